"""CPU linear and embedding modules against float64 references over gguf.quants' exact values."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gguf import quants as ggml_quants

from chatglm.kernels import cpu, ggml, ggml_numerics, make_embedding, make_linear, tied_head
from chatglm.quant import QType, RowStack

from test_quant import q6_k, qtensor

QUANTS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
STORED = QUANTS + ["f16", "bf16", "f32"]
SHAPES = [(64, 96), (130, 256)]
# decode steps [B,1,K] (a batch beyond KERNEL_ROWS too), one row [K], a short prompt on the int4 kernel,
# and a prompt [B,T,K] long enough for the unpacked GEMM
INPUTS = [(3, 1), (cpu.KERNEL_ROWS + 4, 1), (1,), (1, 5), (2, cpu.KERNEL_ROWS + 3)]
# float32 must match to float32 rounding; bf16 carries bf16 rounding of activations, weights and output
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def reference(x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None) -> torch.Tensor:
    return x.double() @ torch.from_numpy(w).double().T + (0 if bias is None else bias.double())


def assert_close(got: torch.Tensor, x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None, dtype: torch.dtype):
    """Error measured against the sum of |terms|: the scale any rounding of the products lives on."""
    assert got.dtype == dtype
    ref = reference(x, w, bias)
    scale = x.double().abs() @ torch.from_numpy(w).double().abs().T + (0 if bias is None else bias.double().abs())
    err = ((got.double() - ref).abs() / scale.clamp_min(1e-30)).max().item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def inputs(lead: tuple[int, ...], k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    shape = (k,) if lead == (1,) else (*lead, k)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", STORED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_dequantized_reference(name, shape, dtype, with_bias):
    q, w = qtensor(name, shape)
    bias = torch.randn(shape[0]).to(dtype) if with_bias else None
    lin = make_linear(q, bias, dtype)
    for lead in INPUTS:
        x = inputs(lead, shape[1], dtype)
        y = lin(x)
        assert y.shape == (*x.shape[:-1], shape[0])
        assert_close(y, x, w, bias, dtype)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_tensors_run_at_the_compute_dtype(stored, dtype):
    w = torch.randn(48, 64).to(stored)
    lin = make_linear(w, torch.randn(48), dtype)
    assert lin.weight.dtype == dtype and lin.bias.dtype == dtype
    x = inputs((2, 5), 64, dtype)
    assert_close(lin(x), x, w.float().numpy(), lin.bias.float(), dtype)


def test_float_weight_at_its_own_dtype_is_not_copied():
    w = torch.randn(16, 32)
    assert make_linear(w, None, torch.float32).weight.data_ptr() == w.data_ptr()


@pytest.mark.parametrize("name", STORED)
def test_embedding_rows(name):
    q, w = qtensor(name, (130, 256))
    ids = torch.tensor([[129, 0, 64], [31, 32, 7]])
    exact = make_embedding(q, torch.float32)(ids)
    assert exact.dtype == torch.float32 and torch.equal(exact, torch.from_numpy(w)[ids])
    rows = make_embedding(q, torch.bfloat16)(ids)
    want = torch.from_numpy(w)[ids]
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 3, 256)
    # the int4 layout holds f16 scales in bf16: a few bf16 steps of the block's largest value
    tol = 2 ** -7 * want.abs().amax(-1, keepdim=True)
    assert ((rows.float() - want).abs() <= tol).all()


@pytest.mark.parametrize("name", STORED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_head_shares_the_embedding_storage(name, dtype):
    q, w = qtensor(name, (130, 256))
    embed = make_embedding(q, dtype)
    head = tied_head(embed)
    embed_storage = {b.untyped_storage().data_ptr() for b in embed.buffers()}
    assert {b.untyped_storage().data_ptr() for b in head.buffers()} <= embed_storage
    for lead in INPUTS:
        x = inputs(lead, 256, dtype)
        assert_close(head(x), x, w, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_0_memory_stays_near_the_file(dtype):
    q, _ = qtensor("q8_0", (256, 512))
    held = sum(b.numel() * b.element_size() for b in make_linear(q, None, dtype).buffers())
    assert held <= 1.15 * q.raw.numel()


def test_int4_layout_is_torchs(monkeypatch):
    """We write the kernel's private layout ourselves; the guard compares it with torch's own packer."""
    cpu._check_int4_layout.__wrapped__()
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", lambda w, k: torch.zeros_like(w))
    with pytest.raises(RuntimeError, match="dtype float32"):
        cpu._check_int4_layout.__wrapped__()


def test_other_ggml_types_fall_back_to_float():
    """k-quants have no packed path yet: dequantized once at build time, still correct."""
    q, w = q6_k()
    lin = make_linear(q, None, torch.float32)
    assert isinstance(lin, cpu.FloatLinear)
    x = inputs((2, 3), q.shape[1], torch.float32)
    assert_close(lin(x), x, w, None, torch.float32)


# --- the C++ kernels (chatglm/kernels/csrc): ggml blocks read in place, 8-bit activations as in llama.cpp ---

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels are not built (pip install -e . with a compiler)")
# K a multiple of 32 but not of 256 (an odd number of blocks: the last pairs with nothing), N not a multiple of
# the 16 rows a thread takes, M odd and around the tile of ggml.TILE_ROWS activation rows
GGML_SHAPES = [(37, 96), (130, 160), (64, 512)]
GGML_ROWS = [1, 3, 9, 2 * ggml.TILE_ROWS + 5]


def q8_activations(x: torch.Tensor) -> np.ndarray:
    """x as ggml sees it: rounded to q8_0 blocks (8-bit codes, f16 scale) by gguf.quants."""
    raw = ggml_quants.quantize(x.float().numpy(), QType.Q8_0)
    return ggml_quants.dequantize(raw, QType.Q8_0).reshape(x.shape)


@needs_ggml
@pytest.mark.parametrize("name", QUANTS)
@pytest.mark.parametrize("shape", GGML_SHAPES)
def test_ggml_kernel_is_the_dot_product_of_q8_activations(name, shape):
    """ggml's numerics: the exact product of gguf.quants' q8_0 rounding of x with the stored blocks."""
    q, w = qtensor(name, shape)
    bias = torch.randn(shape[0])
    lin = ggml.GGMLLinear(q, bias, torch.float32)
    for m in GGML_ROWS:
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        y = lin(x)
        assert y.shape == (m, shape[0]) and y.dtype == torch.float32
        assert_close(y, torch.from_numpy(q8_activations(x)), w, bias, torch.float32)
        # and within the 8-bit rounding of the float product: relative 1e-2 of the output's norm
        ref = reference(x, w, bias)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@needs_ggml
@pytest.mark.parametrize("name", QUANTS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 11])  # up to 4: the decode path (groups of 4 blocks); then tiles
# 5 blocks: two groups, both read masked; 18 (the default model's 576): whole groups, then a masked pair; 35: a
# masked group of 3 after 8 whole ones, with enough rows (1000) that threads take runs of 2 and 4 rows
@pytest.mark.parametrize("k,n", [(160, 130), (576, 67), (1120, 1000)])
def test_ggml_simd_path_matches_the_portable_one(name, rows, k, n):
    q, _ = qtensor(name, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
    fast = ggml._ggml.linear(x, [q.raw], int(q.qtype), ggml.TILE_ROWS)
    # the integer dot products are exact; the float32 sums over blocks run in another order (up to ~5e-5 for 35
    # blocks of outputs near 130), while one code off would move an output by ~1e-2
    torch.testing.assert_close(fast, ggml._ggml.linear_reference(x, q.raw, int(q.qtype), n), rtol=1e-5, atol=1e-4)


@needs_ggml
@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
@pytest.mark.parametrize("rows", [1, 4, 20])
def test_ggml_products_do_not_depend_on_how_threads_share_the_rows(name, rows):
    """Each output row is one thread's whole sum in one order, so any split of the rows, here 8 threads on 2 cores
    over pieces of odd sizes, gives the single thread's bits (a step's thread count changes with the load)."""
    pieces = [qtensor(name, (n, 4096))[0] for n in (1000, 37, 250)]
    x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ggml._ggml.linear(x, [q.raw for q in pieces], int(pieces[0].qtype), ggml.TILE_ROWS)
        torch.set_num_threads(8)
        for _ in range(5):
            assert torch.equal(ggml._ggml.linear(x, [q.raw for q in pieces], int(pieces[0].qtype), ggml.TILE_ROWS),
                               alone)
    finally:
        torch.set_num_threads(threads)


@needs_ggml
def test_ggml_route_reads_the_weights_in_place_and_f32_stays_exact():
    q, w = qtensor("q4_0", (64, 256))
    with ggml_numerics():
        fast = make_linear(q, None, torch.float32)
    assert isinstance(fast, ggml.GGMLLinear) and fast.raw0.data_ptr() == q.raw.data_ptr()
    assert isinstance(make_linear(q, None, torch.float32), cpu.BlockLinear)  # outside: exact float32
    x = inputs((2, 3), 256, torch.float32)
    assert fast(x).shape == (2, 3, 64)
    assert torch.equal(make_embedding(q, torch.float32)(torch.tensor([5, 0])), torch.from_numpy(w)[[5, 0]])


@needs_ggml
def test_ggml_fused_weight_reads_each_piece_where_it_lies():
    """A fused q/k/v (RowStack) runs piece by piece, with no concatenated copy."""
    pieces = [qtensor("q5_1", (n, 160)) for n in (40, 9, 17)]
    stack = RowStack([q for q, _ in pieces])
    lin = ggml.GGMLLinear(stack, None, torch.float32)
    assert [b.data_ptr() for b in lin.buffers()] == [q.raw.data_ptr() for q, _ in pieces]
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(3))
    w = np.concatenate([w for _, w in pieces])
    assert_close(lin(x), torch.from_numpy(q8_activations(x)), w, None, torch.float32)
    assert "raw" not in vars(stack)  # nothing asked for the concatenation


def test_without_the_extension_torch_kernels_serve(monkeypatch):
    monkeypatch.setattr(ggml, "_ggml", None)
    q, _ = qtensor("q8_0", (64, 256))
    with ggml_numerics():
        assert isinstance(make_linear(q, None, torch.float32), cpu.BlockLinear)
        assert isinstance(make_linear(q, None, torch.bfloat16), cpu.Int4Linear)


@needs_ggml
def test_default_model_runs_on_the_file_mapping(default_gguf):
    """Every block weight of the default model is a view of the GGUF's memory map: nothing repacked."""
    from chatglm import load_model

    model = load_model(default_gguf)
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(os.path.realpath(default_gguf))]
    spans = [tuple(int(v, 16) for v in m[0].split("-")) for m in maps]
    linears = [m for m in model.modules() if isinstance(m, ggml.GGMLLinear)]
    assert linears and model.dtype == torch.float32
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for m in linears for p in m.parts)
