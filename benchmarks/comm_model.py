"""Communication volume, time and memory per optimizer step, per parallel mode: COMPUTED from formulas and
stated bandwidths, not measured. It writes the tables of docs/distributed.md:

    python -m benchmarks.comm_model            (from the repository root)

Volumes are bytes each GPU sends (= receives) in bandwidth-optimal ring/tree collectives over n ranks:
all-reduce 2(n-1)/n·M, reduce-scatter and all-gather (n-1)/n·M, for a tensor of M bytes. Parameters and
gradients move in bf16 (2 B per element). One gradient reduction per optimizer step (no communication on
non-final micro-steps); FSDP gathers parameters on every micro-step (twice with reshard_after_forward).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from models.config import InternLM2Config  # noqa: E402

GB = 1e9
BF16 = 2


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus: int
    gpus_per_node: int
    nvlink_gbs: float        # achievable bus bandwidth inside a node, GB/s per GPU
    ib_gbs: float            # achievable inter-node bandwidth per GPU (node NICs / GPUs per node), GB/s
    peak_tflops: float       # dense bf16 peak per GPU


# InternEvo's InternLM2 runs used A800 nodes (8 GPUs, NVLink 400 GB/s bidirectional, 4 x 200 Gb/s HDR
# InfiniBand per node). Achievable bus bandwidths are assumptions of this model: ~70% of the NVLink one-way
# figure and ~85% of the NIC line rate, shared by the 8 GPUs of a node.
A800_8 = Cluster("8 x A800 (1 node)", 8, 8, nvlink_gbs=140.0, ib_gbs=10.6, peak_tflops=312.0)
A800_1024 = Cluster("1024 x A800 (128 nodes)", 1024, 8, nvlink_gbs=140.0, ib_gbs=10.6, peak_tflops=312.0)


def ring(n: int) -> float:
    return (n - 1) / n


def seconds(volume: float, group: int, cluster: Cluster) -> float:
    """A collective inside one node runs at NVLink speed; one that spans nodes at the per-GPU NIC share."""
    if group <= 1:
        return 0.0
    return volume / GB / (cluster.nvlink_gbs if group <= cluster.gpus_per_node else cluster.ib_gbs)


@dataclass
class Row:
    mode: str
    volume_gb: float
    seconds: float
    exposed_s: float
    memory_gb: float
    tokens_per_gpu_s: float


def step_rows(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, micro_steps: int,
              mfu: float) -> tuple[float, list[Row]]:
    """(compute seconds per step, one Row per mode). ``exposed_s`` assumes the overlap hides communication
    behind the backward (2/3 of compute) for gradient reductions and behind the forward (1/3) for the
    parameter gathers of ZeRO-1/2, each collective capped by the compute it can hide behind."""
    n = cluster.gpus
    N = config.num_parameters()
    P = N * BF16                          # bytes of bf16 parameters (= of bf16 gradients)
    flops = tokens_per_gpu * config.flops_per_token(4096)
    compute = flops / (cluster.peak_tflops * 1e12 * mfu)
    backward, forward = compute * 2 / 3, compute / 3
    # Memory per GPU (parameters + gradients + optimizer), bf16 params/grads, fp32 master + 2 moments (12 B).
    rows = []

    def add(mode, parts, memory):
        volume = sum(v for v, _, _ in parts)
        t = sum(seconds(v, g, cluster) for v, g, _ in parts)
        hidden_in = {"backward": backward, "forward": forward, "none": 0.0}
        exposed = 0.0
        for kind in ("backward", "forward", "none"):
            tk = sum(seconds(v, g, cluster) for v, g, k in parts if k == kind)
            exposed += max(0.0, tk - hidden_in[kind])
        rows.append(Row(mode, volume / GB, t, exposed, memory / GB, tokens_per_gpu / (compute + exposed)))

    add("ddp", [(2 * ring(n) * P, n, "backward")], P + P + 12 * N)
    for shard in sorted({n, cluster.gpus_per_node}):
        rep = n // shard
        parts = [(ring(shard) * P, shard, "backward"), (2 * ring(rep) * P / shard, rep, "backward"),
                 (ring(shard) * P, shard, "forward")]
        label = "all ranks" if shard == n else f"{shard}"
        add(f"zero1 (shard {label})", parts, P + P + 12 * N / shard)
        add(f"zero2 (shard {label})", parts, P + P / shard + 12 * N / shard)
    for shard in sorted({n, cluster.gpus_per_node}):
        rep = n // shard
        gathers = 2 * micro_steps * ring(shard) * P     # forward + backward re-gather, every micro-step
        parts = [(gathers, shard, "forward"), (ring(shard) * P, shard, "backward"),
                 (2 * ring(rep) * P / shard, rep, "backward")]
        label = "all ranks" if shard == n else f"{shard}"
        add(f"fsdp (shard {label})", parts, (P + P + 12 * N) / shard)
    return compute, rows


def table(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, micro_steps: int, mfu: float) -> str:
    compute, rows = step_rows(config, cluster, tokens_per_gpu, micro_steps, mfu)
    out = [f"**{cluster.name}**, {tokens_per_gpu} tokens per GPU per step ({micro_steps} micro-steps), compute "
           f"{compute:.2f} s per step at {mfu:.0%} MFU of {cluster.peak_tflops:.0f} TFLOP/s",
           "", "| mode | sent per GPU per step (GB) | comm time (s) | exposed after overlap (s) | "
           "tokens/GPU/s | params+grads+optimizer per GPU (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.mode} | {r.volume_gb:.1f} | {r.seconds:.2f} | {r.exposed_s:.2f} | "
                   f"{r.tokens_per_gpu_s:.0f} | {r.memory_gb:.1f} |")
    return "\n".join(out)


def main() -> None:
    config = InternLM2Config.preset("7b")
    print(f"InternLM2-7B: {config.num_parameters() / 1e9:.2f} B parameters\n")
    # 8 GPUs: 4 micro-steps of 8192 tokens per GPU per step; 1024 GPUs: the 4M-token global batch, 4096 per GPU.
    print(table(config, A800_8, 4 * 8192, 4, 0.64))
    print()
    print(table(config, A800_1024, 4 * 1024 * 1024 // 1024, 1, 0.53))


if __name__ == "__main__":
    main()
