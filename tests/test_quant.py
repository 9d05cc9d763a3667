"""ggml block formats: our bytes and values against gguf.quants (bit-exact with ggml)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as ggml_quants

from chatglm.quant import QTensor, QType, dequantize, qtype_of, quantize

NAMES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32"]
SHAPES = [(64, 96), (130, 256), (1, 32)]


def weights(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (scale 0) is a case every format must survive
    return w


def qtensor(name: str, shape: tuple[int, int]) -> tuple[QTensor, np.ndarray]:
    """A QTensor over gguf.quants bytes, and gguf.quants' own float32 values for them."""
    qtype = qtype_of(name)
    raw = ggml_quants.quantize(weights(shape), qtype).view(np.uint8)
    return QTensor(torch.from_numpy(raw.copy()), qtype, shape), ggml_quants.dequantize(raw, qtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bytes_equal_gguf(name, shape):
    expected = ggml_quants.quantize(weights(shape), qtype_of(name)).view(np.uint8)
    got = quantize(weights(shape), name)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_is_exact(name, shape):
    q, ref = qtensor(name, shape)
    assert same_bits(q.dequantize().numpy(), ref)
    assert same_bits(dequantize(q.raw.numpy(), name, shape), ref)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_rows_decode_only_the_rows_asked_for(name):
    q, ref = qtensor(name, (130, 256))
    ids = torch.tensor([[129, 0, 7], [7, 64, 3]])
    got = q.rows(ids, torch.float32)
    assert got.shape == (2, 3, 256)
    assert same_bits(got.numpy(), ref[ids.numpy()])


def q6_k(rows: int = 3, cols: int = 512) -> tuple[QTensor, np.ndarray]:
    """A k-quant (no torch decoder) from random bytes with a sane scale d, and gguf.quants' values."""
    raw = np.random.default_rng(1).integers(0, 256, (rows, cols // 256 * 210), dtype=np.uint8)
    raw.reshape(rows, -1, 210)[..., 208:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return QTensor(torch.from_numpy(raw), QType.Q6_K, (rows, cols)), ggml_quants.dequantize(raw, QType.Q6_K).reshape(rows, cols)


def test_other_ggml_types_decode_through_gguf():
    q, ref = q6_k()
    assert same_bits(q.dequantize().numpy(), ref)
    assert same_bits(q.rows(torch.tensor([2, 0]), torch.float32).numpy(), ref[[2, 0]])


@pytest.mark.parametrize("name", ["Q4_0", "q8_0", "BF16", "F32"])
def test_qtype_names_any_case(name):
    assert qtype_of(name) == QType[name.upper()]


@pytest.mark.parametrize("name", ["q4", "int8", "", "q4_k"])
def test_bad_qtype_names_are_named(name):
    with pytest.raises(ValueError, match="unknown quantization type .*q4_0"):
        qtype_of(name)
