// Matrix products with ggml's legacy 32-value blocks (q4_0 q4_1 q5_0 q5_1 q8_0) read in place.
//
// The scheme is ggml's: each call quantizes the activation rows to 8-bit blocks of 32 (one f16-rounded
// scale per block, plus the block's integer sum), then every weight block meets an activation block in
// an integer dot product, scaled by both blocks' scales in float32.
//
// Integer dot products use vpdpbusd (unsigned bytes x signed bytes). Weights are turned into unsigned
// codes u = w + bias (bias 8 for q4_0, 16 for q5_0, 128 for q8_0, 0 for q4_1/q5_1 whose codes are
// already unsigned); the -bias * sum(a) term is per activation only, so it is precomputed once per call
// (the prompt path adds it in float, the decode path starts the dot product from it and stays exact).
// q4_1/q5_1 add their offset m times the activation block's sum (ggml's q8_1 "s") in float.
//
// Prompts: two blocks fill a 512-bit register. For the nibble types the activations are stored in the
// order the nibbles unpack in ([block0 low half, block1 low half, block0 high half, block1 high half]), so
// a weight pair decodes with one broadcast, one shift and one mask, and serves a tile of activation rows.
//
// Decode (a few activation rows): one block per 256-bit register, as ggml does, since Zen 4 issues two
// 256-bit ops a cycle where 512-bit ones take one: a block costs a decode, one vpdpbusd, a convert and
// one scaled accumulate, with no lane shuffles.
#include "ggml_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GGML_KERNELS_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;        // values per block
constexpr int PAIR = 64;      // activation bytes per pair of blocks
constexpr int LANES = 16;     // int32 lanes per pair
constexpr int MAX_TILE = 8;   // activation rows that share one decoded weight block
constexpr int DECODE_ROWS = 4;  // calls with at most this many activation rows take the per-block path
constexpr int64_t SHARED_ACTS = 12 << 10;  // decode activations past this many bytes serve four weight rows per load

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };  // gguf's numbering

struct Format {
  int block_bytes;  // bytes per block
  int bias;         // what is added to a code to make it unsigned (0: already unsigned, with an offset m)
  bool nibbles;     // values 0..15 in the low nibbles, 16..31 in the high ones
};

Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {18, 8, true};
    case Q4_1: return {20, 0, true};
    case Q5_0: return {22, 16, true};
    case Q5_1: return {24, 0, true};
    case Q8_0: return {34, 128, false};
  }
  TORCH_CHECK(false, "ggml block type ", qtype, " has no kernel; expected q4_0, q4_1, q5_0, q5_1 or q8_0");
}

float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

float round_to_half(float v) {
  return c10::detail::fp16_ieee_to_fp32_value(c10::detail::fp16_ieee_from_fp32_value(v));
}

// Byte position of value i of the pair's block h (0 or 1) in the activations' pair layout.
inline int position(int64_t h, int i, bool nibbles) {
  if (!nibbles) return static_cast<int>(h) * QK + i;
  return i < 16 ? static_cast<int>(h) * 16 + i : 32 + static_cast<int>(h) * 16 + (i - 16);
}

// Activation rows quantized to 8-bit blocks, pair-major so that a tile of rows reads adjacent bytes.
struct Acts {
  int64_t rows, blocks, pairs;
  torch::Tensor q;    // int8 [pairs, rows, 64]: codes in the weight format's pair layout
  torch::Tensor ds;   // float [pairs, rows, 4]: both blocks' f16-rounded scale d, then d * sum(q) / 8 each
  int8_t* q_at = nullptr;
  float* ds_at = nullptr;

  const int8_t* codes(int64_t p, int64_t r) const { return q_at + (p * rows + r) * PAIR; }
  const float* scales(int64_t p, int64_t r) const { return ds_at + (p * rows + r) * 4; }
};

// One block of 32 activations as 8-bit codes in value order (ggml's q8_0 rounding); returns the codes'
// sum and sets the f16-rounded scale d.
int quantize_block(const float* v, int8_t* c, float& d) {
#ifdef GGML_KERNELS_VNNI
  const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float exact = amax / 127.f;
  const __m512 id = _mm512_set1_ps(exact != 0.f ? 1.f / exact : 0.f);
  // std::round's ties away from zero: truncate, then step away from zero where the exact remainder is >= 1/2
  auto codes = [&](__m512 x) {
    const __m512 y = _mm512_mul_ps(x, id);
    const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 step = _mm512_or_ps(_mm512_set1_ps(1.f), _mm512_and_ps(y, _mm512_set1_ps(-0.f)));  // +-1 as y
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, step));
  };
  const __m512i a = codes(lo), b = codes(hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm512_cvtsepi32_epi8(a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16), _mm512_cvtsepi32_epi8(b));
  d = round_to_half(exact);
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
#else
  float amax = 0.f;
  for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float exact = amax / 127.f, id = exact != 0.f ? 1.f / exact : 0.f;
  int sum = 0;
  for (int i = 0; i < QK; ++i) {
    c[i] = static_cast<int8_t>(std::round(v[i] * id));  // ties away from zero, as ggml's reference
    sum += c[i];
  }
  d = round_to_half(exact);
  return sum;
#endif
}

Acts quantize_acts(const float* x, int64_t rows, int64_t k, const Format& f) {
  Acts a;
  a.rows = rows;
  a.blocks = k / QK;
  a.pairs = (a.blocks + 1) / 2;
  a.q = torch::zeros({a.pairs, rows, PAIR}, torch::kInt8);   // an odd last block pairs with zeros
  a.ds = torch::zeros({a.pairs, rows, 4}, torch::kFloat32);
  int8_t* q = a.q_at = a.q.data_ptr<int8_t>();
  float* ds = a.ds_at = a.ds.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    int8_t c[QK];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < a.blocks; ++b) {
        const int64_t at = (b / 2) * rows + r, h = b % 2;
        const int sum = quantize_block(x + r * k + b * QK, c, ds[at * 4 + h]);
        for (int i = 0; i < QK; ++i) q[at * PAIR + position(h, i, f.nibbles)] = c[i];
        ds[at * 4 + 2 + h] = ds[at * 4 + h] * static_cast<float>(sum) / 8.f;
      }
    }
  });
  return a;
}

// A few activation rows (decode) quantized block by block in value order, block-major so that the rows
// at one block are adjacent: each weight block is decoded once into 256 bits and meets them in turn.
// Everything a block needs lies in one 40-byte record, so the activations are one stream beside the weights'.
struct ActBlock {
  int8_t q[QK];
  float d;       // the f16-rounded scale
  int32_t init;  // -bias * sum(q) / 8, each of 8 lanes' starting value, so that the integer dot product of the
                 // unsigned weight codes comes out exact
};
static_assert(sizeof(ActBlock) == 40, "activation records are packed");

struct BlockActs {
  int64_t rows, blocks;
  torch::Tensor records;  // ActBlock [blocks, rows]
  torch::Tensor dsum;     // float [blocks, rows]: d * sum(q), for the offset of q4_1/q5_1
  const ActBlock* at = nullptr;
  const float* sums = nullptr;
};

BlockActs quantize_block_acts(const float* x, int64_t rows, int64_t k, const Format& f) {
  BlockActs a{rows, k / QK};
  a.records = torch::empty({a.blocks * rows * static_cast<int64_t>(sizeof(ActBlock))}, torch::kUInt8);
  a.dsum = torch::empty({a.blocks, rows}, torch::kFloat32);
  ActBlock* rec = reinterpret_cast<ActBlock*>(a.records.data_ptr<uint8_t>());
  float* dsum = a.dsum.data_ptr<float>();
  a.at = rec;
  a.sums = dsum;
  for (int64_t b = 0; b < a.blocks; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      ActBlock& o = rec[b * rows + r];
      const int sum = quantize_block(x + r * k + b * QK, o.q, o.d);
      dsum[b * rows + r] = o.d * static_cast<float>(sum);
      o.init = -f.bias * sum / 8;
    }
  }
  return a;
}

// One weight block as unsigned codes in value order, with its scale and offset (m, or 0).
void decode_block(const uint8_t* blk, int64_t qtype, uint8_t* u, float& d, float& m) {
  d = half_to_float(blk);
  m = 0.f;
  uint32_t qh = 0;
  const uint8_t* qs = blk + 2;
  switch (qtype) {
    case Q4_1: m = half_to_float(blk + 2); qs = blk + 4; break;
    case Q5_0: std::memcpy(&qh, blk + 2, 4); qs = blk + 6; break;
    case Q5_1: m = half_to_float(blk + 2); std::memcpy(&qh, blk + 4, 4); qs = blk + 8; break;
    case Q8_0:
      for (int i = 0; i < QK; ++i) u[i] = static_cast<uint8_t>(static_cast<int8_t>(qs[i]) + 128);
      return;
  }
  for (int i = 0; i < 16; ++i) {
    u[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
    u[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
  }
}

// Portable path: the same arithmetic one block at a time.
void rows_scalar(const uint8_t* raw, int64_t row_stride, int64_t qtype, const Format& f, const Acts& a,
                 float* y, int64_t n_out, int64_t n0, int64_t n1) {
  uint8_t u[QK];
  std::vector<float> acc(a.rows);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < a.blocks; ++b) {
      float d, m;
      decode_block(raw + n * row_stride + b * f.block_bytes, qtype, u, d, m);
      for (int64_t r = 0; r < a.rows; ++r) {
        const int8_t* q = a.codes(b / 2, r);
        const float* ds = a.scales(b / 2, r);
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) dot += (static_cast<int32_t>(u[i]) - f.bias) * q[position(b % 2, i, f.nibbles)];
        acc[r] += d * ds[b % 2] * static_cast<float>(dot) + m * 8.f * ds[2 + b % 2];
      }
    }
    for (int64_t r = 0; r < a.rows; ++r) y[r * n_out + n] = acc[r];
  }
}

#ifdef GGML_KERNELS_VNNI

inline __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m512 half_splat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm512_set1_ps(_cvtsh_ss(h));
}

// Two blocks as 64 unsigned codes in the activations' layout, with per-lane scales and offsets
// (m for q4_1/q5_1; -bias * d for the others, which the activations' sums multiply).
template <int QT>
inline void decode_pair(const uint8_t* b0, const uint8_t* b1, __m512i& u, __m512& d, __m512& m) {
  constexpr bool nibbles = QT != Q8_0;
  const __mmask16 second = nibbles ? 0xF0F0 : 0xFF00;
  d = _mm512_mask_blend_ps(second, half_splat(b0), half_splat(b1));
  if constexpr (QT == Q4_1 || QT == Q5_1) {
    m = _mm512_mask_blend_ps(second, half_splat(b0 + 2), half_splat(b1 + 2));
  } else {
    m = _mm512_mul_ps(d, _mm512_set1_ps(QT == Q4_0 ? -8.f : QT == Q5_0 ? -16.f : -128.f));
  }
  if constexpr (QT == Q8_0) {
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b0 + 2)), load256(b1 + 2), 1);
    u = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int qs = QT == Q4_0 ? 2 : QT == Q4_1 ? 4 : QT == Q5_0 ? 6 : 8;
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(load128(b0 + qs)), load128(b1 + qs), 1);
    __m512i w = _mm512_broadcast_i64x4(both);
    w = _mm512_srlv_epi64(w, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
    u = _mm512_and_si512(w, _mm512_set1_epi8(15));
    if constexpr (QT == Q5_0 || QT == Q5_1) {
      constexpr int at = QT == Q5_0 ? 2 : 4;
      uint32_t h0, h1;
      std::memcpy(&h0, b0 + at, 4);
      std::memcpy(&h1, b1 + at, 4);
      __mmask64 high = static_cast<uint64_t>(h0 & 0xFFFF) | (static_cast<uint64_t>(h1 & 0xFFFF) << 16) |
                       (static_cast<uint64_t>(h0 >> 16) << 32) | (static_cast<uint64_t>(h1 >> 16) << 48);
      u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(high, _mm512_set1_epi8(16)));
    }
  }
}

// y rows [r0, r0 + T) at columns [n0, n1) (+)= the products over block pairs [p0, p1): each decoded
// weight pair serves T activation rows.
template <int QT, int T>
void tile(const uint8_t* raw, int64_t row_stride, const Acts& a, int64_t r0, int64_t p0, int64_t p1, float* y,
          int64_t n_out, int64_t n0, int64_t n1) {
  constexpr int block_bytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;
  constexpr bool nibbles = QT != Q8_0;
  // Which of (d0, d1, s0, s1) each lane takes: the lane's block's scale, then its sum.
  const __m512i pick_d = nibbles ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i pick_s = _mm512_add_epi32(pick_d, _mm512_set1_epi32(2));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = raw + n * row_stride;
    __m512 acc[T], off[T];  // two chains per row: the scaled dot products and the offset terms
    for (int t = 0; t < T; ++t) acc[t] = off[t] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* b0 = row + 2 * p * block_bytes;
      const uint8_t* b1 = 2 * p + 1 < a.blocks ? b0 + block_bytes : b0;  // an odd last block pairs with itself
      _mm_prefetch(reinterpret_cast<const char*>(b0 + 8 * block_bytes), _MM_HINT_T0);
      __m512i u;
      __m512 d, m;
      decode_pair<QT>(b0, b1, u, d, m);
      const int8_t* q = a.codes(p, r0);
      const float* ds = a.scales(p, r0);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(q + t * PAIR));
        __m512 both = _mm512_castps128_ps512(_mm_loadu_ps(ds + 4 * t));
        __m512 scale = _mm512_mul_ps(d, _mm512_permutexvar_ps(pick_d, both));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
        off[t] = _mm512_fmadd_ps(m, _mm512_permutexvar_ps(pick_s, both), off[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float& out = y[(r0 + t) * n_out + n];
      out = (p0 == 0 ? 0.f : out) + _mm512_reduce_add_ps(_mm512_add_ps(acc[t], off[t]));
    }
  }
}

template <int QT, int T = MAX_TILE>
void tile_any(int rows, const uint8_t* raw, int64_t row_stride, const Acts& a, int64_t r0, int64_t p0, int64_t p1,
              float* y, int64_t n_out, int64_t n0, int64_t n1) {
  if constexpr (T > 1) {
    if (rows < T) return tile_any<QT, T - 1>(rows, raw, row_stride, a, r0, p0, p1, y, n_out, n0, n1);
  }
  tile<QT, T>(raw, row_stride, a, r0, p0, p1, y, n_out, n0, n1);
}

template <int QT>
void rows_vnni(const uint8_t* raw, int64_t row_stride, const Acts& a, float* y, int64_t n_out, int64_t n0,
               int64_t n1, int64_t tile_rows) {
  // Weight rows go in chunks that stay in L2 while every tile of activation rows passes over them; a
  // tile's activations go in spans of block pairs that stay in L1.
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_stride));
  const int64_t span = std::max<int64_t>(1, (24 << 10) / (tile_rows * (PAIR + 16)));
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t r0 = 0; r0 < a.rows; r0 += tile_rows) {
      int rows = static_cast<int>(std::min(tile_rows, a.rows - r0));
      for (int64_t p0 = 0; p0 < a.pairs; p0 += span) {
        tile_any<QT>(rows, raw, row_stride, a, r0, p0, std::min(a.pairs, p0 + span), y, n_out, c0, c1);
      }
    }
  }
}

// One weight block as 32 unsigned codes in value order, in 256 bits (bias added for q8_0 by the sign flip).
template <int QT>
inline __m256i decode_256(const uint8_t* blk) {
  if constexpr (QT == Q8_0) {
    return _mm256_xor_si256(load256(blk + 2), _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int qs = QT == Q4_0 ? 2 : QT == Q4_1 ? 4 : QT == Q5_0 ? 6 : 8;
    // the 16 bytes in both halves (a load alone), the upper half shifted to its high nibbles
    const __m256i both = _mm256_broadcastsi128_si256(load128(blk + qs));
    __m256i u = _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
    if constexpr (QT == Q5_0 || QT == Q5_1) {
      uint32_t high;  // bit i is value i's fifth bit
      std::memcpy(&high, blk + (QT == Q5_0 ? 2 : 4), 4);
      u = _mm256_or_si256(u, _mm256_maskz_mov_epi8(high, _mm256_set1_epi8(16)));
    }
    return u;
  }
}

// The f16 at p in all 8 lanes, converted in the vector unit (no scalar round trip).
inline __m256 half_splat_256(const uint8_t* p) {
  int16_t h;
  std::memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(h));
}

// Decode (T = a.rows activation rows, few): y rows at columns [n0, n1) = the products, one weight block at
// a time in 256 bits; the scale d_w * d_a is a product of broadcasts, so no lane shuffles.
//
// Each weight byte is read once, so speed is the hardware prefetcher's: it serves a few sequential streams
// (one per 4 KB page region), not rows interleaved within a page. Narrow inputs read the thread's rows as one
// stream (two blocks in flight per row). Wide ones (activation records over SHARED_ACTS bytes, e.g. a 13696-wide
// down projection, where reloading them for every row costs more than the weights) take R = 4 rows far apart,
// one from each quarter of the range, so that every activation record loaded serves four rows.
template <int QT, int T, int R>
void rows_decode_r(const uint8_t* raw, int64_t row_stride, const BlockActs& a, float* y, int64_t n_out, int64_t n0,
                   int64_t n1) {
  constexpr int block_bytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;
  constexpr bool offset = QT == Q4_1 || QT == Q5_1;
  constexpr int J = R == 1 ? 2 : 1;  // independent chains per row and activation row
  const int64_t L = (n1 - n0) / R;  // the range in R runs of L rows, one row of each at a time
  for (int64_t i = 0; i < L; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* row = raw + n * row_stride;
    __m256 acc[R][T][J];
    float off[R][T] = {};
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < J; ++j) acc[r][t][j] = _mm256_setzero_ps();
    auto step = [&](int64_t b, int j) {
      __m256i u[R];
      __m256 d[R];
      float m[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = row + r * L * row_stride + b * block_bytes;
        u[r] = decode_256<QT>(blk);
        d[r] = half_splat_256(blk);
        m[r] = offset ? _mm256_cvtss_f32(half_splat_256(blk + 2)) : 0.f;
      }
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const ActBlock& x = a.at[b * T + t];
        const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
        const __m256i start = _mm256_set1_epi32(x.init);
        const __m256 da = _mm256_set1_ps(x.d);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i dot = _mm256_dpbusd_epi32(start, u[r], qa);
          acc[r][t][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d[r], da), acc[r][t][j]);
          if constexpr (offset) off[r][t] += m[r] * a.sums[b * T + t];
        }
      }
    };
    int64_t b = 0;
    for (; b + J <= a.blocks; b += J)
      for (int j = 0; j < J; ++j) step(b + j, j);
    for (; b < a.blocks; ++b) step(b, 0);
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        __m256 s8 = acc[r][t][0];
        for (int j = 1; j < J; ++j) s8 = _mm256_add_ps(s8, acc[r][t][j]);
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        y[t * n_out + n + r * L] = _mm_cvtss_f32(s4) + off[r][t];
      }
    }
  }
  if constexpr (R > 1) {
    if (n0 + R * L < n1) rows_decode_r<QT, T, 1>(raw, row_stride, a, y, n_out, n0 + R * L, n1);
  }
}

template <int QT, int T>
void rows_decode(const uint8_t* raw, int64_t row_stride, const BlockActs& a, float* y, int64_t n_out, int64_t n0,
                 int64_t n1) {
  if (a.blocks * T * static_cast<int64_t>(sizeof(ActBlock)) > SHARED_ACTS) {
    return rows_decode_r<QT, T, 4>(raw, row_stride, a, y, n_out, n0, n1);
  }
  rows_decode_r<QT, T, 1>(raw, row_stride, a, y, n_out, n0, n1);
}

template <int QT, int T = DECODE_ROWS>
void decode_any(int64_t rows, const uint8_t* raw, int64_t row_stride, const BlockActs& a, float* y, int64_t n_out,
                int64_t n0, int64_t n1) {
  if constexpr (T > 1) {
    if (rows < T) return decode_any<QT, T - 1>(rows, raw, row_stride, a, y, n_out, n0, n1);
  }
  rows_decode<QT, T>(raw, row_stride, a, y, n_out, n0, n1);
}

#endif

}  // namespace

int64_t check_parts(const std::vector<torch::Tensor>& parts, int64_t k, int64_t qtype) {
  const Format f = format_of(qtype);
  TORCH_CHECK(k % QK == 0, "in_features ", k, " is not a multiple of 32");
  int64_t n_out = 0;
  for (const torch::Tensor& raw : parts) {
    TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == torch::kUInt8 && raw.stride(1) == 1 && !raw.is_cuda(),
                "weights must be CPU uint8 [rows, bytes_per_row] with contiguous rows");
    TORCH_CHECK(raw.size(1) == k / QK * f.block_bytes, "weight rows hold ", raw.size(1), " bytes; expected ",
                k / QK * f.block_bytes, " for ", k, " inputs");
    n_out += raw.size(0);
  }
  return n_out;
}

void linear_into(const float* x, int64_t m, int64_t k, const std::vector<torch::Tensor>& parts, int64_t qtype,
                 int64_t tile_rows, float* out) {
  const Format f = format_of(qtype);
  std::vector<int64_t> first{0};  // each part's first output row
  for (const torch::Tensor& raw : parts) first.push_back(first.back() + raw.size(0));
  const int64_t n_out = first.back();
  if (m == 0 || n_out == 0) return;
  // run(w, stride, y_part, lo, hi) for each part's share of a thread's output columns
  auto each_part = [&](auto&& run) {
    at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
      for (size_t i = 0; i < parts.size(); ++i) {
        const int64_t lo = std::max(n0, first[i]) - first[i], hi = std::min(n1, first[i + 1]) - first[i];
        if (lo < hi) run(parts[i].data_ptr<uint8_t>(), parts[i].stride(0), out + first[i], lo, hi);
      }
    });
  };
#ifdef GGML_KERNELS_VNNI
  // the block type as a compile-time constant for the SIMD kernels
  auto by_type = [&](auto&& run) {
    switch (qtype) {
      case Q4_0: return run(std::integral_constant<int, Q4_0>{});
      case Q4_1: return run(std::integral_constant<int, Q4_1>{});
      case Q5_0: return run(std::integral_constant<int, Q5_0>{});
      case Q5_1: return run(std::integral_constant<int, Q5_1>{});
      case Q8_0: return run(std::integral_constant<int, Q8_0>{});
    }
  };
  if (m <= DECODE_ROWS) {
    const BlockActs a = quantize_block_acts(x, m, k, f);
    by_type([&](auto qt) {
      each_part([&](const uint8_t* w, int64_t stride, float* yp, int64_t lo, int64_t hi) {
        decode_any<decltype(qt)::value>(m, w, stride, a, yp, n_out, lo, hi);
      });
    });
    return;
  }
  const Acts a = quantize_acts(x, m, k, f);
  by_type([&](auto qt) {
    each_part([&](const uint8_t* w, int64_t stride, float* yp, int64_t lo, int64_t hi) {
      rows_vnni<decltype(qt)::value>(w, stride, a, yp, n_out, lo, hi, tile_rows);
    });
  });
#else
  (void)tile_rows;
  const Acts a = quantize_acts(x, m, k, f);
  each_part([&](const uint8_t* w, int64_t stride, float* yp, int64_t lo, int64_t hi) {
    rows_scalar(w, stride, qtype, f, a, yp, n_out, lo, hi);
  });
#endif
}

// y [M, N] float32 = x [M, K] @ W.T, W being N rows of ggml blocks held in `parts` (uint8 [rows, K/32
// blocks], stacked along rows: a fused q/k/v read where each piece lies).
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& parts, int64_t qtype,
                     int64_t tile_rows) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, in_features]");
  TORCH_CHECK(tile_rows >= 1 && tile_rows <= MAX_TILE, "tile_rows must be in 1..", MAX_TILE);
  const int64_t n_out = check_parts(parts, x.size(1), qtype);
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  torch::Tensor y = torch::empty({x.size(0), n_out}, xf.options());
  linear_into(xf.data_ptr<float>(), x.size(0), x.size(1), parts, qtype, tile_rows, y.data_ptr<float>());
  return y;
}

// The portable path, callable on any build so tests can check the SIMD one against it.
torch::Tensor linear_reference(const torch::Tensor& x, const torch::Tensor& raw, int64_t qtype, int64_t out_features) {
  const Format f = format_of(qtype);
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(xf.dim() == 2 && xf.size(1) % QK == 0 && raw.dim() == 2 && raw.stride(1) == 1 &&
              raw.size(0) == out_features && raw.size(1) == xf.size(1) / QK * f.block_bytes, "bad shapes");
  torch::Tensor y = torch::empty({xf.size(0), out_features}, xf.options());
  const Acts a = quantize_acts(xf.data_ptr<float>(), xf.size(0), xf.size(1), f);
  rows_scalar(raw.data_ptr<uint8_t>(), raw.stride(0), qtype, f, a, y.data_ptr<float>(), out_features, 0, out_features);
  return y;
}

bool simd() {
#ifdef GGML_KERNELS_VNNI
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ggml block matmuls read in place (see ggml_kernels.cpp)";
  m.def("linear", &linear, "y = x @ W.T for ggml-block W", py::arg("x"), py::arg("parts"), py::arg("qtype"),
        py::arg("tile_rows") = 4);
  m.def("linear_reference", &linear_reference, "the portable path of linear");
  m.def("simd", &simd, "whether the AVX-512 VNNI path was compiled in");
  register_decode_step(m);
}
