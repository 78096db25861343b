"""lm-eval adapter (train/eval/lm_adapter.py) against lm-eval's own ``hf`` model on the same exported micro
checkpoint: per-request log-likelihoods, rolling perplexity sums and greedy strings; rolling windows; the shared-
context packing against the unshared one and against a direct forward; bad --model_args."""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from models import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from train.data.tokenizer import BYTE_OFFSET, ByteTokenizer, save_hf_tokenizer  # noqa: E402
from train.eval.lm_adapter import InternLMKernelsLM, rolling_windows, score_requests  # noqa: E402

MAX_LEN = 96
# fp32 end to end on both sides; the sums run over up to ~100 tokens of log-softmax values around -5, so float32
# rounding (~1e-7 relative per op) leaves differences around 1e-5: 1e-4 is the bound with margin.
TOL = 1e-4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random micro model in the Llama export layout with the byte tokenizer's transformers files. The output
    rows of every id but printable ASCII are zero, so greedy generations are printable text (the comparison of
    strings then compares tokens, not U+FFFD replacements of stray bytes); init std 0.15 makes the argmax clear."""
    torch.manual_seed(0)
    cfg = InternLM2Config(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                          initializer_range=0.15)
    model = InternLM2ForCausalLM(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        keep = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        keep[BYTE_OFFSET + 0x20:BYTE_OFFSET + 0x7F] = True
        keep[BYTE_OFFSET + ord("\n")] = True
        model.output.weight[~keep] = 0.0
    path = tmp_path_factory.mktemp("micro") / "model"
    model.save_pretrained(path, layout="llama")
    save_hf_tokenizer(ByteTokenizer(), path)
    return str(path)


@pytest.fixture(scope="module")
def ours(export):
    return InternLMKernelsLM(pretrained=export, device="cpu", batch_tokens=256)


@pytest.fixture(scope="module")
def hf(export):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=export, device="cpu", batch_size=4, dtype="float32")


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


CONTEXTS = ["Question: 2 + 3 =", "东京 is a city in Japan. It is", "", "long " * 30, "<|im_start|>user\nhi<|im_end|>\n"]
CONTINUATIONS = [" 5", " six", " 中文", "x", "y" * 25]


def test_loglikelihood_equals_hf(ours, hf):
    reqs = _instances("loglikelihood", [(c, k) for c in CONTEXTS for k in CONTINUATIONS])
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert len(a) == len(b) == len(reqs)
    for (req, x, y) in zip(reqs, a, b):
        assert math.isfinite(x[0]) and abs(x[0] - y[0]) < TOL, (req.args, x, y)
        assert x[1] == y[1], req.args


def test_loglikelihood_rolling_equals_hf(export, ours):
    from lm_eval.models.huggingface import HFLM

    # hf encodes the text with its add_bos_token setting; without <s> it scores exactly our windows. Its logits
    # cache is off: with it, a window whose input equals another's (periodic text, as the first one here) is
    # scored on the other window's continuation rows (lm-eval 0.4.13), which our adapter does not copy.
    hf_plain = HFLM(pretrained=export, device="cpu", batch_size=4, dtype="float32", add_bos_token=False,
                    logits_cache=False)
    texts = ["hello world " * 25, "短文本", "a" * 250, "x"]
    reqs = _instances("loglikelihood_rolling", [(t,) for t in texts])
    for x, y in zip(ours.loglikelihood_rolling(reqs), hf_plain.loglikelihood_rolling(reqs)):
        assert abs(x - y) < TOL * (1 + abs(y) / 100)   # sums over up to 300 tokens


def test_generate_until_equals_hf(ours, hf):
    prompts = ["Question: 2 + 3 =", "The sky is", "东京", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    untils = (["\n"], [".", "e"], ["<|im_end|>"])
    args = [(p, {"until": untils[i % 3], "max_gen_toks": 10, "do_sample": False}) for i, p in enumerate(prompts)]
    args.append((prompts[0], {"until": ["e"], "max_gen_toks": 10, "do_sample": False}))
    reqs = _instances("generate_until", args)
    a, b = ours.generate_until(reqs), hf.generate_until(reqs)
    assert a == b
    assert any(len(s) >= 3 for s in a)   # real generations, not all empty


def test_rolling_windows_cover_every_token_once():
    ids = list(range(10, 10 + 237))
    for max_length in (1, 7, 64, 300):
        windows = rolling_windows(ids, prefix=1, max_length=max_length)
        assert [t for _, cont in windows for t in cont] == ids
        seen = [1] + ids
        pos = 0
        for ctx, cont in windows:
            assert 1 <= len(ctx) + len(cont) <= max_length + 1
            assert ctx + cont == seen[pos + 1 - len(ctx):pos + 1 + len(cont)]   # context: the preceding tokens
            pos += len(cont)


def test_shared_contexts_equal_direct_forward(ours):
    """The shared-context packing against a plain forward of each whole sequence (log_softmax of the logits)."""
    tok, model = ours.tok, ours.model
    ctx = tok.encode("Q: Where does Kalo live? A:", add_bos=True)
    conts = [tok.encode(c) for c in (" Vesk.", " Ormel.", " T", " Quillon and more")]
    reqs = [(ctx, c) for c in conts] + [(ctx[:5], conts[0]), (tok.encode("z" * 120), tok.encode("end"))]
    shared = score_requests(model, reqs, MAX_LEN, torch.device("cpu"), batch_tokens=64)
    plain = score_requests(model, reqs, MAX_LEN, torch.device("cpu"), share_contexts=False)
    with torch.no_grad():
        for (c, k), s, p in zip(reqs, shared, plain):
            seq = (c + k)[-(MAX_LEN + 1):]
            logits = model(torch.tensor(seq[:-1])).logits.float()
            logp = torch.log_softmax(logits[-len(k):], -1).gather(1, torch.tensor(k)[:, None]).sum().item()
            greedy = bool((logits[-len(k):].argmax(-1) == torch.tensor(k)).all())
            assert abs(s[0] - logp) < TOL and abs(p[0] - logp) < TOL and s[1] == p[1] == greedy
    for bad in ([([], conts[0])], [(ctx, [])]):
        with pytest.raises(ValueError, match="empty"):
            score_requests(model, bad, MAX_LEN, torch.device("cpu"))


def test_simple_evaluate_on_shipped_task_equals_hf(ours, hf):
    """A shipped multiple-choice task through lm-eval's own evaluator: identical accuracies."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=os.path.join(os.path.dirname(__file__), "..", "train", "eval", "tasks"),
                        include_defaults=False)
    res = [lm_eval.simple_evaluate(model=m, tasks=["ik_choice"], limit=8, task_manager=tasks)["results"]["ik_choice"]
           for m in (ours, hf)]
    assert res[0]["acc,none"] == res[1]["acc,none"] and res[0]["acc_norm,none"] == res[1]["acc_norm,none"]


@pytest.mark.parametrize("args, key", [("bogus=1", "bogus"), ("dtype=int8", "dtype"), ("max_length=0", "max_length"),
                                       ("share_contexts=maybe", "share_contexts"), ("threads=0", "threads")])
def test_bad_model_args_name_the_key(export, args, key):
    cls = get_model("internlm_kernels")
    with pytest.raises(ValueError, match=key):
        cls.create_from_arg_string(f"pretrained={export},{args}", {"device": "cpu"})


def test_missing_or_bad_pretrained(tmp_path):
    cls = get_model("internlm_kernels")
    with pytest.raises(ValueError, match="pretrained"):
        cls.create_from_arg_string("dtype=float32", {})
    with pytest.raises(ValueError, match="pretrained"):
        cls.create_from_arg_string(f"pretrained={tmp_path / 'missing'}", {})


def test_cuda_device_falls_back_to_cpu(export, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: cuda:0 is used, not the fallback")
    lm = get_model("internlm_kernels").create_from_arg_string(f"pretrained={export}", {"device": "cuda:0"})
    assert lm.device.type == "cpu" and "CUDA is not available" in capsys.readouterr().err
    assert lm.prefix_token_id == lm.tok.bos_id == 1


def test_registry_keeps_lm_eval_models():
    """Registering ours must not hide lm-eval's own models (its registry imports them only while it is empty), so
    ``python -m train.eval.lm_eval --model hf`` still works. A fresh process: here other tests imported them."""
    import subprocess
    import sys

    code = ("import train.eval.lm_adapter\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('internlm_kernels').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert out.stdout.split() == ["HFLM", "InternLMKernelsLM"], out.stderr[-2000:]
