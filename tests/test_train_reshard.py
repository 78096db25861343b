"""Checkpoints across world sizes: saved by 2 gloo ranks and resumed by 1, and the other way round, with the
same following losses as an uninterrupted run (torch.distributed.checkpoint reshards model and optimizer)."""
from __future__ import annotations

import os

from distributed_harness import run_torchrun

from train.checkpoint import latest_checkpoint, load_trainer_state, read_saved_state
from train.config import parse_cli
from train.metrics import read_jsonl
from train.stages.pretrain import run_pretraining

# 2 rows per step of 1 row per micro-batch: one rank accumulates the two rows, two ranks take one each, and DDP's
# all-reduce of two gradients adds them in the same order as accumulation does, so the losses match bit for bit.
ARGS = ["--run.threads=1", "--metrics.progress=false", "--metrics.plots=false", "--eval.passkey=false",
        "--data.heldout_docs=4", "--optim.warmup_steps=1", "--model.overrides.hidden_size=32",
        "--model.overrides.intermediate_size=64", "--model.overrides.num_hidden_layers=1",
        "--model.overrides.num_attention_heads=2", "--model.overrides.num_key_value_heads=1",
        "--stages.0.steps=4", "--stages.0.seq_len=64", "--stages.0.global_batch_tokens=128",
        "--stages.0.micro_batch_tokens=64"]


def _args(tmp_path, name, *extra):
    return ["--run.output_dir", str(tmp_path), f"--run.name={name}", *ARGS, *extra]


def _torchrun(args):
    run_torchrun("train.stages.pretrain", args)


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def test_one_rank_to_two_ranks_to_one_rank(tmp_path):
    """1 rank trains steps 1-2 and saves; 2 ranks resume, train step 3 and save; 1 rank resumes and finishes.
    Every loss equals the uninterrupted single-process run's."""
    expected = _losses(run_pretraining(parse_cli(_args(tmp_path, "full"))).run_dir)
    assert len(expected) == 4
    first = run_pretraining(parse_cli(_args(tmp_path, "r", "--run.stop_at_step=2")))
    moments = read_saved_state(first.checkpoint)["optimizer"]["state"]
    assert moments and all(s["exp_avg"].abs().sum() > 0 for s in moments.values())
    _torchrun(_args(tmp_path, "r", "--resume", "--run.stop_at_step=3"))
    saved = latest_checkpoint(os.path.join(tmp_path, "r"))
    assert load_trainer_state(saved)["global_step"] == 3
    assert sorted(f for f in os.listdir(os.path.join(saved, "state")) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]                                      # both ranks wrote a part
    resumed = run_pretraining(parse_cli(_args(tmp_path, "r", "--resume")))
    assert resumed.finished
    assert _losses(resumed.run_dir) == expected                               # bit for bit
