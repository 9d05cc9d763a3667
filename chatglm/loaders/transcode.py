"""K-quant and other block types without a kernel, turned at load into the legacy blocks the C++ kernels run.

Most downloaded GGUFs are K-quant mixes (Q4_K_M: Q4_K with some tensors Q6_K). Our kernels multiply the legacy
32-value blocks (q4_0 q4_1 q5_0 q5_1 q8_0) in place, so each other block tensor is rewritten once, as it is read:

- Q4_K -> q4_1 and Q5_K -> q5_1: a K-quant's 32-value sub-block is affine, value = d*sc*q - dmin*m with the same
  4- or 5-bit codes q, which is q4_1 / q5_1's value = d'*q + m'. The codes are kept; only d' = d*sc and
  m' = -dmin*m, exact in float32, are rounded to float16: each at most 2^-11 of itself (float16 keeps 11
  significant bits), so a value moves by at most 2^-11 * (|d'|*q + |m'|).
- Q6_K, Q3_K, Q2_K (16-value sub-blocks with their own scales) and every other type: their exact values
  (gguf.quants) requantized to q8_0, at most half a q8_0 step away (amax/254 per 32 values, well under
  their own steps).
- Pieces fused along rows (q, k, v) must share one type: where their targets differ, all become q8_0.

Transcoded tensors live in anonymous memory (about the file's size: +11% for q4_1 over Q4_K, +30% for q8_0
over Q6_K), in 2 MB pages where the file's other weights move into them (--no-mmap); the file pages they were
read from are dropped from the process's mapping.
"""
from __future__ import annotations

import ctypes
from collections import Counter
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from ..quant import DECODERS, FLOAT_TYPES, QTensor, QType, dequantize, q8_0_bytes
from .huge_pages import HUGE, huge_empty

AFFINE_TARGETS = {QType.Q4_K: QType.Q4_1, QType.Q5_K: QType.Q5_1}
_CHUNK_VALUES = 1 << 18  # values decoded at a time: gguf.quants takes ~40 bytes a value in temporaries


def target_of(qtype: QType) -> QType | None:
    """The legacy block type a tensor of `qtype` is transcoded to; None when it already runs as it is."""
    if qtype in DECODERS or qtype in FLOAT_TYPES:
        return None
    return AFFINE_TARGETS.get(qtype, QType.Q8_0)


def plan(types: Mapping[str, QType], groups: Iterable[list[str]]) -> dict[str, QType]:
    """file tensor name -> its target type, for every tensor that changes: `groups` are the names fused along
    rows into one weight, which must end in one type (q8_0 where their targets differ)."""
    out = {name: t for name, qtype in types.items() if (t := target_of(qtype)) is not None}
    for names in groups:
        blocks = [n for n in names if types[n] not in FLOAT_TYPES]
        if len({out.get(n, types[n]) for n in blocks}) > 1:
            out.update({n: QType.Q8_0 for n in blocks if types[n] != QType.Q8_0})
    return out


def summary(types: Mapping[str, QType], targets: Mapping[str, QType]) -> str:
    """'transcoded at load: 7 Q4_K -> q4_1, 2 Q6_K -> q8_0' (empty when nothing is)."""
    counts = Counter((types[n].name, t.name.lower()) for n, t in targets.items())
    return ("transcoded at load: " + ", ".join(f"{c} {a} -> {b}" for (a, b), c in sorted(counts.items()))
            if counts else "")


def transcode(w: QTensor, target: QType, huge: bool = False) -> QTensor:
    """`w`'s blocks as `target` blocks, in fresh memory ([rows, bytes per row] as the file lays them; with `huge`,
    2 MB pages for a tensor of 2 MB or more), a few rows at a time (never the whole tensor decoded at once)."""
    affine = (w.qtype, target) in ((QType.Q4_K, QType.Q4_1), (QType.Q5_K, QType.Q5_1))
    if not affine and target != QType.Q8_0:
        raise ValueError(f"cannot transcode {w.qtype.name} to {target.name}; expected a target from target_of")
    rows, cols = w.shape
    block, size = GGML_QUANT_SIZES[target]
    width = cols // block * size
    big = huge and rows * width >= HUGE
    out = huge_empty(rows * width).view(rows, width) if big else torch.empty(rows, width, dtype=torch.uint8)
    step = max(1, _CHUNK_VALUES // cols)
    for at in range(0, rows, step):
        part = w.raw[at : at + step].numpy()
        if affine:
            _affine_blocks(part, w.qtype, out[at : at + step].numpy())
        else:
            out[at : at + step] = q8_0_bytes(torch.from_numpy(dequantize(part, w.qtype, (len(part), cols))))
    return QTensor(out, target, w.shape)


def _scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in a Q4_K/Q5_K block's 12 bytes (ggml's get_scale_min_k4)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _affine_blocks(raw: np.ndarray, qtype: QType, out: np.ndarray) -> None:
    """Q4_K -> q4_1 or Q5_K -> q5_1 bytes into `out`, one legacy block per 32-value sub-block: the codes as they
    are, scale float16(d*sc) and offset float16(-dmin*m) (d, dmin float16, sc, m six-bit: exact in float32)."""
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    n = len(blocks)
    out = out.reshape(n, 8, -1)                                     # [K-quant blocks, sub-blocks, legacy block]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = _scales_mins(blocks[:, 4:16])
    out[..., 0:2] = (d * sc).astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = (-(dmin * m)).astype(np.float16)[..., None].view(np.uint8)
    # 32 bytes per pair of sub-blocks: sub-block 2j in the low nibbles, 2j + 1 in the high; a legacy block's byte i
    # holds its value i in the low nibble and value i + 16 in the high
    qs = blocks[:, -128:].reshape(n, 4, 32)
    first, second = qs[..., :16], qs[..., 16:]
    low = out[..., -16:].reshape(n, 4, 2, 16)
    np.bitwise_or(first & 15, second << 4, out=low[:, :, 0])
    np.bitwise_or(first >> 4, second & 0xF0, out=low[:, :, 1])
    if qtype == QType.Q5_K:  # bit k of qh[l]: sub-block k's value l; q5_1's 32-bit qh: bit i for value i
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        fifth = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        out[..., 4:8] = np.packbits(fifth, axis=-1, bitorder="little")


def transcoding(get: Callable[[str], torch.Tensor | QTensor], targets: Mapping[str, QType],
                release: Callable[[str], None], huge: bool = False) -> Callable[[str], torch.Tensor | QTensor]:
    """A tensor reader that transcodes the tensors named in `targets` (into 2 MB pages with `huge`), then
    `release`s the file bytes they were read from (the process's memory is the transcoded copy, not both). A
    damaged scale (NaN, inf) carries into the new blocks' scales, which the loader's finite check refuses."""
    def read(name: str) -> torch.Tensor | QTensor:
        w = get(name)
        if name not in targets or not isinstance(w, QTensor):
            return w
        out = transcode(w, targets[name], huge)
        release(name)
        _return_freed_heap()
        return out

    return read


def _return_freed_heap() -> None:
    """Give the decoding temporaries' freed heap pages back to the system (glibc's malloc_trim; elsewhere nothing):
    glibc keeps them between the long-lived transcoded tensors, tens of MB that would count as the model's."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
