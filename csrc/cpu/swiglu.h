// CPU SwiGLU (csrc/cpu/swiglu_kernels.h): the launch description and the per-ISA entry points csrc/cpu/swiglu.cpp
// dispatches to.
#pragma once

#include <cstdint>

namespace ik {

// rows × width float32 rows, each row contiguous, rows `*_row` elements apart (the packed [gate | up] layout is two
// such views of one tensor). With g = gate_multiplier · gate, s = sigmoid(g):
//   forward   out = g · s · up · down_multiplier
//   backward  dup = dout' · g · s,  dgate = dout' · up · s · (1 + g · (1 - s)) · gate_multiplier,
//             dout' = dout · down_multiplier; either output may be absent (0).
struct SwiGLULaunch {
  int64_t gate, up, out, dout, dgate, dup;
  int64_t rows, width;
  int64_t gate_row, up_row, out_row, dout_row, dgate_row, dup_row;
  float gate_multiplier, down_multiplier;
};

#define IK_SWIGLU_ISA(ns)                                               \
  namespace ns {                                                        \
  void swiglu_forward(const SwiGLULaunch& a, int num_threads);          \
  void swiglu_backward(const SwiGLULaunch& a, int num_threads);         \
  }
IK_SWIGLU_ISA(swiglu_generic)
IK_SWIGLU_ISA(swiglu_avx2)
IK_SWIGLU_ISA(swiglu_avx512)
#undef IK_SWIGLU_ISA

}  // namespace ik
