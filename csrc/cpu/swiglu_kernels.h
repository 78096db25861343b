// SwiGLU on CPU, float32: the body of csrc/cpu/swiglu_{avx512,avx2,generic}.cpp, each of which includes this file
// once with IK_SWIGLU_NS (its namespace) and IK_VW (floats per native vector) set and is compiled for its ISA
// (CMakeLists.txt); csrc/cpu/swiglu.cpp picks one at run time.
//
// With g = m_g · gate and s = sigmoid(g) = 1 / (1 + e^-g):
//   forward   out = g · s · up · m_d
//   backward  dup = dout · m_d · g · s,   dgate = dout · m_d · up · s · (1 + g · (1 - s)) · m_g
// (d silu(g) / dg = s + g · s · (1 - s)). One pass over the rows each way: as ATen ops the forward is silu and a
// product (two passes, one intermediate tensor), the backward three calls (silu_backward recomputes s) and a kept
// silu(g) activation. s = 1 / (1 + 2^(-g log2 e)) by exp2_clamped below (~1 ulp), over both signs of g: not the
// attention kernels' exp2_neg, which takes x <= 0 only and rounds through a floor (sigmoid over it needed |g| and a
// select per vector, and the forward ran ~1.4x slower).
//
// Everything here has internal linkage (see the note in attention_kernels.h on per-ISA files).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/swiglu.h"

namespace ik {
namespace IK_SWIGLU_NS {
namespace {

#include "cpu/kernel_common.h"

// 2^x for |x| <= 126 after the clamp (beyond, 2^±126: sigmoid is 0 or 1 to float precision there): 2^round(x) from
// the exponent bits (round to nearest by the 1.5·2^23 shift) times a degree-6 polynomial of 2^f on |f| <= 1/2
// (Taylor in f ln 2, ~1.2e-7 relative: about one float ulp).
inline vf exp2_clamped(vf x) {
  x = x < splat(-126.f) ? splat(-126.f) : x;
  x = x > splat(126.f) ? splat(126.f) : x;
  const vf shifted = x + splat(12582912.f);                 // 1.5·2^23: the low mantissa bits now hold round(x)
  const vf rounded = shifted - splat(12582912.f);
  const vf f = x - rounded;                                  // in [-1/2, 1/2]
  vf p = splat(1.5403530393381606e-4f);                      // (ln 2)^k / k!, k = 6 down to 1
  p = p * f + splat(1.3333558146428443e-3f);
  p = p * f + splat(9.6181291076284772e-3f);
  p = p * f + splat(5.5504108664821580e-2f);
  p = p * f + splat(2.4022650695910071e-1f);
  p = p * f + splat(6.9314718055994531e-1f);
  p = p * f + splat(1.f);
  vi bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;                    // the rounded exponent, biased, in place
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / (1 + e^-g) = 1 / (1 + 2^(-g log2 e)); for g < -87 e^-g is past float's range and the clamp leaves 2^126,
// whose sigmoid (~1e-38) is 0 to float precision, as is the true value's difference from it.
inline vf sigmoid(vf g) { return splat(1.f) / (splat(1.f) + exp2_clamped(g * splat(-LOG2E))); }

}  // namespace

void swiglu_forward(const SwiGLULaunch& a, int num_threads) {
  const vf mg = splat(a.gate_multiplier), md = splat(a.down_multiplier);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    const float* gate = reinterpret_cast<const float*>(a.gate) + row * a.gate_row;
    const float* up = reinterpret_cast<const float*>(a.up) + row * a.up_row;
    float* out = reinterpret_cast<float*>(a.out) + row * a.out_row;
    over_row(a.width, [&](int64_t i, int64_t n) {
      const vf g = load_n(gate + i, n) * mg;
      store_n(out + i, g * sigmoid(g) * load_n(up + i, n) * md, n);
    });
  }
}

void swiglu_backward(const SwiGLULaunch& a, int num_threads) {
  const vf mg = splat(a.gate_multiplier), md = splat(a.down_multiplier), one = splat(1.f);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    const float* gate = reinterpret_cast<const float*>(a.gate) + row * a.gate_row;
    const float* up = reinterpret_cast<const float*>(a.up) + row * a.up_row;
    const float* dout = reinterpret_cast<const float*>(a.dout) + row * a.dout_row;
    float* dgate = a.dgate != 0 ? reinterpret_cast<float*>(a.dgate) + row * a.dgate_row : nullptr;
    float* dup = a.dup != 0 ? reinterpret_cast<float*>(a.dup) + row * a.dup_row : nullptr;
    over_row(a.width, [&](int64_t i, int64_t n) {
      const vf g = load_n(gate + i, n) * mg, s = sigmoid(g), d = load_n(dout + i, n) * md;
      if (dup != nullptr) store_n(dup + i, d * g * s, n);
      if (dgate != nullptr) store_n(dgate + i, d * load_n(up + i, n) * s * (one + g * (one - s)) * mg, n);
    });
  }
}

}  // namespace IK_SWIGLU_NS
}  // namespace ik
