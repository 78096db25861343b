// Element types that cross the Python boundary as integer codes, and their conversions to and from float.
//
// The conversions are the only per-type code the kernels need: all arithmetic happens in float (or double
// for CPU reductions). They compile for the host (plain C++ and nvcc's host pass) and the device, and round
// to nearest-even like torch's own casts.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define IK_HD __host__ __device__
#else
#define IK_HD
#if !defined(__FLT16_MANT_DIG__)
#error "internlm_kernels needs a host compiler with _Float16 (GCC >= 12 or Clang >= 15 on x86-64/aarch64)"
#endif
#endif

namespace ik {

// Codes shared with internlm_kernels/_ext.py (which reads them from _C.dtype_codes()).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Storage of the 16-bit types: raw bits, so that one definition serves host and device.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

IK_HD inline float to_float(float x) { return x; }

IK_HD inline float to_float(BFloat16 x) {
  // bfloat16 is the upper half of a float32: widening is exact.
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

IK_HD inline float to_float(Half x) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(x.bits));
#else
  _Float16 h;
  memcpy(&h, &x.bits, sizeof(h));
  return static_cast<float>(h);  // exact; one vcvtph2ps where F16C is enabled
#endif
}

template <typename T>
IK_HD inline T from_float(float x);

template <>
IK_HD inline float from_float<float>(float x) {
  return x;
}

template <>
IK_HD inline Half from_float<Half>(float x) {
#if defined(__CUDACC__)
  return Half{__half_as_ushort(__float2half_rn(x))};
#else
  _Float16 h = static_cast<_Float16>(x);  // round to nearest-even, overflow to inf, NaN stays NaN
  Half out;
  memcpy(&out.bits, &h, sizeof(h));
  return out;
#endif
}

template <>
IK_HD inline BFloat16 from_float<BFloat16>(float x) {
#if defined(__CUDA_ARCH__)
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x0040u)};  // NaN: keep it quiet
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (carries into the exponent correctly)
  return BFloat16{uint16_t(u >> 16)};
#endif
}

// NaN-propagating maximum, as torch.maximum: a NaN in either operand wins.
template <typename T>
IK_HD inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

}  // namespace ik
