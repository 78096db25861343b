// AdamW over many tensors on the CPU: OpenMP over the chunks of the work list, a vectorized loop per chunk
// over the shared per-element math of adamw.h.
#include <stdexcept>
#include <string>
#include <type_traits>

#include "adamw.h"
#include "cpu/parallel.h"
#include "entry_points.h"
#include "multi_tensor.h"

namespace ik {
namespace {

// One contiguous span of one tensor. P: parameter, G: gradient, S: moment storage type.
template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
IK_CPU_CLONES void adamw_span(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                              S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, float* __restrict master,
                              int64_t n, AdamWScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float w = MASTER ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float v_max = AMSGRAD ? to_float(max_exp_avg_sq[i]) : 0.0f;
    adamw_update<AMSGRAD>(w, to_float(grad[i]), m, v, v_max, s);
    if (MASTER) master[i] = w;
    param[i] = from_float<P>(w);
    exp_avg[i] = from_float<S>(m);
    exp_avg_sq[i] = from_float<S>(v);
    if (AMSGRAD) max_exp_avg_sq[i] = from_float<S>(v_max);
  }
}

template <typename P, typename G, typename S, bool MASTER, bool AMSGRAD>
void adamw_chunks(const AdamWLaunch& launch, int num_threads) {
  const auto* rows = reinterpret_cast<const AdamWTensorRow*>(launch.work.table);
  const auto* chunks = reinterpret_cast<const ChunkRef*>(launch.work.chunks);
  const int64_t chunk_size = launch.work.chunk_size;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (num_threads > 1)
  for (int64_t c = 0; c < launch.work.n_chunks; ++c) {
    const AdamWTensorRow& r = rows[chunks[c].tensor];
    const int64_t start = chunks[c].start;
    adamw_span<P, G, S, MASTER, AMSGRAD>(
        reinterpret_cast<P*>(r.param) + start, reinterpret_cast<const G*>(r.grad) + start,
        reinterpret_cast<S*>(r.exp_avg) + start, reinterpret_cast<S*>(r.exp_avg_sq) + start,
        AMSGRAD ? reinterpret_cast<S*>(r.max_exp_avg_sq) + start : nullptr,
        MASTER ? reinterpret_cast<float*>(r.master) + start : nullptr, chunk_length(r.numel, start, chunk_size),
        launch.scalars);
  }
}

template <typename P, typename G>
void adamw_dispatch_state(const AdamWLaunch& launch, int num_threads) {
  if (launch.master) {
    if constexpr (std::is_same_v<P, float>) {
      throw std::invalid_argument("adamw_cpu: master weights are for float16/bfloat16 parameters");
    } else {
      if (launch.amsgrad) return adamw_chunks<P, G, float, true, true>(launch, num_threads);
      return adamw_chunks<P, G, float, true, false>(launch, num_threads);
    }
  }
  if (launch.amsgrad) return adamw_chunks<P, G, P, false, true>(launch, num_threads);
  return adamw_chunks<P, G, P, false, false>(launch, num_threads);
}

template <typename P>
void adamw_dispatch_grad(const AdamWLaunch& launch, int num_threads) {
  switch (launch.grad_dtype) {
    case kFloat32: return adamw_dispatch_state<P, float>(launch, num_threads);
    case kFloat16: return adamw_dispatch_state<P, Half>(launch, num_threads);
    case kBFloat16: return adamw_dispatch_state<P, BFloat16>(launch, num_threads);
  }
  throw std::invalid_argument("adamw_cpu: unknown grad dtype code " + std::to_string(launch.grad_dtype));
}

}  // namespace

void adamw_cpu(const AdamWLaunch& launch, int num_threads) {
  switch (launch.param_dtype) {
    case kFloat32: return adamw_dispatch_grad<float>(launch, num_threads);
    case kFloat16: return adamw_dispatch_grad<Half>(launch, num_threads);
    case kBFloat16: return adamw_dispatch_grad<BFloat16>(launch, num_threads);
  }
  throw std::invalid_argument("adamw_cpu: unknown param dtype code " + std::to_string(launch.param_dtype));
}

}  // namespace ik
