"""Weight-holding linear and embedding modules, picked by device and stored weight format.

The models call only these three functions; each device's module decides how a format is held
and multiplied. `cpu` is the only backend so far: until `cuda.py` exists, other devices get the
weights dequantized to the compute dtype (plain F.linear).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

from ..quant import QTensor
from . import cpu
from .ggml import fused_decoder, latent_moe_decoder

__all__ = ["make_linear", "make_embedding", "tied_head", "ggml_numerics", "in_ggml_numerics", "fused_decoder",
           "latent_moe_decoder"]

_GGML_NUMERICS: ContextVar[bool] = ContextVar("ggml_numerics", default=False)


@contextmanager
def ggml_numerics() -> Iterator[None]:
    """Modules made inside may round float32 activations to 8 bits where that is llama.cpp's fast path
    (ggml block weights); outside, float32 stays exact. The loader decides; the models need not know."""
    token = _GGML_NUMERICS.set(True)
    try:
        yield
    finally:
        _GGML_NUMERICS.reset(token)


def in_ggml_numerics() -> bool:
    """Whether modules made now take llama.cpp's numerics (see `ggml_numerics`)."""
    return _GGML_NUMERICS.get()


def make_linear(weight: torch.Tensor | QTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                device: str | torch.device = "cpu") -> nn.Module:
    """A module computing x @ W.T + b for x [..., in] of `dtype`, W held in its stored format where it pays."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu.make_linear(weight, bias, dtype, quantized_activations=_GGML_NUMERICS.get())
    return cpu.FloatLinear(_on(weight, dtype, device), None if bias is None else _on(bias, dtype, device))


def make_embedding(weight: torch.Tensor | QTensor, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> nn.Module:
    """A module mapping token ids [...] to rows [..., hidden] of `dtype`, decoding only the rows asked for."""
    return cpu.Embedding(make_linear(weight, None, dtype, device))


def tied_head(embedding: nn.Module) -> nn.Module:
    """The lm_head of a model that ties it to the embedding: the same storage, no copy."""
    return embedding.table


def _on(t: torch.Tensor | QTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (t.dequantize(dtype) if isinstance(t, QTensor) else t).to(device=device, dtype=dtype)
