// What the ggml block kernels (ggml_kernels.cpp) offer the fused decode steps (decode_step.cpp, latent_moe_step.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

// The output rows held by `parts` (uint8 [rows, bytes per row] of ggml blocks of type `qtype`, gguf's
// numbering) for `k` inputs; throws naming the mismatch.
int64_t check_parts(const std::vector<torch::Tensor>& parts, int64_t k, int64_t qtype);

// One block of 32 values as 8-bit codes in value order, rounded as ggml's quantize_row_q8_0_ref (scale amax / 127,
// codes rounded half away from zero), written to c; returns their sum and sets the float16-rounded scale d.
int quantize_block(const float* v, int8_t* c, float& d);

// Items 0..n-1 on torch's threads, each thread taking the next from a shared counter as it finishes one: a thread
// that shares its core with another process takes fewer, where an even split would wait for it. work(take) runs once
// on each thread (its scratch first, then its loop); take() gives the thread's next item, n once none is left.
template <typename Work>
void claimed(int64_t n, Work&& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    work([&] { return std::min<int64_t>(next++, n); });
  });
}

// y [m, n_out] = x [m, k] @ W.T, W the rows of `parts` stacked; x and y float32, contiguous. Unchecked:
// check_parts first. Threads split the output rows.
void linear_into(const float* x, int64_t m, int64_t k, const std::vector<torch::Tensor>& parts, int64_t qtype,
                 int64_t tile_rows, float* y);

// Adds the fused decode step's classes to the extension module.
void register_decode_step(pybind11::module_& m);

// Adds GLM-4.7-Flash's one-call step (latent_moe_step.cpp).
void register_latent_moe_step(pybind11::module_& m);

// Adds the prompt forward's element-wise row kernels (prompt_ops.cpp).
void register_prompt_ops(pybind11::module_& m);
