"""Decode attention over a KV cache: ik.flash_attn_with_kvcache (paged, split-KV) beside its peers, same run.

Shapes (GPU, bf16, 32 query / 8 KV heads, head dim 128):
  batch 64 × context 4096, pages of 64            the goal: >= 85% of the card's copy bandwidth (H200 4239 GB/s)
  batch 1 × context 131072, pages of 64           one long sequence: the split-KV kernel against num_splits=1
Peers: torch SDPA over the padded contiguous cache (B, Hkv, L, D) with enable_gqa (what the repository's first
decoder did), and flex_attention (compiled) on the same padded cache. The figure is GB/s of KV cache read (2·B·L·Hkv·D
elements), the bound of decode attention. On CPU only the peers run, at a tiny shape (our kernels run there only
under the Triton interpreter, a test harness).
"""
from __future__ import annotations

import pytest
import torch
from common import OURS, device, record

import internlm_kernels as ik

ON_GPU = torch.cuda.is_available()
HQ, HKV, D, PAGE = (32, 8, 128, 64) if ON_GPU else (4, 2, 32, 16)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = {"b64-ctx4096": (64, 4096), "b1-ctx131072": (1, 131072)} if ON_GPU else {"b4-ctx256": (4, 256)}
IMPLS = [OURS, OURS + "-1split", "sdpa-padded", "flex_attention"]


def _inputs(batch: int, ctx: int):
    dev = device()
    pages = ctx // PAGE
    n_pages = batch * pages
    k_cache = torch.randn(n_pages, PAGE, HKV, D, device=dev, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(n_pages, device=dev).reshape(batch, pages).int()   # pages scattered over the pool
    q = torch.randn(batch, 1, HQ, D, device=dev, dtype=DTYPE)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    # The padded layout the peers read: (B, Hkv, L, D), built from the same pages.
    k_pad = k_cache[table.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    v_pad = v_cache[table.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    return q, k_cache, v_cache, table, seqlens, k_pad, v_pad


def _fn(impl, q, k_cache, v_cache, table, seqlens, k_pad, v_pad):
    if impl.startswith(OURS):
        if not ON_GPU:
            pytest.skip("our Triton kernels time only on CUDA")
        splits = 1 if impl.endswith("1split") else 0
        return lambda: ik.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                  num_splits=splits)
    qb = q.transpose(1, 2)                                                   # (B, Hq, 1, D)
    if impl == "sdpa-padded":
        return lambda: torch.nn.functional.scaled_dot_product_attention(qb, k_pad, v_pad, enable_gqa=True)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    return lambda: flex(qb, k_pad, v_pad, enable_gqa=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_attention(benchmark, shape, impl):
    batch, ctx = SHAPES[shape]
    args = _inputs(batch, ctx)
    fn = _fn(impl, *args)
    with torch.inference_mode():
        fn()
        kv_bytes = 2 * batch * ctx * HKV * D * args[1].element_size()
        record(benchmark, lambda: fn(), group=f"decode attention {shape} {HQ}q/{HKV}kv d{D} page {PAGE} {DTYPE}",
               impl=impl, metric="GB/s", work=kv_bytes, note="KV bytes read")
