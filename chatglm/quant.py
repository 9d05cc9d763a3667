"""ggml block formats: weights kept as the file's bytes, decoded exactly as ggml decodes them.

Quantizing goes through `gguf.quants` (bit-exact with ggml). The legacy 32-value blocks
(q4_0 q4_1 q5_0 q5_1 q8_0) are decoded in torch into an `Affine` form, integer codes times a
scale plus an optional offset, because the kernels repack codes and scales rather than floats;
the same form yields ggml's exact float values. Other ggml types (k-quants, i-quants) decode
through `gguf.quants`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from gguf import quants as ggml_quants

__all__ = ["QType", "QTensor", "Affine", "quantize", "dequantize", "qtype_of", "affine", "FLOAT_TYPES", "q8_0_bytes",
           "q8_0_values"]

NAMES: dict[str, QType] = {q.name.lower(): q for q in
                           (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.F16, QType.BF16, QType.F32)}
FLOAT_TYPES: dict[QType, torch.dtype] = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def qtype_of(name: str | QType) -> QType:
    """The ggml type for a user-facing name such as "q4_0" (any case)."""
    if isinstance(name, QType):
        return name
    try:
        return NAMES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown quantization type {name!r}; expected one of {', '.join(NAMES)}") from None


def quantize(weights: np.ndarray, qtype: QType | str) -> np.ndarray:
    """ggml's bytes for `weights` [..., cols]: uint8 [..., bytes_per_row], through gguf.quants."""
    out = ggml_quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype_of(qtype))
    return out.view(np.uint8)


def dequantize(raw: np.ndarray, qtype: QType | str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of ggml bytes, shaped `shape` (the reference decoder, gguf.quants)."""
    return ggml_quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype_of(qtype)).reshape(shape)


class Affine(NamedTuple):
    """Blocks of 32 values as w = codes * scale + offset, the form every legacy ggml block takes."""

    codes: torch.Tensor          # int8 [rows, groups, 32]
    scale: torch.Tensor          # float16 [rows, groups, 1] (the file's value)
    offset: torch.Tensor | None  # float16 [rows, groups, 1], or None where the format has no offset

    def values(self) -> torch.Tensor:
        """float32 [rows, groups, 32] as ggml computes them: codes*scale is exact, then one rounding for the offset."""
        w = self.codes.float().mul_(self.scale.float())  # in place: one float32 copy at the peak (a long KV span)
        if self.offset is not None:
            w += self.offset.float()
        return w


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[..., at:at + 2].view(torch.float16)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes (uint8); ggml keeps the block's first 16 values in the low nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


_BIT = torch.arange(8, dtype=torch.uint8)


def _five_bits(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Nibbles plus a fifth bit from 4 bytes qh (a little-endian uint32: bit i belongs to value i)."""
    return _nibbles(qs) | (((qh.unsqueeze(-1) >> _BIT.to(qh.device)) & 1) << 4).flatten(-2)


def _q4_0(b: torch.Tensor) -> Affine:
    return Affine(_nibbles(b[..., 2:]).view(torch.int8) - 8, _f16(b, 0), None)


def _q4_1(b: torch.Tensor) -> Affine:
    return Affine(_nibbles(b[..., 4:]).view(torch.int8), _f16(b, 0), _f16(b, 2))


def _q5_0(b: torch.Tensor) -> Affine:
    return Affine(_five_bits(b[..., 6:], b[..., 2:6]).view(torch.int8) - 16, _f16(b, 0), None)


def _q5_1(b: torch.Tensor) -> Affine:
    return Affine(_five_bits(b[..., 8:], b[..., 4:8]).view(torch.int8), _f16(b, 0), _f16(b, 2))


def _q8_0(b: torch.Tensor) -> Affine:
    return Affine(b[..., 2:].view(torch.int8), _f16(b, 0), None)


DECODERS: dict[QType, Callable[[torch.Tensor], Affine]] = {
    QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1, QType.Q8_0: _q8_0,
}


def affine(raw: torch.Tensor, qtype: QType) -> Affine:
    """Decode a legacy block type's bytes [rows, bytes_per_row] into codes, scales and offsets.

    q8_0's codes and every scale are views of `raw`; 4- and 5-bit codes are unpacked to a byte each.
    """
    _, type_size = GGML_QUANT_SIZES[qtype]
    return DECODERS[qtype](raw.reshape(raw.shape[0], -1, type_size))


def q8_0_bytes(x: torch.Tensor) -> torch.Tensor:
    """ggml's q8_0 blocks of x [..., n] (n a multiple of 32) as uint8 [..., n // 32 * 34], where x lies (a KV
    cache quantizes each step's rows on its own device). Rounded as quantize_row_q8_0_ref and gguf.quants round:
    scale amax / 127 (stored as float16), codes x * (1 / scale) rounded half away from zero."""
    blocks = x.float().unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    v = blocks * torch.where(scale == 0, 0.0, 1 / scale)
    a = v.abs()
    whole = a.floor()
    codes = v.sign() * (whole + (2 * (a - whole)).floor())  # C's roundf, as gguf.quants' np_roundf spells it
    return torch.cat([scale.half().view(torch.uint8), codes.to(torch.int8).view(torch.uint8)], -1).flatten(-2)


def q8_0_values(raw: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] of q8_0 blocks raw uint8 [..., n // 32 * 34], exactly as ggml decodes them."""
    return affine(raw.reshape(-1, raw.shape[-1]), QType.Q8_0).values().reshape(*raw.shape[:-1], -1)


@dataclass
class QTensor:
    """A weight stored as ggml blocks: raw bytes as they are in the file (often an mmap view)."""

    raw: torch.Tensor        # uint8 [rows, bytes_per_row]
    qtype: QType
    shape: tuple[int, int]   # (rows, cols) in torch layout: (out_features, in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[rows, cols] with ggml's exact float32 values, then cast to `dtype`."""
        return _decode(self.raw, self.qtype, self.shape[1]).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[*ids.shape, cols]: decode only the rows asked for (an embedding lookup)."""
        picked = self.raw.index_select(0, ids.reshape(-1).to(self.raw.device))
        return _decode(picked, self.qtype, self.shape[1]).to(dtype).reshape(*ids.shape, self.shape[1])


class RowStack(QTensor):
    """QTensors of one ggml type stacked along rows (a fused q/k/v) without moving them: the kernels that
    read `parts` use the file's bytes in place; `raw`, for everything else, concatenates on first use."""

    def __init__(self, pieces: list[QTensor]):
        self.parts = tuple(p.raw for p in pieces)
        self.qtype = pieces[0].qtype
        self.shape = (sum(p.shape[0] for p in pieces), pieces[0].shape[1])

    @functools.cached_property
    def raw(self) -> torch.Tensor:  # type: ignore[override]
        return torch.cat(self.parts)


def _decode(raw: torch.Tensor, qtype: QType, cols: int) -> torch.Tensor:
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[qtype]).float().reshape(-1, cols)
    if qtype in DECODERS:
        return affine(raw, qtype).values().reshape(-1, cols)
    return torch.from_numpy(dequantize(raw.cpu().numpy(), qtype, (raw.shape[0], cols))).to(raw.device)
