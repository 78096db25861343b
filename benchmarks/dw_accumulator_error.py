"""The error of the fused linear cross-entropy's bf16 dW accumulator at 1M tokens per step, against
``accum_dtype=torch.float32``: ``python benchmarks/dw_accumulator_error.py [--tokens N] [--hidden H] [--vocab V]``.

It replays the Triton driver's dW schedule (``linear_cross_entropy_chunked``) in torch on CPU, at a small hidden
size and vocabulary so a step of 2^20 tokens runs in seconds, with the chunk length the driver uses for the real
vocabulary (92544 classes in bf16 -> 906-row chunks, 1158 chunks per 2^20 tokens) — the number of chunks is what
the accumulation error grows with. Per chunk, as the kernels do: logits = x Wᵀ rounded to bf16, dlogits =
(softmax - onehot) / N in fp32 rounded to bf16; then

  bf16 accumulator (the default)  dW = dW + dlogitsᵀ x, rounded to bf16 after every chunk (addmm_ in bf16)
  fp32 accumulator                dW32 = dW32 + dlogitsᵀ x in fp32, rounded to bf16 once at the end
  exact                           the same bf16 dlogits and x, products summed in float64

and prints ||dW - exact|| / ||exact|| (Frobenius) and the median per-element relative error for both.
"""
from __future__ import annotations

import argparse
import time

import torch

REAL_VOCAB = 92544
LOGITS_CHUNK_BYTES = 160 * 2**20  # the driver's budget (internlm_kernels/triton/cross_entropy.py)


def measure(tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).bfloat16()
    rows = LOGITS_CHUNK_BYTES // (REAL_VOCAB * 2)
    acc16 = torch.zeros(vocab, hidden, dtype=torch.bfloat16)
    acc32 = torch.zeros(vocab, hidden, dtype=torch.float32)
    exact = torch.zeros(vocab, hidden, dtype=torch.float64)
    chunks = 0
    for start in range(0, tokens, rows):
        n = min(rows, tokens - start)
        x = torch.randn(n, hidden, generator=g).bfloat16()
        target = torch.randint(0, vocab, (n,), generator=g)
        logits = (x @ weight.t()).float()                       # bf16 matmul output, as the driver's buffer
        dlogits = torch.softmax(logits, -1)
        dlogits[torch.arange(n), target] -= 1.0
        dlogits = (dlogits / tokens).bfloat16()                 # written over the bf16 logits buffer
        acc16.addmm_(dlogits.t(), x)
        acc32.addmm_(dlogits.t().float(), x.float())
        exact.addmm_(dlogits.t().double(), x.double())
        chunks += 1
    out = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "chunk_rows": rows, "chunks": chunks}
    for name, dw in (("bf16 accumulator", acc16), ("fp32 accumulator", acc32.bfloat16())):
        diff = dw.double() - exact
        out[name] = {"frobenius_rel": (diff.norm() / exact.norm()).item(),
                     "median_elem_rel": (diff.abs() / exact.abs().clamp(min=1e-30)).median().item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2**20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = measure(args.tokens, args.hidden, args.vocab)
    print(f"{result['tokens']} tokens, hidden {result['hidden']}, vocab {result['vocab']}, "
          f"{result['chunks']} chunks of {result['chunk_rows']} rows ({time.perf_counter() - t0:.0f} s)")
    for name in ("bf16 accumulator", "fp32 accumulator"):
        r = result[name]
        print(f"  {name}: ||dW - exact|| / ||exact|| = {r['frobenius_rel']:.3e}, "
              f"median element relative error = {r['median_elem_rel']:.3e}")


if __name__ == "__main__":
    main()
