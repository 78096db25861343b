// Picks the attention kernels' ISA: the widest of those built that both the CPU and the caller allow. The caller
// passes the ISA ATen dispatches to (ATEN_CPU_CAPABILITY), so a run pinned to AVX2 runs these kernels as an
// AVX2-only machine would, and speed comparisons against ATen under that setting compare like with like.
#include <algorithm>
#include <vector>

#include "cpu/attention.h"
#include "entry_points.h"

namespace ik {
namespace {

int usable_isa(int requested) {
#if defined(IK_ATTENTION_X86)
  __builtin_cpu_init();
  if (requested >= kIsaAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return kIsaAvx512;
  if (requested >= kIsaAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#else
  (void)requested;
#endif
  return kIsaGeneric;
}

// Documents by decreasing Lq·Lk, so that under dynamic scheduling the short ones fill the ends of the threads' shares.
std::vector<int64_t> costliest_first(const AttentionLaunch& a) {
  const int32_t* cq = reinterpret_cast<const int32_t*>(a.cu_q);
  const int32_t* ck = reinterpret_cast<const int32_t*>(a.cu_k);
  auto cost = [&](int64_t b) { return int64_t(cq[b + 1] - cq[b]) * (ck[b + 1] - ck[b]); };
  std::vector<int64_t> order(a.n_seqs);
  for (int64_t b = 0; b < a.n_seqs; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(x) > cost(y); });
  return order;
}

}  // namespace

bool attention_cpu(const AttentionLaunch& a, bool backward, int isa, int num_threads) {
  const std::vector<int64_t> order = costliest_first(a);
  const int64_t* o = order.data();
  switch (usable_isa(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512:
      return backward ? attn_avx512::attention_backward(a, o, num_threads)
                      : attn_avx512::attention_forward(a, o, num_threads);
    case kIsaAvx2:
      return backward ? attn_avx2::attention_backward(a, o, num_threads)
                      : attn_avx2::attention_forward(a, o, num_threads);
#endif
    default:
      return backward ? attn_generic::attention_backward(a, o, num_threads)
                      : attn_generic::attention_forward(a, o, num_threads);
  }
}

int attention_isa_cpu(int requested) { return usable_isa(requested); }

}  // namespace ik
