// The work of a prompt forward (many rows at once) between the block products. Element-wise: RMSNorm, the residual
// add fused into the norm that follows it, rotary in place, and SwiGLU straight from the gate_up product's output.
// As torch operators each is a pass over [rows, width] with a fresh temporary (SwiGLU alone: silu, then a product);
// here each is one pass over the rows, split among torch's threads, with step_math.h's row helpers (the decode
// step's arithmetic). Then a fresh prompt's causal attention (below). chatglm/kernels/prompt.py picks these for
// CPU float32 rows and torch's operators otherwise.
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

// Rotates x [B, T, H, r] in place (any strides but unit ones along r) by cs float32 [B, T, r/2, 2] (each token's
// cos and sin): step_math.h's rotation of the decode step, every head of a token at once
void rope_rows_(torch::Tensor& x, const torch::Tensor& cs, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && !x.is_cuda() && x.stride(3) == 1 &&
              x.size(3) % 2 == 0,
              "x must be CPU float32 [batch, tokens, heads, rope_dim] with unit stride along an even rope_dim");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), r = x.size(3);
  checked_float(cs, B * T * r, "cs (float32 [batch, tokens, rope_dim/2, 2])");
  float* xp = x.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  at::parallel_for(0, B * T, GRAIN, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = xp + i / T * x.stride(0) + i % T * x.stride(1);
      for (int64_t h = 0; h < H; ++h) rotate(row + h * x.stride(2), cp + i * r, r, interleaved);
    }
  });
}

#if defined(__AVX512F__)
// Fresh-prompt causal attention, flash style (one pass over the keys with a running softmax), in float32.
//
// A work item is one kv head of one sequence and QT query positions, taken with all G query heads of that kv head:
// ROWS = 64 query rows (QT * G of them real) that share every key and value tile (the cache's rows as float32, in
// place). Queries are held transposed ([D][ROWS], scaled once), so the scores come out as [keys][rows]: each key's
// value broadcast against 16 rows at a time, and the softmax runs across rows in vector lanes. Tiles past the
// item's last position are never read.
constexpr int64_t ROWS = 64;  // query rows of a work item (4 vectors of 16)
constexpr int64_t KEYS = 64;  // keys of a tile

struct Scratch {
  std::vector<float> qt, s, o, m, l, alpha, pos;
  explicit Scratch(int64_t D)
      : qt(D * ROWS), s(KEYS * ROWS), o(ROWS * D), m(ROWS), l(ROWS), alpha(ROWS), pos(ROWS) {}
};

// s [KEYS][ROWS] = k [nk][D] . qt [D][ROWS]: KB keys against all 64 rows per pass over D
template <int KB>
void scores(const float* k, int64_t ks, const float* qt, int64_t nk, int64_t D, float* s) {
  for (int64_t j = 0; j < nk; j += KB) {
    __m512 acc[KB][4];
    for (auto& a : acc)
      for (auto& v : a) v = _mm512_setzero_ps();
    const int64_t n = std::min<int64_t>(KB, nk - j);
    const float* kj[KB];
    for (int i = 0; i < KB; ++i) kj[i] = k + (j + (i < n ? i : 0)) * ks;  // past the tile's end: key j again, unstored
    for (int64_t d = 0; d < D; ++d) {
      __m512 q[4];
      for (int c = 0; c < 4; ++c) q[c] = _mm512_loadu_ps(qt + d * ROWS + 16 * c);
      for (int i = 0; i < KB; ++i) {
        const __m512 kk = _mm512_set1_ps(kj[i][d]);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(kk, q[c], acc[i][c]);
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + (j + i) * ROWS + 16 * c, acc[i][c]);
  }
}

// rows r0..r1-1 of o [ROWS][D] = o * alpha (per row) + p . v, p held as s [nk][ROWS]: RB rows of NV vectors each
// in registers
template <int NV, int RB>
void weigh_values(const float* s, const float* v, int64_t vs, const float* alpha, int64_t nk, float* o, int64_t r0,
                  int64_t r1) {
  constexpr int64_t D = 16 * NV;
  for (int64_t r = r0; r + RB <= r1; r += RB) {
    __m512 acc[RB][NV];
    for (int i = 0; i < RB; ++i) {
      const __m512 a = _mm512_set1_ps(alpha[r + i]);
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_mul_ps(a, _mm512_loadu_ps(o + (r + i) * D + 16 * c));
    }
    for (int64_t j = 0; j < nk; ++j) {
      __m512 p[RB];
      for (int i = 0; i < RB; ++i) p[i] = _mm512_set1_ps(s[j * ROWS + r + i]);
      for (int c = 0; c < NV; ++c) {
        const __m512 vv = _mm512_loadu_ps(v + j * vs + 16 * c);
        for (int i = 0; i < RB; ++i) acc[i][c] = _mm512_fmadd_ps(p[i], vv, acc[i][c]);
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + (r + i) * D + 16 * c, acc[i][c]);
  }
}

// The running softmax over one tile of scores s [nk][ROWS] for keys j0..j0+nk-1: masks keys past each row's
// position, turns scores into e^(s - running max), and sets each row's rescale factor for what came before.
void softmax_tile(float* s, int64_t nk, int64_t j0, Scratch& w) {
  for (int c = 0; c < ROWS; c += 16) {
    const __m512 pos = _mm512_loadu_ps(&w.pos[c]), old = _mm512_loadu_ps(&w.m[c]);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = old;
    for (int64_t j = 0; j < nk; ++j) {
      const __mmask16 hidden = _mm512_cmp_ps_mask(_mm512_set1_ps(static_cast<float>(j0 + j)), pos, _CMP_GT_OQ);
      const __m512 v = _mm512_mask_mov_ps(_mm512_loadu_ps(s + j * ROWS + c), hidden, ninf);
      _mm512_storeu_ps(s + j * ROWS + c, v);
      mx = _mm512_max_ps(mx, v);
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j * ROWS + c), mx));
      _mm512_storeu_ps(s + j * ROWS + c, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 alpha = exp16(_mm512_sub_ps(old, mx));  // 0 on the first tile (old = -inf)
    _mm512_storeu_ps(&w.alpha[c], alpha);
    _mm512_storeu_ps(&w.l[c], _mm512_fmadd_ps(_mm512_loadu_ps(&w.l[c]), alpha, sum));
    _mm512_storeu_ps(&w.m[c], mx);
  }
}

// One work item: query positions t0..t0+qt-1 of one kv head's G query heads.
//   q: the item's first query row (position t0, the group's first head), positions q_stride apart, heads D apart
//   k, v: the kv head's key and value rows from position 0, kv_stride apart; out like q with out_stride
template <int NV>
void attend_item(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, int64_t t0,
                 int64_t qt, int64_t G, float scale, float* out, int64_t out_stride, Scratch& w) {
  constexpr int64_t D = 16 * NV;
  const int64_t real = qt * G;
  for (int64_t r = 0; r < ROWS; ++r) {  // padding rows repeat the last real one: finite, never written out
    const int64_t rr = std::min(r, real - 1), p = rr / G, h = rr % G;
    const float* row = q + p * q_stride + h * D;
    for (int64_t d = 0; d < D; ++d) w.qt[d * ROWS + r] = row[d] * scale;
    w.pos[r] = static_cast<float>(t0 + p);
    w.m[r] = -INFINITY;
    w.l[r] = 0.f;
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  const int64_t end = t0 + qt;  // keys 0..end-1 are seen by some row
  for (int64_t j0 = 0; j0 < end; j0 += KEYS) {
    const int64_t nk = std::min(KEYS, end - j0);
    const float *kt = k + j0 * kv_stride, *vt = v + j0 * kv_stride;
    scores<6>(kt, kv_stride, w.qt.data(), nk, D, w.s.data());  // 24 accumulators: 1.35x less time than 16
    softmax_tile(w.s.data(), nk, j0, w);
    constexpr int RB = 24 / NV, FULL = ROWS / RB * RB;  // 24 accumulators again, then the rows left one by one
    weigh_values<NV, RB>(w.s.data(), vt, kv_stride, w.alpha.data(), nk, w.o.data(), 0, FULL);
    weigh_values<NV, 1>(w.s.data(), vt, kv_stride, w.alpha.data(), nk, w.o.data(), FULL, ROWS);
  }
  for (int64_t r = 0; r < real; ++r) {
    const int64_t p = r / G, h = r % G;
    const __m512 inv = _mm512_set1_ps(1.f / w.l[r]);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(out + p * out_stride + h * D + d, _mm512_mul_ps(inv, _mm512_loadu_ps(&w.o[r * D + d])));
  }
}

template <int NV>
void attend_all(const torch::Tensor& q, const torch::Tensor& kv, torch::Tensor& out) {
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), D = 16 * NV, Hkv = kv.size(3), G = H / Hkv;
  const int64_t qt = std::max<int64_t>(1, ROWS / G), tiles = (T_ + qt - 1) / qt, items = B * Hkv * tiles;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // threads claim items, the longest (last positions) first: causal items differ
  claimed(items, [&](auto take) {
    Scratch w(D);
    for (int64_t i; (i = take()) < items;) {
      const int64_t tile = tiles - 1 - i / (B * Hkv), b = i % (B * Hkv) / Hkv, g = i % Hkv, t0 = tile * qt;
      const float* kvb = kvp + b * kv.stride(0) + g * D;
      attend_item<NV>(qp + b * q.stride(0) + t0 * q.stride(1) + g * G * D, q.stride(1), kvb, kvb + kv.stride(2),
                      kv.stride(1), t0, std::min(qt, T_ - t0), G, scale,
                      op + b * out.stride(0) + t0 * out.stride(1) + g * G * D, out.stride(1), w);
    }
  });
}

// softmax(q k^T / sqrt(D), causal) v for fresh prompts: q float32 [B, T, H, D] (heads D apart, values contiguous;
// any position stride), kv the cache rows as stored [B, T, 2, Hkv, D] float16 or float32; returns float32
// [B, T, H, D]. H must be a multiple of Hkv with at most 64 query heads per kv head, D 64 or 128.
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& kv) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && !q.is_cuda() && q.stride(3) == 1 &&
              q.stride(2) == q.size(3), "q must be CPU float32 [batch, tokens, heads, head_dim], heads contiguous");
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && !kv.is_cuda() && kv.size(0) == q.size(0) &&
              kv.size(1) == q.size(1) && kv.size(2) == 2 && kv.size(4) == q.size(3),
              "kv must be contiguous [batch, tokens, 2, kv_heads, head_dim] matching q ", q.sizes());
  const int64_t H = q.size(2), Hkv = kv.size(3), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= ROWS, "heads (", H, ") must be a multiple of kv_heads (", Hkv,
              ") with at most ", ROWS, " per kv head");
  torch::Tensor out = torch::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.size(1) == 0 || q.size(0) == 0) return out;
  TORCH_CHECK(kv.scalar_type() == torch::kFloat16 || kv.scalar_type() == torch::kFloat32,
              "kv must be float16 or float32, got ", kv.scalar_type());
  // float16 rows become float32 once (a few MB): every work item of a kv head then reads them in place, where
  // converting each tile in each item took 1.1-1.3x longer (the ~T/16 items of a kv head convert its rows again)
  const torch::Tensor rows = kv.to(torch::kFloat32);
  if (D == 64) attend_all<4>(q, rows, out);
  else if (D == 128) attend_all<8>(q, rows, out);
  else TORCH_CHECK(false, "head_dim must be 64 or 128, got ", D);
  return out;
}
#endif

}  // namespace

void register_prompt_ops(pybind11::module_& m) {
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm of each row", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm_rows", &add_rms_norm_rows, "h += x in place, then RMSNorm(h)", py::arg("h"), py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("swiglu_rows", &swiglu_rows, "silu(gate) * up from [..., gate | up]", py::arg("gate_up"));
  m.def("rope_rows_", &rope_rows_, "rotary of every head of every token, in place", py::arg("x"), py::arg("cs"),
        py::arg("interleaved"));
#if defined(__AVX512F__)
  m.def("causal_attention", &causal_attention, "fresh-prompt causal attention over float16 or float32 cache rows",
        py::arg("q"), py::arg("kv"));
#endif
}
