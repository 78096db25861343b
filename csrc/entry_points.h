// The functions bindings.cpp exposes. Tensors arrive as addresses (int64), dtypes as ik::DType codes,
// CUDA streams as integers; Python has validated every argument and owns every buffer.
#pragma once

#include <cstdint>
#include <string>

#include "adamw.h"
#include "cpu/attention.h"
#include "cpu/decode_attention.h"
#include "cpu/rms_norm.h"
#include "cpu/swiglu.h"

namespace ik {

// A multi-tensor launch: `table` and `chunks` are the addresses of the tables of multi_tensor.h.
struct MultiTensorLaunch {
  int64_t table;
  int64_t chunks;
  int64_t n_chunks;
  int64_t chunk_size;
};

struct AdamWLaunch {
  MultiTensorLaunch work;  // rows are AdamWTensorRow
  int param_dtype;         // every row's parameter dtype
  int grad_dtype;          // every row's gradient dtype
  bool master;             // rows carry fp32 master weights and fp32 moments (half/bfloat16 params only)
  bool amsgrad;            // rows carry max_exp_avg_sq
  AdamWScalars scalars;
};

// Rotary embedding (rotate-half) of `tokens` × `groups` × `heads_per_group` heads of `dim` float32 features:
// out = x rotated by the per-token tables cos/sin (tokens, half) contiguous, their sine times `sign` (-1: the
// backward). Strides in elements; x and out must not overlap.
struct RotaryHeads {
  int64_t x, out, cos, sin;                    // addresses
  int64_t tokens, groups, heads_per_group, dim, half;
  int64_t x_token, x_group, x_head;            // strides of x
  int64_t out_token, out_group, out_head;      // strides of out
  float sign;
};

void rotary_heads_cpu(const RotaryHeads& r, int num_threads);

// Attention over packed documents, float32 (csrc/cpu/attention.h): the forward writes out and lse, the backward
// dq, dk, dv. `isa` is the widest ISA the caller allows (kIsa*); the kernels run the widest the CPU also has.
// Returns false, writing nothing, for a head dim without a kernel.
enum AttentionIsa { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
bool attention_cpu(const AttentionLaunch& a, bool backward, int isa, int num_threads);
// The ISA attention_cpu runs for `requested`.
int attention_isa_cpu(int requested);

// Decode attention over a per-slot KV cache, float32 (csrc/cpu/decode_attention.h), on the ISA attention_cpu would
// use. Throws std::invalid_argument (Python: ValueError) for a row length outside [0, max_keys]; returns false,
// writing nothing, for a head dim without a kernel.
bool decode_attention_cpu(const DecodeAttentionLaunch& a, int isa, int num_threads);

// RMSNorm with the fused residual add and SwiGLU, float32 (csrc/cpu/rms_norm.h, csrc/cpu/swiglu.h), on the ISA
// attention_cpu would use.
void rms_norm_cpu(const RMSNormForward& a, int isa, int num_threads);
void rms_norm_backward_cpu(const RMSNormBackward& a, int isa, int num_threads);
void swiglu_cpu(const SwiGLULaunch& a, bool backward, int isa, int num_threads);

void adamw_cpu(const AdamWLaunch& launch, int num_threads);
void adamw_cuda(const AdamWLaunch& launch, int device, int64_t stream);

// Norm of all gradients of a GradTensorRow table: chunk partials (double on CPU, float on CUDA, n_chunks of
// them) then one combined value written as float to `out`. `kind` is an ik::NormKind, `p` its order.
void grad_norm_cpu(const MultiTensorLaunch& work, int kind, double p, int64_t partials, int64_t out,
                   int num_threads);
void grad_norm_cuda(const MultiTensorLaunch& work, int kind, double p, int64_t partials, int64_t out, int device,
                    int64_t stream);

// Multiplies every gradient by clip_coefficient(max_norm, *total_norm), reading the norm (a float) where the
// device finds it, so no host synchronization is needed; leaves gradients untouched when the coefficient is 1.
void grad_scale_cpu(const MultiTensorLaunch& work, int64_t total_norm, float max_norm, int num_threads);
void grad_scale_cuda(const MultiTensorLaunch& work, int64_t total_norm, float max_norm, int device, int64_t stream);

bool built_with_cuda();
// "" when a CUDA device is usable, else why not.
std::string cuda_device_error();

}  // namespace ik
