"""The prompt forward's C++ kernels (kernels/prompt.py, csrc/prompt_ops.cpp) against the torch operators they
replace: RMSNorm, residual add + RMSNorm, SwiGLU, and fresh-prompt causal attention (torch's SDPA, float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatglm.kernels import prompt
from chatglm.kernels.ggml import _ggml

needs_kernels = pytest.mark.skipif(_ggml is None, reason="the C++ kernels are not built here")
needs_attention = pytest.mark.skipif(not hasattr(_ggml, "causal_attention"),
                                     reason="the causal attention kernel needs an AVX-512 build")
SHAPES = [(1, 33), (3, 7, 4099), (2, 130, 256)]  # odd widths and row counts: every tail of the vector loops


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def assert_float32_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | float = 1.0) -> None:
    """Equal to float32 rounding: a few units of float32's epsilon relative to the values' magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs() / (want.double().abs() + scale)).max().item()
    assert err < 4e-6, f"relative error {err:.2e}"


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_rows_match_torch(shape):
    x, w = rand(*shape), rand(shape[-1], seed=1)
    got = _ggml.rms_norm_rows(x, w, 1e-5)
    assert_float32_close(got, F.rms_norm(x, shape[-1:], w, 1e-5))
    assert_float32_close(prompt.rms_norm(x, w, 1e-5), got, 0.0)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_adds_in_place_then_norms(shape):
    h, x, w = rand(*shape), rand(*shape, seed=2), rand(shape[-1], seed=1)
    want_h = h + x
    got = prompt.add_rms_norm(h, x, w, 1e-6)
    assert torch.equal(h, want_h)  # one float32 add per value: exactly torch's
    assert_float32_close(got, F.rms_norm(want_h, shape[-1:], w, 1e-6))


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_rows_match_torch(shape):
    gate_up = rand(*shape[:-1], 2 * shape[-1]) * 4  # gates far into silu's tails too
    gate, up = gate_up.chunk(2, dim=-1)
    got = _ggml.swiglu_rows(gate_up)
    assert_float32_close(got, F.silu(gate) * up, up.abs())
    assert torch.equal(prompt.swiglu(gate_up), got)


@needs_kernels
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rows_rotate_like_a_complex_product(interleaved):
    """The q and k heads of a qkv product's rows (a strided view), rotated in place; the rest untouched."""
    B, T, H, D, r = 2, 9, 5, 64, 32
    qkv = rand(B, T, (H + 1) * D)
    before = qkv.clone()
    angles = rand(B, T, 1, r // 2, seed=4)
    cs = torch.polar(torch.ones_like(angles), angles)
    heads = qkv[..., : H * D].unflatten(-1, (H, D))[..., :r]
    prompt.apply_rope_(heads, cs, interleaved)
    x = before[..., : H * D].unflatten(-1, (H, D))[..., :r].double()
    pairs = x.unflatten(-1, (-1, 2)) if interleaved else x.unflatten(-1, (2, -1)).transpose(-1, -2)
    z = torch.view_as_complex(pairs.contiguous()) * cs.to(torch.complex128)
    want = torch.view_as_real(z)
    want = want.flatten(-2) if interleaved else want.transpose(-1, -2).flatten(-2)
    assert_float32_close(heads, want.float())
    rest = torch.ones_like(qkv, dtype=torch.bool)
    rest[..., : H * D].unflatten(-1, (H, D))[..., :r] = False
    assert torch.equal(qkv[rest], before[rest])


def test_other_dtypes_take_torch():
    """bfloat16 (and any device but the CPU) keeps the torch expressions, bit for bit."""
    x, w = rand(2, 5, 64).bfloat16(), rand(64, seed=1).bfloat16()
    assert torch.equal(prompt.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(prompt.swiglu(x), F.silu(gate) * up)
    h = rand(2, 5, 64, seed=3).bfloat16()
    want = F.rms_norm(h + x, (64,), w, 1e-5)
    assert torch.equal(prompt.add_rms_norm(h, x, w, 1e-5), want)


@needs_kernels
def test_row_kernels_name_bad_inputs():
    with pytest.raises(RuntimeError, match="norm weight"):
        _ggml.rms_norm_rows(rand(2, 8), rand(7), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        _ggml.swiglu_rows(rand(2, 7))


def sdpa_reference(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """torch's causal SDPA in float64 over the cache rows' values."""
    keys, values = kv.double().permute(2, 0, 3, 1, 4)
    att = F.scaled_dot_product_attention(q.double().transpose(1, 2), keys, values, is_causal=True, enable_gqa=True)
    return att.transpose(1, 2)


@needs_attention
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim", [
    (1, 131, 32, 2, 128),   # ChatGLM3's grouping: 16 query heads share a key head; T not a multiple of any tile
    (2, 70, 4, 4, 64),      # no grouping, two sequences
    (1, 67, 12, 4, 128),    # 3 heads a group: work items with padding rows
    (1, 1, 6, 2, 64),       # one token
    (1, 200, 65, 1, 64),    # more heads a group than a work item holds: torch serves
])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_causal_attention_matches_sdpa(batch, tokens, heads, kv_heads, head_dim, kv_dtype):
    qkv = rand(batch, tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))  # a view with the product's row stride
    kv = qkv[..., heads * head_dim:].unflatten(-1, (2, kv_heads, head_dim)).to(kv_dtype)  # float32: a view
    got = prompt.causal_attention(q, kv)
    want = sdpa_reference(q, kv)
    assert got.dtype == torch.float32 and got.shape == q.shape
    err = ((got.double() - want).abs() / want.abs().amax(-1, keepdim=True)).max().item()
    assert err < 1e-5, f"relative error {err:.2e}"


@needs_attention
def test_causal_attention_names_bad_inputs():
    q = rand(1, 4, 6, 64)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        _ggml.causal_attention(q, rand(1, 4, 2, 4, 64))
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        _ggml.causal_attention(rand(1, 4, 2, 32), rand(1, 4, 2, 2, 32))
