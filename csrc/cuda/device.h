// Host-side helpers of the CUDA entry points: device checks, launch errors, and the vector loads the
// multi-tensor kernels share.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ik {
namespace cuda {

// Throws std::runtime_error unless a CUDA device is usable, then makes `device` current until the guard goes
// out of scope. (The current device is per-thread driver state shared with torch's CUDA runtime: restore it.)
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

inline cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Elements per thread per iteration: 16-byte loads for float, 8-byte loads for the 16-bit types.
constexpr int kVec = 4;

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ inline bool pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

// Addresses come from the work table, so the compiler sees generic pointers; asserting that the exact
// address dereferenced is global turns generic LD/ST into LDG/STG. (Asserted where it is used: an assumption
// made before pointer arithmetic does not survive it.)
template <typename T>
__device__ __forceinline__ T& global_ref(T* ptr) {
  __builtin_assume(__isGlobal(ptr));
  return *ptr;
}

// One vector load/store of a pack (ld/st.global.v4.u32 or .v2.u32), whatever the element type.
template <typename T>
using PackWord = std::conditional_t<sizeof(Pack<T>) == 16, uint4, uint2>;

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  static_assert(sizeof(Pack<T>) == sizeof(PackWord<T>), "packs are 8 or 16 bytes");
  const PackWord<T> word = global_ref(reinterpret_cast<const PackWord<T>*>(ptr));
  Pack<T> out;
  memcpy(&out, &word, sizeof(out));
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack) {
  PackWord<T> word;
  memcpy(&word, &pack, sizeof(word));
  global_ref(reinterpret_cast<PackWord<T>*>(ptr)) = word;
}

}  // namespace cuda
}  // namespace ik
