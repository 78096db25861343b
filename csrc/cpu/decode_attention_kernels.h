// Decode attention over a per-slot KV cache, float32: the body of csrc/cpu/decode_attention_{avx512,avx2,generic}.cpp,
// each of which includes this file once with IK_DECODE_NS (its namespace) and IK_VW (floats per native vector) set
// and is compiled for its ISA (CMakeLists.txt); csrc/cpu/decode_attention.cpp picks one at run time.
//
// One task per (row b, KV head h): the g query heads of the group against the row's n = seqlens[b] keys, each key
// and value read once for all g heads (GQA without repeating K/V), in two passes over the keys:
//   s_rj = (scale·log2 e) q_r·k_j   (j < n),   m_r = max_j s_rj,   p_rj = 2^(s_rj - m_r),   l_r = Σ_j p_rj,
//   out_r = (Σ_j p_rj v_j) / l_r.
// The softmax is exact (the g × n scores sit in a per-thread buffer), not online. A row with n = 0 gets out = 0.
// Scores run VW keys at a time in the cache's own layout (no transposed copy of K: each key is read once, so packing
// would cost as much as the product): per key one vector of partial products summed over the features, then the VW
// partial vectors are reduced to one vector of VW scores by log2(VW) rounds of "sum of even and odd lanes" of pairs
// (two shuffles and an add per pair), instead of a horizontal sum per key. ·V is a sum of value rows weighted by
// p_rj, vectorized over the features, g rows at once (kernel_common.h's weighted_rows, as the packed kernels' P V).
//
// Like attention_kernels.h, this file is compiled with per-ISA -march flags and so defines nothing of external
// linkage but its entry point.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/decode_attention.h"

namespace ik {
namespace IK_DECODE_NS {
namespace {

#include "cpu/kernel_common.h"

inline vi lane_index() {
  vi x;
  for (int i = 0; i < VW; ++i) x[i] = i;
  return x;
}

// [a0 + a1, a2 + a3, ..., b0 + b1, b2 + b3, ...]: the pairwise lane sums of a, then of b.
inline vf even_odd_sum(vf a, vf b) {
#if defined(__GNUC__) && !defined(__clang__)
  const vi i = lane_index();
  return __builtin_shuffle(a, b, i + i) + __builtin_shuffle(a, b, i + i + 1);
#else
  vf out;
  for (int i = 0; i < VW / 2; ++i) {
    out[i] = a[2 * i] + a[2 * i + 1];
    out[VW / 2 + i] = b[2 * i] + b[2 * i + 1];
  }
  return out;
#endif
}

// Lane t of the result is the sum of the lanes of x[t], t < VW (x is overwritten). Round r leaves VW >> r vectors
// each holding 2^r consecutive entries' partial sums in order, so after log2(VW) rounds lane t holds entry t's.
inline vf lane_sums(vf* x) {
  for (int w = VW; w > 1; w /= 2)
    for (int t = 0; t < w / 2; ++t) x[t] = even_odd_sum(x[2 * t], x[2 * t + 1]);
  return x[0];
}

// Scores of one query row (D floats, already scaled) against keys [0, n) with token stride ks: s[0, round_up(n, VW)),
// the lanes past n set to -inf.
template <int D>
void scores_row(const float* q, const float* k, int64_t ks, int64_t n, float* s) {
  constexpr int DV = D / VW;
  vf qv[DV];
  for (int v = 0; v < DV; ++v) qv[v] = load(q + v * VW);
  vf part[VW];
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    for (int t = 0; t < VW; ++t) {
      const float* kr = k + (j + t) * ks;
      vf acc = qv[0] * load(kr);
      for (int v = 1; v < DV; ++v) acc += qv[v] * load(kr + v * VW);
      part[t] = acc;
    }
    store(s + j, lane_sums(part));
  }
  if (j < n) {
    const int64_t count = n - j;
    for (int t = 0; t < VW; ++t) {
      vf acc = splat(0.f);
      if (t < count) {
        const float* kr = k + (j + t) * ks;
        for (int v = 0; v < DV; ++v) acc += qv[v] * load(kr + v * VW);
      }
      part[t] = acc;
    }
    const vf x = lane_sums(part);
    store(s + j, lane_index() < vi{} + int32_t(count) ? x : splat(-kInf));
  }
}

// p = 2^(s - max s) in place over s[0, n_pad) (lanes past n, at -inf, become 0); returns 1 / Σ p.
inline float softmax_row(float* s, int64_t n, int64_t n_pad) {
  vf mv = splat(-kInf);
  for (int64_t j = 0; j < n_pad; j += VW) {
    const vf x = load(s + j);
    mv = mv > x ? mv : x;
  }
  const vf m = splat(hmax(mv));
  vf sum = splat(0.f);
  const vi tail = vi{} + int32_t(n - (n_pad - VW));          // lanes of the last vector that hold keys
  for (int64_t j = 0; j < n_pad; j += VW) {
    vf e = exp2_neg(load(s + j) - m);
    if (j + VW == n_pad) e = lane_index() < tail ? e : splat(0.f);   // 2^(-inf) clamps to 2^-126, not 0
    store(s + j, e);
    sum += e;
  }
  return 1.f / hsum(sum);
}

template <int D>
void task(const DecodeAttentionLaunch& a, int64_t b, int64_t h) {
  const int64_t g = a.group, n = reinterpret_cast<const int64_t*>(a.seqlens)[b];
  float* out = reinterpret_cast<float*>(a.out) + ((b * a.kv_heads + h) * g) * D;
  if (n == 0) {
    fill(out, out + g * D, 0.f);
    return;
  }
  const float* q = reinterpret_cast<const float*>(a.q) + b * a.q_batch + h * a.q_head;
  const float* k = reinterpret_cast<const float*>(a.k) + b * a.kv_batch + h * a.kv_head;
  const float* v = reinterpret_cast<const float*>(a.v) + b * a.kv_batch + h * a.kv_head;
  const int64_t n_pad = round_up(n, VW);
  float* s = scratch_floats(g * n_pad + g + D);              // scores / weights (g, n_pad), 1 / l (g), scaled q (D)
  float* inv_l = s + g * n_pad;
  float* qs = inv_l + g;
  const float qscale = a.scale * LOG2E;
  for (int64_t r = 0; r < g; ++r) {
    for (int e = 0; e < D; ++e) qs[e] = q[r * a.q_row + e] * qscale;
    scores_row<D>(qs, k, a.kv_token, n, s + r * n_pad);
    inv_l[r] = softmax_row(s + r * n_pad, n, n_pad);
  }
  constexpr int R = weighted_rows_per_tile<D>();
  int64_t r = 0;
  for (; r + R <= g; r += R) weighted_rows<D, R>(s + r * n_pad, n_pad, v, a.kv_token, n, out + r * D, D, inv_l + r);
  for (; r < g; ++r) weighted_rows<D, 1>(s + r * n_pad, n_pad, v, a.kv_token, n, out + r * D, D, inv_l + r);
}

template <int D>
void run(const DecodeAttentionLaunch& a, int num_threads) {
  const int64_t tasks = a.batch * a.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1)
  for (int64_t t = 0; t < tasks; ++t) task<D>(a, t / a.kv_heads, t % a.kv_heads);
}

}  // namespace

bool decode_attention(const DecodeAttentionLaunch& a, int num_threads) {
  switch (a.dim) {
    case 16: run<16>(a, num_threads); return true;
    case 32: run<32>(a, num_threads); return true;
    case 64: run<64>(a, num_threads); return true;
    case 128: run<128>(a, num_threads); return true;
    default: return false;
  }
}

}  // namespace IK_DECODE_NS
}  // namespace ik
