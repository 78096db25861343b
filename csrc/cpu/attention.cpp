// Picks the attention kernels' ISA: the widest of those built that both the CPU and the caller allow. The caller
// passes the ISA ATen dispatches to (ATEN_CPU_CAPABILITY), so a run pinned to AVX2 runs these kernels as an
// AVX2-only machine would, and speed comparisons against ATen under that setting compare like with like.
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

}  // namespace

bool attention_cpu(const AttentionLaunch& a, bool backward, int isa, int num_threads) {
  switch (usable_isa(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512:
      return backward ? attn_avx512::attention_backward(a, num_threads) : attn_avx512::attention_forward(a, num_threads);
    case kIsaAvx2:
      return backward ? attn_avx2::attention_backward(a, num_threads) : attn_avx2::attention_forward(a, num_threads);
#endif
    default:
      return backward ? attn_generic::attention_backward(a, num_threads)
                      : attn_generic::attention_forward(a, num_threads);
  }
}

int attention_isa_cpu(int requested) { return usable_isa(requested); }

}  // namespace ik
