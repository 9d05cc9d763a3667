"""CPU linear and embedding modules for every stored weight format, each on its fastest path.

With the C++ kernels built, ggml's legacy block types run on them (`ggml.GGMLLinear`: the file's
bytes in place, activations rounded to 8 bits as llama.cpp rounds them), except float32 activations
that must stay exact. Without them, and for those, torch's own kernels serve:

What torch offers on this CPU (Zen 4, AVX-512 BF16), measured: the packed int4 kernel
`_weight_int4pack_mm_for_cpu` is fast only for bfloat16 activations (1.6 ms for a 13696x4096
matrix-vector product, against 7 ms for a bf16 F.linear). For float32 activations it takes a generic
path four times slower than a float32 F.linear (so does `_weight_int8pack_mm`), and its output
always has the activations' dtype, so no bf16 kernel can give float32-exact results. Hence:

* bfloat16 activations (`Int4Linear`): every legacy ggml block type is repacked for that kernel.
  q4_0/q4_1 map onto it directly; q8_0, q5_0 and q5_1 become two nibble planes (see `_planes`).
  Results are within bf16 rounding of the reference: the extra rounding is the f16 scale (and
  zero) held in bf16, as the kernel requires.
* float32 activations (`BlockLinear`): ggml's codes and f16 scales, dequantized a chunk of rows at
  a time for a float32 matmul: x @ dequantize(W).T to float32 rounding, at about the speed of a
  float32 F.linear, holding the file's bytes.
* other ggml types (k-quants, i-quants) are dequantized to `dtype` once at build time: correct but
  not compact. A GGUF file's never get here: the loader transcodes them to legacy blocks as it reads them
  (loaders/transcode.py).
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import DECODERS, Affine, QTensor, QType, affine
from . import ggml

GROUP = 32          # values per ggml block, and the kernel's group size
BLOCK_ROWS = 64     # the int4 kernel packs output rows in blocks of 64 (rows j and j+32 share a byte)
KERNEL_ROWS = 8     # prompt rows that take the int4 kernel (it is faster than unpacking up to ~100 rows, time grows per row)
BATCH_ROWS = 64     # ... and for a batch of one-token decode steps: 16 sequences then decode at 4x the tokens/s of
                    # one (SmolLM2, 2 threads); prompts keep the unpacked GEMM, whose rounding greedy replies were tested on
CHUNK = 1 << 21     # weights dequantized at a time: 8 MB of float32 (measured best: fewer calls, still cached)
NIBBLE_BIAS = {QType.Q4_0: 8, QType.Q4_1: 0}  # code + bias = the stored nibble; other types need two planes
HIGH = 16           # what the high nibble plane is worth against the low one
HALVES = ((torch.bitwise_and, 15), (torch.bitwise_right_shift, 4))  # (op, arg) taking a byte's low, then high nibble


class FloatLinear(nn.Module):
    """A float weight at the compute dtype: plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class BlockLinear(nn.Module):
    """Exact matmul for float32 (any non-bf16) activations: ggml codes dequantized a row chunk at a time.

    torch has no kernel that is both fast and exact for float32 activations, so each chunk of rows
    becomes code * d in a cache-sized float32 buffer that one matmul reads back; per-group offsets
    (q4_1, q5_1, and q4_0's -8d) join as a small matmul with the activations' group sums. The
    result is x @ dequantize(W).T to float32 rounding, at about the speed of a float32 F.linear.
    Memory stays the file's: q4 nibbles stay packed and unpack into two planes (the block's
    low-nibble and high-nibble halves) with the activations permuted to match, which keeps every
    pass contiguous; q8_0 codes stay bytes; q5 codes widen to bytes (1.5x the file).
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.planes = 2 if weight.qtype in NIBBLE_BIAS else 1
        self.nibble_bias = NIBBLE_BIAS.get(weight.qtype, 0)
        codes, scale, offset = [], [], []
        for _, _, a in _chunks(weight):
            codes.append(a.codes if self.planes == 1 else _nibble_bytes(a.codes + self.nibble_bias))
            scale.append(a.scale.squeeze(-1))
            offset.append(a.offset)
        self.register_buffer("codes", torch.cat(codes), persistent=False)      # [rows, groups, 32 // planes]
        self.register_buffer("scale", torch.cat(scale), persistent=False)      # float16 [rows, groups]
        self.register_buffer("offset", None if offset[0] is None else torch.cat(offset).squeeze(-1), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.has_offsets = offset[0] is not None or self.nibble_bias != 0
        self.dtype = dtype
        self.step = max(1, CHUNK // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.has_offsets:
            sums = x2.reshape(len(x2), -1, GROUP).sum(-1).T.to(self.dtype)         # [groups, M]: what offsets multiply
        x2 = self._planar(x2)
        out_t = torch.empty(self.out_features, len(x2), dtype=self.dtype)        # W x^T: row chunks are contiguous
        rows = min(self.step, self.out_features)
        values = torch.empty(rows, self.planes, self.in_features // GROUP, GROUP // self.planes)
        nibbles = torch.empty(rows, *self.codes.shape[1:], dtype=torch.uint8) if self.planes == 2 else None
        for r0 in range(0, self.out_features, rows):
            r1 = min(r0 + rows, self.out_features)
            w = self._scaled(slice(r0, r1), values[: r1 - r0], nibbles)
            torch.mm(w.view(r1 - r0, -1).to(self.dtype), x2.T, out=out_t[r0:r1])
            if self.has_offsets:  # a small matmul: cheaper than adding offsets to every weight
                out_t[r0:r1].addmm_(self._offsets(slice(r0, r1)).to(self.dtype), sums)
        y = out_t.T.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _planar(self, x2: torch.Tensor) -> torch.Tensor:
        """Activations in the values' order: per plane, every group's share of 32 // planes values."""
        m = x2.shape[0]
        return x2.reshape(m, -1, self.planes, GROUP // self.planes).transpose(1, 2).reshape(m, -1)

    def _scaled(self, sel: slice | torch.Tensor, out: torch.Tensor, nibbles: torch.Tensor | None) -> torch.Tensor:
        """Stored code * d for rows `sel`, float32, into out [rows, planes, groups, 32 // planes]."""
        codes = self.codes[sel]
        if nibbles is None:
            out[:, 0].copy_(codes)
        else:
            for plane, (op, arg) in enumerate(HALVES):
                out[:, plane].copy_(op(codes, arg, out=nibbles[: len(out)]))
        return out.mul_(self.scale[sel].float()[:, None, :, None])

    def _offsets(self, sel: slice | torch.Tensor) -> torch.Tensor:
        """float32 [rows, groups] added to each group's values: ggml's m less d * the nibbles' bias."""
        m = 0 if self.offset is None else self.offset[sel].float()
        return m - self.nibble_bias * self.scale[sel].float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        values = torch.empty(len(flat), self.planes, self.in_features // GROUP, GROUP // self.planes)
        nibbles = torch.empty(len(flat), *self.codes.shape[1:], dtype=torch.uint8) if self.planes == 2 else None
        w = self._scaled(flat, values, nibbles)
        if self.has_offsets:
            w.add_(self._offsets(flat)[:, None, :, None])
        return w.transpose(1, 2).reshape(*ids.shape, self.in_features).to(self.dtype)  # ggml's order in a block


def _chunks(weight: QTensor, rows: int = 4096) -> Iterator[tuple[int, int, Affine]]:
    """Decode a weight a few thousand rows at a time, so repacking never holds a full unpacked copy."""
    for r0 in range(0, weight.shape[0], rows):
        r1 = min(r0 + rows, weight.shape[0])
        yield r0, r1, affine(weight.raw[r0:r1], weight.qtype)


def _nibble_bytes(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> ggml's 16 bytes: the block's first half in the low nibbles."""
    nibbles = nibbles.view(torch.uint8)
    return nibbles[..., :16] | nibbles[..., 16:] << 4


class Int4Linear(nn.Module):
    """bf16 activations on torch's int4 kernel, ggml blocks repacked into its layout (see `_planes`).

    Up to KERNEL_ROWS activation rows (BATCH_ROWS for [batch, 1, in] decode steps) use the kernel; prompts unpack
    chunks of weight rows to bf16 for a GEMM, since the kernel's time grows with every row.
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.planes = 1 if weight.qtype in NIBBLE_BIAS else 2
        self.dtype = dtype
        packed, scales = _pack(weight)
        self.register_buffer("packed", packed, persistent=False)    # uint8 [row blocks, planes*K, 32]
        self.register_buffer("scales", scales, persistent=False)    # bf16 [K/32, padded rows, (scale, zero)]
        self.register_buffer("spread", torch.tensor([HIGH, 1.0][-self.planes:], dtype=dtype), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.step = max(1, CHUNK // (BLOCK_ROWS * self.in_features * self.planes))  # row blocks per chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= (BATCH_ROWS if x.dim() == 3 and x.shape[1] == 1 else KERNEL_ROWS):
            spread = (x2.reshape(len(x2), -1, 1, GROUP) * self.spread[:, None]).view(len(x2), -1)  # once per plane
            y = torch._weight_int4pack_mm_for_cpu(spread, self.packed.view(-1, self.packed.shape[1] // 2),
                                                  GROUP * self.planes, self.scales)
        else:
            y = self._unpacked_mm(x2)
        y = y[:, : self.out_features].reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _unpacked_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ W.T with W unpacked to the compute dtype a chunk of row blocks at a time."""
        blocks, step, k_planes, ys = self.packed.shape[0], min(self.step, self.packed.shape[0]), self.packed.shape[1], []
        nibbles = torch.empty(step, k_planes, 32, dtype=torch.uint8)
        values = torch.empty(step, k_planes, 32)
        w_t = torch.empty(self.in_features, 2, step, 32, dtype=self.dtype)  # half-major: contiguous writes
        for b0 in range(0, blocks, step):
            n = min(step, blocks - b0)
            packed = self.packed[b0:b0 + n]             # [n, planes*K, 32]: a byte holds rows j (low) and 32+j (high)
            sz = self.scales[:, b0 * BLOCK_ROWS: (b0 + n) * BLOCK_ROWS].unflatten(1, (n, 2, 32)).permute(4, 2, 1, 0, 3)
            for half, (op, arg) in enumerate(HALVES):
                op(packed, arg, out=nibbles[:n])
                w = self._values(values[:n].copy_(nibbles[:n]), sz[:, half])
                w_t[:, half, :n].copy_(w.transpose(0, 1))
            y = torch.mm(x2, w_t[:, :, :n].reshape(self.in_features, -1))
            ys.append(y.view(len(x2), 2, n, 32).transpose(1, 2))
        return torch.cat(ys, dim=1).view(len(x2), -1)

    def _values(self, nib: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        """float32 weights [n, K, r] from nibbles [n, planes*K, r] (float32, overwritten) and
        scales [2, n, K/32, r] (scale, zero), computed as the kernel computes them."""
        n, _, r = nib.shape
        s, z = sz.float().unsqueeze(3).contiguous()                  # contiguous: a strided operand is not vectorized
        w = nib.view(n, -1, GROUP * self.planes, r).mul_(s).add_(z - 8 * s)  # (nibble - 8) * scale + zero
        if self.planes == 2:
            w = torch.add(w[:, :, GROUP:], w[:, :, :GROUP], alpha=HIGH)
        return w.reshape(n, self.in_features, r)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        block, j = flat // BLOCK_ROWS, flat % BLOCK_ROWS
        byte = self.packed[block, :, j % 32]                                          # [T, planes*K]
        nib = ((byte >> (4 * (j >= 32)).to(torch.uint8)[:, None]) & 15).float()
        w = self._values(nib.unsqueeze(-1), self.scales[:, flat].permute(2, 1, 0).unsqueeze(-1))
        return w.reshape(*ids.shape, self.in_features).to(self.dtype)


def _pack(weight: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml blocks -> (nibbles in the int4 kernel's byte layout, its bf16 [groups, rows, (scale, zero)])."""
    _check_int4_layout()
    rows, cols = weight.shape
    planes = 1 if weight.qtype in NIBBLE_BIAS else 2
    padded = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
    packed = torch.empty(padded // BLOCK_ROWS, planes * cols, 32, dtype=torch.uint8)
    scales = torch.zeros(cols // GROUP, padded, 2, dtype=torch.bfloat16)
    for r0, r1, a in _chunks(weight):
        nib, sz = _planes(a, weight.qtype)
        packed[r0 // BLOCK_ROWS: -(-r1 // BLOCK_ROWS)] = _kernel_bytes(nib)
        scales[:, r0:r1] = sz.transpose(0, 1)
    return packed, scales


def _kernel_bytes(nib: torch.Tensor) -> torch.Tensor:
    """Nibbles [rows, K] -> the kernel's bytes [row blocks, K, 32]: rows j and j+32 of a block share one."""
    nib = torch.cat([nib, nib.new_zeros(-len(nib) % BLOCK_ROWS, nib.shape[1])])  # zero rows pad the last block
    pairs = nib.view(-1, 2, 32, nib.shape[1])
    return (pairs[:, 0] | pairs[:, 1] << 4).transpose(1, 2)


@functools.cache
def _check_int4_layout() -> None:
    """We write the kernel's private byte layout directly (no int32 copy); make sure this torch uses it."""
    probe = torch.randint(0, 16, (BLOCK_ROWS, 2 * GROUP), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    convert = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not torch.equal(convert(probe, 1).flatten(), _kernel_bytes(probe.to(torch.uint8)).flatten()):
        raise RuntimeError(f"torch {torch.__version__} lacks the int4 CPU kernel layout chatglm packs for; "
                           "run with float32 activations (dtype float32)")


def _planes(a: Affine, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """Nibbles uint8 [rows, planes*K] and bf16 [rows, K/32, (scale, zero)] reproducing code*d + m.

    The kernel computes sum(x * ((nibble - 8) * scale + zero)) with one (scale, zero) per group.
    One plane (4-bit codes), group 32: nibble = code + bias, so scale = d, zero = m + (8 - bias)*d.
    Two planes (5- and 8-bit codes c = 16*(c >> 4) + (c & 15)), group 64: each block becomes its
    high nibbles (c >> 4) + 8 then its low nibbles c & 15, sharing one group, and the activations
    enter twice, times HIGH = 16 then times 1. Per value that sums to
    d * (c - 8) + 17 * zero, so scale = d and zero = (8d + m) / 17: exact up to bf16 rounding, like
    the scale itself. (Two groups of 32 per block would need no division but 18% more memory.)
    """
    d = a.scale.float()
    m = torch.zeros_like(d) if a.offset is None else a.offset.float()
    if qtype in NIBBLE_BIAS:
        nib = a.codes + NIBBLE_BIAS[qtype]
        zero = m + (8 - NIBBLE_BIAS[qtype]) * d
    else:
        nib = torch.cat([(a.codes >> 4) + 8, a.codes & 15], dim=-1)                # [rows, G, 64]
        zero = (8 * d + m) / (HIGH + 1)
    return nib.view(torch.uint8).flatten(1), torch.cat([d, zero], dim=-1).to(torch.bfloat16)


class Embedding(nn.Module):
    """Token embeddings read from a linear module's storage, so a tied lm_head costs no memory."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)


def make_linear(weight: torch.Tensor | QTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                quantized_activations: bool = False) -> nn.Module:
    """The fastest module for this weight format and activation dtype on the CPU: ggml blocks run on
    the in-place C++ kernels (`ggml`, when built) for bfloat16 activations, and for float32 ones where
    `quantized_activations` allows their 8-bit rounding; otherwise on the exact paths above."""
    bias = None if bias is None else _dense(bias, dtype)
    if isinstance(weight, QTensor) and weight.qtype in DECODERS:
        if ggml.available() and (dtype == torch.bfloat16 or (quantized_activations and dtype == torch.float32)):
            return ggml.GGMLLinear(weight, bias, dtype)
        return (Int4Linear if dtype == torch.bfloat16 else BlockLinear)(weight, bias, dtype)
    return FloatLinear(_dense(weight, dtype), bias)


def _dense(t: torch.Tensor | QTensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor at dtype; ggml types without a packed path are dequantized here (see module doc)."""
    return t.dequantize(dtype) if isinstance(t, QTensor) else t.to(dtype)
