"""Communication volume, time and memory per optimizer step, per parallel mode: COMPUTED from formulas and
stated bandwidths, not measured. It writes the tables of docs/distributed.md:

    python -m benchmarks.comm_model            (from the repository root)

Volumes are bytes each GPU sends (= receives) in bandwidth-optimal ring/tree collectives over n ranks:
all-reduce 2(n-1)/n·M, reduce-scatter and all-gather (n-1)/n·M, for a tensor of M bytes. Parameters and
gradients move in bf16 (2 B per element). One gradient reduction per optimizer step (no communication on
non-final micro-steps); FSDP gathers parameters on every micro-step (twice with reshard_after_forward).

Tensor x data parallel rows (tp ranks innermost, as parallel_mesh lays them out): tensor + sequence parallelism's
per-layer activation collectives inside each tp group, plus the data-parallel traffic of a 1/tp parameter slice.
The TP collectives are counted fully exposed: torch's TP issues them synchronously between the matmuls that
consume or produce them, and our code overlaps none of them.
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


def seconds(volume: float, group: int, cluster: Cluster, stride: int = 1) -> float:
    """A collective inside one node runs at NVLink speed; one that spans nodes at the per-GPU NIC share. A group
    of ``group`` ranks ``stride`` apart (data-parallel ranks of one tp position: stride tp) spans group·stride
    consecutive ranks."""
    if group <= 1:
        return 0.0
    in_node = group * stride <= cluster.gpus_per_node
    return volume / GB / (cluster.nvlink_gbs if in_node else cluster.ib_gbs)


@dataclass
class Row:
    mode: str
    volume_gb: float
    seconds: float
    exposed_s: float
    memory_gb: float
    tokens_per_gpu_s: float


def make_row(mode: str, parts: list[tuple[float, int, int, str]], memory: float, compute: float,
             tokens_per_gpu: int, cluster: Cluster) -> Row:
    """``parts``: (bytes sent per GPU, group size, rank stride, what it hides behind: "backward" (⅔ of compute),
    "forward" (⅓) or "none" (exposed)). Each kind's collectives are capped by the compute they can hide behind."""
    backward, forward = compute * 2 / 3, compute / 3
    hidden_in = {"backward": backward, "forward": forward, "none": 0.0}
    volume = sum(v for v, _, _, _ in parts)
    t = sum(seconds(v, g, cluster, s) for v, g, s, _ in parts)
    exposed = 0.0
    for kind in ("backward", "forward", "none"):
        tk = sum(seconds(v, g, cluster, s) for v, g, s, k in parts if k == kind)
        exposed += max(0.0, tk - hidden_in[kind])
    return Row(mode, volume / GB, t, exposed, memory / GB, tokens_per_gpu / (compute + exposed))


def compute_seconds(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, mfu: float) -> float:
    return tokens_per_gpu * config.flops_per_token(4096) / (cluster.peak_tflops * 1e12 * mfu)


def step_rows(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, micro_steps: int,
              mfu: float) -> tuple[float, list[Row]]:
    """(compute seconds per step, one Row per mode). ``exposed_s`` assumes the overlap hides communication
    behind the backward (2/3 of compute) for gradient reductions and behind the forward (1/3) for the
    parameter gathers of ZeRO-1/2, each collective capped by the compute it can hide behind."""
    n = cluster.gpus
    N = config.num_parameters()
    P = N * BF16                          # bytes of bf16 parameters (= of bf16 gradients)
    compute = compute_seconds(config, cluster, tokens_per_gpu, mfu)
    # Memory per GPU (parameters + gradients + optimizer), bf16 params/grads, fp32 master + 2 moments (12 B).
    rows = []

    def add(mode, parts, memory):
        rows.append(make_row(mode, [(v, g, 1, k) for v, g, k in parts], memory, compute, tokens_per_gpu, cluster))

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


@dataclass(frozen=True)
class TpLayout:
    tp: int          # tensor + sequence parallel group: tp consecutive ranks, inside one node
    mode: str        # "zero1" | "zero2" over the data-parallel ranks of each tp position (none when dp = 1)
    shard: int = 0   # ZeRO shard group in data-parallel ranks; 0: all of them


def tp_parts(config: InternLM2Config, tp: int, tokens_per_dp_rank: int, recompute: bool
             ) -> list[tuple[float, int, int, str]]:
    """Bytes each GPU sends per step for tensor + sequence parallelism (parallelize_internlm2's plan), all on
    the tp group (stride 1, NVLink) and all exposed. The tp ranks of one data-parallel rank share its tokens:
    every activation collective moves the (tokens_per_dp_rank, hidden) bf16 tensor, gathered from or scattered
    to token shards, (tp-1)/tp of it per GPU."""
    activation = tokens_per_dp_rank * config.hidden_size * BF16
    # Per block, forward: all-gather of the attention input, reduce-scatter of wo's output, all-gather of the
    # MLP input, reduce-scatter of w2's output; backward: each one's transpose (4 more). Full activation
    # checkpointing (configs/internlm2_7b.toml) recomputes the block's forward in the backward: 4 more.
    per_block = 12 if recompute else 8
    # The vocabulary-parallel embedding: reduce-scatter of its output, all-gather of the gradient.
    # The vocabulary-parallel cross-entropy: all-gather of the final hidden states, reduce-scatter of their
    # gradient (both in its forward call), not recomputed.
    gathers = (config.num_hidden_layers * per_block + 2 + 2) * ring(tp) * activation
    # The cross-entropy's all-reduces: the row max (fp32) and the (sum of exp, target logit) pair (2 x fp32)
    # per token: 12 B/token, under 1% of one block's gathers. (The norms' replicated weight gradients and the
    # score model's one more gather are negligible or absent from pretraining.)
    loss_stats = 2 * ring(tp) * 3 * 4 * tokens_per_dp_rank
    return [(gathers + loss_stats, tp, 1, "none")]


def tp_step_rows(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, mfu: float,
                 layouts: list[TpLayout], recompute: bool = True) -> list[Row]:
    """tp x dp rows: the same global batch (tokens_per_gpu per GPU, so tokens_per_gpu·tp per data-parallel
    rank) and the same MFU input as step_rows, TP's collectives exposed, the data-parallel collectives of a
    1/tp parameter slice hidden as in step_rows. Data-parallel groups are ranks tp apart (parallel_mesh)."""
    compute = compute_seconds(config, cluster, tokens_per_gpu, mfu)
    N = config.num_parameters()
    rows = []
    for layout in layouts:
        tp, dp = layout.tp, cluster.gpus // layout.tp
        P = N * BF16 / tp                  # bytes of this rank's bf16 parameter (= gradient) slice
        parts = tp_parts(config, tp, tokens_per_gpu * tp, recompute)
        if dp == 1:
            rows.append(make_row(f"tp {tp} (no data parallelism)", parts, 2 * P + 12 * N / tp, compute,
                                 tokens_per_gpu, cluster))
            continue
        shard = layout.shard or dp
        rep = dp // shard
        parts += [(ring(shard) * P, shard, tp, "backward"), (2 * ring(rep) * P / shard, rep, tp * shard, "backward"),
                  (ring(shard) * P, shard, tp, "forward")]
        grads = P if layout.mode == "zero1" else P / shard
        label = "all dp ranks" if shard == dp else f"{shard}"
        rows.append(make_row(f"tp {tp} x dp {dp}, {layout.mode} (shard {label})", parts,
                             P + grads + 12 * N / (tp * shard), compute, tokens_per_gpu, cluster))
    return rows


def table(config: InternLM2Config, cluster: Cluster, tokens_per_gpu: int, micro_steps: int, mfu: float,
          tp_layouts: list[TpLayout]) -> str:
    compute, rows = step_rows(config, cluster, tokens_per_gpu, micro_steps, mfu)
    rows += tp_step_rows(config, cluster, tokens_per_gpu, mfu, tp_layouts)
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
    # tp rows: on one node tp 2 x dp 4 (the config's one-node tp example) and tp 8 alone; on 1024 GPUs tp 8
    # inside each node x dp 128 across nodes (its data-parallel groups span nodes whatever the shard size, so
    # shard groups of 8 would only add memory), and tp 2 x dp 512 with ZeRO shard groups of 4 dp ranks, which
    # keep tp and the shard group's collectives inside a node.
    print(table(config, A800_8, 4 * 8192, 4, 0.64,
                [TpLayout(2, "zero1"), TpLayout(2, "zero2"), TpLayout(8, "zero1")]))
    print()
    print(table(config, A800_1024, 4 * 1024 * 1024 // 1024, 1, 0.53,
                [TpLayout(8, "zero1"), TpLayout(8, "zero2"), TpLayout(2, "zero1", 4)]))


if __name__ == "__main__":
    main()
