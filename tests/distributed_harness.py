"""Shared by tests/test_distributed_*.py: real gloo ranks in spawned processes, the micro model, its batches and
the single-process reference run every mode is compared with."""
from __future__ import annotations

import datetime
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MICRO = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
STEPS, MICRO_STEPS, TOKENS, LR, CLIP = 5, 2, 33, 1e-2, 0.5   # 33 tokens: TP pads to even


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(module: str, args, ranks: int = 2, timeout: float = 240.0) -> None:
    """``torchrun --standalone --nproc_per_node=ranks -m module *args`` from the repository root, one thread per
    rank; fails with the tail of its stderr. In a session of its own, so that a hang kills torchrun and every
    worker, not torchrun alone."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                             "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on ``world`` gloo ranks; returns each rank's result. A rank that fails raises here
    with its traceback; a hang past ``timeout`` kills every rank."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        try:
            for p in procs:
                p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        finally:
            hung = [p for p in procs if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
        if errors:
            raise AssertionError("a rank failed:\n" + errors[0])
        if hung:
            raise TimeoutError(f"{len(hung)} of {world} ranks still running after {timeout} s (killed)")
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def micro_model(seed: int = 0):
    from models import InternLM2Config, InternLM2ForCausalLM

    torch.manual_seed(seed)
    return InternLM2ForCausalLM(InternLM2Config(**MICRO))


def batches(step: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``n`` micro-batches (input_ids (T,), cu_seqlens) of a global step: two documents each, fixed by step."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n):
        ids = torch.randint(0, MICRO["vocab_size"], (TOKENS,), generator=g)
        cut = int(torch.randint(4, TOKENS - 4, (1,), generator=g))
        out.append((ids, torch.tensor([0, cut, TOKENS], dtype=torch.int32)))
    return out


def n_targets(batch) -> int:
    return TOKENS - (len(batch[1]) - 1)


def rank_batches(step: int, rank: int, world: int):
    """This rank's micro-batches of a step, and the number of target tokens of the whole global batch."""
    every = batches(step, world * MICRO_STEPS)
    return every[rank * MICRO_STEPS:(rank + 1) * MICRO_STEPS], sum(n_targets(b) for b in every)


def _reference_step(model, opt, step: int, world: int) -> float:
    import internlm_kernels as ik

    every = batches(step, world * MICRO_STEPS)
    total = sum(n_targets(b) for b in every)
    loss_sum = 0.0
    for ids, cu in every:
        loss = model(ids, cu, labels=ids, loss_reduction="sum").loss
        (loss / total).backward()
        loss_sum += float(loss.detach())
    ik.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad()
    return loss_sum / total


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_run(world: int, seed: int = 0, checkpoint: str | None = None):
    """One process trains on every rank's micro-batches: FusedAdamW, clipping, accumulation. (losses, params).
    With ``checkpoint`` it also saves model and optimizer there through DCP after STEPS steps, then trains one
    more step: ((losses, params), saved optimizer state, (loss of step STEPS, params after it))."""
    import internlm_kernels as ik

    model = micro_model(seed)
    opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = [_reference_step(model, opt, step, world) for step in range(STEPS)]
    if checkpoint is None:
        return losses, _params(model)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    params = _params(model)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=checkpoint)
    osd = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in osd["state"].items()}}
    return (losses, params), osd, (_reference_step(model, opt, STEPS, world), _params(model))


def global_loss(local_sum: float) -> float:
    t = torch.tensor([local_sum], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


@functools.cache
def float64_oracle(world: int, steps: int = STEPS, seed: int = 0) -> dict:
    """The parameters of ``reference_run``'s training (``steps`` steps) computed in float64: the same function
    through transformers' LlamaForCausalLM (our checkpoint's export layout; each document its own sequence) with
    torch's ``clip_grad_norm_`` and ``AdamW``, so the exact result up to float64 rounding. InternLM2 names."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.checkpoint import from_llama_state_dict, llama_config_dict, to_llama_state_dict

    ours = micro_model(seed)
    # No pad token: Llama's embedding would drop the pad row's gradient, and these batches draw every id.
    hf = LlamaForCausalLM(LlamaConfig(**{**llama_config_dict(ours.config), "pad_token_id": None}))
    hf.load_state_dict(to_llama_state_dict(ours.state_dict(), ours.config))
    hf.double().config._attn_implementation = "eager"
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.1)
    for step in range(steps):
        every = batches(step, world * MICRO_STEPS)
        total = sum(n_targets(b) for b in every)
        for ids, cu in every:
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                doc = ids[a:b]
                loss = F.cross_entropy(hf(doc[None]).logits[0, :-1], doc[1:], reduction="sum")
                (loss / total).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in from_llama_state_dict(hf.state_dict(), ours.config).items()}


def assert_close_run(got, want, oracle: dict, steps: int = STEPS, rtol: float = 1e-5) -> None:
    """``got`` (losses, params) of a distributed run against ``want``, the single-process float32 run of the same
    ``steps`` training steps, and ``oracle``, its float64 parameters (``float64_oracle``)."""
    (got_losses, got_params), (want_losses, want_params) = got, want
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=rtol, atol=0)
    assert got_params.keys() == want_params.keys() == oracle.keys()
    for k in want_params:
        got, want, exact = got_params[k].double(), want_params[k].double(), oracle[k]
        # Element-wise: Adam's first steps move an element by ~lr whatever the size of its gradient, so an element
        # whose gradient is float noise (another reduction order) can differ by a fraction of lr: within lr / 100
        # (+ 1e-4 relative) of the exact value, plus twice the float32 reference's own distance from it at that
        # element (under AVX2-only GEMMs the reference had an element of wo ~1e-4 from it, the tp x dp runs too).
        bound = LR / 100 + 1e-4 * exact.abs() + 2 * (want - exact).abs()
        over = (got - exact).abs() > bound
        assert not over.any(), f"{k}: {int(over.sum())} of {over.numel()} elements farther from the float64 " \
            f"oracle than lr/100 plus twice the float32 reference's distance, worst {float(((got - exact).abs() - bound).max()):.3g} over"
        # On average no farther from the exact (float64) training than twice the float32 single-process run is
        # (flash-attn's test criterion), plus one float32 rounding (unit roundoff 2^-24) of the parameter and of its
        # ~lr update per step: a floor for a tensor that the reference happens to get almost exact. Float32
        # rounding alone moves the reference's tensors by 1e-8 to 7e-7 on average over these steps, so two float32
        # runs that sum in different orders (ranks, GEMM kernels) differ by about that much again; a wrong gradient
        # or step (a lost micro-batch, a scale) moves them by orders of magnitude more.
        got_err, want_err = (got - exact).abs().mean(), (want - exact).abs().mean()
        floor = steps * 2.0 ** -24 * (exact.abs().mean() + LR)
        assert got_err <= 2 * want_err + floor, \
            f"{k}: mean |error| {float(got_err):.3g}, float32 reference {float(want_err):.3g}, floor {float(floor):.3g}"
