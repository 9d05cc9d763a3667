"""The work of a prompt forward between a block's products: element-wise rows and a fresh prompt's attention.

Contiguous CPU float32 rows go through the C++ kernels (csrc/prompt_ops.cpp: one pass each, split among torch's
threads, no temporaries; a flash-style causal attention over the cache's float16 or float32 rows); other
devices and dtypes (CUDA, bfloat16) and builds without the extension take the torch expressions they replace,
which are also what the tests compare the kernels with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ggml import _ggml


def _native(*ts: torch.Tensor) -> bool:
    """Whether the C++ row kernels take these tensors: contiguous CPU float32."""
    return _ggml is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                                     for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32 like the reference code, returned in x's dtype."""
    if _native(x, weight):
        return _ggml.rms_norm_rows(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def add_rms_norm(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += x in place (h: a product's fresh output, x: the residual), then RMSNorm(h) (see `rms_norm`)."""
    if _native(h, x, weight) and h.shape == x.shape:
        return _ggml.add_rms_norm_rows(h, x, weight, eps)
    return rms_norm(h.add_(x), weight, eps)


def apply_rope_(x: torch.Tensor, cs: torch.Tensor, interleaved: bool) -> None:
    """Rotate x [B,T,H,r] in place (float32 arithmetic) by cs [B,T,1,r/2]: pairs (x0,x1),(x2,x3)...
    when interleaved, else the two halves; one complex product either way (the C++ rotation on float32 rows)."""
    if (_ggml is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4 and x.stride(3) == 1
            and cs.dtype == torch.complex64 and cs.is_contiguous() and cs.shape == (*x.shape[:2], 1, x.shape[3] // 2)):
        _ggml.rope_rows_(x, torch.view_as_real(cs), interleaved)
        return
    xf = x.float().contiguous()  # complex views need unit-stride pairs; a float linear may return any strides
    if interleaved:
        z = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cs
        x.copy_(torch.view_as_real(z).flatten(-2))
    else:
        half = x.shape[-1] // 2
        z = torch.complex(xf[..., :half], xf[..., half:]) * cs
        x.copy_(torch.cat([z.real, z.imag], dim=-1))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from a gate_up product's output [..., gate | up]."""
    if _native(gate_up):
        return _ggml.swiglu_rows(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def causal_attention(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for fresh prompts: q [B,T,H,D], kv the cache rows as stored
    [B,T,2,Hkv,D] (float16 or float32; Hkv divides H); returns [B,T,H,D] in q's dtype."""
    H, D, Hkv = q.shape[2], q.shape[3], kv.shape[3]
    if (hasattr(_ggml, "causal_attention") and q.device.type == "cpu" and q.dtype == torch.float32
            and kv.dtype in (torch.float16, torch.float32) and q.stride(3) == 1
            and q.stride(2) == D and D in (64, 128) and H // Hkv <= 64):
        return _ggml.causal_attention(q, kv.contiguous())  # a float32 cache's rows may be a view of the product
    keys, values = kv.to(q.dtype).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D] each
    att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, enable_gqa=True)
    return att.transpose(1, 2)
