// The element-wise work of a prompt forward (many rows at once) between the block products: RMSNorm, the residual
// add fused into the norm that follows it, and SwiGLU straight from the gate_up product's output. As torch
// operators each is a pass over [rows, width] with a fresh temporary (SwiGLU alone: silu, then a product); here
// each is one pass over the rows, split among torch's threads, with step_math.h's row helpers (the decode step's
// arithmetic). chatglm/kernels/prompt.py picks these for contiguous CPU float32 rows and torch's operators otherwise.
#include "ggml_kernels.h"
#include "step_math.h"

#include <ATen/Parallel.h>

namespace {

constexpr int64_t GRAIN = 8;  // rows a thread takes at least: a row is thousands of values

// rows of x [..., width] as (rows, width), checked to be contiguous CPU float32 (named `what` otherwise)
std::pair<int64_t, int64_t> float_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && !x.is_cuda() && x.dim() >= 1, what,
              " must be a contiguous CPU float32 tensor");
  const int64_t width = x.size(-1);
  return {width == 0 ? 0 : x.numel() / width, width};
}

// y = RMSNorm(x) row by row: x * w / sqrt(mean(x^2) + eps)
torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const auto [rows, n] = float_rows(x, "x");
  checked_float(w, n, "the norm weight");
  torch::Tensor y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm(xp + r * n, wp, static_cast<float>(eps), n, yp + r * n);
  });
  return y;
}

// h += x in place (the residual joins a product's fresh output), then returns RMSNorm(h): one pass over the rows
torch::Tensor add_rms_norm_rows(torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const auto [rows, n] = float_rows(h, "h");
  TORCH_CHECK(x.sizes() == h.sizes(), "x must have h's shape ", h.sizes(), ", got ", x.sizes());
  float_rows(x, "x");
  checked_float(w, n, "the norm weight");
  torch::Tensor y = torch::empty_like(h);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, rows, GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      add_scaled(hp + r * n, 1.f, xp + r * n, n);
      rms_norm(hp + r * n, wp, static_cast<float>(eps), n, yp + r * n);
    }
  });
  return y;
}

// [..., 2F] gate rows then up rows (the gate_up product's output) -> [..., F] silu(gate) * up
torch::Tensor swiglu_rows(const torch::Tensor& gate_up) {
  const auto [rows, n2] = float_rows(gate_up, "gate_up");
  TORCH_CHECK(n2 % 2 == 0, "gate_up's last dimension must be even (gate then up), got ", n2);
  const int64_t n = n2 / 2;
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = n;
  torch::Tensor y = torch::empty(shape, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) swiglu(g + r * n2, g + r * n2 + n, yp + r * n, n);
  });
  return y;
}

}  // namespace

void register_prompt_ops(pybind11::module_& m) {
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm of each row", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm_rows", &add_rms_norm_rows, "h += x in place, then RMSNorm(h)", py::arg("h"), py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("swiglu_rows", &swiglu_rows, "silu(gate) * up from [..., gate | up]", py::arg("gate_up"));
}
