// Matrix products with ggml's legacy 32-value blocks (q4_0 q4_1 q5_0 q5_1 q8_0) read in place.
//
// The scheme is ggml's: each call quantizes the activation rows to 8-bit blocks of 32 (one f16-rounded
// scale per block, plus the block's integer sum), then every weight block meets an activation block in
// an integer dot product, scaled by both blocks' scales in float32.
//
// Integer dot products use vpdpbusd (unsigned bytes x signed bytes). Weights are turned into unsigned
// codes u = w + bias (bias 8 for q4_0, 16 for q5_0, 128 for q8_0, 0 for q4_1/q5_1 whose codes are
// already unsigned); the -bias * sum(a) term is per activation only, so it is precomputed once per call
// (the integer dot product starts from it, so it stays exact).
// q4_1/q5_1 add their offset m times the activation block's sum (ggml's q8_1 "s") in float.
//
// Prompts: the 32-bit lanes of a register are 16 activation rows (a tile) and the weights come to them:
// a weight block is decoded once to 32 unsigned codes, and each group of 4 codes is broadcast into one
// vpdpbusd per tile, so a block's integer dot product with 16 rows takes 8 of them and is scaled once, and
// each decoded block serves a panel of up to 4 tiles (64 rows). The activations are stored as those
// registers, 4 values of 16 rows apiece.
//
// Decode (a few activation rows): four blocks per 512-bit register, their codes gathered by one byte permute
// and the activations stored in the same order, so four blocks cost about what one did in a 256-bit register
// (see "Decode" below).
#include "ggml_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__)
#define GGML_KERNELS_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;        // values per block
constexpr int TILE = 16;      // activation rows per prompt tile: a 512-bit register's int32 lanes
constexpr int MAX_TILE = 64;  // activation rows that share one decoded weight block in a prompt (a panel)
constexpr int SUB = 8;        // blocks a prompt decodes per weight row at a time
constexpr int64_t SPAN_BYTES = 256 << 10;   // prompt activations per span of blocks: they stay in L2 (1 MB)
constexpr int64_t CHUNK_BYTES = 512 << 10;  // prompt weight rows per chunk: they stay in L2 for every panel
constexpr int PREFETCH = 512;  // how far ahead of its reads a prompt fetches each weight row, in bytes
constexpr int DECODE_ROWS = 4;  // calls with at most this many activation rows take the per-block path
constexpr int DECODE_PREFETCH = 1024;  // bytes ahead of each weight row a decode call asks for (512: 3-10% slower, 1536: slower)
constexpr int64_t SHARED_ACTS = 20 << 10;  // decode activations past this many bytes serve four weight rows per load

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };  // gguf's numbering

struct Format {
  int block_bytes;  // bytes per block
  int bias;         // what is added to a code to make it unsigned (0: already unsigned, with an offset m)
};

Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {18, 8};
    case Q4_1: return {20, 0};
    case Q5_0: return {22, 16};
    case Q5_1: return {24, 0};
    case Q8_0: return {34, 128};
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

#ifdef GGML_KERNELS_VNNI
// quantize_block's codes in 256 bits.
inline __m256i quantize_block_512(const float* v, int& sum, float& d) {
  const __m512 x0 = _mm512_loadu_ps(v), x1 = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const float exact = amax / 127.f, id = exact != 0.f ? 1.f / exact : 0.f;
  auto round = [](__m512 y) {  // ties away from zero, as std::round: y - trunc(y) is exact
    const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 away = _mm512_or_ps(_mm512_and_ps(y, _mm512_set1_ps(-0.f)), _mm512_set1_ps(1.f));  // +-1
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, away));
  };
  const __m512i c0 = round(_mm512_mul_ps(x0, _mm512_set1_ps(id))), c1 = round(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
  d = round_to_half(exact);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(c0)), _mm512_cvtepi32_epi8(c1), 1);
}

#endif

}  // namespace

int quantize_block(const float* v, int8_t* c, float& d) {
#ifdef GGML_KERNELS_VNNI
  int sum;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), quantize_block_512(v, sum, d));
  return sum;
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

namespace {

// Activation rows quantized to 8-bit blocks in value order: the portable path's input.
struct Acts {
  int64_t rows, blocks;
  torch::Tensor q;   // int8 [rows, blocks, 32]
  torch::Tensor ds;  // float [rows, blocks, 2]: the f16-rounded scale d, then d * sum(q)
};

Acts quantize_acts(const float* x, int64_t rows, int64_t k) {
  Acts a{rows, k / QK, torch::empty({rows, k / QK, QK}, torch::kInt8), torch::empty({rows, k / QK, 2}, torch::kFloat32)};
  int8_t* q = a.q.data_ptr<int8_t>();
  float* ds = a.ds.data_ptr<float>();
  at::parallel_for(0, rows * a.blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int sum = quantize_block(x + i * QK, q + i * QK, ds[2 * i]);
      ds[2 * i + 1] = ds[2 * i] * static_cast<float>(sum);
    }
  });
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
  const int8_t* codes = a.q.data_ptr<int8_t>();
  const float* scales = a.ds.data_ptr<float>();
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < a.blocks; ++b) {
      float d, m;
      decode_block(raw + n * row_stride + b * f.block_bytes, qtype, u, d, m);
      for (int64_t r = 0; r < a.rows; ++r) {
        const int8_t* q = codes + (r * a.blocks + b) * QK;
        const float* ds = scales + (r * a.blocks + b) * 2;
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) dot += (static_cast<int32_t>(u[i]) - f.bias) * q[i];
        acc[r] += d * ds[0] * static_cast<float>(dot) + m * ds[1];
      }
    }
    for (int64_t r = 0; r < a.rows; ++r) y[r * n_out + n] = acc[r];
  }
}

#ifdef GGML_KERNELS_VNNI

inline __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline float half_to_float_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
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

// ---- Decode: a few activation rows meet each weight row, four blocks per 512-bit register ----
//
// A group is 4 consecutive blocks of a row (128 values). Its weight bytes come in as two or four 64-byte loads and
// one two-table byte permute (vpermt2b) gathers the codes: for the 4-bit types the 16 packed bytes of each block
// side by side, whose low nibbles are the blocks' values 0-15 and high nibbles values 16-31; for q8_0 two permutes,
// values 0-15 and 16-31. The activations are stored in that same order, so a group's integer dot products are two
// vpdpbusd with no other shuffle, each block's sum in 4 lanes; a word permute gathers the 4 f16 scales as
// [d0 x4, d1 x4, ...] for one convert, one multiply by the activation scales and one fused accumulate.
// About 11 vector ops per 4 blocks and weight row, against 11 per block one block to a 256-bit register.

constexpr int GROUP = 4;  // blocks per decode group

// One activation row at one group, in the weight codes' order.
struct alignas(64) ActGroup {
  int8_t q[2][64];  // q[h][16 * j + i]: value 16 * h + i of the group's block j
  float d[16];      // the f16-rounded scale of the block each lane sums
  union {
    int32_t init[16];  // -bias * sum(q) / 4 per lane: the unsigned weight codes' dot product starts here, exact
    float dsum[16];    // d * sum(q) / 4 per lane, which q4_1/q5_1's offset m multiplies
  };
};
static_assert(sizeof(ActGroup) == 256, "activation groups are packed");

// The decode activations: ActGroup [groups][rows], the rows at one group adjacent (one stream beside the
// weights'); blocks past the last are zero (no codes, scale 0) and add nothing.
struct GroupActs {
  int64_t rows, blocks, groups;
  torch::Tensor records;
  const ActGroup* at = nullptr;
};

GroupActs quantize_group_acts(const float* x, int64_t rows, int64_t k, const Format& f) {
  GroupActs a{rows, k / QK, (k / QK + GROUP - 1) / GROUP};
  a.records = torch::zeros({a.groups * rows * static_cast<int64_t>(sizeof(ActGroup))}, torch::kUInt8);
  ActGroup* rec = reinterpret_cast<ActGroup*>(a.records.data_ptr<uint8_t>());
  a.at = rec;
  alignas(32) int8_t c[QK];
  for (int64_t b = 0; b < a.blocks; ++b) {
    const int j = static_cast<int>(b % GROUP);
    for (int64_t r = 0; r < rows; ++r) {
      ActGroup& o = rec[b / GROUP * rows + r];
      float d;
      const int sum = quantize_block(x + r * k + b * QK, c, d);
      std::memcpy(o.q[0] + 16 * j, c, 16);
      std::memcpy(o.q[1] + 16 * j, c + 16, 16);
      for (int l = 4 * j; l < 4 * j + 4; ++l) {
        o.d[l] = d;
        if (f.bias == 0) o.dsum[l] = d * static_cast<float>(sum) / 4.f;
        else o.init[l] = -f.bias * sum / 4;
      }
    }
  }
  return a;
}

template <int QT>
constexpr int block_bytes_of() {
  return QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;
}

// Byte offsets, within the 128 bytes a permute reads, of what each output byte takes: `first` is where block 0's
// wanted 16 bytes start (h: values 0-15 or 16-31 for q8_0, whose 16-31 come from a table 8 bytes on).
template <int QT>
struct GroupIndex {
  alignas(64) uint8_t codes[2][64];
  alignas(64) uint16_t d[32], m[32];  // word permutes: the scale (and offset) of lane i's block, in the low 16 words
  constexpr GroupIndex() : codes{}, d{}, m{} {
    constexpr int S = block_bytes_of<QT>();
    constexpr int qs = QT == Q4_0 ? 2 : QT == Q4_1 ? 4 : QT == Q5_0 ? 6 : QT == Q5_1 ? 8 : 2;
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 64; ++i) codes[h][i] = static_cast<uint8_t>(S * (i / 16) + qs + i % 16 + (h ? 16 - 8 : 0));
    for (int i = 0; i < 16; ++i) {
      d[i] = static_cast<uint16_t>(S / 2 * (i / 4));
      m[i] = static_cast<uint16_t>(S / 2 * (i / 4) + 1);
    }
  }
};

// 64 bytes at p whose bytes [from, valid) (counted from the group's start, p = group + from) are wanted; the rest
// are zero and not read, so a row's last group reads nothing past the row.
template <bool Tail>
inline __m512i load_window(const uint8_t* p, int from, int valid) {
  if constexpr (!Tail) {
    return _mm512_loadu_si512(p);
  } else {
    const int n = std::clamp(valid - from, 0, 64);
    return _mm512_maskz_loadu_epi8(n == 64 ? ~0ULL : (1ULL << n) - 1, p);
  }
}

// One weight row's group as unsigned codes (lo: values 0-15 of each block, hi: 16-31), its scales per lane and
// (q4_1/q5_1) offsets per lane.
template <int QT, bool Tail>
inline void decode_group(const uint8_t* g, int valid, __m512i& lo, __m512i& hi, __m512& d, __m512& m) {
  static constexpr GroupIndex<QT> ix{};
  const __m512i w0 = load_window<Tail>(g, 0, valid), w1 = load_window<Tail>(g + 64, 64, valid);
  const __m512i scales = _mm512_permutex2var_epi16(w0, _mm512_load_si512(ix.d), w1);
  d = _mm512_cvtph_ps(_mm512_castsi512_si256(scales));
  if constexpr (QT == Q4_1 || QT == Q5_1) {
    m = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(w0, _mm512_load_si512(ix.m), w1)));
  }
  if constexpr (QT == Q8_0) {
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512i v0 = load_window<Tail>(g + 8, 8, valid), v1 = load_window<Tail>(g + 72, 72, valid);
    lo = _mm512_xor_si512(_mm512_permutex2var_epi8(w0, _mm512_load_si512(ix.codes[0]), w1), sign);
    hi = _mm512_xor_si512(_mm512_permutex2var_epi8(v0, _mm512_load_si512(ix.codes[1]), v1), sign);
  } else {
    const __m512i packed = _mm512_permutex2var_epi8(w0, _mm512_load_si512(ix.codes[0]), w1);
    const __m512i nibble = _mm512_set1_epi8(15);
    lo = _mm512_and_si512(packed, nibble);
    hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
    if constexpr (QT == Q5_0 || QT == Q5_1) {
      // each block's 32 fifth bits (bit i: value i's): the low 16 of the 4 blocks side by side mask lo, the high hi
      constexpr int qh = QT == Q5_0 ? 2 : 4, S = block_bytes_of<QT>();
      alignas(64) static constexpr uint8_t bits[64] = {
          qh, qh + 1, S + qh, S + qh + 1, 2 * S + qh, 2 * S + qh + 1, 3 * S + qh, 3 * S + qh + 1,
          qh + 2, qh + 3, S + qh + 2, S + qh + 3, 2 * S + qh + 2, 2 * S + qh + 3, 3 * S + qh + 2, 3 * S + qh + 3};
      const __m128i h = _mm512_castsi512_si128(_mm512_permutex2var_epi8(w0, _mm512_load_si512(bits), w1));
      const __m512i five = _mm512_set1_epi8(16);
      lo = _mm512_mask_add_epi8(lo, static_cast<__mmask64>(_mm_cvtsi128_si64(h)), lo, five);
      hi = _mm512_mask_add_epi8(hi, static_cast<__mmask64>(_mm_extract_epi64(h, 1)), hi, five);
    }
  }
}

// Decode (T = a.rows activation rows, few): y rows at columns [n0, n1) = the products, a group of 4 blocks at a
// time. Each weight byte is read once, so speed is the memory's as long as these few ops per block keep up: the
// hardware prefetcher serves a few sequential streams (one per 4 KB page region), not rows interleaved within a
// page, so a thread reads R rows far apart, one from each R-th of its range, each a stream of its own, with a
// software prefetch DECODE_PREFETCH bytes ahead; every activation group loaded serves the R rows. R = 2 (narrow
// inputs) or 4 (activations over SHARED_ACTS bytes, e.g. a 13696-wide down projection, where reloading costs more).
template <int QT, int T, int R>
void rows_decode_r(const uint8_t* raw, int64_t row_stride, const GroupActs& a, float* y, int64_t n_out, int64_t n0,
                   int64_t n1) {
  constexpr int S = block_bytes_of<QT>(), G = GROUP * S;
  constexpr bool offset = QT == Q4_1 || QT == Q5_1;
  constexpr int64_t window_end = QT == Q8_0 ? 136 : 128;  // how far past a group's start its loads read
  const int64_t L = (n1 - n0) / R;  // the range in R runs of L rows, one row of each at a time
  const int64_t row_bytes = a.blocks * S;
  // groups read whole; the last one or two read masked, nothing past the row
  const int64_t full = row_bytes < window_end ? 0 : std::min(a.groups, (row_bytes - window_end) / G + 1);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* row = raw + n * row_stride;
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    auto step = [&](int64_t g, auto tail) {
      constexpr bool Tail = decltype(tail)::value;
      __m512i lo[R], hi[R];
      __m512 d[R], m[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = row + r * L * row_stride + g * G;
        if constexpr (!Tail) {
          for (int line = 0; line < G; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(p + DECODE_PREFETCH + line), _MM_HINT_T0);
        }
        decode_group<QT, Tail>(p, static_cast<int>(std::min<int64_t>(row_bytes - g * G, G + 64)), lo[r], hi[r], d[r], m[r]);
      }
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const ActGroup& x = a.at[g * T + t];
        const __m512i q0 = _mm512_load_si512(x.q[0]), q1 = _mm512_load_si512(x.q[1]);
        const __m512 da = _mm512_load_ps(x.d);
        const __m512i start = offset ? _mm512_setzero_si512() : _mm512_load_si512(x.init);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo[r], q0), hi[r], q1);
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d[r], da), acc[r][t]);
          if constexpr (offset) acc[r][t] = _mm512_fmadd_ps(m[r], _mm512_load_ps(x.dsum), acc[r][t]);
        }
      }
    };
    for (int64_t g = 0; g < full; ++g) step(g, std::false_type{});
    for (int64_t g = full; g < a.groups; ++g) step(g, std::true_type{});
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) y[t * n_out + n + r * L] = _mm512_reduce_add_ps(acc[r][t]);
  }
  if constexpr (R > 1) {
    if (n0 + R * L < n1) rows_decode_r<QT, T, 1>(raw, row_stride, a, y, n_out, n0 + R * L, n1);
  }
}

template <int QT, int T>
void rows_decode(const uint8_t* raw, int64_t row_stride, const GroupActs& a, float* y, int64_t n_out, int64_t n0,
                 int64_t n1) {
  if (a.groups * T * static_cast<int64_t>(sizeof(ActGroup)) > SHARED_ACTS) {
    return rows_decode_r<QT, T, 4>(raw, row_stride, a, y, n_out, n0, n1);
  }
  rows_decode_r<QT, T, 2>(raw, row_stride, a, y, n_out, n0, n1);
}

template <int QT, int T = DECODE_ROWS>
void decode_any(int64_t rows, const uint8_t* raw, int64_t row_stride, const GroupActs& a, float* y, int64_t n_out,
                int64_t n0, int64_t n1) {
  if constexpr (T > 1) {
    if (rows < T) return decode_any<QT, T - 1>(rows, raw, row_stride, a, y, n_out, n0, n1);
  }
  rows_decode<QT, T>(raw, row_stride, a, y, n_out, n0, n1);
}

// ---- Prompts: a 16-lane tile of activation rows meets each weight row's blocks ----

// Sixteen activation rows at one block, laid out so that each group of 4 values (what one vpdpbusd lane
// sums) of all 16 rows is one 512-bit register: a weight row's group, broadcast, meets 16 rows at once.
struct alignas(64) ActTile {
  int8_t q[8][TILE][4];  // q[j][l]: values 4j..4j+3 of row l
  float d[TILE];         // f16-rounded scales
  union {
    int32_t init[TILE];  // -bias * sum(q): the integer dot product starts here and comes out exact
    float dsum[TILE];    // d * sum(q), which q4_1/q5_1's offset m multiplies
  };
};
static_assert(sizeof(ActTile) == 640, "activation tiles are packed");

// The prompt's activation tiles, grouped in panels of up to MAX_TILE / TILE tiles that share each decoded
// weight block; within a panel the tiles at one block are adjacent, so a span of blocks is one range.
struct TileActs {
  int64_t rows, blocks, tiles, panel;  // panel: tiles per panel
  torch::Tensor records;               // ActTile [panels][blocks][tiles in the panel]
  const ActTile* at = nullptr;

  const ActTile* panel_at(int64_t p) const { return at + p * panel * blocks; }
  int tiles_in(int64_t p) const { return static_cast<int>(std::min(panel, tiles - p * panel)); }
};

TileActs quantize_tile_acts(const float* x, int64_t rows, int64_t k, const Format& f, int64_t panel) {
  TileActs a{rows, k / QK, (rows + TILE - 1) / TILE, panel};
  a.records = torch::empty({a.tiles * a.blocks * static_cast<int64_t>(sizeof(ActTile))}, torch::kUInt8);
  ActTile* rec = reinterpret_cast<ActTile*>(a.records.data_ptr<uint8_t>());
  a.at = rec;
  at::parallel_for(0, a.tiles, 1, [&](int64_t t0, int64_t t1) {  // by tile: no record is shared by two threads
    alignas(32) int32_t groups[8];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / panel, n = a.tiles_in(p), lanes = std::min<int64_t>(TILE, rows - t * TILE);
      for (int64_t b = 0; b < a.blocks; ++b) {
        ActTile& o = rec[p * panel * a.blocks + b * n + t % panel];
        for (int64_t l = 0; l < lanes; ++l) {  // the 16 rows of a record in turn, while it is in L1
          int sum;
          const float* v = x + (t * TILE + l) * k + b * QK;
          _mm256_store_si256(reinterpret_cast<__m256i*>(groups), quantize_block_512(v, sum, o.d[l]));
          for (int j = 0; j < 8; ++j) std::memcpy(o.q[j][l], &groups[j], 4);
          if (f.bias == 0) o.dsum[l] = o.d[l] * static_cast<float>(sum);
          else o.init[l] = -f.bias * sum;
        }
        for (int64_t l = lanes; l < TILE; ++l) {  // the last tile's lanes past the last row: 0, adding nothing
          for (int j = 0; j < 8; ++j) std::memset(o.q[j][l], 0, 4);
          o.d[l] = 0.f;
          o.init[l] = 0;
        }
      }
    }
  });
  return a;
}

// part[w][t] (16 lanes: a tile's rows) (+)= weight rows row + w * row_stride times the TA tiles at a, over
// nb blocks. Blocks are decoded SUB at a time into unsigned codes on the stack; then for each block every
// group of 4 weight codes is broadcast into the W x TA integer dot products, which are scaled once per block.
// Each broadcast serves TA tiles and each activation register W rows, so loads stay below one per vpdpbusd.
template <int QT, int W, int TA>
void span_rows(const uint8_t* row, int64_t row_stride, const ActTile* a, int64_t nb, float* part, bool first) {
  constexpr int block_bytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;
  constexpr bool offset = QT == Q4_1 || QT == Q5_1;
  alignas(32) uint8_t u[W][SUB][QK];
  float dw[W][SUB], mw[W][SUB];
  __m512 acc[W][TA];
  for (int w = 0; w < W; ++w)
    for (int t = 0; t < TA; ++t) acc[w][t] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (w * TA + t) * TILE);
  for (int64_t s0 = 0; s0 < nb; s0 += SUB) {
    const int ns = static_cast<int>(std::min<int64_t>(SUB, nb - s0));
    for (int w = 0; w < W; ++w) {
      const uint8_t* blocks = row + w * row_stride + s0 * block_bytes;
      // W rows read side by side share pages, which the hardware prefetcher serves badly: fetch ahead
      for (int line = 0; line < SUB * block_bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blocks + PREFETCH + line), _MM_HINT_T0);
      for (int s = 0; s < ns; ++s) {
        const uint8_t* blk = blocks + s * block_bytes;
        _mm256_store_si256(reinterpret_cast<__m256i*>(u[w][s]), decode_256<QT>(blk));
        dw[w][s] = half_to_float_f16c(blk);
        if constexpr (offset) mw[w][s] = half_to_float_f16c(blk + 2);
      }
    }
    for (int s = 0; s < ns; ++s) {
      const ActTile* at = a + (s0 + s) * TA;
      __m512i dot[W][TA];
      for (int w = 0; w < W; ++w)
        for (int t = 0; t < TA; ++t) dot[w][t] = offset ? _mm512_setzero_si512() : _mm512_load_si512(at[t].init);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m512i q[TA];
        for (int t = 0; t < TA; ++t) {
          q[t] = _mm512_load_si512(at[t].q[j]);
          asm("" : "+v"(q[t]));  // in a register, loaded once for the W rows (not a memory operand of each)
        }
        for (int w = 0; w < W; ++w) {
          int32_t group;
          std::memcpy(&group, u[w][s] + 4 * j, 4);
          const __m512i g = _mm512_set1_epi32(group);
          for (int t = 0; t < TA; ++t) dot[w][t] = _mm512_dpbusd_epi32(dot[w][t], g, q[t]);
        }
      }
      for (int t = 0; t < TA; ++t) {
        const __m512 da = _mm512_load_ps(at[t].d);
        for (int w = 0; w < W; ++w)
          acc[w][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[w][t]), _mm512_mul_ps(da, _mm512_set1_ps(dw[w][s])), acc[w][t]);
        if constexpr (offset) {
          const __m512 ds = _mm512_load_ps(at[t].dsum);
          for (int w = 0; w < W; ++w) acc[w][t] = _mm512_fmadd_ps(_mm512_set1_ps(mw[w][s]), ds, acc[w][t]);
        }
      }
    }
  }
  for (int w = 0; w < W; ++w)
    for (int t = 0; t < TA; ++t) _mm512_storeu_ps(part + (w * TA + t) * TILE, acc[w][t]);
}

// part = weight rows [c0, c1) times a panel of TA tiles, in spans of blocks whose activations stay in L2.
// W, the weight rows per pass (measured best), keeps W x TA dot products, as many accumulators and TA
// activations in registers (for TA = 4 a few accumulators spill, which still beats W = 2).
template <int QT, int TA>
void panel_rows(const uint8_t* raw, int64_t row_stride, const ActTile* a, int64_t blocks, float* part, int64_t c0,
                int64_t c1) {
  constexpr int W = TA <= 2 ? 4 : 3;
  constexpr int block_bytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;
  const int64_t span = std::max<int64_t>(SUB, SPAN_BYTES / (TA * static_cast<int64_t>(sizeof(ActTile))));
  for (int64_t b0 = 0; b0 < blocks; b0 += span) {
    const int64_t nb = std::min(span, blocks - b0);
    const uint8_t* w = raw + b0 * block_bytes;
    int64_t n = c0;
    for (; n + W <= c1; n += W)
      span_rows<QT, W, TA>(w + n * row_stride, row_stride, a + b0 * TA, nb, part + (n - c0) * TA * TILE, b0 == 0);
    for (; n < c1; ++n)
      span_rows<QT, 1, TA>(w + n * row_stride, row_stride, a + b0 * TA, nb, part + (n - c0) * TA * TILE, b0 == 0);
  }
}

// Weight rows of `row_bytes` that stay in L2 while every panel of a prompt's activation rows passes over them: a
// multiple of 12 rows, which every W divides.
int64_t prompt_chunk_rows(int64_t row_bytes) {
  return std::max<int64_t>(12, CHUNK_BYTES / std::max<int64_t>(1, row_bytes) / 12 * 12);
}

// y rows at columns [n0, n1) = the products: weight rows in chunks that stay in L2 while each panel of
// activation rows passes over them.
template <int QT>
void rows_prompt(const uint8_t* raw, int64_t row_stride, const TileActs& a, float* y, int64_t n_out, int64_t n0,
                 int64_t n1) {
  const int64_t chunk = prompt_chunk_rows(row_stride);
  std::vector<float> part(chunk * a.panel * TILE);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t p = 0; p * a.panel < a.tiles; ++p) {
      const int ta = a.tiles_in(p);
      const ActTile* ap = a.panel_at(p);
      switch (ta) {
        case 1: panel_rows<QT, 1>(raw, row_stride, ap, a.blocks, part.data(), c0, c1); break;
        case 2: panel_rows<QT, 2>(raw, row_stride, ap, a.blocks, part.data(), c0, c1); break;
        case 3: panel_rows<QT, 3>(raw, row_stride, ap, a.blocks, part.data(), c0, c1); break;
        default: panel_rows<QT, 4>(raw, row_stride, ap, a.blocks, part.data(), c0, c1); break;
      }
      const int64_t r0 = p * a.panel * TILE, r1 = std::min(a.rows, r0 + ta * TILE);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n = c0; n < c1; ++n) y[r * n_out + n] = part[(n - c0) * ta * TILE + (r - r0)];
    }
  }
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
  // run(w, stride, y_part, lo, hi) for each part's share of the output columns [n0, n1)
  auto parts_in = [&](int64_t n0, int64_t n1, auto&& run) {
    for (size_t i = 0; i < parts.size(); ++i) {
      const int64_t lo = std::max(n0, first[i]) - first[i], hi = std::min(n1, first[i + 1]) - first[i];
      if (lo < hi) run(parts[i].data_ptr<uint8_t>(), parts[i].stride(0), out + first[i], lo, hi);
    }
  };
  auto each_part = [&](auto&& run) {  // an even split of the columns over the threads
    at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) { parts_in(n0, n1, run); });
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
    const GroupActs a = quantize_group_acts(x, m, k, f);
    by_type([&](auto qt) {
      each_part([&](const uint8_t* w, int64_t stride, float* yp, int64_t lo, int64_t hi) {
        decode_any<decltype(qt)::value>(m, w, stride, a, yp, n_out, lo, hi);
      });
    });
    return;
  }
  const TileActs a = quantize_tile_acts(x, m, k, f, (tile_rows + TILE - 1) / TILE);
  // Prompts' threads claim chunks of weight rows (decode keeps the even split: claiming cost it 10-25%). A chunk is
  // at most the rows rows_prompt keeps in L2, and small enough that each thread has 4 to take: n_out / (4 threads)
  // rounded up to a multiple of 12.
  const int64_t fewest = 4 * at::get_num_threads(), in_l2 = prompt_chunk_rows(k / QK * f.block_bytes);
  const int64_t chunk = std::min(in_l2, (n_out + 12 * fewest - 1) / (12 * fewest) * 12);
  const int64_t chunks = (n_out + chunk - 1) / chunk;
  by_type([&](auto qt) {
    claimed(chunks, [&](auto take) {
      for (int64_t c; (c = take()) < chunks;)
        parts_in(c * chunk, std::min(n_out, (c + 1) * chunk),
                 [&](const uint8_t* w, int64_t stride, float* yp, int64_t lo, int64_t hi) {
                   rows_prompt<decltype(qt)::value>(w, stride, a, yp, n_out, lo, hi);
                 });
    });
  });
#else
  (void)tile_rows;
  const Acts a = quantize_acts(x, m, k);
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
  const Acts a = quantize_acts(xf.data_ptr<float>(), xf.size(0), xf.size(1));
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
        py::arg("tile_rows") = MAX_TILE);
  m.def("linear_reference", &linear_reference, "the portable path of linear");
  m.def("simd", &simd, "whether the AVX-512 VNNI path was compiled in");
  register_decode_step(m);
  register_latent_moe_step(m);
  register_prompt_ops(m);
}
