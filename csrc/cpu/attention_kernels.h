// Blocked CPU attention over packed documents, float32: the body of csrc/cpu/attention_{avx512,avx2,generic}.cpp,
// each of which includes this file once with IK_ATTN_NS (its namespace) and IK_VW (floats per native vector) set and
// is compiled for its ISA (CMakeLists.txt); csrc/cpu/attention.cpp picks one at run time.
//
// Forward, one task per (document, KV head) that packs Kᵀ once, then per query head of the group and block of BQ
// query rows a materialized score tile:
//   S = (scale·log2 e) Q Kᵀ   over the keys the block sees (a causal block stops at its diagonal),
//   m_i = max_j S_ij, P = 2^(S - m), l_i = Σ_j P_ij,   O_i = (P V)_i / l_i,   lse_i = (m_i + log2 l_i)·ln 2.
// Kᵀ is packed into 32-key panels so the score product runs R rows × 32 keys of accumulators in registers (a
// head_dim of 32 is too short a reduction to vectorize over); P V runs R rows × head_dim. The tile is at most
// BQ × (document length) floats, so a document's softmax is exact, not online: no rescaling of O.
//
// Backward (FlashAttention-2's equations), one task per (document, KV head), looping over the query heads of its
// group and their query blocks, so dK and dV have one writer and GQA needs no repeated K/V:
//   P = 2^(S - lse·log2 e),  dP = dO Vᵀ,  dS = P ∘ (dP - rowsum(dO ∘ O)),
//   dQ = scale · dS K,  dK += scale · dSᵀ Q,  dV += Pᵀ dO.
// Masked scores are exact zeros of P and dS, and the key loops of dK and dV skip the rows a causal key cannot see.
//
// This file is compiled with per-ISA -march flags, so it instantiates no template of external linkage (no std::vector,
// std::fill, std::min, ...): the linker keeps one copy of such a function for the whole module, which could be this
// file's AVX-512 one called from the baseline path of a CPU without AVX-512. Everything here has internal linkage.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/attention.h"

namespace ik {
namespace IK_ATTN_NS {
namespace {

#include "cpu/kernel_common.h"

constexpr int PANEL = 32;   // keys per packed Kᵀ panel, as many as a query block's rows: a causal block computes at
                            // most one panel of masked scores
constexpr int PV = PANEL / VW;                             // vectors per panel row
// Register tiles of ACC (kernel_common.h) accumulators: scores 8 rows × 2 vectors (AVX-512) or 6 × 2 (AVX2).
constexpr int QK_COLS = PV < 2 ? PV : 2;                   // vectors per score microkernel pass
constexpr int QK_ROWS = ACC / QK_COLS;
constexpr int BQ_FWD = 32;                                 // query rows per forward block
constexpr int BQ_BWD = 32;                                 // query rows per backward block

// rows (n, D) with token stride `stride` -> panels [n_pad / PANEL][D][PANEL], zero past n.
template <int D>
void pack_transposed(const float* rows, int64_t stride, int64_t n, float* panels) {
  const int64_t n_pad = round_up(n, PANEL);
  for (int64_t p = 0; p < n_pad; p += PANEL) {
    float* panel = panels + p * D;
    const int64_t w = min64(PANEL, n - p);
    for (int64_t c = 0; c < w; ++c) {
      const float* r = rows + (p + c) * stride;
      for (int d = 0; d < D; ++d) panel[d * PANEL + c] = r[d];
    }
    for (int d = 0; d < D; ++d)
      for (int64_t c = w; c < PANEL; ++c) panel[d * PANEL + c] = 0.f;
  }
}

// S[r][0, n_pad) = Σ_d A[r][d] · Bt[d][·] for r < R: A rows with stride lda, Bt packed panels, S with stride lds.
template <int D, int R>
inline void scores_rows(const float* a, int64_t lda, const float* panels, int64_t n_pad, float* s, int64_t lds) {
  for (int64_t p = 0; p < n_pad; p += PANEL) {
    const float* panel = panels + p * D;
    for (int c0 = 0; c0 < PV; c0 += QK_COLS) {
      vf acc[R][QK_COLS];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < QK_COLS; ++c) acc[r][c] = splat(0.f);   // not `= {}`: that zeroes memory (rep stos)
      for (int d = 0; d < D; ++d) {
        vf b[QK_COLS];
        for (int c = 0; c < QK_COLS; ++c) b[c] = load(panel + d * PANEL + (c0 + c) * VW);
        for (int r = 0; r < R; ++r) {
          const vf x = splat(a[r * lda + d]);
          for (int c = 0; c < QK_COLS; ++c) acc[r][c] += x * b[c];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < QK_COLS; ++c) store(s + r * lds + p + (c0 + c) * VW, acc[r][c]);
    }
  }
}

template <int D>
void scores(const float* a, int64_t lda, int64_t rows, const float* panels, int64_t n_pad, float* s, int64_t lds) {
  int64_t r = 0;
  for (; r + QK_ROWS <= rows; r += QK_ROWS) scores_rows<D, QK_ROWS>(a + r * lda, lda, panels, n_pad, s + r * lds, lds);
  for (; r < rows; ++r) scores_rows<D, 1>(a + r * lda, lda, panels, n_pad, s + r * lds, lds);
}

// Row r's sum runs over its own key count n[r] (the rest of P is zero, so any n >= n[r] gives the same result).
template <int D>
void weighted(const float* p, int64_t ldp, int64_t rows, const int64_t* n, const float* b, int64_t ldb, float* out,
              int64_t ldo, const float* mul) {
  constexpr int R = weighted_rows_per_tile<D>();
  int64_t r = 0;
  for (; r + R <= rows; r += R) weighted_rows<D, R>(p + r * ldp, ldp, b, ldb, n[r + R - 1], out + r * ldo, ldo, mul + r);
  for (; r < rows; ++r) weighted_rows<D, 1>(p + r * ldp, ldp, b, ldb, n[r], out + r * ldo, ldo, mul + r);
}

// acc[j][·] += Σ_{i in [first_j, rows)} P[i][j] · B[i][·] for keys j < n, the transposed product (dV += Pᵀ dO,
// dK += dSᵀ Q); first_j = max(0, j - shift) skips query rows that cannot see key j (shift = -∞: none skipped).
template <int D, int R>
inline void transposed_rows(const float* p, int64_t ldp, int64_t i_begin, int64_t rows, const float* b, int64_t ldb,
                            float* acc_out) {
  constexpr int DV = D / VW;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < DV; ++v) acc[r][v] = splat(0.f);
  for (int64_t i = i_begin; i < rows; ++i) {
    vf x[DV];
    for (int v = 0; v < DV; ++v) x[v] = load(b + i * ldb + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf w = splat(p[i * ldp + r]);
      for (int v = 0; v < DV; ++v) acc[r][v] += w * x[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < DV; ++v) store(acc_out + r * D + v * VW, load(acc_out + r * D + v * VW) + acc[r][v]);
}

template <int D>
void transposed(const float* p, int64_t ldp, int64_t rows, int64_t n, int64_t first_row_offset, bool causal,
                const float* b, int64_t ldb, float* acc) {
  constexpr int R = weighted_rows_per_tile<D>();
  auto first = [&](int64_t j) { return causal ? max64(0, j - first_row_offset) : int64_t{0}; };
  int64_t j = 0;
  for (; j + R <= n; j += R) transposed_rows<D, R>(p + j, ldp, first(j), rows, b, ldb, acc + j * D);
  for (; j < n; ++j) transposed_rows<D, 1>(p + j, ldp, first(j), rows, b, ldb, acc + j * D);
}

struct Doc {
  int64_t q0, k0, lq, lk;
};

inline Doc doc(const AttentionLaunch& a, int64_t b) {
  const int32_t* cq = reinterpret_cast<const int32_t*>(a.cu_q);
  const int32_t* ck = reinterpret_cast<const int32_t*>(a.cu_k);
  return {cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]};
}

// Keys row i (of the document's queries) sees: all, or causally those j <= i + lk - lq (bottom-right aligned).
inline int64_t visible(const AttentionLaunch& a, const Doc& d, int64_t i) {
  return a.causal ? min64(max64(i + d.lk - d.lq + 1, 0), d.lk) : d.lk;
}

// Query rows [i0, i0 + BQ) of head h of document d, with the document's Kᵀ packed in kt and a BQ × (keys_pad)
// score tile and BQ floats in s.
template <int D>
void forward_block(const AttentionLaunch& a, const Doc& d, int64_t h, int64_t i0, const float* kt, float* qs,
                   float* s, float* inv_l) {
  const int64_t rows = min64(BQ_FWD, d.lq - i0);
  const int64_t group = a.heads / a.kv_heads, kvh = h / group;
  const int64_t q_stride = a.heads * D, kv_stride = a.kv_heads * D;
  const float* q = reinterpret_cast<const float*>(a.q) + (d.q0 + i0) * q_stride + h * D;
  const float* v = reinterpret_cast<const float*>(a.v) + d.k0 * kv_stride + kvh * D;
  float* out = reinterpret_cast<float*>(a.out) + (d.q0 + i0) * q_stride + h * D;
  float* lse = reinterpret_cast<float*>(a.lse) + h * a.total_q + d.q0 + i0;

  int64_t n[BQ_FWD];
  for (int64_t i = 0; i < rows; ++i) n[i] = visible(a, d, i0 + i);
  const int64_t keys = n[rows - 1], keys_pad = round_up(keys, PANEL);

  const float qscale = a.scale * LOG2E;
  for (int64_t i = 0; i < rows; ++i)
    for (int e = 0; e < D; ++e) qs[i * D + e] = q[i * q_stride + e] * qscale;
  scores<D>(qs, D, rows, kt, keys_pad, s, keys_pad);

  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * keys_pad;
    const int64_t ni = n[i], full = ni / VW * VW;
    if (ni == 0) {                                         // no key: out 0, lse +inf (flash-attn's convention)
      fill(row, row + keys, 0.f);
      inv_l[i] = 0.f;
      lse[i] = kInf;
      continue;
    }
    float m = -kInf;
    vf mv = splat(m);
    for (int64_t j = 0; j < full; j += VW) { const vf x = load(row + j); mv = mv > x ? mv : x; }
    m = hmax(mv);
    for (int64_t j = full; j < ni; ++j) m = row[j] > m ? row[j] : m;
    vf sv = {};
    for (int64_t j = 0; j < full; j += VW) { const vf e = exp2_neg(load(row + j) - m); store(row + j, e); sv += e; }
    float l = hsum(sv);
    if (full < ni) {                                       // the tail through a zero-padded vector
      vf x = splat(-200.f);
      for (int64_t j = full; j < ni; ++j) x[j - full] = row[j] - m;
      const vf e = exp2_neg(x);
      for (int64_t j = full; j < ni; ++j) { row[j] = e[j - full]; l += e[j - full]; }
    }
    fill(row + ni, row + keys, 0.f);
    inv_l[i] = 1.f / l;
    lse[i] = (m + __builtin_log2f(l)) * LN2;
  }
  weighted<D>(s, keys_pad, rows, n, v, kv_stride, out, q_stride, inv_l);
}

// Every query head of KV head kvh's group over document b: its Kᵀ is packed once.
template <int D>
void forward_task(const AttentionLaunch& a, int64_t b, int64_t kvh) {
  const Doc d = doc(a, b);
  const int64_t group = a.heads / a.kv_heads, keys_pad = round_up(d.lk, PANEL);
  float* kt = scratch_floats(keys_pad * D + BQ_FWD * D + BQ_FWD * keys_pad + BQ_FWD);
  float* qs = kt + keys_pad * D;
  float* s = qs + BQ_FWD * D;
  float* inv_l = s + BQ_FWD * keys_pad;
  pack_transposed<D>(reinterpret_cast<const float*>(a.k) + d.k0 * a.kv_heads * D + kvh * D, a.kv_heads * D, d.lk,
                     kt);
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
    for (int64_t i0 = 0; i0 < d.lq; i0 += BQ_FWD) forward_block<D>(a, d, h, i0, kt, qs, s, inv_l);
}

template <int D>
void backward_task(const AttentionLaunch& a, int64_t b, int64_t kvh) {
  const Doc d = doc(a, b);
  const int64_t group = a.heads / a.kv_heads;
  const int64_t q_stride = a.heads * D, kv_stride = a.kv_heads * D;
  const float* k = reinterpret_cast<const float*>(a.k) + d.k0 * kv_stride + kvh * D;
  const float* v = reinterpret_cast<const float*>(a.v) + d.k0 * kv_stride + kvh * D;
  float* dk = reinterpret_cast<float*>(a.dk) + d.k0 * kv_stride + kvh * D;
  float* dv = reinterpret_cast<float*>(a.dv) + d.k0 * kv_stride + kvh * D;
  const int64_t keys_pad = round_up(d.lk, PANEL);
  float* kt = scratch_floats(2 * keys_pad * D + 2 * d.lk * D + 2 * BQ_BWD * keys_pad + BQ_BWD * D + 2 * BQ_BWD);
  float* vt = kt + keys_pad * D;
  float* dk_acc = vt + keys_pad * D;                       // (lk, D), unscaled
  float* dv_acc = dk_acc + d.lk * D;
  float* p = dv_acc + d.lk * D;                            // (BQ, keys_pad)
  float* ds = p + BQ_BWD * keys_pad;
  float* qs = ds + BQ_BWD * keys_pad;                      // (BQ, D) q · scale · log2 e
  float* delta = qs + BQ_BWD * D;
  float* dq_scale = delta + BQ_BWD;                        // scale, per row
  fill(dq_scale, dq_scale + BQ_BWD, a.scale);
  fill(dk_acc, dk_acc + 2 * d.lk * D, 0.f);
  pack_transposed<D>(k, kv_stride, d.lk, kt);
  pack_transposed<D>(v, kv_stride, d.lk, vt);
  const float qscale = a.scale * LOG2E;

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < d.lq; i0 += BQ_BWD) {
      const int64_t rows = min64(BQ_BWD, d.lq - i0);
      const int64_t row0 = (d.q0 + i0) * q_stride + h * D;
      const float* q = reinterpret_cast<const float*>(a.q) + row0;
      const float* dout = reinterpret_cast<const float*>(a.dout) + row0;
      const float* out = reinterpret_cast<const float*>(a.out) + row0;
      const float* lse = reinterpret_cast<const float*>(a.lse) + h * a.total_q + d.q0 + i0;
      float* dq = reinterpret_cast<float*>(a.dq) + row0;
      int64_t n[BQ_BWD];
      for (int64_t i = 0; i < rows; ++i) n[i] = visible(a, d, i0 + i);
      const int64_t keys = n[rows - 1], kp = round_up(keys, PANEL);
      for (int64_t i = 0; i < rows; ++i) {
        float dot = 0.f;
        for (int e = 0; e < D; ++e) {
          qs[i * D + e] = q[i * q_stride + e] * qscale;
          dot += dout[i * q_stride + e] * out[i * q_stride + e];
        }
        delta[i] = dot;
      }
      scores<D>(qs, D, rows, kt, kp, p, keys_pad);         // S (log2 units)
      scores<D>(dout, q_stride, rows, vt, kp, ds, keys_pad);   // dP
      for (int64_t i = 0; i < rows; ++i) {
        float* pr = p + i * keys_pad;
        float* dr = ds + i * keys_pad;
        const int64_t ni = n[i];
        const float l2 = lse[i] * LOG2E;
        const vf l2v = splat(l2), dv_ = splat(delta[i]);
        int64_t j = 0;
        if (ni > 0) {
          for (; j + VW <= ni; j += VW) {
            const vf e = exp2_neg(load(pr + j) - l2v);
            store(pr + j, e);
            store(dr + j, e * (load(dr + j) - dv_));
          }
          if (j < ni) {
            vf x = splat(-200.f);
            for (int64_t c = j; c < ni; ++c) x[c - j] = pr[c] - l2;
            const vf e = exp2_neg(x);
            for (int64_t c = j; c < ni; ++c) { pr[c] = e[c - j]; dr[c] = e[c - j] * (dr[c] - delta[i]); }
            j = ni;
          }
        }
        fill(pr + j, pr + keys, 0.f);
        fill(dr + j, dr + keys, 0.f);
      }
      weighted<D>(ds, keys_pad, rows, n, k, kv_stride, dq, q_stride, dq_scale);
      // Query row i (block-relative) sees key j iff i >= j - (i0 + lk - lq).
      const int64_t shift = i0 + d.lk - d.lq;
      transposed<D>(p, keys_pad, rows, keys, shift, a.causal, dout, q_stride, dv_acc);
      transposed<D>(ds, keys_pad, rows, keys, shift, a.causal, q, q_stride, dk_acc);
    }
  }
  for (int64_t j = 0; j < d.lk; ++j)
    for (int e = 0; e < D; ++e) {
      dk[j * kv_stride + e] = dk_acc[j * D + e] * a.scale;
      dv[j * kv_stride + e] = dv_acc[j * D + e];
    }
}

template <int D>
void forward_d(const AttentionLaunch& a, const int64_t* order, int num_threads) {
  const int64_t tasks = a.n_seqs * a.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1)
  for (int64_t t = 0; t < tasks; ++t) forward_task<D>(a, order[t / a.kv_heads], t % a.kv_heads);
}

template <int D>
void backward_d(const AttentionLaunch& a, const int64_t* order, int num_threads) {
  float* dq = reinterpret_cast<float*>(a.dq);
  const int64_t tasks = a.n_seqs * a.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = order[t / a.kv_heads], kvh = t % a.kv_heads;
    const Doc d = doc(a, b);
    if (d.lk == 0) {                                       // no key: the document's queries get zero gradients
      if (kvh == 0) fill(dq + d.q0 * a.heads * D, dq + (d.q0 + d.lq) * a.heads * D, 0.f);
      continue;
    }
    backward_task<D>(a, b, kvh);
  }
}

}  // namespace

bool attention_forward(const AttentionLaunch& a, const int64_t* order, int num_threads) {
  switch (a.dim) {
    case 16: forward_d<16>(a, order, num_threads); return true;
    case 32: forward_d<32>(a, order, num_threads); return true;
    case 64: forward_d<64>(a, order, num_threads); return true;
    case 128: forward_d<128>(a, order, num_threads); return true;
    default: return false;
  }
}

bool attention_backward(const AttentionLaunch& a, const int64_t* order, int num_threads) {
  switch (a.dim) {
    case 16: backward_d<16>(a, order, num_threads); return true;
    case 32: backward_d<32>(a, order, num_threads); return true;
    case 64: backward_d<64>(a, order, num_threads); return true;
    case 128: backward_d<128>(a, order, num_threads); return true;
    default: return false;
  }
}

}  // namespace IK_ATTN_NS
}  // namespace ik
