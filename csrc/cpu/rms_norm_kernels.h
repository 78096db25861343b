// RMSNorm with the fused residual add on CPU, float32: the body of csrc/cpu/rms_norm_{avx512,avx2,generic}.cpp, each
// of which includes this file once with IK_RMS_NORM_NS (its namespace) and IK_VW (floats per native vector) set and
// is compiled for its ISA (CMakeLists.txt); csrc/cpu/rms_norm.cpp picks one at run time.
//
// One row of `width` features at a time, in vectors of VW floats (a shorter tail through a zero-padded vector):
//   forward   h = x + residual,  rstd = 1 / sqrt(Σ h² / width + eps),  y = h · rstd · w  (1 / width: square_scale)
//   backward  n = h · rstd,  dn = dy · w,  dh = rstd · (dn - n · Σ(dn · n) / width) + dh_out,  dw += dy · n
// Each pass reads its row twice (the sum first, then the outputs), both times from L1 at the widths of these models;
// as ATen ops the same math is ~8 calls forward and ~10 backward, each a pass over the whole (rows, width) tensor.
// dw sums rows into a block partial every DW_BLOCK rows, block partials into the thread's partial, and the threads'
// partials in thread order: fp32 sums of at most DW_BLOCK + rows / DW_BLOCK terms deep, the same for a given
// thread count on every run.
//
// Everything here has internal linkage (see the note in attention_kernels.h on per-ISA files).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/rms_norm.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ik {
namespace IK_RMS_NORM_NS {
namespace {

#include "cpu/kernel_common.h"

constexpr int64_t DW_BLOCK = 64;   // rows per block partial of dw

// Σ_i a[i] · b[i] over n floats.
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = splat(0.f);
  over_row(n, [&](int64_t i, int64_t k) { acc += load_n(a + i, k) * load_n(b + i, k); });
  return hsum(acc);
}

// h = x + r over n floats (h may be written before being read back); returns Σ h².
inline float add_rows(const float* x, const float* r, float* h, int64_t n) {
  vf acc = splat(0.f);
  over_row(n, [&](int64_t i, int64_t k) {
    const vf v = load_n(x + i, k) + load_n(r + i, k);
    store_n(h + i, v, k);
    acc += v * v;
  });
  return hsum(acc);
}

// y = h · rstd (· w) over n floats.
inline void scale_row(const float* h, float rstd, const float* w, float* y, int64_t n) {
  const vf r = splat(rstd);
  if (w == nullptr)
    over_row(n, [&](int64_t i, int64_t k) { store_n(y + i, load_n(h + i, k) * r, k); });
  else
    over_row(n, [&](int64_t i, int64_t k) { store_n(y + i, load_n(h + i, k) * r * load_n(w + i, k), k); });
}

// The backward of one row; dw_block (width floats) accumulates dy · n when given.
inline void backward_row(const float* dy, const float* h, float rstd, const float* w, const float* dh_out,
                         float* dh, float* dw_block, int64_t width) {
  // Σ (dy · w) · (h · rstd) = rstd · Σ dy · w · h
  vf acc = splat(0.f);
  over_row(width, [&](int64_t i, int64_t k) { acc += load_n(dy + i, k) * load_n(w + i, k) * load_n(h + i, k); });
  const vf r = splat(rstd), m = splat(rstd * hsum(acc) / float(width));
  over_row(width, [&](int64_t i, int64_t k) {
    const vf g = load_n(dy + i, k), nv = load_n(h + i, k) * r;
    const vf carried = dh_out != nullptr ? load_n(dh_out + i, k) : splat(0.f);
    store_n(dh + i, (g * load_n(w + i, k) - nv * m) * r + carried, k);
    if (dw_block != nullptr) store_n(dw_block + i, load_n(dw_block + i, k) + g * nv, k);
  });
}

// Rows [begin, end) of thread t of num_threads: equal static shares.
inline int64_t share(int64_t rows, int t, int num_threads) { return rows * t / num_threads; }

}  // namespace

void rms_norm_forward(const RMSNormForward& a, int num_threads) {
  const float* x = reinterpret_cast<const float*>(a.x);
  const float* res = reinterpret_cast<const float*>(a.residual);
  const float* w = reinterpret_cast<const float*>(a.weight);
  float* y = reinterpret_cast<float*>(a.y);
  float* h = reinterpret_cast<float*>(a.h);
  float* rstd = reinterpret_cast<float*>(a.rstd);
  const int64_t width = a.width;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    const float* xr = x + row * width;
    const float* hr = xr;
    float squares;
    if (res != nullptr) {
      float* ho = h + row * width;
      squares = add_rows(xr, res + row * width, ho, width);
      hr = ho;
    } else {
      squares = dot(xr, xr, width);
    }
    const float r = 1.f / std::sqrt(squares * a.square_scale + a.eps);
    if (rstd != nullptr) rstd[row] = r;
    scale_row(hr, r, w, y + row * width, width);
  }
}

void rms_norm_backward(const RMSNormBackward& a, int num_threads) {
  const float* dy = reinterpret_cast<const float*>(a.dy);
  const float* h = reinterpret_cast<const float*>(a.h);
  const float* rstd = reinterpret_cast<const float*>(a.rstd);
  const float* w = reinterpret_cast<const float*>(a.weight);
  const float* dh_out = reinterpret_cast<const float*>(a.dh_out);
  float* dh = reinterpret_cast<float*>(a.dh);
  float* dw = reinterpret_cast<float*>(a.dw);
  float* partials = reinterpret_cast<float*>(a.partials);
  const int64_t width = a.width, rows = a.rows;
  int team = 1;   // the threads that ran, each writing its partial (OpenMP may form a smaller team than asked)
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
#else
    const int t = 0, threads = 1;
#endif
    if (t == 0) team = threads;
    float* part = dw != nullptr ? partials + t * width : nullptr;
    float* block = dw != nullptr ? scratch_floats(width) : nullptr;
    if (part != nullptr) fill(part, part + width, 0.f);
    const int64_t begin = share(rows, t, threads), end = share(rows, t + 1, threads);
    for (int64_t b0 = begin; b0 < end; b0 += DW_BLOCK) {
      const int64_t b1 = min64(end, b0 + DW_BLOCK);
      if (block != nullptr) fill(block, block + width, 0.f);
      for (int64_t row = b0; row < b1; ++row) {
        const int64_t o = row * width;
        backward_row(dy + o, h + o, rstd[row], w, dh_out != nullptr ? dh_out + o : nullptr, dh + o, block, width);
      }
      if (part != nullptr)
        for (int64_t i = 0; i < width; ++i) part[i] += block[i];
    }
  }
  if (dw == nullptr) return;
  fill(dw, dw + width, 0.f);
  for (int t = 0; t < team; ++t)
    for (int64_t i = 0; i < width; ++i) dw[i] += partials[t * width + i];
}

}  // namespace IK_RMS_NORM_NS
}  // namespace ik
