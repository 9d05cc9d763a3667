"""ggml's legacy block types multiplied in place from the file's bytes by the C++ kernels.

`csrc/ggml_kernels.cpp` (built at install when a compiler is there) does what llama.cpp does on the
CPU: each call quantizes the activation rows to 8-bit blocks of 32 and takes integer dot products
with the weight blocks as stored, so a memory-mapped file is used as it is, with no repacking at
load and no memory beyond the file. Results carry the 8-bit rounding of the activations (about
0.5% of a product's magnitude), as llama.cpp's do; float32 activations without it take
`cpu.BlockLinear`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import QTensor, QType, RowStack

try:
    from . import _ggml
except ImportError:  # built without the extension (no compiler at install): torch's kernels serve
    _ggml = None

TYPES = frozenset({QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0})
TILE_ROWS = 8  # activation rows that share each decoded weight block (measured best for prompts)


def available() -> bool:
    """Whether the C++ kernels were built for this machine."""
    return _ggml is not None


class GGMLLinear(nn.Module):
    """x @ W.T + b with W the file's ggml blocks, read in place (the QTensor's bytes, no copy)."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if weight.qtype not in TYPES:
            raise ValueError(f"GGMLLinear takes {', '.join(t.name for t in TYPES)}; got {weight.qtype.name}")
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.dtype = dtype
        # uint8 [rows, bytes per row] as the file holds them: one tensor, or the pieces of a fused weight
        self.parts = weight.parts if isinstance(weight, RowStack) else (weight.raw,)
        for i, part in enumerate(self.parts):
            self.register_buffer(f"raw{i}", part, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _ggml.linear(x.reshape(-1, self.in_features), self.parts, int(self.qtype), TILE_ROWS)
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y += self.bias
        return y.to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows decoded exactly (ggml's values), only the ones asked for."""
        raw = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)  # embeddings are never fused
        return QTensor(raw, self.qtype, (self.out_features, self.in_features)).rows(ids, self.dtype)
