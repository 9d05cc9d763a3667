"""CPU linear and embedding modules against float64 references over gguf.quants' exact values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm.kernels import cpu, make_embedding, make_linear, tied_head
from chatglm.quant import QTensor, qtype_of

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
