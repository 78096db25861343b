// Work lists of the multi-tensor kernels. Python (internlm_kernels/_ext.py) builds both tables as int64
// tensors and passes their addresses; the layouts below are the contract with that code.
//
// A launch covers many tensors. Each tensor is cut into chunks of `chunk_size` elements (a multiple of
// kChunkMultiple, so every chunk starts at the same alignment as its tensor); one CUDA block, or one
// OpenMP work item, processes one chunk.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace ik {

constexpr int64_t kChunkMultiple = 8;

// One row per chunk: which tensor, and the element offset where the chunk starts.
struct ChunkRef {
  int64_t tensor;
  int64_t start;
};
static_assert(sizeof(ChunkRef) == 2 * sizeof(int64_t), "ChunkRef is two int64 columns");

// AdamW: one row per parameter. Addresses are 0 where unused (max_exp_avg_sq without amsgrad,
// master without master weights).
struct AdamWTensorRow {
  int64_t param;           // P*: the parameter (float, half or bfloat16)
  int64_t grad;            // G*: its gradient (any of the three)
  int64_t exp_avg;         // S*: first moment; S = float with master weights, else P
  int64_t exp_avg_sq;      // S*: second moment
  int64_t max_exp_avg_sq;  // S*: running max of exp_avg_sq (amsgrad)
  int64_t master;          // float*: fp32 master copy of a half/bfloat16 parameter
  int64_t numel;
  int64_t unused;          // pads the row to 64 bytes
};
static_assert(sizeof(AdamWTensorRow) == 8 * sizeof(int64_t), "AdamWTensorRow is eight int64 columns");

// Gradient norm and scaling: one row per gradient; tensors of different dtypes share a launch.
struct GradTensorRow {
  int64_t data;   // element address
  int64_t numel;
  int64_t dtype;  // ik::DType code
  int64_t unused;
};
static_assert(sizeof(GradTensorRow) == 4 * sizeof(int64_t), "GradTensorRow is four int64 columns");

IK_HD inline int64_t chunk_length(int64_t numel, int64_t start, int64_t chunk_size) {
  return numel - start < chunk_size ? numel - start : chunk_size;
}

}  // namespace ik
