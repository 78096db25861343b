// Norm of many gradients and their clipping, each in one launch for all tensors (any mix of dtypes).
//
// grad_norm_cuda: pass 1, one block per chunk, each thread accumulates its elements (float, vector loads when
// aligned), the block reduces through warp shuffles and writes one partial per chunk; pass 2, one block
// combines the partials in a fixed order in double and writes the norm. Deterministic: no atomics.
// grad_scale_cuda: one block per chunk reads the norm from device memory (no host sync), computes the clip
// coefficient and scales its chunk, or returns at once when the coefficient is 1.
#include <stdexcept>
#include <string>

#include "cuda/device.h"
#include "entry_points.h"
#include "grad_norm.h"
#include "multi_tensor.h"

namespace ik {
namespace {

using cuda::global_ref;
using cuda::kVec;
using cuda::load_pack;
using cuda::Pack;
using cuda::pack_aligned;
using cuda::store_pack;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <NormKind K, typename Acc>
__device__ Acc block_combine(Acc acc, Acc* shared) {  // shared: kWarps entries; result valid in thread 0
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc = norm_combine<K>(acc, __shfl_down_sync(0xffffffffu, acc, offset));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kWarps ? shared[threadIdx.x] : Acc(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc = norm_combine<K>(acc, __shfl_down_sync(0xffffffffu, acc, offset));
  }
  return acc;
}

// This thread's share of one chunk of one tensor.
template <NormKind K, typename T>
__device__ float thread_partial(const T* x, int64_t n, float p) {
  float acc = 0.0f;
  int64_t first_scalar = 0;
  if (pack_aligned<T>(x)) {
    const int64_t n_packed = n / kVec * kVec;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < n_packed; i += int64_t(kThreads) * kVec) {
      const Pack<T> v = load_pack(x + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc = norm_combine<K>(acc, norm_term<K>(to_float(v.v[j]), p));
    }
    first_scalar = n_packed;
  }
  for (int64_t i = first_scalar + threadIdx.x; i < n; i += kThreads) {
    acc = norm_combine<K>(acc, norm_term<K>(to_float(global_ref(x + i)), p));
  }
  return acc;
}

template <NormKind K>
__global__ void __launch_bounds__(kThreads)
    norm_partials_kernel(const GradTensorRow* __restrict__ rows,  // (n_tensors,) address, numel, dtype
                         const ChunkRef* __restrict__ chunks,     // (n_chunks,) one per block
                         int64_t chunk_size,                      // elements per chunk, a multiple of kVec
                         float p,                                 // order of an L_p norm (kNormP)
                         float* __restrict__ partials) {          // (n_chunks,) out: one per chunk
  __shared__ float shared[kWarps];
  const ChunkRef chunk = chunks[blockIdx.x];
  const GradTensorRow row = rows[chunk.tensor];
  const int64_t n = chunk_length(row.numel, chunk.start, chunk_size);
  float acc = 0.0f;
  switch (row.dtype) {  // uniform across the block
    case kFloat32: acc = thread_partial<K>(reinterpret_cast<const float*>(row.data) + chunk.start, n, p); break;
    case kFloat16: acc = thread_partial<K>(reinterpret_cast<const Half*>(row.data) + chunk.start, n, p); break;
    case kBFloat16: acc = thread_partial<K>(reinterpret_cast<const BFloat16*>(row.data) + chunk.start, n, p); break;
  }
  acc = block_combine<K>(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <NormKind K>
__global__ void __launch_bounds__(kThreads)
    norm_finalize_kernel(const float* __restrict__ partials,  // (n_chunks,)
                         int64_t n_chunks,
                         double p,                            // order of an L_p norm (kNormP)
                         float* __restrict__ out) {           // (1,) the norm
  __shared__ double shared[kWarps];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n_chunks; i += kThreads) acc = norm_combine<K>(acc, double(partials[i]));
  acc = block_combine<K>(acc, shared);
  if (threadIdx.x == 0) out[0] = float(norm_finalize<K>(acc, p));
}

template <typename T>
__device__ void scale_chunk(T* x, int64_t n, float coef) {
  int64_t first_scalar = 0;
  if (pack_aligned<T>(x)) {
    const int64_t n_packed = n / kVec * kVec;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < n_packed; i += int64_t(kThreads) * kVec) {
      Pack<T> v = load_pack(x + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) * coef);
      store_pack(x + i, v);
    }
    first_scalar = n_packed;
  }
  for (int64_t i = first_scalar + threadIdx.x; i < n; i += kThreads) {
    T& e = global_ref(x + i);
    e = from_float<T>(to_float(e) * coef);
  }
}

__global__ void __launch_bounds__(kThreads)
    scale_kernel(const GradTensorRow* __restrict__ rows,  // (n_tensors,) address, numel, dtype
                 const ChunkRef* __restrict__ chunks,     // (n_chunks,) one per block
                 int64_t chunk_size,                      // elements per chunk, a multiple of kVec
                 const float* __restrict__ total_norm,    // (1,) written by norm_finalize_kernel
                 float max_norm) {
  const float coef = clip_coefficient(max_norm, *total_norm);
  if (coef == 1.0f) return;  // x · 1 == x for every x: nothing to write
  const ChunkRef chunk = chunks[blockIdx.x];
  const GradTensorRow row = rows[chunk.tensor];
  const int64_t n = chunk_length(row.numel, chunk.start, chunk_size);
  switch (row.dtype) {
    case kFloat32: scale_chunk(reinterpret_cast<float*>(row.data) + chunk.start, n, coef); break;
    case kFloat16: scale_chunk(reinterpret_cast<Half*>(row.data) + chunk.start, n, coef); break;
    case kBFloat16: scale_chunk(reinterpret_cast<BFloat16*>(row.data) + chunk.start, n, coef); break;
  }
}

template <NormKind K>
void launch_norm(const MultiTensorLaunch& work, double p, float* partials, float* out, cudaStream_t stream) {
  if (work.n_chunks > 0) {
    norm_partials_kernel<K><<<unsigned(work.n_chunks), kThreads, 0, stream>>>(
        reinterpret_cast<const GradTensorRow*>(work.table), reinterpret_cast<const ChunkRef*>(work.chunks),
        work.chunk_size, float(p), partials);
    cuda::check_launch("grad_norm_cuda (partials)");
  }
  norm_finalize_kernel<K><<<1, kThreads, 0, stream>>>(partials, work.n_chunks, p, out);
  cuda::check_launch("grad_norm_cuda (finalize)");
}

void check_grid(const MultiTensorLaunch& work, const char* fn) {
  if (work.n_chunks > 0x7fffffff) throw std::invalid_argument(std::string(fn) + ": more than 2^31 - 1 chunks");
}

}  // namespace

void grad_norm_cuda(const MultiTensorLaunch& work, int kind, double p, int64_t partials, int64_t out, int device,
                    int64_t stream) {
  check_grid(work, "grad_norm_cuda");
  const cuda::DeviceGuard guard(device);
  auto* part = reinterpret_cast<float*>(partials);
  auto* result = reinterpret_cast<float*>(out);
  const cudaStream_t s = cuda::as_stream(stream);
  switch (kind) {
    case kNormL1: return launch_norm<kNormL1>(work, p, part, result, s);
    case kNormL2: return launch_norm<kNormL2>(work, p, part, result, s);
    case kNormInf: return launch_norm<kNormInf>(work, p, part, result, s);
    case kNormP: return launch_norm<kNormP>(work, p, part, result, s);
  }
  throw std::invalid_argument("grad_norm_cuda: unknown norm kind " + std::to_string(kind));
}

void grad_scale_cuda(const MultiTensorLaunch& work, int64_t total_norm, float max_norm, int device, int64_t stream) {
  check_grid(work, "grad_scale_cuda");
  const cuda::DeviceGuard guard(device);
  if (work.n_chunks == 0) return;
  scale_kernel<<<unsigned(work.n_chunks), kThreads, 0, cuda::as_stream(stream)>>>(
      reinterpret_cast<const GradTensorRow*>(work.table), reinterpret_cast<const ChunkRef*>(work.chunks),
      work.chunk_size, reinterpret_cast<const float*>(total_norm), max_norm);
  cuda::check_launch("grad_scale_cuda");
}

}  // namespace ik
