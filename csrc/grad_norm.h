// Gradient norm and clipping, per element: the single definition the CPU and CUDA kernels share.
//
// The norm of all gradients together, as torch.nn.utils.clip_grad_norm_ computes it:
//   p = 1, 2, any finite p > 0:  (Σ |x|^p)^(1/p)      p = inf:  max |x|   (a NaN anywhere gives NaN)
// Kernels accumulate terms per chunk (float on the GPU, double on the CPU), a second pass combines the
// chunk partials in a fixed order (double) and finalizes. Clipping multiplies every gradient by
// min(max_norm / (norm + 1e-6), 1), the formula torch uses; a NaN norm gives a NaN coefficient, as in torch.
#pragma once

#include <cmath>

#include "dtypes.h"

namespace ik {

// Codes shared with internlm_kernels/_ext.py.
enum NormKind : int { kNormL1 = 0, kNormL2 = 1, kNormInf = 2, kNormP = 3 };

IK_HD inline float abs_pow(float a, float p) { return powf(a, p); }
IK_HD inline double abs_pow(double a, double p) { return pow(a, p); }

// The contribution of one element x to the accumulator.
template <NormKind K, typename Acc>
IK_HD inline Acc norm_term(float x, Acc p) {
  const Acc a = static_cast<Acc>(fabsf(x));
  if (K == kNormL2) return a * a;
  if (K == kNormP) return abs_pow(a, p);
  return a;  // L1 and inf
}

template <NormKind K, typename Acc>
IK_HD inline Acc norm_combine(Acc a, Acc b) {
  return K == kNormInf ? nan_max(a, b) : a + b;
}

// From the combined accumulator to the norm.
template <NormKind K>
IK_HD inline double norm_finalize(double acc, double p) {
  if (K == kNormL2) return sqrt(acc);
  if (K == kNormP) return pow(acc, 1.0 / p);
  return acc;
}

// torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1 (torch.clamp keeps NaN).
IK_HD inline float clip_coefficient(float max_norm, float total_norm) {
  const float coef = max_norm / (total_norm + 1e-6f);
  return coef > 1.0f ? 1.0f : coef;
}

}  // namespace ik
