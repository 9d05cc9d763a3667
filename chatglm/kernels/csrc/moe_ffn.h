// GLM's mixture-of-experts feed-forward for the one-call decode steps (decode_step.cpp: GLM-4.5/4.6,
// latent_moe_step.cpp: GLM-4.7-Flash), as chatglm/models/glm4_moe.py computes it (Router, MoE): sigmoid scores,
// the correction bias for choosing only (best groups first), the chosen scores normalised and scaled; only the
// chosen experts' blocks are read, each expert once over all the rows routed to it; a shared SwiGLU adds to every
// row. Internal to each file that includes it.
#pragma once

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
    for (int64_t e = 0; e < experts; ++e) {
      TORCH_CHECK(gate_up[e]->in == hidden && down[e]->out == hidden && gate_up[e]->out == 2 * down[e]->in,
                  "expert ", e, ": gate_up is [", gate_up[e]->out, ", ", gate_up[e]->in, "] and down [", down[e]->out,
                  ", ", down[e]->in, "]; expected [2 * ffn, ", hidden, "] and [", hidden, ", ffn]");
    }
  }

  bool routed() const { return !gate_up.empty(); }
  int64_t hidden() const { return routed() ? gate_up[0]->in : shared_gate_up->in; }
};

// Routed experts alone (no shared part), each expert's gate_up and down from the ggml blocks `parts` of one type.
inline std::shared_ptr<FeedForward> routed_experts(const torch::Tensor& router, const torch::Tensor& router_bias,
                                                   const std::vector<std::vector<torch::Tensor>>& gate_up,
                                                   int64_t gate_up_type,
                                                   const std::vector<std::vector<torch::Tensor>>& down,
                                                   int64_t down_type, int64_t top_k, int64_t groups,
                                                   int64_t top_groups, bool normalize, double scaling) {
  TORCH_CHECK(!gate_up.empty() && gate_up.size() == down.size(), "experts: ", gate_up.size(), " gate_up weights but ",
              down.size(), " down");
  TORCH_CHECK(router.dim() == 2, "router must be [experts, hidden]");
  const int64_t hidden = router.size(1);
  std::vector<Weight> up, dn;
  for (size_t e = 0; e < gate_up.size(); ++e) {
    up.push_back(std::make_shared<BlockLinear>(gate_up[e], gate_up_type, hidden, std::nullopt));
    dn.push_back(std::make_shared<BlockLinear>(down[e], down_type, up.back()->out / 2, std::nullopt));
  }
  return std::make_shared<FeedForward>(router, router_bias, std::move(up), std::move(dn), nullptr, nullptr, top_k,
                                       groups, top_groups, normalize, scaling);
}

// SwiGLU over m rows: y = down(silu(gate) * up), gate_up's gate rows first.
inline void swiglu_mlp(const BlockLinear& gate_up, const BlockLinear& down, const float* x, int64_t m, float* y,
                       std::vector<float>& gu, std::vector<float>& act, int64_t tile_rows) {
  const int64_t ffn = down.in;
  gu.resize(m * 2 * ffn);
  act.resize(m * ffn);
  gate_up(x, m, gu.data(), tile_rows);
  for (int64_t r = 0; r < m; ++r) swiglu(&gu[r * 2 * ffn], &gu[r * 2 * ffn + ffn], &act[r * ffn], ffn);
  down(act.data(), m, y, tile_rows);
}

// ids, weights [B, top_k]: sigmoid scores; the choice adds the correction bias and, with groups, keeps the
// top_groups groups whose two best choices sum highest; weights are the chosen scores, normalised and scaled.
inline void route(const FeedForward& f, const float* x, int64_t B, int64_t* ids, float* weights) {
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

// y [B, hidden] += the routed experts' weighted sum for the rows x [B, hidden]: each chosen expert once over the
// rows routed to it (in row order, as the torch block groups them).
inline void add_routed(const FeedForward& f, const float* x, int64_t B, float* y, std::vector<float>& gu,
                       std::vector<float>& act, int64_t tile_rows) {
  const int64_t hidden = f.hidden(), E = static_cast<int64_t>(f.gate_up.size());
  std::vector<int64_t> ids(B * f.top_k);
  std::vector<float> weights(B * f.top_k);
  route(f, x, B, ids.data(), weights.data());
  std::vector<std::vector<int64_t>> picks(E);
  for (int64_t i = 0; i < B * f.top_k; ++i) picks[ids[i]].push_back(i);
  std::vector<float> rows, out;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(picks[e].size());
    if (n == 0) continue;
    rows.resize(n * hidden);
    out.resize(n * hidden);
    for (int64_t r = 0; r < n; ++r) std::copy_n(x + picks[e][r] / f.top_k * hidden, hidden, &rows[r * hidden]);
    swiglu_mlp(*f.gate_up[e], *f.down[e], rows.data(), n, out.data(), gu, act, tile_rows);
    for (int64_t r = 0; r < n; ++r)
      add_scaled(y + picks[e][r] / f.top_k * hidden, weights[picks[e][r]], &out[r * hidden], hidden);
  }
}

// y [B, hidden] = the routed experts' weighted sum plus the shared expert (or the dense SwiGLU alone).
inline void feed_forward(const FeedForward& f, const float* x, int64_t B, float* y, std::vector<float>& gu,
                         std::vector<float>& act, int64_t tile_rows) {
  const int64_t hidden = f.hidden();
  std::fill_n(y, B * hidden, 0.f);
  if (f.routed()) add_routed(f, x, B, y, gu, act, tile_rows);
  if (f.shared_gate_up) {
    std::vector<float> shared(B * hidden);
    swiglu_mlp(*f.shared_gate_up, *f.shared_down, x, B, shared.data(), gu, act, tile_rows);
    for (int64_t i = 0; i < B * hidden; ++i) y[i] += shared[i];
  }
}

}  // namespace
