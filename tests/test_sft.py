"""SFT: packed conversations (never cut, over-long ones counted), the packed loss, the long-context mix,
tool-call validity."""
import dataclasses
import json

import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from train.data.chat import CALCULATOR, Conversation, Message, SyntheticChats, plugin_call, plugin_declaration
from train.data.corpus import SyntheticCorpus
from train.data.items import ItemBatches
from train.data.sft_items import KIND_PRETRAIN, SFTItems
from train.data.tokenizer import ByteTokenizer
from train.eval.chat import chat_eval, declared_tools, valid_plugin_call


def micro_model(vocab=272, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=vocab, max_position_embeddings=1024)
    return InternLM2ForCausalLM(cfg).eval()


def test_packed_sft_loss_equals_per_conversation_loss():
    tok = ByteTokenizer()
    items = SFTItems(SyntheticChats(seed=4), tok)
    batch = ItemBatches(items, micro_batch_tokens=1400, max_seq_len=700).next_micro_batch()
    n = batch.cu_seqlens.numel() - 1
    assert n >= 3
    model = micro_model()
    with torch.no_grad():
        packed = model(batch.input_ids, batch.cu_seqlens, labels=batch.labels, loss_reduction="sum").loss
        total, targets = torch.zeros((), dtype=torch.float64), 0
        for k in range(n):
            ids, labels = items(k).sequences[0]
            assert batch.input_ids[int(batch.cu_seqlens[k]):int(batch.cu_seqlens[k + 1])].tolist() == ids
            ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
            alone = model(ids_t, labels=labels_t, loss_reduction="sum").loss.double()
            # the same loss by hand: cross-entropy of each labelled next token, logits of this conversation alone
            logits = model(ids_t, return_logits=True).logits.double()
            mask = labels_t[1:] != -100
            by_hand = torch.nn.functional.cross_entropy(logits[:-1][mask], labels_t[1:][mask], reduction="sum")
            torch.testing.assert_close(alone, by_hand, rtol=1e-5, atol=1e-5)
            total += alone
            targets += int(mask.sum())
    assert batch.num_targets == targets
    torch.testing.assert_close(packed.double(), total, rtol=1e-5, atol=1e-4)


def test_conversations_never_cut_and_overlong_rules_counted():
    tok = ByteTokenizer()
    items = SFTItems(SyntheticChats(seed=0), tok)
    lengths = [len(items(i).sequences[0][0]) for i in range(120)]
    limit = sorted(lengths)[len(lengths) // 2]      # about half the conversations are over-long

    def run(rule):
        stream = ItemBatches(items, micro_batch_tokens=4 * limit, max_seq_len=limit, overlong=rule)
        seen = []
        while stream.next_item < 60:
            b = stream.next_micro_batch()
            assert int(b.cu_seqlens[-1]) <= 4 * limit
            seen += (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        return stream, seen

    dropped, kept = run("drop")
    assert dropped.dropped == sum(n > limit for n in lengths[:dropped.next_item]) > 0 and dropped.truncated == 0
    assert kept == [n for n in lengths[:dropped.next_item] if n <= limit]       # whole, in order
    truncated, cut = run("truncate")
    assert truncated.truncated == sum(n > limit for n in lengths[:truncated.next_item]) > 0
    assert truncated.dropped == 0
    assert cut == [min(n, limit) for n in lengths[:truncated.next_item]]
    with pytest.raises(ValueError, match="sft.overlong"):
        ItemBatches(items, 100, 50, overlong="wrap", where="sft")


def test_long_context_mix_interleaves_pretraining_documents():
    tok = ByteTokenizer()
    corpus = SyntheticCorpus(seed=0, mix={"passkey": 1.0}, passkey_chars=(300, 400))
    items = SFTItems(SyntheticChats(seed=0), tok, long_context_mix=0.3, documents=corpus.__getitem__, seed=1)
    kinds = [items(i).group for i in range(300)]
    assert 0.2 < kinds.count(KIND_PRETRAIN) / 300 < 0.4
    i = kinds.index(KIND_PRETRAIN)
    ids, labels = items(i).sequences[0]
    assert ids == labels == tok.encode(corpus[i], add_bos=True, add_eos=True)      # every token learned
    assert [items(k).group for k in range(300)] == kinds                           # deterministic per index
    with pytest.raises(ValueError, match="long_context_mix"):
        SFTItems(SyntheticChats(), tok, long_context_mix=1.0, documents=corpus.__getitem__)
    with pytest.raises(ValueError, match="needs a source"):
        SFTItems(SyntheticChats(), tok, long_context_mix=0.1)


def test_tool_call_validity():
    msgs = [plugin_declaration([CALCULATOR]), Message("user", "Use the calculator: 3 * 4")]
    tools = declared_tools(msgs)
    good = plugin_call("calculator", {"expression": "3 * 4"})
    assert valid_plugin_call(good, tools) and valid_plugin_call("Sure." + good, tools)
    bad = [plugin_call("abacus", {"expression": "3 * 4"}),                     # undeclared tool
           plugin_call("calculator", {"expr": "3 * 4"}),                       # required key missing
           good.replace('"expression"', "expression"),                        # not JSON
           good[:-len("<|action_end|>")],                                      # unterminated
           good.replace("<|plugin|>", "<|interpreter|>"),
           "3 * 4 = 12"]
    assert not any(valid_plugin_call(b, tools) for b in bad)
    payload = json.dumps({"name": "calculator", "parameters": {"expression": "1"}, "extra": 1})
    assert not valid_plugin_call(f"<|action_start|><|plugin|>\n{payload}<|action_end|>", tools)


def test_chat_eval_on_an_untrained_model():
    held = [SyntheticChats(seed=0, split="heldout")[i] for i in range(8)]
    held.append(Conversation([Message("user", "hi"), Message("assistant", "hi")], "echo", "hi"))
    result = chat_eval(micro_model(), ByteTokenizer(), held, max_new_tokens=4)
    assert result["by_task"]["echo"] == (0, 1) and sum(t for _, t in result["by_task"].values()) == 9
    assert 0.0 <= result["exact_match"] < 0.5
    if any(c.task in ("calculator", "lookup") for c in held):
        assert result["tool_call_valid"] == 0.0 and result["examples"][0]["reference"].startswith("<|action_start|>")


# ---- the stage on the Trainer ----------------------------------------------------------------------------------
def _sft_args(tmp_path, name, init_from, *extra):
    return ["--config", "configs/sft_tiny.toml", f"--run.name={name}", f"--run.output_dir={tmp_path}",
            "--model.preset=micro", "--model.overrides={max_position_embeddings = 1024}",
            f"--sft.init_from={init_from}", "--sft.heldout=4", "--sft.eval_max_new_tokens=3",
            "--sft.long_context_mix=0.2", "--stages.0.steps=4", "--stages.0.seq_len=512",
            "--stages.0.micro_batch_tokens=512", "--stages.0.global_batch_tokens=1024",
            "--stages.0.passkey_min_chars=100", "--stages.0.passkey_max_chars=300",
            "--optim.warmup_steps=1", "--metrics.progress=false", *extra]


def _sft_cfg(tmp_path, name, init_from, *extra):
    from train.stages.align_config import parse_sft_cli

    return parse_sft_cli(_sft_args(tmp_path, name, init_from, *extra))


def _records(path, kind):
    from train.metrics import read_jsonl

    return [{k: v for k, v in r.items() if k not in ("window_time_s", "tokens_per_s")}
            for r in read_jsonl(path) if r["kind"] == kind]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint on disk (transformers' Llama layout, as the pretraining stage exports)."""
    path = tmp_path_factory.mktemp("pre") / "model"
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272, max_position_embeddings=1024)
    torch.manual_seed(1)
    InternLM2ForCausalLM(cfg).save_pretrained(path, layout="llama")
    return str(path)


def test_sft_stage_starts_from_pretraining_exports_and_resumes_exactly(tmp_path, pretrained):
    from transformers import LlamaForCausalLM

    from train.data.chat import render
    from train.stages.sft import conversations, heldout_assistant_loss, run_sft

    full = run_sft(_sft_cfg(tmp_path, "full", pretrained))
    assert full.finished and full.init_from == pretrained
    train_recs = _records(full.metrics_path, "train")
    assert len(train_recs) == 4 and all(r["tokens_per_s"] > 0 for r in _records(full.metrics_path, "train")
                                        if "tokens_per_s" in r)
    # the first evaluation is the pretraining checkpoint's own held-out assistant loss
    cfg = _sft_cfg(tmp_path, "full", pretrained)
    _, held = conversations(cfg)
    items = [SFTItems(held, ByteTokenizer())(i) for i in range(len(held))]
    init = _records(full.metrics_path, "eval")[0]
    start = InternLM2ForCausalLM.from_pretrained(pretrained)
    start.set_rope_theta(cfg.stages[0].rope_theta)             # the stage's RoPE base applies to the loaded model
    expected = heldout_assistant_loss(start, items, torch.device("cpu"), 8192)
    assert init["stage"] == "init" and init["heldout_loss"] == pytest.approx(expected, rel=1e-5)
    data = _records(full.metrics_path, "data")[-1]
    assert data["items"] > 0 and data["dropped"] + data["truncated"] >= 0

    # the export loads in transformers and computes our logits
    export = tmp_path / "full" / "checkpoints" / "step_00000004" / "model"
    hf = LlamaForCausalLM.from_pretrained(str(export)).eval()
    ids = torch.tensor(ByteTokenizer().encode(render(held[0].messages)))
    with torch.no_grad():
        ours = full.model.eval()(ids, return_logits=True).logits
        theirs = hf(ids[None]).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # stop after step 2, resume: the same losses, gradient norms, evaluations and data counters
    cut = run_sft(_sft_cfg(tmp_path, "cut", pretrained, "--run.stop_at_step=2"))
    assert not cut.finished
    resumed = run_sft(_sft_cfg(tmp_path, "cut", pretrained, "--resume"))
    assert resumed.finished
    assert _records(resumed.metrics_path, "train") == train_recs
    assert _records(resumed.metrics_path, "eval") == _records(full.metrics_path, "eval")
    assert _records(resumed.metrics_path, "data")[-1] == data

    from train.pipeline.align import sft_section
    summary = {"sft": {"exact_match_before": 0.0, "exact_match_after": 0.7, "tool_call_exact_after": 0.5}}
    report = "\n".join(sft_section(resumed, {}, summary))
    assert "| exact match, all |" in report and "| tool-call format valid |" in report
    assert report.count("**not met**") == 1 and "tool call exactly right (name and arguments) 50.0%" in report
    assert "<|action_start|><|plugin|>" in report      # the example conversation with a tool call


def test_sft_config_errors(tmp_path, pretrained):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="sft.init_from: .* neither a model directory nor a run directory"):
        from train.stages.align_config import resolve_init
        resolve_init(str(tmp_path), "sft.init_from")
    with pytest.raises(ConfigError, match="sft.long_context_mix"):
        _sft_cfg(tmp_path, "x", pretrained, "--sft.long_context_mix=1.5")
    with pytest.raises(ConfigError, match="micro_batch_tokens .* must be a multiple of seq_len"):
        _sft_cfg(tmp_path, "x", pretrained, "--stages.0.seq_len=1024", "--stages.0.micro_batch_tokens=512",
                 "--stages.0.global_batch_tokens=1024")
    with pytest.raises(ConfigError, match="sft.conversations"):
        _sft_cfg(tmp_path, "x", pretrained, "--sft.conversations=/nonexistent.jsonl")


def test_sft_reads_openai_jsonl_with_a_heldout_split(tmp_path, pretrained):
    from train.stages.sft import conversations

    path = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    train, held = conversations(_sft_cfg(tmp_path, "j", pretrained, f"--sft.conversations={path}", "--sft.heldout=2"))
    assert [c.messages[-1].content for c in held] == ["a0", "a1"]
    assert [c.messages[-1].content for c in train] == ["a2", "a3", "a4"]


# ---- data parallelism -------------------------------------------------------------------------------------------
def test_sft_data_splits_over_data_parallel_ranks_not_tp_ranks(tmp_path, pretrained):
    """world 4 = tp 2 x dp 2: the tp peers (ranks 0, 1 and 2, 3) get the same micro-batches, the two data-parallel
    groups together exactly the micro-batches one process takes in a step."""
    from train.parallel import ParallelDims
    from train.stages.sft import conversations, sft_batches

    cfg = _sft_cfg(tmp_path, "split", pretrained, "--sft.long_context_mix=0")
    items = SFTItems(conversations(cfg)[0], ByteTokenizer())
    one = sft_batches(cfg, items, ParallelDims())
    ranks = [sft_batches(cfg, items, ParallelDims("fsdp", world=4, rank=r, tp=2)) for r in range(4)]
    for _ in range(2):
        want = one.next_step()
        got = [b.next_step() for b in ranks]
        assert len(want) == 2 and all(len(g) == 1 for g in got)
        for rank, (mine,) in enumerate(got):
            torch.testing.assert_close(mine.input_ids, want[rank // 2].input_ids, rtol=0, atol=0)
            torch.testing.assert_close(mine.cu_seqlens, want[rank // 2].cu_seqlens, rtol=0, atol=0)
    assert all(b.state_dict() == one.state_dict() for b in ranks)


TORCHRUN_EXTRA = ("--sft.long_context_mix=0", "--stages.0.steps=3", "--run.threads=1", "--metrics.plots=false")


@pytest.fixture(scope="module")
def sft_one_process(tmp_path_factory, pretrained):
    from train.stages.sft import run_sft

    return run_sft(_sft_cfg(tmp_path_factory.mktemp("sft_one"), "one", pretrained, *TORCHRUN_EXTRA))


@pytest.mark.parametrize("extra, ranks", [((), 2), (("--parallel.tp=2",), 2),
                                          (("--parallel.tp=2", "--parallel.mode=zero1"), 4)],
                         ids=["dp2", "tp2", "tp2_dp2_zero1"])
def test_sft_under_torchrun_equals_one_process(tmp_path, pretrained, sft_one_process, extra, ranks):
    """torchrun on gloo ranks. dp2 (DDP): each rank takes one of the step's two micro-batches. tp2: both ranks run
    both micro-batches tensor + sequence parallel, the evaluation's held-out loss is a collective forward and its
    replies are generated on the gathered full model. tp2_dp2_zero1: 4 ranks, tp 2 inside each of 2 ZeRO-1
    data-parallel groups (the held-out forward also finishes ZeRO's parameter all-gathers before the gather).
    The losses are those of one process accumulating both micro-batches, the evaluations (before and after
    training) the same."""
    import os

    from distributed_harness import run_torchrun

    run_torchrun("train.stages.sft", _sft_args(tmp_path, "two", pretrained, *TORCHRUN_EXTRA, *extra), ranks)
    two = os.path.join(tmp_path, "two", "metrics.jsonl")
    want = [r["loss"] for r in _records(sft_one_process.metrics_path, "train")]
    assert len(want) == 3
    torch.testing.assert_close(torch.tensor([r["loss"] for r in _records(two, "train")]), torch.tensor(want),
                               rtol=1e-5, atol=0)
    got_evals, want_evals = _records(two, "eval"), _records(sft_one_process.metrics_path, "eval")
    assert [e["stage"] for e in got_evals] == ["init", "sft"]
    for got, want in zip(got_evals, want_evals):
        assert got.pop("heldout_loss") == pytest.approx(want.pop("heldout_loss"), rel=1e-5)
        assert got == want          # exact match per task, tool-call validity: the same replies
