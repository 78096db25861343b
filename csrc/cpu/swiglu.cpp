// Picks the SwiGLU kernels' ISA as attention.cpp does for the attention kernels: the widest built that both the CPU
// and the caller (ATen's ISA) allow.
#include "cpu/swiglu.h"
#include "entry_points.h"

namespace ik {

void swiglu_cpu(const SwiGLULaunch& a, bool backward, int isa, int num_threads) {
  switch (attention_isa_cpu(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512:
      return backward ? swiglu_avx512::swiglu_backward(a, num_threads) : swiglu_avx512::swiglu_forward(a, num_threads);
    case kIsaAvx2:
      return backward ? swiglu_avx2::swiglu_backward(a, num_threads) : swiglu_avx2::swiglu_forward(a, num_threads);
#endif
    default:
      return backward ? swiglu_generic::swiglu_backward(a, num_threads)
                      : swiglu_generic::swiglu_forward(a, num_threads);
  }
}

}  // namespace ik
