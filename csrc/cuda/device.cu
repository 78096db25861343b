// Device discovery and error reporting. cudart is linked statically, so the module imports on machines
// without a driver; every entry point opens a DeviceGuard first and gets a clear error there.
#include <atomic>
#include <stdexcept>
#include <string>

#include "cuda/device.h"
#include "entry_points.h"

namespace ik {

bool built_with_cuda() { return true; }

std::string cuda_device_error() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last-error state so later checks start clean
    return "no CUDA device: cudaGetDeviceCount returned error " + std::to_string(int(err)) + " (" +
           cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "no CUDA device: cudaGetDeviceCount found 0 devices";
  return "";
}

namespace cuda {

DeviceGuard::DeviceGuard(int device) {
  // Once a device was seen it stays; until then each call asks again (and reports why not).
  static std::atomic<bool> device_seen{false};
  if (!device_seen.load(std::memory_order_relaxed)) {
    const std::string err = cuda_device_error();
    if (!err.empty()) throw std::runtime_error(err);
    device_seen.store(true, std::memory_order_relaxed);
  }
  int current = 0;
  cudaError_t e = cudaGetDevice(&current);
  if (e == cudaSuccess && current != device) {
    e = cudaSetDevice(device);
    if (e == cudaSuccess) previous_ = current;
  }
  if (e != cudaSuccess) {
    throw std::runtime_error("cannot make CUDA device " + std::to_string(device) + " current: " +
                             cudaGetErrorString(e));
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": launch failed: " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace ik
