// One decode step (one new token per sequence) through every block of the shared decoder (llama family,
// ChatGLM2/3, GLM-4, CodeGeeX2, GLM v1, GLM-4-0414, GLM-4.5/4.6 with its experts) in a single call, for weights
// held as ggml blocks.
//
// Between two matrix products a block does little arithmetic (a norm, a rotation, one query row's attention,
// SwiGLU), but as torch operators each is a dispatch of a few microseconds; dozens a layer cost more than the
// products themselves on a small model. Here they are plain loops over float32 rows, and the products go
// straight to linear_into, with the activation rows kept in scratch buffers reused by every layer.
//
// The arithmetic is the Python block's (chatglm/models/layers.py: Block.forward, attend); a test checks one
// against the other.
#include "ggml_kernels.h"
#include "moe_ffn.h"
#include "step_math.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// LayerNorm with a bias (GLM v1): (x - mean) / sqrt(var + eps) * w + b, both moments in two passes as torch does.
void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* y) {
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float scale = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * scale * w[i] + b[i];
}

// out[i] = gelu(x[i]) in torch's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written
// as x / (1 + e^(-2u)) (the same value, one exponential, no overflow: e^(-2u) saturates to 0 or inf).
void gelu_tanh(const float* x, float* out, int64_t n) {
  constexpr float k = -2.f * 0.7978845608028654f, c = 0.044715f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f), kk = _mm512_set1_ps(k), cc = _mm512_set1_ps(c);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 u = _mm512_mul_ps(kk, _mm512_fmadd_ps(_mm512_mul_ps(cc, v), _mm512_mul_ps(v, v), v));
    _mm512_storeu_ps(out + i, _mm512_div_ps(v, _mm512_add_ps(one, exp16(u))));
  }
#endif
  for (; i < n; ++i) out[i] = x[i] / (1.f + std::exp(k * (x[i] + c * x[i] * x[i] * x[i])));
}

// A tile of cache rows as float32: the rows themselves in a float32 cache; converted once into buf from float16, so
// every query head of a group then reads them from L1 instead of converting them again.
inline const float* rows_f32(const float* p, int64_t, float*) { return p; }
inline const float* rows_f32(const c10::Half* p, int64_t n, float* buf) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf + i, load16(p + i));
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  return buf;
}
inline const float* rows_f32(const BlockQ8_0* p, int64_t n, float* buf) {  // n blocks: 32 n values
  dequantize_q8_0(p, n, buf);
  return buf;
}

#if defined(__AVX512F__)
// Lane j of the result is the sum of the 16 lanes of v[j]: 16 dot products reduced in 15 shuffle-adds, not one
// horizontal reduction each.
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2k], v[2k+1]
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sums of v[4k] .. v[4k+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44), _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44), _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}
#endif

// s[j] = q . k_j for the m <= 16 rows k_j (d floats each, one after another) of a tile
inline void tile_scores(const float* q, const float* k, int64_t m, int64_t d, float* s) {
#if defined(__AVX512F__)
  if (m == 16 && d % 16 == 0) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 qi = _mm512_loadu_ps(q + i);
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k + j * d + i), acc[j]);
    }
    _mm512_storeu_ps(s, sum16(acc));
    return;
  }
#endif
  for (int64_t j = 0; j < m; ++j) s[j] = dot(q, k + j * d, d);
}

// o += sum_j p[j] v_j over the m rows v_j (d floats each) of a tile, o kept in registers across the rows
inline void tile_accumulate(const float* p, const float* v, int64_t m, int64_t d, float* o) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= d; i += 16) {
    __m512 acc = _mm512_loadu_ps(o + i);
    for (int64_t j = 0; j < m; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(v + j * d + i), acc);
    _mm512_storeu_ps(o + i, acc);
  }
#endif
  for (; i < d; ++i)
    for (int64_t j = 0; j < m; ++j) o[i] += p[j] * v[j * d + i];
}

// out [heads, d] from the partials of n chunks, each [max per head, sum per head, output per head]: the softmax
// over all chunks' rows, each chunk's part rescaled to the largest max.
void merge_partials(const float* partial, int64_t n, int64_t heads, int64_t d, float* out) {
  const int64_t part = heads * (d + 2);
  for (int64_t i = 0; i < heads; ++i) {
    float top = -INFINITY, total = 0.f;
    for (int64_t c = 0; c < n; ++c) top = std::max(top, partial[c * part + i]);
    float* o = out + i * d;
    std::fill_n(o, d, 0.f);
    for (int64_t c = 0; c < n; ++c) {
      const float* p = partial + c * part;
      const float w = std::exp(p[i] - top);
      total += w * p[heads + i];
      add_scaled(o, w, p + 2 * heads + i * d, d);
    }
    for (int64_t k = 0; k < d; ++k) o[k] /= total;
  }
}

using Parts = std::vector<torch::Tensor>;
using Bias = std::optional<torch::Tensor>;

std::optional<torch::Tensor> checked_norm(const Bias& t, int64_t n, const char* what) {
  if (!t) return std::nullopt;
  return checked_float(*t, n, what);
}

// One block's weights, and the switches of its shape (fixed per layer, so the step branches per layer, never per
// value): the shared block is RMSNorm, SwiGLU and plain residuals; GLM-4-0414 adds RMSNorms on the attention and
// MLP outputs (attn_post_norm, ffn_post_norm); GLM v1 has LayerNorms with biases, its q, k, v interleaved per
// head (qkv_per_head), a GELU MLP with biases, and residuals alpha * the normed input (residual_alpha > 0);
// GLM-4.5/4.6 RMS-norms each query and key head before rotary (q_norm, k_norm) and adds routed experts (moe_ffn.h)
// to the SwiGLU, which is then the shared expert.
struct DecodeLayer {
  torch::Tensor attn_norm, ffn_norm;
  BlockLinear qkv, o, gate_up, down;
  std::optional<torch::Tensor> attn_norm_bias, ffn_norm_bias, attn_post_norm, ffn_post_norm, q_norm, k_norm;
  bool gelu, qkv_per_head;
  float residual_alpha;
  std::shared_ptr<FeedForward> experts;  // or null

  DecodeLayer(const torch::Tensor& attn_norm_, const torch::Tensor& ffn_norm_, Parts qkv_, int64_t qkv_type,
              const Bias& qkv_bias, Parts o_, int64_t o_type, const Bias& o_bias, int64_t attn_width, Parts gate_up_,
              int64_t gate_up_type, Parts down_, int64_t down_type, int64_t ffn, const Bias& gate_up_bias,
              const Bias& down_bias, const Bias& attn_norm_bias_, const Bias& ffn_norm_bias_,
              const Bias& attn_post_norm_, const Bias& ffn_post_norm_, const std::string& mlp, double alpha,
              bool per_head, const Bias& q_norm_, const Bias& k_norm_, const Bias& router, const Bias& router_bias,
              const std::vector<Parts>& experts_gate_up, int64_t experts_gate_up_type,
              const std::vector<Parts>& experts_down, int64_t experts_down_type, int64_t top_k, int64_t groups,
              int64_t top_groups, bool normalize, double scaling)
      : attn_norm(checked_float(attn_norm_, attn_norm_.numel(), "attn_norm")),
        ffn_norm(checked_float(ffn_norm_, attn_norm.numel(), "ffn_norm")),
        qkv(std::move(qkv_), qkv_type, attn_norm.numel(), qkv_bias, "qkv_bias"),
        o(std::move(o_), o_type, attn_width, o_bias, "o_bias"),
        gate_up(std::move(gate_up_), gate_up_type, attn_norm.numel(), gate_up_bias, "gate_up_bias"),
        down(std::move(down_), down_type, ffn, down_bias, "down_bias"),
        attn_norm_bias(checked_norm(attn_norm_bias_, attn_norm.numel(), "attn_norm_bias")),
        ffn_norm_bias(checked_norm(ffn_norm_bias_, attn_norm.numel(), "ffn_norm_bias")),
        attn_post_norm(checked_norm(attn_post_norm_, attn_norm.numel(), "attn_post_norm")),
        ffn_post_norm(checked_norm(ffn_post_norm_, attn_norm.numel(), "ffn_post_norm")),
        q_norm(checked_norm(q_norm_, q_norm_ ? q_norm_->numel() : 0, "q_norm")),
        k_norm(checked_norm(k_norm_, k_norm_ ? k_norm_->numel() : 0, "k_norm")),
        gelu(mlp == "gelu"), qkv_per_head(per_head), residual_alpha(static_cast<float>(alpha)) {
    TORCH_CHECK(mlp == "swiglu" || mlp == "gelu", "mlp must be 'swiglu' or 'gelu', got '", mlp, "'");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm come together or not at all");
    if (router) {
      TORCH_CHECK(router_bias && !gelu, "routed experts need router_bias and a SwiGLU shared expert");
      experts = routed_experts(*router, *router_bias, experts_gate_up, experts_gate_up_type, experts_down,
                               experts_down_type, top_k, groups, top_groups, normalize, scaling);
      TORCH_CHECK(experts->hidden() == attn_norm.numel(), "the experts take ", experts->hidden(),
                  " inputs; expected the hidden size ", attn_norm.numel());
    }
    TORCH_CHECK(attn_norm_bias.has_value() == ffn_norm_bias.has_value(), "attn_norm_bias and ffn_norm_bias "
                "come together (LayerNorm) or not at all (RMSNorm)");
    TORCH_CHECK(alpha >= 0, "residual_alpha must be >= 0 (0: plain residuals), got ", alpha);
    const int64_t up_rows = gelu ? ffn : 2 * ffn;
    TORCH_CHECK(o.out == attn_norm.numel() && down.out == attn_norm.numel() && gate_up.out == up_rows,
                "layer shapes disagree: o has ", o.out, " rows, down ", down.out, ", gate_up ", gate_up.out,
                " (expected ", up_rows, " for ", mlp, ") for hidden size ", attn_norm.numel(), " and ffn size ", ffn);
  }

  // y = the block's input norm of x: RMSNorm, or LayerNorm when the norm has a bias
  void norm(const torch::Tensor& w, const std::optional<torch::Tensor>& b, const float* x, float eps, int64_t n,
            float* y) const {
    if (b) {
      layer_norm(x, w.data_ptr<float>(), b->data_ptr<float>(), eps, n, y);
    } else {
      rms_norm(x, w.data_ptr<float>(), eps, n, y);
    }
  }

  // x += y, with y first RMS-normed by `post` when the layer has it; or x = alpha * h + y (GLM v1)
  void residual(float* x, float* y, const float* h, const std::optional<torch::Tensor>& post, float eps,
                int64_t B, int64_t n) const {
    if (post) {
      for (int64_t b = 0; b < B; ++b) rms_norm(y + b * n, post->data_ptr<float>(), eps, n, y + b * n);
    }
    if (residual_alpha > 0) {
      for (int64_t i = 0; i < B * n; ++i) x[i] = residual_alpha * h[i] + y[i];
    } else {
      for (int64_t i = 0; i < B * n; ++i) x[i] += y[i];
    }
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
      TORCH_CHECK(!l->qkv_per_head || heads == kv_heads, "qkv_per_head needs as many key heads as query heads");
      TORCH_CHECK(l->attn_norm.numel() == layers_[0]->attn_norm.numel(), "every layer must have the first layer's "
                  "hidden size");
      TORCH_CHECK(!l->q_norm || (l->q_norm->numel() == head_dim && l->k_norm->numel() == head_dim),
                  "q_norm and k_norm must have head_dim (", head_dim, ") values");
    }
  }

  // x [B, hidden] (updated in place and returned) for tokens at positions pos [B], their keys and values going to
  // cache rows rows [B] of each sequence; tables [B, width] are the sequences' block tables into the paged cache
  // kv [layers, 2, kv_heads, blocks, block_size, head_dim] (float32 or float16; q8_0: uint8 [..., head_dim / 32 * 34]
  // bytes, head_dim / 32 blocks a row), rope the (cos, sin) table
  // [max_position, rope_dim/2, 2]. 2D rotary (GLM v1): pos [B, 2], each head's first rope_dim values rotated by
  // the token's position, the next rope_dim by its block position.
  torch::Tensor step(torch::Tensor x, const torch::Tensor& kv, const torch::Tensor& tables, const torch::Tensor& pos,
                     const torch::Tensor& rows, const torch::Tensor& rope) {
    const int64_t hidden = layers_[0]->attn_norm.numel();
    const bool q8_0 = kv.scalar_type() == torch::kByte;  // head_dim / 32 q8_0 blocks per row
    TORCH_CHECK((kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kFloat16 || q8_0) &&
                kv.is_contiguous() && kv.dim() == 6 && kv.size(0) == static_cast<int64_t>(layers_.size()) &&
                kv.size(1) == 2 && kv.size(2) == kv_heads_ &&
                (q8_0 ? head_dim_ % 32 == 0 && kv.size(5) == head_dim_ / 32 * 34 : kv.size(5) == head_dim_),
                "the cache must be float32 or float16 [layers, 2, kv_heads, blocks, block_size, head_dim], or q8_0 "
                "blocks as uint8 [..., head_dim / 32 * 34]");
    const bool two_d = pos.dim() == 2;
    TORCH_CHECK(!two_d || (pos.size(1) == 2 && 2 * rope_dim_ <= head_dim_), "pos [batch, 2] (2D rotary) needs 2 "
                "columns and 2 * rope_dim <= head_dim; got ", pos.sizes(), ", rope ", rope_dim_, " of ", head_dim_);
    check_step_inputs(x, hidden, tables, pos, two_d ? 2 : 1, rows, rope, rope_dim_, kv.size(3), kv.size(4));
    const int64_t* at = pos.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* table = tables.data_ptr<int64_t>();
    const int64_t width = tables.size(1);
    if (kv.scalar_type() == torch::kFloat16) {
      run(x, static_cast<c10::Half*>(kv.data_ptr()), kv, table, width, at, two_d, row, rope);
    } else if (q8_0) {
      run(x, static_cast<BlockQ8_0*>(kv.data_ptr()), kv, table, width, at, two_d, row, rope);
    } else {
      run(x, kv.data_ptr<float>(), kv, table, width, at, two_d, row, rope);
    }
    return x;
  }

 private:
  template <typename T>
  void run(torch::Tensor& x, T* cache, const torch::Tensor& kv, const int64_t* table, int64_t width, const int64_t* at,
           bool two_d, const int64_t* row, const torch::Tensor& rope) const {
    const int64_t B = x.size(0), hidden = layers_[0]->attn_norm.numel(), D = head_dim_;
    const int64_t nq = heads_ * D, nkv = kv_heads_ * D, qkv_width = nq + 2 * nkv;
    int64_t ffn_max = 0;  // a dense first layer's SwiGLU is wider than the shared expert of the MoE layers after it
    for (const auto& l : layers_) ffn_max = std::max(ffn_max, l->down.in);
    std::vector<float> h(B * hidden), qkv(B * qkv_width), att(B * nq), gu(B * 2 * ffn_max), act(B * ffn_max);
    std::vector<float> y(B * hidden), per_head(qkv_width), expert_gu, expert_act;
    float* xs = x.data_ptr<float>();
    const float* rot = rope.data_ptr<float>();
    const int64_t unit = static_cast<int64_t>(sizeof(T)) / kv.element_size();  // tensor elements per T (q8_0: 34)
    const Paged<T> paged{nullptr, table, width, kv.size(4), kv.stride(3) / unit, kv.stride(2) / unit,
                         kv.stride(1) / unit, kv.stride(4) / unit};

    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecodeLayer& w = *layers_[l];
      Paged<T> layer = paged;
      layer.base = cache + l * kv.stride(0) / unit;
      for (int64_t b = 0; b < B; ++b)
        w.norm(w.attn_norm, w.attn_norm_bias, xs + b * hidden, eps_, hidden, &h[b * hidden]);
      w.qkv(h.data(), B, qkv.data(), tile_rows_);
      for (int64_t b = 0; b < B; ++b) {
        float* r = &qkv[b * qkv_width];
        if (w.qkv_per_head) {  // [q k v] of each head (GLM v1) -> all q heads, all k heads, all v heads
          std::copy_n(r, qkv_width, per_head.begin());
          for (int64_t i = 0; i < heads_; ++i)
            for (int64_t part = 0; part < 3; ++part)
              std::copy_n(&per_head[(3 * i + part) * D], D, r + part * nq + i * D);
        }
        if (w.q_norm) {  // each query and key head RMS-normed before rotary (GLM-4.5)
          for (int64_t i = 0; i < heads_; ++i) rms_norm(r + i * D, w.q_norm->data_ptr<float>(), eps_, D, r + i * D);
          for (int64_t g = 0; g < kv_heads_; ++g)
            rms_norm(r + nq + g * D, w.k_norm->data_ptr<float>(), eps_, D, r + nq + g * D);
        }
        const float* cs = rot + at[two_d ? 2 * b : b] * rope_dim_;
        const float* cs2 = two_d ? rot + at[2 * b + 1] * rope_dim_ : nullptr;
        for (int64_t i = 0; i < heads_ + kv_heads_; ++i) {
          rotate(r + i * D, cs, rope_dim_, interleaved_);
          if (cs2) rotate(r + i * D + rope_dim_, cs2, rope_dim_, interleaved_);
        }
        for (int64_t g = 0; g < kv_heads_; ++g) {  // this token's key and value into the cache
          T* k = layer.row(b, g, row[b]);
          store_row(r + nq + g * D, D, k);
          store_row(r + nq + nkv + g * D, D, k + layer.half_stride);
        }
      }
      attend(layer, row, B, qkv.data(), qkv_width, att.data());
      w.o(att.data(), B, y.data(), tile_rows_);
      w.residual(xs, y.data(), h.data(), w.attn_post_norm, eps_, B, hidden);
      for (int64_t b = 0; b < B; ++b)
        w.norm(w.ffn_norm, w.ffn_norm_bias, xs + b * hidden, eps_, hidden, &h[b * hidden]);
      const int64_t ffn = w.down.in;
      w.gate_up(h.data(), B, gu.data(), tile_rows_);
      for (int64_t b = 0; b < B; ++b) {
        if (w.gelu) {
          gelu_tanh(&gu[b * ffn], &act[b * ffn], ffn);
        } else {
          swiglu(&gu[b * 2 * ffn], &gu[b * 2 * ffn + ffn], &act[b * ffn], ffn);
        }
      }
      w.down(act.data(), B, y.data(), tile_rows_);
      if (w.experts) add_routed(*w.experts, h.data(), B, y.data(), expert_gu, expert_act, tile_rows_);
      w.residual(xs, y.data(), h.data(), w.ffn_post_norm, eps_, B, hidden);
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

  // Each row's query heads over its cache rows 0..row[b] (the prefix, its past and itself), flash-decoding style:
  // a sequence's rows are cut into chunks of CHUNK_BLOCKS blocks, one task per (sequence, key head, chunk), so a
  // long context keeps every thread busy even at batch 1 with 2 key heads; each task meets its query heads with
  // each block's keys and values converted once, and leaves a partial (max, sum, output) per query head; the
  // partials of a sequence's chunks are merged after.
  template <typename T>
  void attend(const Paged<T>& kv, const int64_t* row, int64_t B, const float* qkv, int64_t width, float* out) const {
    const int64_t group = heads_ / kv_heads_, D = head_dim_, bs = kv.block_size, chunk = CHUNK_BLOCKS * bs;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    std::vector<int64_t> first(B * kv_heads_ + 1, 0);  // tasks of (b, g): first[b * kv_heads + g] ..
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < kv_heads_; ++g)
        first[b * kv_heads_ + g + 1] = first[b * kv_heads_ + g] + (row[b] + chunk) / chunk;
    const int64_t tasks = first.back(), part = group * (D + 2);  // per task: max and sum per head, then outputs
    std::vector<float> partial(tasks * part);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> q(group * D), scores(group * chunk), buf(std::min<int64_t>(bs, 16) * D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bg = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
        const int64_t b = bg / kv_heads_, g = bg % kv_heads_, j0 = (t - first[bg]) * chunk;
        const int64_t n = std::min(row[b] + 1, j0 + chunk) - j0;  // rows j0 .. j0 + n - 1
        const float* qg = qkv + b * width + g * group * D;
        for (int64_t i = 0; i < group * D; ++i) q[i] = qg[i] * scale;
        float* p = &partial[t * part];
        for_tiles(kv, b, g, j0, n, 0, buf.data(), [&](const float* keys, int64_t j, int64_t m) {
          for (int64_t i = 0; i < group; ++i) tile_scores(&q[i * D], keys, m, D, &scores[i * chunk + j]);
        });
        for (int64_t i = 0; i < group; ++i) {
          float* s = &scores[i * chunk];
          p[i] = *std::max_element(s, s + n);
          p[group + i] = exp_shifted(s, n, p[i]);
        }
        float* o = p + 2 * group;
        std::fill_n(o, group * D, 0.f);
        for_tiles(kv, b, g, j0, n, kv.half_stride, buf.data(), [&](const float* values, int64_t j, int64_t m) {
          for (int64_t i = 0; i < group; ++i) tile_accumulate(&scores[i * chunk + j], values, m, D, o + i * D);
        });
      }
    });
    at::parallel_for(0, B * kv_heads_, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t bg = s0; bg < s1; ++bg) merge_partials(&partial[first[bg] * part], first[bg + 1] - first[bg],
                                                          group, D, out + bg * group * D);
    });
  }

  // Rows j0 .. j0 + n - 1 of sequence b, key head g (offset 0: keys, half_stride: values) as float32 tiles of at
  // most 16 rows that lie together in one block: fn(rows, first row's index from j0, rows in the tile).
  template <typename T, typename Fn>
  static void for_tiles(const Paged<T>& kv, int64_t b, int64_t g, int64_t j0, int64_t n, int64_t offset, float* buf,
                        Fn&& fn) {
    for (int64_t j = 0; j < n;) {
      const int64_t m = std::min({n - j, kv.block_size - (j0 + j) % kv.block_size, int64_t{16}});
      fn(rows_f32(kv.row(b, g, j0 + j) + offset, m * kv.row_stride, buf), j, m);
      j += m;
    }
  }

  static constexpr int64_t CHUNK_BLOCKS = 16;  // cache blocks per attention task (256 rows of 16-row blocks)

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
                    const Bias&, int64_t, Parts, int64_t, Parts, int64_t, int64_t, const Bias&, const Bias&,
                    const Bias&, const Bias&, const Bias&, const Bias&, const std::string&, double, bool,
                    const Bias&, const Bias&, const Bias&, const Bias&, const std::vector<Parts>&, int64_t,
                    const std::vector<Parts>&, int64_t, int64_t, int64_t, int64_t, bool, double>(),
           py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("qkv"), py::arg("qkv_type"), py::arg("qkv_bias"),
           py::arg("o"), py::arg("o_type"), py::arg("o_bias"), py::arg("attn_width"), py::arg("gate_up"),
           py::arg("gate_up_type"), py::arg("down"), py::arg("down_type"), py::arg("ffn"),
           py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none(),
           py::arg("attn_norm_bias") = py::none(), py::arg("ffn_norm_bias") = py::none(),
           py::arg("attn_post_norm") = py::none(), py::arg("ffn_post_norm") = py::none(),
           py::arg("mlp") = "swiglu", py::arg("residual_alpha") = 0.0, py::arg("qkv_per_head") = false,
           py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(), py::arg("router") = py::none(),
           py::arg("router_bias") = py::none(), py::arg("experts_gate_up") = std::vector<Parts>(),
           py::arg("experts_gate_up_type") = 0, py::arg("experts_down") = std::vector<Parts>(),
           py::arg("experts_down_type") = 0, py::arg("top_k") = 1, py::arg("groups") = 1, py::arg("top_groups") = 1,
           py::arg("normalize") = true, py::arg("scaling") = 1.0);
  py::class_<FusedDecoder>(m, "FusedDecoder", "every block of a one-token step in one call (decode_step.cpp)")
      .def(py::init<std::vector<std::shared_ptr<DecodeLayer>>, int64_t, int64_t, int64_t, int64_t, bool, double,
                    int64_t>(),
           py::arg("layers"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("rope_dim"),
           py::arg("interleaved"), py::arg("eps"), py::arg("tile_rows"))
      .def("step", &FusedDecoder::step, py::arg("x"), py::arg("kv"), py::arg("tables"), py::arg("pos"), py::arg("rows"),
           py::arg("rope"), py::call_guard<py::gil_scoped_release>());
}
