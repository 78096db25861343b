// Rotate-half rotary embedding of groups of heads on CPU, float32, one pass: the cpu backend's qkv_rotary
// (internlm_kernels/cpu/rotary.py) reads InternLM2's packed wqkv rows and writes rotated q and k, and its backward
// the reverse. As ATen ops the same rotation is 4 elementwise calls per output whose innermost loop is half a head
// (16 floats at head_dim 32): per-iteration overhead, not arithmetic, set their cost.
#include <cstdint>

#include "cpu/parallel.h"
#include "entry_points.h"

namespace ik {
namespace {

// One head: o1 = x1·c - x2·s, o2 = x2·c + x1·s over the first 2·half features; the rest copied. Two products and
// one add or subtract per element, as the ATen composition (mul, then addcmul_) rounds them (no FMA contraction).
IK_CPU_CLONES void rotate_head(const float* __restrict x, float* __restrict o, const float* __restrict c,
                               const float* __restrict s, int64_t half, int64_t dim, float sign) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i], si = sign * s[i];
    o[i] = x1 * c[i] - x2 * si;
    o[half + i] = x2 * c[i] + x1 * si;
  }
  for (int64_t i = 2 * half; i < dim; ++i) o[i] = x[i];
}

}  // namespace

void rotary_heads_cpu(const RotaryHeads& r, int num_threads) {
  const float* x = reinterpret_cast<const float*>(r.x);
  float* out = reinterpret_cast<float*>(r.out);
  const float* cos = reinterpret_cast<const float*>(r.cos);
  const float* sin = reinterpret_cast<const float*>(r.sin);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int64_t t = 0; t < r.tokens; ++t) {
    const float* c = cos + t * r.half;
    const float* s = sin + t * r.half;
    for (int64_t grp = 0; grp < r.groups; ++grp) {
      for (int64_t h = 0; h < r.heads_per_group; ++h) {
        rotate_head(x + t * r.x_token + grp * r.x_group + h * r.x_head,
                    out + t * r.out_token + grp * r.out_group + h * r.out_head, c, s, r.half, r.dim, r.sign);
      }
    }
  }
}

}  // namespace ik
