// What the ggml block kernels (ggml_kernels.cpp) offer the fused decode steps (decode_step.cpp, latent_moe_step.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// The output rows held by `parts` (uint8 [rows, bytes per row] of ggml blocks of type `qtype`, gguf's
// numbering) for `k` inputs; throws naming the mismatch.
int64_t check_parts(const std::vector<torch::Tensor>& parts, int64_t k, int64_t qtype);

// One block of 32 values as 8-bit codes in value order, rounded as ggml's quantize_row_q8_0_ref (scale amax / 127,
// codes rounded half away from zero), written to c; returns their sum and sets the float16-rounded scale d.
int quantize_block(const float* v, int8_t* c, float& d);

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
