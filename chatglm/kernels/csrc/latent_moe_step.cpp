// One decode step (one new token per sequence) through every GLM-4.7-Flash block in a single call: latent
// attention over the latent cache and a mixture of experts, weights read in place as ggml blocks.
//
// Attention (chatglm/models/glm4_moe_lite.py: LatentAttention) is absorbed: each head's key part of kv_b
// (attn_k_b, [rank, nope] per head) maps its query into latent space, so the head scores the cached
// entries (normed latent + rotated shared key) directly, and its value part (attn_v_b) maps the weighted
// latent to the head's values after attention; every cache row is kv_rank + rope_dim values, read once per
// token for all the heads a thread takes (as one multi-query head: the latent cache's point).
//
// The feed-forward is GLM-4.5's mixture of experts (moe_ffn.h, shared with decode_step.cpp); a dense layer is its
// shared part alone.
#include "ggml_kernels.h"
#include "moe_ffn.h"
#include "step_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

namespace {

struct LatentLayer {
  torch::Tensor attn_norm, ffn_norm, q_a_norm, kv_a_norm;
  Weight q_a, q, kv_a, o;  // q: q_b after q_a's bottleneck, or the one query projection (q_a null)
  std::vector<Weight> k_b, v_b;  // per head: [rank rows, nope inputs] and [value rows, rank inputs]
  std::shared_ptr<FeedForward> ffn;

  LatentLayer(const torch::Tensor& attn_norm_, const torch::Tensor& ffn_norm_, Weight q_a_,
              const std::optional<torch::Tensor>& q_a_norm_, Weight q_, Weight kv_a_, const torch::Tensor& kv_a_norm_,
              std::vector<Weight> k_b_, std::vector<Weight> v_b_, Weight o_, std::shared_ptr<FeedForward> ffn_)
      : attn_norm(checked_float(attn_norm_, attn_norm_.numel(), "attn_norm")),
        ffn_norm(checked_float(ffn_norm_, attn_norm.numel(), "ffn_norm")),
        kv_a_norm(checked_float(kv_a_norm_, kv_a_norm_.numel(), "kv_a_norm")), q_a(std::move(q_a_)),
        q(std::move(q_)), kv_a(std::move(kv_a_)), o(std::move(o_)), k_b(std::move(k_b_)), v_b(std::move(v_b_)),
        ffn(std::move(ffn_)) {
    const int64_t hidden = attn_norm.numel();
    if (q_a) {
      TORCH_CHECK(q_a_norm_, "q_a needs q_a_norm");
      q_a_norm = checked_float(*q_a_norm_, q_a->out, "q_a_norm");
      TORCH_CHECK(q_a->in == hidden && q->in == q_a->out, "q_a is [", q_a->out, ", ", q_a->in, "] and q_b takes ",
                  q->in, " inputs for hidden size ", hidden);
    } else {
      TORCH_CHECK(q->in == hidden, "q takes ", q->in, " inputs; expected the hidden size ", hidden);
    }
    TORCH_CHECK(kv_a->in == hidden && o->out == hidden && ffn->hidden() == hidden, "kv_a, o or the feed-forward "
                "does not fit hidden size ", hidden);
    TORCH_CHECK(!k_b.empty() && k_b.size() == v_b.size(), "k_b and v_b need one weight per head");
  }
};

class LatentMoeDecoder {
 public:
  LatentMoeDecoder(std::vector<std::shared_ptr<LatentLayer>> layers, int64_t nope, int64_t rope_dim, bool interleaved,
                   double eps, double latent_eps, double scale, int64_t tile_rows)
      : layers_(std::move(layers)), nope_(nope), rope_dim_(rope_dim), interleaved_(interleaved),
        eps_(static_cast<float>(eps)), latent_eps_(static_cast<float>(latent_eps)), scale_(static_cast<float>(scale)),
        tile_rows_(tile_rows) {
    TORCH_CHECK(!layers_.empty() && rope_dim % 2 == 0, "need layers and an even rope_dim");
    const LatentLayer& l0 = *layers_[0];
    heads_ = static_cast<int64_t>(l0.k_b.size());
    rank_ = l0.kv_a_norm.numel();
    value_ = l0.v_b[0]->out;
    for (const auto& l : layers_) {
      TORCH_CHECK(static_cast<int64_t>(l->k_b.size()) == heads_ && l->kv_a->out == rank_ + rope_dim &&
                  l->q->out == heads_ * (nope + rope_dim) && l->o->in == heads_ * value_,
                  "layer shapes disagree: kv_a has ", l->kv_a->out, " rows, q ", l->q->out, ", o takes ", l->o->in,
                  " for ", heads_, " heads of ", nope, " + ", rope_dim, " (latent ", rank_, ", values ", value_, ")");
      for (int64_t h = 0; h < heads_; ++h) {
        TORCH_CHECK(l->k_b[h]->in == nope && l->k_b[h]->out == rank_ && l->v_b[h]->in == rank_ &&
                    l->v_b[h]->out == value_, "head ", h, ": k_b must be [", rank_, ", ", nope, "] and v_b [", value_,
                    ", ", rank_, "]");
      }
    }
  }

  // x [B, hidden] (updated in place and returned) for tokens at positions pos [B], their cache entries going to
  // rows rows [B]; tables [B, width] are the sequences' block tables into the latent cache
  // kv [layers, 1, 1, blocks, block_size, kv_rank + rope_dim] (float32 or float16), rope [positions, rope_dim/2, 2].
  torch::Tensor step(torch::Tensor x, const torch::Tensor& kv, const torch::Tensor& tables, const torch::Tensor& pos,
                     const torch::Tensor& rows, const torch::Tensor& rope) {
    TORCH_CHECK((kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kFloat16) && kv.is_contiguous() &&
                kv.dim() == 6 && kv.size(0) == static_cast<int64_t>(layers_.size()) && kv.size(1) == 1 &&
                kv.size(2) == 1 && kv.size(5) == rank_ + rope_dim_,
                "the cache must be float32 or float16 [layers, 1, 1, blocks, block_size, ", rank_ + rope_dim_, "]");
    check_step_inputs(x, layers_[0]->attn_norm.numel(), tables, pos, 1, rows, rope, rope_dim_, kv.size(3), kv.size(4));
    const int64_t* at = pos.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const Rows rows_of{tables.data_ptr<int64_t>(), tables.size(1), kv.size(4)};
    if (kv.scalar_type() == torch::kFloat16) {
      run(x, static_cast<c10::Half*>(kv.data_ptr()), kv.stride(0), rows_of, at, row, rope);
    } else {
      run(x, kv.data_ptr<float>(), kv.stride(0), rows_of, at, row, rope);
    }
    return x;
  }

 private:
  // Where row j of sequence b lies in one layer's cache (entries of kv_rank + rope_dim values, one per row).
  struct Rows {
    const int64_t* table;
    int64_t width, block_size;
    int64_t at(int64_t b, int64_t j) const { return table[b * width + j / block_size] * block_size + j % block_size; }
  };

  template <typename T>
  void run(torch::Tensor& x, T* cache, int64_t layer_stride, const Rows& rows_of, const int64_t* at,
           const int64_t* row, const torch::Tensor& rope) const {
    const int64_t B = x.size(0), hidden = layers_[0]->attn_norm.numel(), entry = rank_ + rope_dim_;
    const int64_t head_dim = nope_ + rope_dim_, nq = heads_ * head_dim;
    std::vector<float> h(B * hidden), qa, q(B * nq), kva(B * entry), att(B * heads_ * value_), y(B * hidden);
    std::vector<float> gu, act;
    float* xs = x.data_ptr<float>();
    const float* rot = rope.data_ptr<float>();

    for (size_t l = 0; l < layers_.size(); ++l) {
      const LatentLayer& w = *layers_[l];
      T* kv = cache + l * layer_stride;
      for (int64_t b = 0; b < B; ++b) rms_norm(xs + b * hidden, w.attn_norm.data_ptr<float>(), eps_, hidden, &h[b * hidden]);
      if (w.q_a) {
        const int64_t r = w.q_a->out;
        qa.resize(B * r);
        (*w.q_a)(h.data(), B, qa.data(), tile_rows_);
        for (int64_t b = 0; b < B; ++b) rms_norm(&qa[b * r], w.q_a_norm.data_ptr<float>(), latent_eps_, r, &qa[b * r]);
        (*w.q)(qa.data(), B, q.data(), tile_rows_);
      } else {
        (*w.q)(h.data(), B, q.data(), tile_rows_);
      }
      (*w.kv_a)(h.data(), B, kva.data(), tile_rows_);
      for (int64_t b = 0; b < B; ++b) {  // this token's entry: the normed latent and the rotated key, into the cache
        float* e = &kva[b * entry];
        rms_norm(e, w.kv_a_norm.data_ptr<float>(), latent_eps_, rank_, e);
        rotate(e + rank_, rot + at[b] * rope_dim_, rope_dim_, interleaved_);
        T* dst = kv + rows_of.at(b, row[b]) * entry;
        for (int64_t i = 0; i < entry; ++i) dst[i] = static_cast<T>(e[i]);
      }
      attend(w, kv, rows_of, at, row, B, rot, q.data(), att.data());
      (*w.o)(att.data(), B, y.data(), tile_rows_);
      for (int64_t i = 0; i < B * hidden; ++i) xs[i] += y[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(xs + b * hidden, w.ffn_norm.data_ptr<float>(), eps_, hidden, &h[b * hidden]);
      feed_forward(*w.ffn, h.data(), B, y.data(), gu, act, tile_rows_);
      for (int64_t i = 0; i < B * hidden; ++i) xs[i] += y[i];
    }
  }

  // out [B, heads * value]: each thread takes a range of heads, takes every sequence's query of each through its
  // k_b into latent space, attends over that sequence's cache rows 0..row[b] reading each row once for all its
  // heads, and maps the weighted latents through each head's v_b.
  template <typename T>
  void attend(const LatentLayer& w, const T* kv, const Rows& rows_of, const int64_t* at, const int64_t* row, int64_t B,
              const float* rot, float* q, float* out) const {
    const int64_t head_dim = nope_ + rope_dim_, nq = heads_ * head_dim, entry = rank_ + rope_dim_;
    const int64_t grain = (heads_ + at::get_num_threads() - 1) / at::get_num_threads();
    at::parallel_for(0, heads_, grain, [&](int64_t h0, int64_t h1) {
      const int64_t H = h1 - h0;
      std::vector<float> nope(B * nope_), query(H * entry), scores, mixed(H * B * rank_),
          values(B * value_);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t hd = h0; hd < h1; ++hd) rotate(q + b * nq + hd * head_dim + nope_, rot + at[b] * rope_dim_,
                                                      rope_dim_, interleaved_);
      }
      for (int64_t hd = h0; hd < h1; ++hd) {  // linear_into runs inline in a parallel region
        for (int64_t b = 0; b < B; ++b) std::copy_n(q + b * nq + hd * head_dim, nope_, &nope[b * nope_]);
        (*w.k_b[hd])(nope.data(), B, &mixed[(hd - h0) * B * rank_], tile_rows_);
      }
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < H; ++i) {  // the query of head h0 + i: its latent, then its rotated part
          std::copy_n(&mixed[(i * B + b) * rank_], rank_, &query[i * entry]);
          std::copy_n(q + b * nq + (h0 + i) * head_dim + nope_, rope_dim_, &query[i * entry + rank_]);
        }
        const int64_t n = row[b] + 1;
        scores.resize(H * n);
        for (int64_t j = 0; j < n; ++j) {
          const T* e = kv + rows_of.at(b, j) * entry;
          for (int64_t i = 0; i < H; ++i) scores[i * n + j] = dot(&query[i * entry], e, entry) * scale_;
        }
        for (int64_t i = 0; i < H; ++i) {
          float* s = &scores[i * n];
          const float total = exp_shifted(s, n, *std::max_element(s, s + n));
          for (int64_t j = 0; j < n; ++j) s[j] /= total;
          std::fill_n(&mixed[(i * B + b) * rank_], rank_, 0.f);
        }
        for (int64_t j = 0; j < n; ++j) {
          const T* e = kv + rows_of.at(b, j) * entry;
          for (int64_t i = 0; i < H; ++i) add_scaled(&mixed[(i * B + b) * rank_], scores[i * n + j], e, rank_);
        }
      }
      for (int64_t hd = h0; hd < h1; ++hd) {
        (*w.v_b[hd])(&mixed[(hd - h0) * B * rank_], B, values.data(), tile_rows_);
        for (int64_t b = 0; b < B; ++b)
          std::copy_n(&values[b * value_], value_, out + (b * heads_ + hd) * value_);
      }
    });
  }

  std::vector<std::shared_ptr<LatentLayer>> layers_;
  int64_t nope_, rope_dim_, heads_ = 0, rank_ = 0, value_ = 0;
  bool interleaved_;
  float eps_, latent_eps_, scale_;
  int64_t tile_rows_;
};

}  // namespace

void register_latent_moe_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<BlockLinear, std::shared_ptr<BlockLinear>>(m, "BlockWeight", "a weight's ggml blocks and bias")
      .def(py::init<std::vector<torch::Tensor>, int64_t, int64_t, const std::optional<torch::Tensor>&>(),
           py::arg("parts"), py::arg("qtype"), py::arg("in_features"), py::arg("bias"));
  py::class_<FeedForward, std::shared_ptr<FeedForward>>(m, "FeedForward", "routed experts and a shared SwiGLU")
      .def(py::init<const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&, std::vector<Weight>,
                    std::vector<Weight>, Weight, Weight, int64_t, int64_t, int64_t, bool, double>(),
           py::arg("router"), py::arg("router_bias"), py::arg("gate_up"), py::arg("down"), py::arg("shared_gate_up"),
           py::arg("shared_down"), py::arg("top_k"), py::arg("groups"), py::arg("top_groups"), py::arg("normalize"),
           py::arg("scaling"));
  py::class_<LatentLayer, std::shared_ptr<LatentLayer>>(m, "LatentLayer", "one GLM-4.7-Flash block's weights")
      .def(py::init<const torch::Tensor&, const torch::Tensor&, Weight, const std::optional<torch::Tensor>&, Weight,
                    Weight, const torch::Tensor&, std::vector<Weight>, std::vector<Weight>, Weight,
                    std::shared_ptr<FeedForward>>(),
           py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("q_a"), py::arg("q_a_norm"), py::arg("q"),
           py::arg("kv_a"), py::arg("kv_a_norm"), py::arg("k_b"), py::arg("v_b"), py::arg("o"), py::arg("ffn"));
  py::class_<LatentMoeDecoder>(m, "LatentMoeDecoder", "every GLM-4.7-Flash block of a one-token step in one call")
      .def(py::init<std::vector<std::shared_ptr<LatentLayer>>, int64_t, int64_t, bool, double, double, double,
                    int64_t>(),
           py::arg("layers"), py::arg("nope_dim"), py::arg("rope_dim"), py::arg("interleaved"), py::arg("eps"),
           py::arg("latent_eps"), py::arg("scale"), py::arg("tile_rows"))
      .def("step", &LatentMoeDecoder::step, py::arg("x"), py::arg("kv"), py::arg("tables"), py::arg("pos"),
           py::arg("rows"), py::arg("rope"), py::call_guard<py::gil_scoped_release>());
}
