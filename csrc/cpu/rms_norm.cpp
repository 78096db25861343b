// Picks the RMSNorm kernels' ISA as attention.cpp does for the attention kernels: the widest built that both the CPU
// and the caller (ATen's ISA) allow.
#include "cpu/rms_norm.h"
#include "entry_points.h"

namespace ik {

void rms_norm_cpu(const RMSNormForward& a, int isa, int num_threads) {
  switch (attention_isa_cpu(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512: return rms_norm_avx512::rms_norm_forward(a, num_threads);
    case kIsaAvx2: return rms_norm_avx2::rms_norm_forward(a, num_threads);
#endif
    default: return rms_norm_generic::rms_norm_forward(a, num_threads);
  }
}

void rms_norm_backward_cpu(const RMSNormBackward& a, int isa, int num_threads) {
  switch (attention_isa_cpu(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512: return rms_norm_avx512::rms_norm_backward(a, num_threads);
    case kIsaAvx2: return rms_norm_avx2::rms_norm_backward(a, num_threads);
#endif
    default: return rms_norm_generic::rms_norm_backward(a, num_threads);
  }
}

}  // namespace ik
