// The small float32 helpers of the one-call decode steps (decode_step.cpp, latent_moe_step.cpp): cache values,
// dot products, softmax exponentials, SwiGLU, RMSNorm, rotary, a weight in ggml blocks. Internal to each file
// that includes it.
#pragma once

#include <torch/extension.h>

#include "ggml_kernels.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Cache rows are float32 or float16 (converted to float32 as they are read, rounded to nearest as written).
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// sum q[i] * k[i], k float32 or a float16 cache row: 16 lanes at a time, then one tree reduction (a head's 64 or
// 128 values are a few steps)
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += q[i] * to_float(k[i]);
  return s;
}

// o[i] += p * v[i]
template <typename T>
inline void add_scaled(float* o, float p, const T* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pp = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pp, load16(v + i), _mm512_loadu_ps(o + i)));
#endif
  for (; i < n; ++i) o[i] += p * to_float(v[i]);
}

#if defined(__AVX512F__)
// e^x for 16 lanes: 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, a degree-6 Taylor polynomial for
// e^r (relative error ~2e-7) and vscalefps for the 2^n (which also gives 0 and inf past float's range).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// x[i] = e^(x[i] - shift); returns the sum
float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += x[i] = std::exp(x[i] - shift);
  return sum;
}

// out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up
void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float scale = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

// Rotate the first rope_dim values of a head by the angles' (cos, sin) pairs: pairs (0,1), (2,3)... when
// interleaved, else value i with value i + rope_dim/2.
void rotate(float* v, const float* cs, int64_t rope_dim, bool interleaved) {
  const int64_t half = rope_dim / 2, step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[2 * i], s = cs[2 * i + 1];
    float& a = v[i * step];
    float& b = v[i * step + other];
    const float a0 = a;
    a = a0 * c - b * s;
    b = a0 * s + b * c;
  }
}

// A ggml q8_0 block, the cache rows of --kv-type q8_0 (llama.cpp's -ctk/-ctv q8_0): 32 values as int8 codes times
// one float16 scale, 34 bytes as ggml's block_q8_0 lays them out.
struct BlockQ8_0 {
  c10::Half d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34, "a q8_0 block is 34 bytes, as ggml's block_q8_0");

// y = n values (a multiple of 32) as n / 32 q8_0 blocks, rounded as the activations of the block products are
// (quantize_block: ggml's quantize_row_q8_0_ref, gguf.quants, and chatglm.quant.q8_0_bytes for the torch path).
inline void quantize_q8_0(const float* x, int64_t n, BlockQ8_0* y) {
  for (int64_t b = 0; b < n / 32; ++b) {
    float d;
    quantize_block(x + 32 * b, y[b].qs, d);
    y[b].d = static_cast<c10::Half>(d);  // exact: d is float16-rounded already
  }
}

// out = the 32 * n float32 values of n q8_0 blocks (each code times its scale: exact in float32)
inline void dequantize_q8_0(const BlockQ8_0* x, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, out += 32) {
#if defined(__AVX512F__)
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(x[b].d.x));  // F16C: c10's scalar conversion may take the bit path
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1)));
    _mm512_storeu_ps(out, _mm512_mul_ps(d, lo));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, hi));
#else
    const float d = static_cast<float>(x[b].d);
    for (int k = 0; k < 32; ++k) out[k] = d * static_cast<float>(x[b].qs[k]);
#endif
  }
}

// A new cache row y of n values from float32 x: converted (float16 rounded to nearest), or quantized to q8_0 blocks.
template <typename T>
inline void store_row(const float* x, int64_t n, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(x[i]);
}
inline void store_row(const float* x, int64_t n, BlockQ8_0* y) { quantize_q8_0(x, n, y); }

torch::Tensor checked_float(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n && !t.is_cuda(), what,
              " must be a contiguous CPU float32 tensor of ", n, " values");
  return t;
}

// A weight held as ggml blocks (the file's bytes, or the pieces of a fused weight) with its optional float32 bias.
struct BlockLinear {
  std::vector<torch::Tensor> parts;
  int64_t qtype, in, out;
  torch::Tensor bias;  // float32 [out], or undefined

  BlockLinear(std::vector<torch::Tensor> p, int64_t type, int64_t k, const std::optional<torch::Tensor>& b,
              const char* name = "bias")
      : parts(std::move(p)), qtype(type), in(k), out(check_parts(parts, k, type)) {
    if (b) bias = checked_float(*b, out, name);
  }

  // y [m, out] = x [m, in] @ W.T (+ bias)
  void operator()(const float* x, int64_t m, float* y, int64_t tile_rows) const {
    linear_into(x, m, in, parts, qtype, tile_rows, y);
    if (!bias.defined()) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) add_scaled(y + r * out, 1.f, b, out);
  }
};

// A one-call step's inputs beside its cache: x float32 [batch, hidden]; rope float32 [positions, rope_dim/2, 2];
// rows int64 [batch]; pos int64 [batch], or [batch, pos_columns] where a token has several positions (GLM v1's 2D
// rotary); tables int64 [batch, width], each row's blocks up to its cache row within the pool's blocks
// (1..blocks-1) of block_size rows.
inline void check_step_inputs(const torch::Tensor& x, int64_t hidden, const torch::Tensor& tables,
                              const torch::Tensor& pos, int64_t pos_columns, const torch::Tensor& rows,
                              const torch::Tensor& rope, int64_t rope_dim, int64_t blocks, int64_t block_size) {
  const int64_t batch = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, "x must be [batch, ", hidden, "]");
  checked_float(x, batch * hidden, "x");
  TORCH_CHECK(rope.scalar_type() == torch::kFloat32 && rope.is_contiguous() && rope.dim() == 3 &&
              rope.size(1) == rope_dim / 2 && rope.size(2) == 2, "rope must be float32 [positions, rope_dim/2, 2]");
  for (const torch::Tensor* t : {&pos, &rows}) {
    const int64_t columns = t == &pos ? pos_columns : 1;
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->dim() == (columns > 1 ? 2 : 1) &&
                t->size(0) == batch && t->numel() == batch * columns, "pos and rows must be int64 [batch]",
                pos_columns > 1 ? " (pos [batch, " + std::to_string(pos_columns) + "])" : std::string());
  }
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.dim() == 2 &&
              tables.size(0) == batch, "tables must be int64 [batch, blocks per sequence]");
  const int64_t* at = pos.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  for (int64_t i = 0; i < pos.numel(); ++i) {
    TORCH_CHECK(at[i] >= 0 && at[i] < rope.size(0), "row ", i / pos_columns, ": position ", at[i],
                " out of range (the rotary table has ", rope.size(0), ")");
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < width * block_size, "row ", b, ": cache row ", row[b], " out of range");
    for (int64_t j = 0; j <= row[b] / block_size; ++j) {
      const int64_t block = table[b * width + j];
      TORCH_CHECK(block > 0 && block < blocks, "row ", b, ": block table entry ", j, " is ", block,
                  ", not a block of the pool (1..", blocks - 1, ")");
    }
  }
}

}  // namespace
