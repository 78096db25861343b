// The CUDA entry points of a build made without a CUDA compiler: each says so.
#include <stdexcept>

#include "entry_points.h"

namespace ik {
namespace {

[[noreturn]] void no_cuda(const char* fn) {
  throw std::runtime_error(std::string(fn) + ": internlm_kernels._C was built without CUDA (no nvcc at build time)");
}

}  // namespace

bool built_with_cuda() { return false; }
std::string cuda_device_error() { return "the extension was built without CUDA (no nvcc found at build time)"; }

void adamw_cuda(const AdamWLaunch&, int, int64_t) { no_cuda("adamw_cuda"); }
void grad_norm_cuda(const MultiTensorLaunch&, int, double, int64_t, int64_t, int, int64_t) { no_cuda("grad_norm_cuda"); }
void grad_scale_cuda(const MultiTensorLaunch&, int64_t, float, int, int64_t) { no_cuda("grad_scale_cuda"); }

}  // namespace ik
