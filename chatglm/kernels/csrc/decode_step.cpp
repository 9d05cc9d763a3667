// One decode step (one new token per sequence) through every block of the shared decoder (llama family,
// ChatGLM2/3, GLM-4, CodeGeeX2) in a single call, for weights held as ggml blocks.
//
// Between two matrix products a block does little arithmetic (a norm, a rotation, one query row's attention,
// SwiGLU), but as torch operators each is a dispatch of a few microseconds; dozens a layer cost more than the
// products themselves on a small model. Here they are plain loops over float32 rows, and the products go
// straight to linear_into, with the activation rows kept in scratch buffers reused by every layer.
//
// The arithmetic is the Python block's (chatglm/models/layers.py: Block.forward, attend); a test checks one
// against the other.
#include "ggml_kernels.h"
#include "step_math.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// A weight in ggml blocks with its optional bias.
struct Linear {
  std::vector<torch::Tensor> parts;
  int64_t qtype, in, out;
  torch::Tensor bias;  // float32 [out], or undefined

  Linear(std::vector<torch::Tensor> p, int64_t type, int64_t k, const std::optional<torch::Tensor>& b, const char* name)
      : parts(std::move(p)), qtype(type), in(k), out(check_parts(parts, k, type)) {
    if (b) bias = checked_float(*b, out, name);
  }

  void operator()(const float* x, int64_t m, float* y, int64_t tile_rows) const {
    linear_into(x, m, in, parts, qtype, tile_rows, y);
    if (!bias.defined()) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < out; ++i) y[r * out + i] += b[i];
  }
};

using Parts = std::vector<torch::Tensor>;
using Bias = std::optional<torch::Tensor>;

struct DecodeLayer {
  torch::Tensor attn_norm, ffn_norm;
  Linear qkv, o, gate_up, down;

  DecodeLayer(const torch::Tensor& attn_norm_, const torch::Tensor& ffn_norm_, Parts qkv_, int64_t qkv_type,
              const Bias& qkv_bias, Parts o_, int64_t o_type, const Bias& o_bias, int64_t attn_width, Parts gate_up_,
              int64_t gate_up_type, Parts down_, int64_t down_type, int64_t ffn)
      : attn_norm(checked_float(attn_norm_, attn_norm_.numel(), "attn_norm")),
        ffn_norm(checked_float(ffn_norm_, attn_norm.numel(), "ffn_norm")),
        qkv(std::move(qkv_), qkv_type, attn_norm.numel(), qkv_bias, "qkv_bias"),
        o(std::move(o_), o_type, attn_width, o_bias, "o_bias"),
        gate_up(std::move(gate_up_), gate_up_type, attn_norm.numel(), std::nullopt, ""),
        down(std::move(down_), down_type, ffn, std::nullopt, "") {
    TORCH_CHECK(o.out == attn_norm.numel() && down.out == attn_norm.numel() && gate_up.out == 2 * ffn,
                "layer shapes disagree: o has ", o.out, " rows, down ", down.out, ", gate_up ", gate_up.out,
                " for hidden size ", attn_norm.numel(), " and ffn size ", ffn);
  }
};

class FusedDecoder {
 public:
  FusedDecoder(std::vector<std::shared_ptr<DecodeLayer>> layers, int64_t heads, int64_t kv_heads, int64_t head_dim,
               int64_t rope_dim, bool interleaved, double eps, int64_t tile_rows)
      : layers_(std::move(layers)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), rope_dim_(rope_dim),
        interleaved_(interleaved), eps_(static_cast<float>(eps)), tile_rows_(tile_rows) {
    TORCH_CHECK(!layers_.empty() && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && rope_dim % 2 == 0 &&
                rope_dim <= head_dim, "bad attention shape: ", heads, " heads, ", kv_heads, " key heads, rope ",
                rope_dim, " of ", head_dim);
    for (const auto& l : layers_) {
      TORCH_CHECK(l->qkv.out == (heads + 2 * kv_heads) * head_dim && l->o.in == heads * head_dim,
                  "qkv has ", l->qkv.out, " rows; expected ", (heads + 2 * kv_heads) * head_dim);
    }
  }

  // x [B, hidden] (updated in place and returned) for tokens at positions pos [B], their keys and values going to
  // cache rows rows [B] of each sequence; tables [B, width] are the sequences' block tables into the paged cache
  // kv [layers, 2, kv_heads, blocks, block_size, head_dim] (float32 or float16), rope the (cos, sin) table
  // [max_position, rope_dim/2, 2].
  torch::Tensor step(torch::Tensor x, const torch::Tensor& kv, const torch::Tensor& tables, const torch::Tensor& pos,
                     const torch::Tensor& rows, const torch::Tensor& rope) {
    const int64_t B = x.size(0), hidden = layers_[0]->attn_norm.numel();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, "x must be [batch, ", hidden, "]");
    checked_float(x, B * hidden, "x");
    TORCH_CHECK((kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kFloat16) && kv.is_contiguous() &&
                kv.dim() == 6 && kv.size(0) == static_cast<int64_t>(layers_.size()) && kv.size(1) == 2 &&
                kv.size(2) == kv_heads_ && kv.size(5) == head_dim_,
                "the cache must be float32 or float16 [layers, 2, kv_heads, blocks, block_size, head_dim]");
    TORCH_CHECK(rope.scalar_type() == torch::kFloat32 && rope.is_contiguous() && rope.dim() == 3 &&
                rope.size(1) == rope_dim_ / 2 && rope.size(2) == 2, "rope must be float32 [positions, rope_dim/2, 2]");
    for (const torch::Tensor* t : {&pos, &rows}) {
      TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == B, "pos and rows "
                  "must be int64 [batch]");
    }
    TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.dim() == 2 &&
                tables.size(0) == B, "tables must be int64 [batch, blocks per sequence]");
    const int64_t* at = pos.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* table = tables.data_ptr<int64_t>();
    const int64_t width = tables.size(1), bs = kv.size(4), blocks = kv.size(3);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(row[b] >= 0 && row[b] < width * bs && at[b] >= 0 && at[b] < rope.size(0), "row ", b,
                  ": cache row ", row[b], " or position ", at[b], " out of range");
      for (int64_t j = 0; j <= row[b] / bs; ++j) {
        const int64_t block = table[b * width + j];
        TORCH_CHECK(block > 0 && block < blocks, "row ", b, ": block table entry ", j, " is ", block,
                    ", not a block of the pool (1..", blocks - 1, ")");
      }
    }
    if (kv.scalar_type() == torch::kFloat16) {
      run(x, static_cast<c10::Half*>(kv.data_ptr()), kv, table, width, at, row, rope);
    } else {
      run(x, kv.data_ptr<float>(), kv, table, width, at, row, rope);
    }
    return x;
  }

 private:
  template <typename T>
  void run(torch::Tensor& x, T* cache, const torch::Tensor& kv, const int64_t* table, int64_t width, const int64_t* at,
           const int64_t* row, const torch::Tensor& rope) const {
    const int64_t B = x.size(0), hidden = layers_[0]->attn_norm.numel();
    const int64_t nq = heads_ * head_dim_, nkv = kv_heads_ * head_dim_, qkv_width = nq + 2 * nkv;
    const int64_t ffn = layers_[0]->down.in;
    std::vector<float> h(B * hidden), qkv(B * qkv_width), att(B * nq), gu(B * 2 * ffn), act(B * ffn), y(B * hidden);
    float* xs = x.data_ptr<float>();
    const float* rot = rope.data_ptr<float>();
    const Paged<T> paged{nullptr, table, width, kv.size(4), kv.stride(3), kv.stride(2), kv.stride(1), kv.stride(4)};

    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecodeLayer& w = *layers_[l];
      Paged<T> layer = paged;
      layer.base = cache + l * kv.stride(0);
      for (int64_t b = 0; b < B; ++b) rms_norm(xs + b * hidden, w.attn_norm.data_ptr<float>(), eps_, hidden, &h[b * hidden]);
      w.qkv(h.data(), B, qkv.data(), tile_rows_);
      for (int64_t b = 0; b < B; ++b) {
        float* r = &qkv[b * qkv_width];
        const float* cs = rot + at[b] * rope_dim_;
        for (int64_t i = 0; i < heads_ + kv_heads_; ++i) rotate(r + i * head_dim_, cs, rope_dim_, interleaved_);
        for (int64_t g = 0; g < kv_heads_; ++g) {  // this token's key and value into the cache
          T* k = layer.row(b, g, row[b]);
          for (int64_t d = 0; d < head_dim_; ++d) {
            k[d] = static_cast<T>(r[nq + g * head_dim_ + d]);
            k[layer.half_stride + d] = static_cast<T>(r[nq + nkv + g * head_dim_ + d]);
          }
        }
      }
      attend(layer, row, B, qkv.data(), qkv_width, att.data());
      w.o(att.data(), B, y.data(), tile_rows_);
      for (int64_t i = 0; i < B * hidden; ++i) xs[i] += y[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(xs + b * hidden, w.ffn_norm.data_ptr<float>(), eps_, hidden, &h[b * hidden]);
      w.gate_up(h.data(), B, gu.data(), tile_rows_);
      for (int64_t b = 0; b < B; ++b) swiglu(&gu[b * 2 * ffn], &gu[b * 2 * ffn + ffn], &act[b * ffn], ffn);
      w.down(act.data(), B, y.data(), tile_rows_);
      for (int64_t i = 0; i < B * hidden; ++i) xs[i] += y[i];
    }
  }

  // One layer's keys of the paged cache: row j of sequence b, key head g (its value half_stride further on).
  template <typename T>
  struct Paged {
    T* base;
    const int64_t* table;
    int64_t width, block_size, block_stride, head_stride, half_stride, row_stride;
    T* row(int64_t b, int64_t g, int64_t j) const {
      return base + table[b * width + j / block_size] * block_stride + g * head_stride + (j % block_size) * row_stride;
    }
  };

  // Each row's query heads over its cache rows 0..row[b] (the prefix, its past and itself): one task per
  // sequence and key head, whose query heads meet each key and value as it is read, a block at a time.
  template <typename T>
  void attend(const Paged<T>& kv, const int64_t* row, int64_t B, const float* qkv, int64_t width, float* out) const {
    const int64_t group = heads_ / kv_heads_, D = head_dim_;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    at::parallel_for(0, B * kv_heads_, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / kv_heads_, g = t % kv_heads_, n = row[b] + 1;
        const float* q = qkv + b * width + g * group * D;
        float* o = out + (b * heads_ + g * group) * D;
        scores.resize(group * n);
        for (int64_t j0 = 0; j0 < n; j0 += kv.block_size) {
          const T* keys = kv.row(b, g, j0);
          for (int64_t j = j0; j < std::min(n, j0 + kv.block_size); ++j)
            for (int64_t i = 0; i < group; ++i) scores[i * n + j] = dot(q + i * D, keys + (j - j0) * D, D) * scale;
        }
        for (int64_t i = 0; i < group; ++i) {
          float* s = &scores[i * n];
          const float total = exp_shifted(s, n, *std::max_element(s, s + n));
          for (int64_t j = 0; j < n; ++j) s[j] /= total;
        }
        std::fill_n(o, group * D, 0.f);
        for (int64_t j0 = 0; j0 < n; j0 += kv.block_size) {
          const T* values = kv.row(b, g, j0) + kv.half_stride;
          for (int64_t j = j0; j < std::min(n, j0 + kv.block_size); ++j)
            for (int64_t i = 0; i < group; ++i) add_scaled(o + i * D, scores[i * n + j], values + (j - j0) * D, D);
        }
      }
    });
  }

  std::vector<std::shared_ptr<DecodeLayer>> layers_;
  int64_t heads_, kv_heads_, head_dim_, rope_dim_;
  bool interleaved_;
  float eps_;
  int64_t tile_rows_;
};

}  // namespace

void register_decode_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<DecodeLayer, std::shared_ptr<DecodeLayer>>(m, "DecodeLayer", "one block's weights for FusedDecoder")
      .def(py::init<const torch::Tensor&, const torch::Tensor&, Parts, int64_t, const Bias&, Parts, int64_t,
                    const Bias&, int64_t, Parts, int64_t, Parts, int64_t, int64_t>(),
           py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("qkv"), py::arg("qkv_type"), py::arg("qkv_bias"),
           py::arg("o"), py::arg("o_type"), py::arg("o_bias"), py::arg("attn_width"), py::arg("gate_up"),
           py::arg("gate_up_type"), py::arg("down"), py::arg("down_type"), py::arg("ffn"));
  py::class_<FusedDecoder>(m, "FusedDecoder", "every block of a one-token step in one call (decode_step.cpp)")
      .def(py::init<std::vector<std::shared_ptr<DecodeLayer>>, int64_t, int64_t, int64_t, int64_t, bool, double,
                    int64_t>(),
           py::arg("layers"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("rope_dim"),
           py::arg("interleaved"), py::arg("eps"), py::arg("tile_rows"))
      .def("step", &FusedDecoder::step, py::arg("x"), py::arg("kv"), py::arg("tables"), py::arg("pos"), py::arg("rows"),
           py::arg("rope"), py::call_guard<py::gil_scoped_release>());
}
