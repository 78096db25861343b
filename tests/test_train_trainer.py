"""The Trainer with a stage written for this test: its own data (loss-masked documents), loss and metric."""
from __future__ import annotations

import os
import random
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import InternLM2Config, InternLM2ForCausalLM
from train.checkpoint import latest_checkpoint, list_checkpoints
from train.config import CheckpointConfig, MetricsConfig, OptimConfig
from train.data.packing import Document, PackedStream, ShardedBatches
from train.data.tokenizer import ByteTokenizer
from train.metrics import read_jsonl
from train.parallel import Runtime
from train.trainer import Stage, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the stage: "a+b=" -> "c", loss only on the answer tokens, exact-match accuracy of the answer tokens ----
class Sums:
    """Documents ``<s>a+b=c</s>`` whose loss mask keeps only ``c</s>`` (an SFT-style mask)."""

    def __init__(self, tok):
        self.tok = tok

    def iter_from(self, start):
        while True:
            rng = random.Random(start)
            a, b = rng.randrange(100), rng.randrange(100)
            prompt, answer = self.tok.encode(f"{a}+{b}=", add_bos=True), self.tok.encode(str(a + b), add_eos=True)
            yield Document(prompt + answer, [False] * len(prompt) + [True] * len(answer))
            start += 1


def answer_loss(model, batch):
    out = model(batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen, labels=batch.labels,
                loss_reduction="none", return_logits=True)
    targets = torch.full_like(batch.labels, -100)
    targets[:-1] = batch.labels[1:]
    targets[batch.cu_seqlens[1:].long() - 1] = -100
    scored = targets != -100
    correct = (out.logits.argmax(-1) == targets) & scored
    return out.loss.sum(), scored.sum(), {"accuracy": correct.sum()}


def sums_stage(tok, steps):
    return Stage("sums", steps, ShardedBatches(PackedStream(Sums(tok), tok, 32), 4, 2), answer_loss)
# ------------------------------------------------------------------------------------------------------------


def _trainer(run_dir, steps, **checkpoint):
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(InternLM2Config(vocab_size=272, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    stop = checkpoint.pop("stop_at_step", 0)
    return Trainer(model, Runtime(torch.device("cpu"), torch.float32), optim=OptimConfig(lr=1e-2, warmup_steps=1),
                   checkpoint=CheckpointConfig(**checkpoint), metrics=MetricsConfig(progress=False),
                   run_dir=str(run_dir), total_steps=steps, signature=["sums", steps], stop_at_step=stop)


def _records(run_dir):
    return [(r["loss"], r["accuracy"], r["grad_norm"]) for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if r["kind"] == "train"]


def test_custom_stage_trains_checkpoints_and_resumes_exactly(tmp_path):
    tok = ByteTokenizer()
    full = _trainer(tmp_path / "full", 6)
    assert full.train(sums_stage(tok, 6))
    expected = _records(tmp_path / "full")
    assert len(expected) == 6 and all(0.0 <= acc <= 1.0 for _, acc, _ in expected)
    assert expected[-1][0] < expected[0][0]
    # The schedule drives the optimizer (the logged lr is the one the last step used).
    assert full.optimizer.param_groups[0]["lr"] == full.schedule.lr_at(5) == read_jsonl(
        os.path.join(tmp_path, "full", "metrics.jsonl"))[-1]["lr"] < 1e-2

    cut = _trainer(tmp_path / "cut", 6, every=2, stop_at_step=3)
    assert not cut.train(sums_stage(tok, 6))                            # stopped at step 3, checkpoint written
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "cut")] == ["step_00000002", "step_00000003"]
    resumed = _trainer(tmp_path / "cut", 6, every=2, resume=True)
    assert resumed.state.global_step == 3
    assert resumed.train(sums_stage(tok, 6))
    assert _records(tmp_path / "cut") == expected                       # loss, accuracy, grad norm: bit-exact
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    assert os.path.isdir(os.path.join(latest_checkpoint(tmp_path / "cut"), "model"))   # HF export at stage end


class HostReads(TorchDispatchMode):
    """Records where tensor values are read on the host (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` all
    dispatch ``aten._local_scalar_dense``): the innermost frame in this repository's code."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT) and "/.venv/" not in f.filename
                      and not f.filename.startswith(os.path.join(ROOT, "tests"))]
            self.sites.append(f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


def test_steady_state_step_reads_nothing_from_the_device_in_model_or_trainer_code(tmp_path, monkeypatch):
    """Issue 9, item 3, on CPU: no host read of a tensor value comes from train/ or models/ during a step (the
    loss, target counts and grad norm stay tensors until the metrics read every log_every steps). The model's
    input value checks read CPU tensors only (free there); they are switched off here as they are for GPU
    tensors. Reads inside internlm_kernels are the kernels' own checks and work lists."""
    import models.packing

    monkeypatch.setattr(models.packing, "reads_values", lambda t: False)
    trainer = _trainer(tmp_path / "sync", 4)
    trainer.metrics_cfg.log_every = 100
    stage = sums_stage(ByteTokenizer(), 4)
    trainer.step(stage)                                  # first step: optimizer state, caches
    with HostReads() as reads:
        trainer.step(stage)
        trainer.step(stage)
    ours = [s for s in reads.sites if s.startswith(("train/", "models/"))]
    assert not ours, ours
    print("host reads inside internlm_kernels per two steps:", sorted(set(reads.sites)))


@pytest.mark.gpu
def test_steady_state_steps_never_sync_on_gpu(tmp_path):
    """Issue 9, item 3, on a GPU: forward, backward, clip and FusedAdamW steps of the Trainer with bf16 weights and
    fp32 master weights under ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host sync raises. Needs
    the kernels' value checks off (their default without INTERNLM_KERNELS_DEBUG)."""
    torch.manual_seed(0)
    runtime = Runtime(torch.device("cuda"), torch.bfloat16)
    model = InternLM2ForCausalLM(InternLM2Config(vocab_size=272, hidden_size=128, intermediate_size=256,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    trainer = Trainer(model.to("cuda", torch.bfloat16), runtime, optim=OptimConfig(warmup_steps=1),
                      checkpoint=CheckpointConfig(), metrics=MetricsConfig(progress=False, log_every=100),
                      run_dir=str(tmp_path), total_steps=10)
    stage = sums_stage(ByteTokenizer(), 10)
    for _ in range(2):                                   # optimizer state, kernel compilation, caches
        trainer.step(stage)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(stage)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert trainer.state.global_step == 5
