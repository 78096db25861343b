// The pybind11 module internlm_kernels._C. It does not link torch: tensors cross as integer addresses,
// dtypes as codes, CUDA streams as integers (see docs/kernels/adamw.md). Python validates and allocates.
#include <pybind11/pybind11.h>

#include "entry_points.h"
#include "grad_norm.h"
#include "multi_tensor.h"

namespace py = pybind11;

namespace {

ik::AdamWLaunch adamw_launch(int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int param_dtype,
                             int grad_dtype, bool master, bool amsgrad, py::tuple scalars) {
  if (scalars.size() != 8) throw std::invalid_argument("adamw: scalars must have 8 entries");
  ik::AdamWScalars s{};
  float* fields[] = {&s.weight_decay_factor, &s.beta1_weight, &s.beta2, &s.one_minus_beta2,
                     &s.bias_correction2_sqrt, &s.neg_step_size, &s.eps, &s.grad_sign};
  for (size_t i = 0; i < 8; ++i) *fields[i] = scalars[i].cast<float>();
  return ik::AdamWLaunch{{table, chunks, n_chunks, chunk_size}, param_dtype, grad_dtype, master, amsgrad, s};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "internlm_kernels native kernels: multi-tensor AdamW and gradient norm/clipping (CPU and CUDA)";

  m.def("built_with_cuda", &ik::built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("cuda_device_error", &ik::cuda_device_error, "'' when a CUDA device is usable, else the reason.");
  m.def("dtype_codes", [] {
    py::dict d;
    d["float32"] = int(ik::kFloat32);
    d["float16"] = int(ik::kFloat16);
    d["bfloat16"] = int(ik::kBFloat16);
    return d;
  }, "Codes of the element types, by torch dtype name.");
  m.def("norm_kinds", [] {
    py::dict d;
    d["l1"] = int(ik::kNormL1);
    d["l2"] = int(ik::kNormL2);
    d["inf"] = int(ik::kNormInf);
    d["p"] = int(ik::kNormP);
    return d;
  }, "Codes of the norm kinds.");
  m.attr("CHUNK_MULTIPLE") = ik::kChunkMultiple;
  m.attr("ADAMW_ROW_COLUMNS") = int(sizeof(ik::AdamWTensorRow) / sizeof(int64_t));
  m.attr("GRAD_ROW_COLUMNS") = int(sizeof(ik::GradTensorRow) / sizeof(int64_t));

  // scalars: (1 - lr*wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), -lr/(1 - beta1^t), eps, ±1)
  m.def("adamw_cpu",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int param_dtype, int grad_dtype,
           bool master, bool amsgrad, py::tuple scalars, int num_threads) {
          ik::AdamWLaunch l = adamw_launch(table, chunks, n_chunks, chunk_size, param_dtype, grad_dtype, master,
                                           amsgrad, scalars);
          py::gil_scoped_release release;
          ik::adamw_cpu(l, num_threads);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("param_dtype"),
        py::arg("grad_dtype"), py::arg("master"), py::arg("amsgrad"), py::arg("scalars"), py::arg("num_threads"));
  m.def("adamw_cuda",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int param_dtype, int grad_dtype,
           bool master, bool amsgrad, py::tuple scalars, int device, int64_t stream) {
          ik::adamw_cuda(adamw_launch(table, chunks, n_chunks, chunk_size, param_dtype, grad_dtype, master, amsgrad,
                                      scalars),
                         device, stream);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("param_dtype"),
        py::arg("grad_dtype"), py::arg("master"), py::arg("amsgrad"), py::arg("scalars"), py::arg("device"),
        py::arg("stream"));

  m.def("rotary_heads_cpu",
        [](int64_t x, int64_t out, int64_t cos, int64_t sin, int64_t tokens, int64_t groups, int64_t heads_per_group,
           int64_t dim, int64_t half, py::tuple x_strides, py::tuple out_strides, float sign, int num_threads) {
          if (x_strides.size() != 3 || out_strides.size() != 3)
            throw std::invalid_argument("rotary_heads_cpu: strides are (token, group, head)");
          ik::RotaryHeads r{x, out, cos, sin, tokens, groups, heads_per_group, dim, half,
                            x_strides[0].cast<int64_t>(), x_strides[1].cast<int64_t>(), x_strides[2].cast<int64_t>(),
                            out_strides[0].cast<int64_t>(), out_strides[1].cast<int64_t>(),
                            out_strides[2].cast<int64_t>(), sign};
          py::gil_scoped_release release;
          ik::rotary_heads_cpu(r, num_threads);
        },
        py::arg("x"), py::arg("out"), py::arg("cos"), py::arg("sin"), py::arg("tokens"), py::arg("groups"),
        py::arg("heads_per_group"), py::arg("dim"), py::arg("half"), py::arg("x_strides"), py::arg("out_strides"),
        py::arg("sign"), py::arg("num_threads"));
  // addresses: (q, k, v, out, lse, dout, dq, dk, dv, cu_q, cu_k), 0 for the backward's in a forward;
  // sizes: (n_seqs, total_q, heads, kv_heads, dim). See csrc/cpu/attention.h.
  m.def("attention_cpu",
        [](py::tuple addresses, py::tuple sizes, float scale, bool causal, bool backward, int isa, int num_threads) {
          if (addresses.size() != 11 || sizes.size() != 5)
            throw std::invalid_argument("attention_cpu: 11 addresses and 5 sizes");
          int64_t p[11], n[5];
          for (size_t i = 0; i < 11; ++i) p[i] = addresses[i].cast<int64_t>();
          for (size_t i = 0; i < 5; ++i) n[i] = sizes[i].cast<int64_t>();
          ik::AttentionLaunch a{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10],
                                n[0], n[1], n[2], n[3], n[4], scale, causal};
          py::gil_scoped_release release;
          return ik::attention_cpu(a, backward, isa, num_threads);
        },
        py::arg("addresses"), py::arg("sizes"), py::arg("scale"), py::arg("causal"), py::arg("backward"),
        py::arg("isa"), py::arg("num_threads"));
  m.def("attention_isa_cpu", &ik::attention_isa_cpu, py::arg("requested"),
        "The ISA attention_cpu runs when the caller allows `requested` (0 generic, 1 AVX2, 2 AVX-512).");
  // addresses: (q, k, v, out, seqlens); sizes: (batch, kv_heads, group, dim, max_keys); strides: q's (batch, kv head,
  // query head of the group), k's and v's (batch, kv head, token). See csrc/cpu/decode_attention.h.
  m.def("decode_attention_cpu",
        [](py::tuple addresses, py::tuple sizes, py::tuple q_strides, py::tuple kv_strides, float scale, int isa,
           int num_threads) {
          if (addresses.size() != 5 || sizes.size() != 5 || q_strides.size() != 3 || kv_strides.size() != 3)
            throw std::invalid_argument("decode_attention_cpu: 5 addresses, 5 sizes, 3 + 3 strides");
          int64_t p[5], n[5], qs[3], ks[3];
          for (size_t i = 0; i < 5; ++i) p[i] = addresses[i].cast<int64_t>();
          for (size_t i = 0; i < 5; ++i) n[i] = sizes[i].cast<int64_t>();
          for (size_t i = 0; i < 3; ++i) qs[i] = q_strides[i].cast<int64_t>();
          for (size_t i = 0; i < 3; ++i) ks[i] = kv_strides[i].cast<int64_t>();
          ik::DecodeAttentionLaunch a{p[0], p[1], p[2], p[3], p[4], n[0], n[1], n[2], n[3], n[4],
                                      qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], scale};
          py::gil_scoped_release release;
          return ik::decode_attention_cpu(a, isa, num_threads);
        },
        py::arg("addresses"), py::arg("sizes"), py::arg("q_strides"), py::arg("kv_strides"), py::arg("scale"),
        py::arg("isa"), py::arg("num_threads"));
  // addresses: (x, residual, weight, y, h, rstd), 0 for residual and h without a residual, for weight and rstd
  // where not wanted. See csrc/cpu/rms_norm.h.
  m.def("rms_norm_cpu",
        [](py::tuple addresses, int64_t rows, int64_t width, float eps, float square_scale, int isa,
           int num_threads) {
          if (addresses.size() != 6) throw std::invalid_argument("rms_norm_cpu: 6 addresses");
          int64_t p[6];
          for (size_t i = 0; i < 6; ++i) p[i] = addresses[i].cast<int64_t>();
          ik::RMSNormForward a{p[0], p[1], p[2], p[3], p[4], p[5], rows, width, eps, square_scale};
          py::gil_scoped_release release;
          ik::rms_norm_cpu(a, isa, num_threads);
        },
        py::arg("addresses"), py::arg("rows"), py::arg("width"), py::arg("eps"), py::arg("square_scale"),
        py::arg("isa"), py::arg("num_threads"));
  // addresses: (dy, h, rstd, weight, dh_out, dh, dw, partials), 0 for dh_out, and for dw and partials without a
  // weight gradient; partials holds num_threads × width floats.
  m.def("rms_norm_backward_cpu",
        [](py::tuple addresses, int64_t rows, int64_t width, int isa, int num_threads) {
          if (addresses.size() != 8) throw std::invalid_argument("rms_norm_backward_cpu: 8 addresses");
          int64_t p[8];
          for (size_t i = 0; i < 8; ++i) p[i] = addresses[i].cast<int64_t>();
          ik::RMSNormBackward a{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], rows, width};
          py::gil_scoped_release release;
          ik::rms_norm_backward_cpu(a, isa, num_threads);
        },
        py::arg("addresses"), py::arg("rows"), py::arg("width"), py::arg("isa"), py::arg("num_threads"));
  // addresses: (gate, up, out, dout, dgate, dup), 0 for those the pass does not use; row_strides in the same order.
  // See csrc/cpu/swiglu.h.
  m.def("swiglu_cpu",
        [](py::tuple addresses, int64_t rows, int64_t width, py::tuple row_strides, float gate_multiplier,
           float down_multiplier, bool backward, int isa, int num_threads) {
          if (addresses.size() != 6 || row_strides.size() != 6)
            throw std::invalid_argument("swiglu_cpu: 6 addresses and 6 row strides");
          int64_t p[6], r[6];
          for (size_t i = 0; i < 6; ++i) p[i] = addresses[i].cast<int64_t>();
          for (size_t i = 0; i < 6; ++i) r[i] = row_strides[i].cast<int64_t>();
          ik::SwiGLULaunch a{p[0], p[1], p[2], p[3], p[4], p[5], rows, width,
                             r[0], r[1], r[2], r[3], r[4], r[5], gate_multiplier, down_multiplier};
          py::gil_scoped_release release;
          ik::swiglu_cpu(a, backward, isa, num_threads);
        },
        py::arg("addresses"), py::arg("rows"), py::arg("width"), py::arg("row_strides"), py::arg("gate_multiplier"),
        py::arg("down_multiplier"), py::arg("backward"), py::arg("isa"), py::arg("num_threads"));
  m.def("grad_norm_cpu",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int kind, double p,
           int64_t partials, int64_t out, int num_threads) {
          py::gil_scoped_release release;
          ik::grad_norm_cpu({table, chunks, n_chunks, chunk_size}, kind, p, partials, out, num_threads);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("kind"),
        py::arg("p"), py::arg("partials"), py::arg("out"), py::arg("num_threads"));
  m.def("grad_norm_cuda",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int kind, double p,
           int64_t partials, int64_t out, int device, int64_t stream) {
          ik::grad_norm_cuda({table, chunks, n_chunks, chunk_size}, kind, p, partials, out, device, stream);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("kind"),
        py::arg("p"), py::arg("partials"), py::arg("out"), py::arg("device"), py::arg("stream"));

  m.def("grad_scale_cpu",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int64_t total_norm, float max_norm,
           int num_threads) {
          py::gil_scoped_release release;
          ik::grad_scale_cpu({table, chunks, n_chunks, chunk_size}, total_norm, max_norm, num_threads);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("total_norm"),
        py::arg("max_norm"), py::arg("num_threads"));
  m.def("grad_scale_cuda",
        [](int64_t table, int64_t chunks, int64_t n_chunks, int64_t chunk_size, int64_t total_norm, float max_norm,
           int device, int64_t stream) {
          ik::grad_scale_cuda({table, chunks, n_chunks, chunk_size}, total_norm, max_norm, device, stream);
        },
        py::arg("table"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("total_norm"),
        py::arg("max_norm"), py::arg("device"), py::arg("stream"));
}
