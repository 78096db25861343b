// CPU decode attention over a per-slot KV cache (csrc/cpu/decode_attention_kernels.h): the launch description and
// the per-ISA entry points csrc/cpu/decode_attention.cpp dispatches to.
#pragma once

#include <cstdint>

namespace ik {

// One new query token per row b < batch, `group` query heads per KV head: query head j of KV head h of row b is
// q[b·q_batch + h·q_head + j·q_row + (0..dim)]; key t of (b, h) is k[b·kv_batch + h·kv_head + t·kv_token + (0..dim)]
// (v alike, same strides). Row b attends to its keys t < seqlens[b] (int64, at most max_keys). out (batch, kv_heads,
// group, dim) contiguous float32. Addresses as integers, strides in elements, every feature dimension contiguous.
struct DecodeAttentionLaunch {
  int64_t q, k, v, out, seqlens;
  int64_t batch, kv_heads, group, dim, max_keys;
  int64_t q_batch, q_head, q_row;
  int64_t kv_batch, kv_head, kv_token;
  float scale;
};

// Each returns false (and writes nothing) for a head dim it has no kernel for (kernels: 16, 32, 64, 128).
#define IK_DECODE_ATTENTION_ISA(ns)                                                \
  namespace ns {                                                                   \
  bool decode_attention(const DecodeAttentionLaunch& a, int num_threads);          \
  }
IK_DECODE_ATTENTION_ISA(decode_attn_generic)
IK_DECODE_ATTENTION_ISA(decode_attn_avx2)
IK_DECODE_ATTENTION_ISA(decode_attn_avx512)
#undef IK_DECODE_ATTENTION_ISA

}  // namespace ik
