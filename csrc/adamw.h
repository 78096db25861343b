// One AdamW step on one element, in float: the single definition the CPU and CUDA kernels share.
//
// Operation order and fused multiply-adds follow torch.optim.AdamW (foreach=False on the CPU; the foreach
// kernels on CUDA round the same way), so fp32 results agree with it to the last bit or two:
//   w ← w · (1 − lr·wd)                              decoupled weight decay, applied first
//   g ← −g                                           only with maximize
//   m ← lerp(m, g, 1 − β1)                           torch.lerp: fma(w, g − m, m) for w < 0.5
//   v ← fma((1 − β2)·g, g, v·β2)                      torch's mul_ then addcmul_
//   v̂ ← max(v̂, v)                                    amsgrad only; v̂ replaces v below
//   w ← w + (−lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
// The kernels are compiled without automatic contraction (CMakeLists.txt), so only these fmas are fused
// and the CPU and CUDA kernels produce identical bits. (torch's CPU sqrt is not correctly rounded, ours is:
// that is the remaining last-bit difference from torch on the CPU.) The step-dependent factors are computed
// once per launch on the host, in double, as torch does.
#pragma once

#include <cmath>

#include "dtypes.h"

namespace ik {

struct AdamWScalars {
  float weight_decay_factor;    // 1 − lr·weight_decay
  float beta1_weight;           // 1 − β1: weight of the gradient in the exp_avg lerp
  float beta2;                  // β2
  float one_minus_beta2;        // 1 − β2
  float bias_correction2_sqrt;  // sqrt(1 − β2^step)
  float neg_step_size;          // −lr / (1 − β1^step)
  float eps;                    // added to the bias-corrected sqrt(v)
  float grad_sign;              // −1 with maximize, else +1
};

// torch.lerp: start + w·(end − start) for w < 0.5, else end − (end − start)·(1 − w) (exact at w = 1),
// each a fused multiply-add as in torch's CPU and CUDA kernels.
IK_HD inline float torch_lerp(float start, float end, float w) {
  const float diff = end - start;
  return w < 0.5f ? fmaf(w, diff, start) : fmaf(-diff, 1.0f - w, end);
}

// w: weight (fp32 master or the widened parameter), g: gradient, m/v/v_max: moments. Updates in place.
template <bool AMSGRAD>
IK_HD inline void adamw_update(float& w, float g, float& m, float& v, float& v_max, const AdamWScalars& s) {
  g = g * s.grad_sign;
  w = w * s.weight_decay_factor;
  m = torch_lerp(m, g, s.beta1_weight);
  v = fmaf(s.one_minus_beta2 * g, g, v * s.beta2);
  float second = v;
  if (AMSGRAD) {
    v_max = nan_max(v_max, v);
    second = v_max;
  }
  const float denom = sqrtf(second) / s.bias_correction2_sqrt + s.eps;
  w = w + (s.neg_step_size * m) / denom;
}

}  // namespace ik
