// CPU attention over packed documents (csrc/cpu/attention_kernels.h): the launch description and the per-ISA
// entry points csrc/cpu/attention.cpp dispatches to.
#pragma once

#include <cstdint>

namespace ik {

// q, out, dout, dq (total_q, heads, dim), k, v, dk, dv (total_k, kv_heads, dim): contiguous float32; lse
// (heads, total_q) float32; cu_q, cu_k (n_seqs + 1) int32. Addresses as integers; the backward's unused by the
// forward are 0. Causal is bottom-right aligned (query i of a document sees keys j <= i + Lk - Lq).
struct AttentionLaunch {
  int64_t q, k, v, out, lse, dout, dq, dk, dv, cu_q, cu_k;
  int64_t n_seqs, total_q, heads, kv_heads, dim;
  float scale;
  bool causal;
};

// Each returns false (and writes nothing) for a head dim it has no kernel for (kernels: 16, 32, 64, 128). `order`
// lists the n_seqs documents in the order their tasks are handed out (attention.cpp: the costliest first).
#define IK_ATTENTION_ISA(ns)                                                                 \
  namespace ns {                                                                             \
  bool attention_forward(const AttentionLaunch& a, const int64_t* order, int num_threads);  \
  bool attention_backward(const AttentionLaunch& a, const int64_t* order, int num_threads); \
  }
IK_ATTENTION_ISA(attn_generic)
IK_ATTENTION_ISA(attn_avx2)
IK_ATTENTION_ISA(attn_avx512)
#undef IK_ATTENTION_ISA

}  // namespace ik
