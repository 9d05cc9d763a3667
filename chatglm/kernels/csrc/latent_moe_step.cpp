// One decode step (one new token per sequence) through every GLM-4.7-Flash block in a single call: latent
// attention over the latent cache and a mixture of experts, weights read in place as ggml blocks.
//
// Attention (chatglm/models/glm4_moe_lite.py: LatentAttention) is absorbed: each head's key part of kv_b
// (attn_k_b, [rank, nope] per head) maps its query into latent space, so the head scores the cached
// entries (normed latent + rotated shared key) directly, and its value part (attn_v_b) maps the weighted
// latent to the head's values after attention; every cache row is kv_rank + rope_dim values, read once per
// token for all the heads a thread takes (as one multi-query head: the latent cache's point).
//
// The feed-forward (glm4_moe.py: Router, MoE) routes each token by sigmoid scores (plus the correction bias
// for choosing, best groups first), reads only the chosen experts' blocks, each expert once over all the
// tokens routed to it, and adds the shared expert; a dense layer is the shared part alone.
#include "ggml_kernels.h"
#include "step_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <vector>

namespace {

using Weight = std::shared_ptr<BlockLinear>;

// A layer's feed-forward: routed experts (when `router` is defined) plus a shared SwiGLU (the whole of a dense one).
struct FeedForward {
  torch::Tensor router, router_bias;  // float32 [experts, hidden], [experts]
  std::vector<Weight> gate_up, down;  // each expert's
  Weight shared_gate_up, shared_down;  // or null
  int64_t top_k, groups, top_groups;
  bool normalize;
  float scaling;

  FeedForward(const std::optional<torch::Tensor>& router_, const std::optional<torch::Tensor>& bias_,
              std::vector<Weight> gate_up_, std::vector<Weight> down_, Weight shared_gate_up_, Weight shared_down_,
              int64_t top_k_, int64_t groups_, int64_t top_groups_, bool normalize_, double scaling_)
      : gate_up(std::move(gate_up_)), down(std::move(down_)), shared_gate_up(std::move(shared_gate_up_)),
        shared_down(std::move(shared_down_)), top_k(top_k_), groups(groups_), top_groups(top_groups_),
        normalize(normalize_), scaling(static_cast<float>(scaling_)) {
    const int64_t experts = static_cast<int64_t>(gate_up.size());
    TORCH_CHECK(static_cast<bool>(shared_gate_up) == static_cast<bool>(shared_down), "shared_gate_up and "
                "shared_down come together");
    TORCH_CHECK(down.size() == gate_up.size(), "experts: ", gate_up.size(), " gate_up weights but ", down.size(),
                " down");
    if (experts == 0) {
      TORCH_CHECK(shared_gate_up && !router_, "a dense feed-forward needs its gate_up and down and no router");
      return;
    }
    TORCH_CHECK(router_ && bias_, "routed experts need the router and its correction bias");
    const int64_t hidden = gate_up[0]->in;
    router = checked_float(*router_, experts * hidden, "router");
    router_bias = checked_float(*bias_, experts, "router_bias");
    TORCH_CHECK(groups > 0 && experts % groups == 0 && top_groups >= 1 && top_groups <= groups && top_k >= 1 &&
                top_k <= top_groups * (experts / groups), "routing: ", top_k, " of ", experts, " experts in ",
                top_groups, " of ", groups, " groups is not possible");
  }

  bool routed() const { return !gate_up.empty(); }
  int64_t hidden() const { return routed() ? gate_up[0]->in : shared_gate_up->in; }
};

// SwiGLU over m rows: y = down(silu(gate) * up), gate_up's gate rows first.
void swiglu_mlp(const BlockLinear& gate_up, const BlockLinear& down, const float* x, int64_t m, float* y,
                std::vector<float>& gu, std::vector<float>& act, int64_t tile_rows) {
  const int64_t ffn = down.in;
  gu.resize(m * 2 * ffn);
  act.resize(m * ffn);
  gate_up(x, m, gu.data(), tile_rows);
  for (int64_t r = 0; r < m; ++r) swiglu(&gu[r * 2 * ffn], &gu[r * 2 * ffn + ffn], &act[r * ffn], ffn);
  down(act.data(), m, y, tile_rows);
}

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
      feed_forward(*w.ffn, h.data(), B, y.data(), gu, act);
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

  // y [B, hidden] = the routed experts' weighted sum plus the shared expert (or the dense SwiGLU alone).
  void feed_forward(const FeedForward& f, const float* x, int64_t B, float* y, std::vector<float>& gu,
                    std::vector<float>& act) const {
    const int64_t hidden = f.hidden();
    std::fill_n(y, B * hidden, 0.f);
    if (f.routed()) {
      const int64_t E = static_cast<int64_t>(f.gate_up.size());
      std::vector<int64_t> ids(B * f.top_k);
      std::vector<float> weights(B * f.top_k);
      route(f, x, B, ids.data(), weights.data());
      // each chosen expert once over its tokens (in token order), as the torch block groups them
      std::vector<std::vector<int64_t>> picks(E);
      for (int64_t i = 0; i < B * f.top_k; ++i) picks[ids[i]].push_back(i);
      std::vector<float> rows, out;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t n = static_cast<int64_t>(picks[e].size());
        if (n == 0) continue;
        rows.resize(n * hidden);
        out.resize(n * hidden);
        for (int64_t r = 0; r < n; ++r) std::copy_n(x + picks[e][r] / f.top_k * hidden, hidden, &rows[r * hidden]);
        swiglu_mlp(*f.gate_up[e], *f.down[e], rows.data(), n, out.data(), gu, act, tile_rows_);
        for (int64_t r = 0; r < n; ++r)
          add_scaled(y + picks[e][r] / f.top_k * hidden, weights[picks[e][r]], &out[r * hidden], hidden);
      }
    }
    if (f.shared_gate_up) {
      std::vector<float> shared(B * hidden);
      swiglu_mlp(*f.shared_gate_up, *f.shared_down, x, B, shared.data(), gu, act, tile_rows_);
      for (int64_t i = 0; i < B * hidden; ++i) y[i] += shared[i];
    }
  }

  // ids, weights [B, top_k]: sigmoid scores; the choice adds the correction bias and, with groups, keeps the
  // top_groups groups whose two best choices sum highest; weights are the chosen scores, normalised and scaled.
  static void route(const FeedForward& f, const float* x, int64_t B, int64_t* ids, float* weights) {
    const int64_t E = static_cast<int64_t>(f.gate_up.size()), hidden = f.hidden(), per_group = E / f.groups;
    const float* router = f.router.data_ptr<float>();
    const float* bias = f.router_bias.data_ptr<float>();
    std::vector<float> scores(B * E);
    at::parallel_for(0, E, 8, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t b = 0; b < B; ++b)
          scores[b * E + e] = 1.f / (1.f + std::exp(-dot(x + b * hidden, router + e * hidden, hidden)));
    });
    const float none = -std::numeric_limits<float>::infinity();
    std::vector<float> choice(E), group_score(f.groups);
    std::vector<int64_t> order(std::max(E, f.groups));
    for (int64_t b = 0; b < B; ++b) {
      const float* s = &scores[b * E];
      for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + bias[e];
      if (f.groups > 1) {
        for (int64_t g = 0; g < f.groups; ++g) {
          const float* c = &choice[g * per_group];
          const int64_t best = std::max_element(c, c + per_group) - c;
          float second = none;
          for (int64_t i = 0; i < per_group; ++i) if (i != best) second = std::max(second, c[i]);
          group_score[g] = c[best] + second;
        }
        std::iota(order.begin(), order.begin() + f.groups, 0);
        std::partial_sort(order.begin(), order.begin() + f.top_groups, order.begin() + f.groups,
                          [&](int64_t a, int64_t c) { return group_score[a] > group_score[c]; });
        std::vector<bool> keep(f.groups, false);
        for (int64_t i = 0; i < f.top_groups; ++i) keep[order[i]] = true;
        for (int64_t e = 0; e < E; ++e) if (!keep[e / per_group]) choice[e] = none;
      }
      std::iota(order.begin(), order.begin() + E, 0);
      std::partial_sort(order.begin(), order.begin() + f.top_k, order.begin() + E,
                        [&](int64_t a, int64_t c) { return choice[a] > choice[c]; });
      float sum = 0.f;
      for (int64_t i = 0; i < f.top_k; ++i) {
        ids[b * f.top_k + i] = order[i];
        sum += weights[b * f.top_k + i] = s[order[i]];
      }
      for (int64_t i = 0; i < f.top_k; ++i) {
        float& wi = weights[b * f.top_k + i];
        if (f.normalize) wi = wi / (sum + 1e-20f);
        wi *= f.scaling;
      }
    }
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
