"""lm-eval loglikelihood throughput: our ``internlm_kernels`` adapter beside lm-eval's own ``hf`` model, on the same
exported checkpoint and the same requests, in the same run.

Checkpoint: the ``tiny`` preset (4 layers, hidden 256, vocabulary 272 of the byte tokenizer; random weights, the
figure does not depend on them) exported in the Llama layout with its transformers tokenizer; float32 on CPU,
bfloat16 on GPU. Requests: the shipped tasks' loglikelihood work — every (question, choice) of ``ik_choice``
(100 questions x 4 choices, contexts shared by the 4 choices) and the rolling windows of ``ik_heldout`` (40
documents) — built by lm-eval's own task code. Figure: scored tokens (context + continuation of each request,
every window's tokens) per second of one whole ``loglikelihood`` + ``loglikelihood_rolling`` call, median of
interleaved rounds (the order flips every round, so load from other processes falls on both alike). hf runs with
batch_size 32 (padded batches, its logits cache on), ours with its default packing (8192 tokens per forward).
On CPU both run with one torch thread (this machine is shared; two threads spin-wait on each other). The goal
(issue 25): >= 2x hf on CPU.
"""
from __future__ import annotations

import os

import pytest
import torch
from common import OURS, card_name, device, record, time_ms_interleaved

pytest.importorskip("lm_eval")

from models import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from train.data.tokenizer import ByteTokenizer, save_hf_tokenizer  # noqa: E402

ON_GPU = torch.cuda.is_available()
TASKS_DIR = os.path.join(os.path.dirname(__file__), "..", "train", "eval", "tasks")
IMPLS = [OURS, "lm-eval hf"]
_CACHE: dict = {}


def _setup(tmp_path_factory):
    """The export, both models and the requests, built once for both parametrizations."""
    if _CACHE:
        return _CACHE
    if not ON_GPU:
        torch.set_num_threads(1)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from train.eval.lm_adapter import InternLMKernelsLM

    tok = ByteTokenizer()
    config = InternLM2Config.preset("tiny")
    config = type(config)(**{**config.__dict__, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config)
    path = tmp_path_factory.mktemp("bench_lm_eval") / "model"
    model.save_pretrained(path, layout="llama")
    save_hf_tokenizer(tok, path)
    dtype = "bfloat16" if ON_GPU else "float32"
    dev = str(device())
    lms = {OURS: InternLMKernelsLM(pretrained=str(path), device=dev, dtype=dtype),
           "lm-eval hf": HFLM(pretrained=str(path), device=dev, dtype=dtype, batch_size=32)}
    tasks = get_task_dict(["ik_choice", "ik_heldout"], TaskManager(include_path=TASKS_DIR, include_defaults=False))
    requests: dict[str, list] = {"loglikelihood": [], "loglikelihood_rolling": []}
    for task in tasks.values():
        task.build_all_requests(rank=0, world_size=1)
        for inst in task.instances:
            requests[inst.request_type].append(inst)
    tokens = sum(len(tok.encode(c + k, add_bos=True)) for c, k in (r.args for r in requests["loglikelihood"]))
    tokens += sum(len(tok.encode(r.args[0])) for r in requests["loglikelihood_rolling"])
    _CACHE.update(lms=lms, requests=requests, tokens=tokens)
    return _CACHE


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_eval_loglikelihood_tokens_per_s(benchmark, tmp_path_factory, impl):
    s = _setup(tmp_path_factory)

    def run(lm):
        return lambda: (lm.loglikelihood(s["requests"]["loglikelihood"], disable_tqdm=True),
                        lm.loglikelihood_rolling(s["requests"]["loglikelihood_rolling"], disable_tqdm=True))

    if "ms" not in s:   # both measured together, alternating, on the first parametrization
        s["ms"] = time_ms_interleaved({name: run(lm) for name, lm in s["lms"].items()}, warmup=1, reps=3)
    group = f"lm-eval loglikelihood ik_choice+ik_heldout tiny {'bf16' if ON_GPU else 'fp32'}"
    value = record(benchmark, run(s["lms"][impl]), group=group, impl=impl, metric="tokens/s", work=s["tokens"],
                   unit_scale=1.0, ms=s["ms"][impl], requests=sum(map(len, s["requests"].values())))
    print(f"\n{impl}: {value:,.0f} tokens/s ({s['ms'][impl]:.0f} ms per pass) on {card_name()}")
