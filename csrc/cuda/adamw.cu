// AdamW over many tensors in one launch per dtype combination (multi-tensor apply).
//
// Grid: one block per chunk of the work list (multi_tensor.h). A block reads its chunk's row, then its
// threads stride through the chunk kVec elements at a time with vector loads when every pointer of the
// tensor is aligned to its pack size, element by element otherwise (views at odd offsets). Math in float,
// once per element, through adamw_update (adamw.h).
#include <stdexcept>
#include <string>
#include <type_traits>

#include "adamw.h"
#include "cuda/device.h"
#include "entry_points.h"
#include "multi_tensor.h"

namespace ik {
namespace {

using cuda::kVec;
using cuda::global_ref;
using cuda::load_pack;
using cuda::Pack;
using cuda::pack_aligned;
using cuda::store_pack;

constexpr int kThreads = 512;

// One element. P: parameter, G: gradient, S: moment storage (float with master weights, else P).
template <typename P, typename G, typename S, bool MASTER>
__device__ __forceinline__ void adamw_element(P& param, G grad, S& exp_avg, S& exp_avg_sq, S& max_exp_avg_sq,
                                              float& master, bool amsgrad, const AdamWScalars& s) {
  float w = MASTER ? master : to_float(param);
  float m = to_float(exp_avg);
  float v = to_float(exp_avg_sq);
  if (amsgrad) {
    float v_max = to_float(max_exp_avg_sq);
    adamw_update<true>(w, to_float(grad), m, v, v_max, s);
    max_exp_avg_sq = from_float<S>(v_max);
  } else {
    float unused = 0.0f;
    adamw_update<false>(w, to_float(grad), m, v, unused, s);
  }
  if (MASTER) master = w;
  param = from_float<P>(w);
  exp_avg = from_float<S>(m);
  exp_avg_sq = from_float<S>(v);
}

template <typename P, typename G, typename S, bool MASTER>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWTensorRow* __restrict__ rows,  // (n_tensors,) pointers and sizes
                 const ChunkRef* __restrict__ chunks,      // (n_chunks,) one per block
                 int64_t chunk_size,                       // elements per chunk, a multiple of kVec
                 bool amsgrad,                             // rows carry max_exp_avg_sq
                 AdamWScalars s) {                         // step-dependent factors, by value
  const ChunkRef chunk = chunks[blockIdx.x];
  const AdamWTensorRow row = rows[chunk.tensor];
  const int64_t n = chunk_length(row.numel, chunk.start, chunk_size);
  P* param = reinterpret_cast<P*>(row.param) + chunk.start;
  const G* grad = reinterpret_cast<const G*>(row.grad) + chunk.start;
  S* exp_avg = reinterpret_cast<S*>(row.exp_avg) + chunk.start;
  S* exp_avg_sq = reinterpret_cast<S*>(row.exp_avg_sq) + chunk.start;
  S* max_exp_avg_sq = amsgrad ? reinterpret_cast<S*>(row.max_exp_avg_sq) + chunk.start : nullptr;
  float* master = MASTER ? reinterpret_cast<float*>(row.master) + chunk.start : nullptr;

  // chunk.start is a multiple of kVec, so the chunk is aligned exactly when its tensor is.
  const bool vectorized = pack_aligned<P>(param) && pack_aligned<G>(grad) && pack_aligned<S>(exp_avg) &&
                          pack_aligned<S>(exp_avg_sq) && (!amsgrad || pack_aligned<S>(max_exp_avg_sq)) &&
                          (!MASTER || pack_aligned<float>(master));
  int64_t first_scalar = 0;
  if (vectorized) {
    const int64_t n_packed = n / kVec * kVec;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < n_packed; i += int64_t(kThreads) * kVec) {
      // All loads of the iteration are issued before any math, keeping 4-6 vector loads in flight per thread.
      Pack<P> p;
      if (!MASTER) p = load_pack(param + i);  // with master weights the parameter is only written
      const Pack<G> g = load_pack(grad + i);
      Pack<S> m = load_pack(exp_avg + i);
      Pack<S> v = load_pack(exp_avg_sq + i);
      Pack<S> vm;
      if (amsgrad) vm = load_pack(max_exp_avg_sq + i);
      Pack<float> w;
      if (MASTER) w = load_pack(master + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        adamw_element<P, G, S, MASTER>(p.v[j], g.v[j], m.v[j], v.v[j], vm.v[j], w.v[j], amsgrad, s);
      }
      store_pack(param + i, p);
      store_pack(exp_avg + i, m);
      store_pack(exp_avg_sq + i, v);
      if (amsgrad) store_pack(max_exp_avg_sq + i, vm);
      if (MASTER) store_pack(master + i, w);
    }
    first_scalar = n_packed;
  }
  // The tail of a vectorized chunk, or the whole of a misaligned one.
  for (int64_t i = first_scalar + threadIdx.x; i < n; i += kThreads) {
    S unused_s{};
    float unused_w = 0.0f;
    adamw_element<P, G, S, MASTER>(global_ref(param + i), global_ref(grad + i), global_ref(exp_avg + i),
                                   global_ref(exp_avg_sq + i), amsgrad ? global_ref(max_exp_avg_sq + i) : unused_s,
                                   MASTER ? global_ref(master + i) : unused_w, amsgrad, s);
  }
}

template <typename P, typename G, typename S, bool MASTER>
void launch(const AdamWLaunch& l, int64_t stream) {
  adamw_kernel<P, G, S, MASTER><<<unsigned(l.work.n_chunks), kThreads, 0, cuda::as_stream(stream)>>>(
      reinterpret_cast<const AdamWTensorRow*>(l.work.table), reinterpret_cast<const ChunkRef*>(l.work.chunks),
      l.work.chunk_size, l.amsgrad, l.scalars);
  cuda::check_launch("adamw_cuda");
}

template <typename P, typename G>
void dispatch_state(const AdamWLaunch& l, int64_t stream) {
  if (!l.master) return launch<P, G, P, false>(l, stream);
  if constexpr (std::is_same_v<P, float>) {
    throw std::invalid_argument("adamw_cuda: master weights are for float16/bfloat16 parameters");
  } else {
    return launch<P, G, float, true>(l, stream);
  }
}

template <typename P>
void dispatch_grad(const AdamWLaunch& l, int64_t stream) {
  switch (l.grad_dtype) {
    case kFloat32: return dispatch_state<P, float>(l, stream);
    case kFloat16: return dispatch_state<P, Half>(l, stream);
    case kBFloat16: return dispatch_state<P, BFloat16>(l, stream);
  }
  throw std::invalid_argument("adamw_cuda: unknown grad dtype code " + std::to_string(l.grad_dtype));
}

}  // namespace

void adamw_cuda(const AdamWLaunch& l, int device, int64_t stream) {
  if (l.work.n_chunks > 0x7fffffff) throw std::invalid_argument("adamw_cuda: more than 2^31 - 1 chunks");
  const cuda::DeviceGuard guard(device);
  if (l.work.n_chunks == 0) return;
  switch (l.param_dtype) {
    case kFloat32: return dispatch_grad<float>(l, stream);
    case kFloat16: return dispatch_grad<Half>(l, stream);
    case kBFloat16: return dispatch_grad<BFloat16>(l, stream);
  }
  throw std::invalid_argument("adamw_cuda: unknown param dtype code " + std::to_string(l.param_dtype));
}

}  // namespace ik
