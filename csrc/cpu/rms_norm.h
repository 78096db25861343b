// CPU RMSNorm with the fused residual add (csrc/cpu/rms_norm_kernels.h): the launch descriptions and the per-ISA
// entry points csrc/cpu/rms_norm.cpp dispatches to.
#pragma once

#include <cstdint>

namespace ik {

// rows × width float32 rows, every tensor contiguous; addresses as integers, 0 for an absent one.
// Forward: h = x (+ residual), rstd = 1 / sqrt(square_scale · Σ h² + eps), y = h · rstd (· weight); writes y, and
// rstd (rows) and h where given (h only with a residual). The norm's square_scale is 1 / width (the mean); the
// generator's norms, whose weights are folded into the next product, take 1 and no weight (models/decode_step.py).
struct RMSNormForward {
  int64_t x, residual, weight, y, h, rstd;
  int64_t rows, width;
  float eps, square_scale;
};

// Backward of the forward above, from dy (and dh_out, the gradient reaching the carried sum h; 0 when none):
// n = h · rstd, dn = dy · weight, dh = rstd · (dn - n · mean(dn · n)) (+ dh_out); dw = Σ_rows dy · n when dw is
// given, summed in `partials` (num_threads × width floats of scratch) and then over threads in a fixed order.
struct RMSNormBackward {
  int64_t dy, h, rstd, weight, dh_out, dh, dw, partials;
  int64_t rows, width;
};

#define IK_RMS_NORM_ISA(ns)                                              \
  namespace ns {                                                         \
  void rms_norm_forward(const RMSNormForward& a, int num_threads);       \
  void rms_norm_backward(const RMSNormBackward& a, int num_threads);     \
  }
IK_RMS_NORM_ISA(rms_norm_generic)
IK_RMS_NORM_ISA(rms_norm_avx2)
IK_RMS_NORM_ISA(rms_norm_avx512)
#undef IK_RMS_NORM_ISA

}  // namespace ik
