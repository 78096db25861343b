"""The trainer's sharded [parallel] modes under torchrun (2 gloo ranks): the same losses as one process, a
checkpoint of 2 ZeRO-2 ranks resumed by 1 process, the HF export of a sharded run, config errors."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from distributed_harness import run_torchrun

from train.checkpoint import list_checkpoints
from train.config import ConfigError, load_config
from train.metrics import read_jsonl
from train.stages.pretrain import run_pretraining

OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
COMMON = {"run.threads": 1, "metrics.progress": False, "metrics.plots": False, "eval.passkey": False,
          "data.heldout_docs": 4, "optim.warmup_steps": 1, "checkpoint.every": 2, "checkpoint.keep_last": 2}
STAGE = {"steps": 4, "seq_len": 64, "global_batch_tokens": 256, "micro_batch_tokens": 64}   # 2 micro-steps/rank


def torchrun(tmp_path, name: str, mode: str, *extra: str, ranks: int = 2) -> str:
    args = [f"--run.output_dir={tmp_path}", f"--run.name={name}", f"--parallel.mode={mode}"]
    args += [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in COMMON.items()]
    args += [f"--model.overrides.{k}={v}" for k, v in OVERRIDES.items()]
    args += [f"--stages.0.{k}={v}" for k, v in STAGE.items()]
    args += extra       # last: they override the common keys
    run_torchrun("train.stages.pretrain", args, ranks)
    return os.path.join(tmp_path, name)


def single_process(tmp_path, name: str, **extra):
    return run_pretraining(load_config(None, {"run.output_dir": str(tmp_path), "run.name": name, **COMMON,
                                              "model.overrides": OVERRIDES, "stages": [STAGE], **extra}))


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def _close(got, want) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_process(tmp_path_factory.mktemp("single"), "single")


TP2 = ("--parallel.tp=2",)
# 8 ranks = tp 2 x shard 2 x replicate 2: HSDP + TP, and hybrid ZeRO-2 + TP (shard within 2, all-reduce across 2).
SHARD2 = ("--parallel.shard_size=2",)
# The passkey probe after the run: rank 0 alone generates, from the HF export when the model is sharded.
PASSKEY = ("--eval.passkey=true", "--eval.passkey_lengths=[256]", "--eval.passkey_depths=[0.5]",
           "--eval.passkey_trials=1")


@pytest.mark.parametrize("mode, extra, ranks", [("zero2", (), 2), ("fsdp", (), 2), ("fsdp", TP2 + PASSKEY, 2),
                                                ("fsdp", TP2, 4), ("ddp", TP2, 4), ("zero1", TP2, 4),
                                                ("fsdp", TP2 + SHARD2, 8), ("zero2", TP2 + SHARD2, 8)],
                         ids=["zero2", "fsdp", "tp2", "fsdp_tp2_dp2", "ddp_tp2_dp2", "zero1_tp2_dp2",
                              "hsdp_tp2_shard2_rep2", "zero2_tp2_shard2_rep2"])
def test_sharded_mode_matches_single_process_and_exports(tmp_path, single, mode, extra, ranks):
    """tp2: both ranks run every micro-batch (one data-parallel rank), tensor + sequence parallel. *_tp2_dp2: 4
    ranks, tp = 2 inside each of 2 data-parallel groups (FSDP2, replicated, or ZeRO-1 over them: InternEvo's
    layout); the tp peers train on the same micro-batches. *_shard2_rep2: 8 ranks, 4 data-parallel ranks sharding
    within groups of 2 and replicating across the 2 groups (the zero2 one also resumes in one process)."""
    from models import InternLM2ForCausalLM

    run_dir = torchrun(tmp_path, mode, mode, *extra, ranks=ranks)
    want = losses(single.run_dir)
    assert len(want) == 4
    _close(losses(run_dir), want)
    if PASSKEY[0] in extra:
        probes = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "passkey_accuracy" in r]
        assert len(probes) == 1 and list(probes[0]["passkey_accuracy"]) == ["256"]
    exported = InternLM2ForCausalLM.from_pretrained(os.path.join(list_checkpoints(run_dir)[-1], "model"))
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=1e-4, atol=1e-4, msg=name)
    if mode == "zero2" or ranks == 4 and mode != "ddp":
        # 2 (or 2-D 2 x 2) -> 1: drop the last checkpoint and resume from step 2 in one process (plain FusedAdamW).
        shutil.rmtree(list_checkpoints(run_dir)[-1])
        resumed = single_process(tmp_path, mode, **{"checkpoint.resume": True})
        _close(losses(resumed.run_dir), want)


def test_bad_parallel_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(None, {"parallel.mode": "zero2", "parallel.tp": 0})
    with pytest.raises(ConfigError, match="parallel.shard_size"):
        load_config(None, {"parallel.mode": "ddp", "parallel.tp": 2, "parallel.shard_size": 2})
    with pytest.raises(ConfigError, match="parallel.overlap"):
        load_config(None, {"parallel.mode": "fsdp", "parallel.overlap": False})
    from train.parallel import MODES, ParallelDims

    with pytest.raises(ValueError, match="parallel.shard_size"):
        MODES["zero1"].check_dims(ParallelDims("zero1", world=4, shard_size=3))
    with pytest.raises(ValueError, match=r"parallel.shard_size \(3\) must divide the data-parallel size \(4 = world 8 / tp 2\)"):
        MODES["fsdp"].check_dims(ParallelDims("fsdp", world=8, tp=2, shard_size=3))
    with pytest.raises(ValueError, match=r"parallel.tp \(3\) must divide the world size \(4\)"):
        MODES["ddp"].check_dims(ParallelDims("ddp", world=4, tp=3))
