// Norm of many gradients and their clipping on the CPU: OpenMP over chunks, double accumulators.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/parallel.h"
#include "entry_points.h"
#include "grad_norm.h"
#include "multi_tensor.h"

namespace ik {
namespace {

// Independent accumulators per span: a single running sum would serialize on the add latency and round
// worse; kLanes of them vectorize, and are combined in a fixed order so the result is deterministic.
constexpr int kLanes = 16;

template <NormKind K, typename T>
IK_CPU_CLONES double norm_span(const T* __restrict x, int64_t n, double p) {
  double lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] = norm_combine<K>(lanes[j], norm_term<K>(to_float(x[i + j]), p));
  }
  for (; i < n; ++i) lanes[0] = norm_combine<K>(lanes[0], norm_term<K>(to_float(x[i]), p));
  double acc = lanes[0];
  for (int j = 1; j < kLanes; ++j) acc = norm_combine<K>(acc, lanes[j]);
  return acc;
}

template <NormKind K>
double norm_chunk(const GradTensorRow& r, int64_t start, int64_t n, double p) {
  switch (r.dtype) {
    case kFloat32: return norm_span<K>(reinterpret_cast<const float*>(r.data) + start, n, p);
    case kFloat16: return norm_span<K>(reinterpret_cast<const Half*>(r.data) + start, n, p);
    case kBFloat16: return norm_span<K>(reinterpret_cast<const BFloat16*>(r.data) + start, n, p);
  }
  return std::nan("");  // unreachable: check_dtypes ran before the parallel region
}

// Exceptions must not escape an OpenMP region, so row dtypes are checked up front.
void check_dtypes(const MultiTensorLaunch& work, const char* fn) {
  const auto* rows = reinterpret_cast<const GradTensorRow*>(work.table);
  const auto* chunks = reinterpret_cast<const ChunkRef*>(work.chunks);
  for (int64_t c = 0; c < work.n_chunks; ++c) {
    const int64_t code = rows[chunks[c].tensor].dtype;
    if (code != kFloat32 && code != kFloat16 && code != kBFloat16) {
      throw std::invalid_argument(std::string(fn) + ": unknown dtype code " + std::to_string(code));
    }
  }
}

template <NormKind K>
void grad_norm(const MultiTensorLaunch& work, double p, double* partials, float* out, int num_threads) {
  const auto* rows = reinterpret_cast<const GradTensorRow*>(work.table);
  const auto* chunks = reinterpret_cast<const ChunkRef*>(work.chunks);
  check_dtypes(work, "grad_norm_cpu");
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (num_threads > 1)
  for (int64_t c = 0; c < work.n_chunks; ++c) {
    const GradTensorRow& r = rows[chunks[c].tensor];
    partials[c] = norm_chunk<K>(r, chunks[c].start, chunk_length(r.numel, chunks[c].start, work.chunk_size), p);
  }
  double acc = 0.0;
  for (int64_t c = 0; c < work.n_chunks; ++c) acc = norm_combine<K>(acc, partials[c]);
  *out = static_cast<float>(norm_finalize<K>(acc, p));
}

template <typename T>
IK_CPU_CLONES void scale_span(T* __restrict x, int64_t n, float coef) {
  for (int64_t i = 0; i < n; ++i) x[i] = from_float<T>(to_float(x[i]) * coef);
}

}  // namespace

void grad_norm_cpu(const MultiTensorLaunch& work, int kind, double p, int64_t partials, int64_t out,
                   int num_threads) {
  auto* part = reinterpret_cast<double*>(partials);
  auto* result = reinterpret_cast<float*>(out);
  switch (kind) {
    case kNormL1: return grad_norm<kNormL1>(work, p, part, result, num_threads);
    case kNormL2: return grad_norm<kNormL2>(work, p, part, result, num_threads);
    case kNormInf: return grad_norm<kNormInf>(work, p, part, result, num_threads);
    case kNormP: return grad_norm<kNormP>(work, p, part, result, num_threads);
  }
  throw std::invalid_argument("grad_norm_cpu: unknown norm kind " + std::to_string(kind));
}

void grad_scale_cpu(const MultiTensorLaunch& work, int64_t total_norm, float max_norm, int num_threads) {
  const float coef = clip_coefficient(max_norm, *reinterpret_cast<const float*>(total_norm));
  if (coef == 1.0f) return;  // x · 1 == x for every x: nothing to write
  check_dtypes(work, "grad_scale_cpu");
  const auto* rows = reinterpret_cast<const GradTensorRow*>(work.table);
  const auto* chunks = reinterpret_cast<const ChunkRef*>(work.chunks);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (num_threads > 1)
  for (int64_t c = 0; c < work.n_chunks; ++c) {
    const GradTensorRow& r = rows[chunks[c].tensor];
    const int64_t start = chunks[c].start;
    const int64_t n = chunk_length(r.numel, start, work.chunk_size);
    switch (r.dtype) {
      case kFloat32: scale_span(reinterpret_cast<float*>(r.data) + start, n, coef); break;
      case kFloat16: scale_span(reinterpret_cast<Half*>(r.data) + start, n, coef); break;
      case kBFloat16: scale_span(reinterpret_cast<BFloat16*>(r.data) + start, n, coef); break;
    }
  }
}

}  // namespace ik
