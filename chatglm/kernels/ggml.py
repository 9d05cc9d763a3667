"""ggml's legacy block types multiplied in place from the file's bytes by the C++ kernels.

`csrc/ggml_kernels.cpp` (built at install when a compiler is there) does what llama.cpp does on the
CPU: each call quantizes the activation rows to 8-bit blocks of 32 and takes integer dot products
with the weight blocks as stored, so a memory-mapped file is used as it is, with no repacking at
load and no memory beyond the file. Results carry the 8-bit rounding of the activations (about
0.5% of a product's magnitude), as llama.cpp's do; float32 activations without it take
`cpu.BlockLinear`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig, MoESpec
from ..quant import QTensor, QType, RowStack

try:
    from . import _ggml
except ImportError:  # built without the extension (no compiler at install): torch's kernels serve
    _ggml = None

TYPES = frozenset({QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0})
TILE_ROWS = 64  # activation rows that share each decoded weight block (measured best for prompts)


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


LINEARS = ("qkv", "o", "gate_up", "down")  # the block products of a fused layer, by DecodeLayer's names


def _in_blocks(m: nn.Module) -> bool:
    """Whether a linear is ggml blocks under float32 activations: what the C++ steps multiply."""
    return isinstance(m, GGMLLinear) and m.dtype == torch.float32


def _routing(spec: MoESpec) -> dict[str, object]:
    """The C++ steps' routing arguments (moe_ffn.h) from a family's MoE settings."""
    return dict(top_k=spec.experts_per_token, groups=spec.groups, top_groups=spec.groups_per_token,
                normalize=spec.normalize, scaling=spec.scaling)


def _routed_experts(router: nn.Module, experts: Sequence[nn.Module]) -> dict[str, object] | None:
    """DecodeLayer's arguments for routed experts (each a gate_up and a down, of one block type per matrix across
    the experts, as a file's expert stacks are); None where they are not all ggml blocks of one type."""
    gate_ups, downs = [e.gate_up for e in experts], [e.down for e in experts]
    if not all(_in_blocks(m) and m.bias is None for m in gate_ups + downs):
        return None
    if len({m.qtype for m in gate_ups}) != 1 or len({m.qtype for m in downs}) != 1:
        return None
    return dict(router=router.weight, router_bias=router.bias, experts_gate_up=[list(m.parts) for m in gate_ups],
                experts_gate_up_type=int(gate_ups[0].qtype), experts_down=[list(m.parts) for m in downs],
                experts_down_type=int(downs[0].qtype), **_routing(router.spec))


def fused_decoder(blocks: Sequence[nn.Module], cfg: ModelConfig) -> "_ggml.FusedDecoder | None":
    """Every block's one-token step as one C++ call (csrc/decode_step.cpp), when each block describes itself
    (`fused_parts()`: its norms, its four products, its shape switches and any routed experts) with every product
    in ggml blocks and float32 activations; None otherwise, and the blocks run as torch code."""
    if _ggml is None:
        return None
    layers = []
    for block in blocks:
        parts = block.fused_parts() if hasattr(block, "fused_parts") else None
        if parts is None:
            return None
        linears = {name: parts.pop(name) for name in LINEARS}
        if not all(_in_blocks(m) for m in linears.values()):
            return None
        # biases and norms are float32 like the activations (the C++ side checks, naming any that is not)
        for name, m in linears.items():
            parts.update({name: list(m.parts), f"{name}_type": int(m.qtype), f"{name}_bias": m.bias})
        if "experts" in parts:
            routed = _routed_experts(parts.pop("router"), parts.pop("experts"))
            if routed is None:
                return None
            parts.update(routed)
        parts = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
        layers.append(_ggml.DecodeLayer(attn_width=cfg.num_heads * cfg.head_dim,
                                        ffn=linears["down"].in_features, **parts))
    return _ggml.FusedDecoder(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_dim,
                              cfg.rope_interleaved, cfg.norm_eps, TILE_ROWS)


def latent_moe_decoder(blocks: Sequence[nn.Module], cfg: ModelConfig) -> "_ggml.LatentMoeDecoder | None":
    """Every GLM-4.7-Flash block's one-token step as one C++ call (csrc/latent_moe_step.cpp), when each weight
    the step multiplies (kv_b's halves per head included: a file's attn_k_b / attn_v_b) is ggml blocks under
    float32 activations and no block has post norms; None otherwise, and the blocks run as torch code."""
    if _ggml is None or cfg.latent is None or cfg.post_norms:
        return None

    def weight(m: nn.Module) -> "_ggml.BlockWeight":
        if not _in_blocks(m):
            raise LookupError
        return _ggml.BlockWeight(list(m.parts), int(m.qtype), m.in_features, m.bias)

    def feed_forward(ffn: nn.Module) -> "_ggml.FeedForward":
        if not hasattr(ffn, "router"):  # a dense layer: the shared part alone
            return _ggml.FeedForward(None, None, [], [], weight(ffn.gate_up), weight(ffn.down), 1, 1, 1, False, 1.0)
        shared = ffn.shared
        return _ggml.FeedForward(ffn.router.weight, ffn.router.bias, [weight(e.gate_up) for e in ffn.experts],
                                 [weight(e.down) for e in ffn.experts], weight(shared.gate_up) if shared else None,
                                 weight(shared.down) if shared else None, **_routing(ffn.router.spec))

    layers, bottleneck = [], cfg.latent.q_rank > 0
    try:
        for block in blocks:
            a = block.attn
            if not hasattr(a, "k_b"):
                return None
            layers.append(_ggml.LatentLayer(
                block.attn_norm.data, block.ffn_norm.data, weight(a.q_a) if bottleneck else None,
                a.q_a_norm.data if bottleneck else None, weight(a.q_b if bottleneck else a.q), weight(a.kv_a),
                a.kv_a_norm.data, [weight(m) for m in a.k_b], [weight(m) for m in a.v_b], weight(a.o),
                feed_forward(block.ffn)))
    except LookupError:  # a weight that is not ggml blocks under float32 activations
        return None
    spec = cfg.latent
    return _ggml.LatentMoeDecoder(layers, spec.nope_dim, cfg.rope_dim, cfg.rope_interleaved, cfg.norm_eps,
                                  spec.norm_eps, spec.scale, TILE_ROWS)
