"""ChatGLM-6B (GLM v1): 2D rotary positions, bidirectional attention over the context up to <sop>,
LayerNorm with biases, GELU (tanh form), and residuals taken after the norm times
alpha = sqrt(2 * 28) (the official blocks never receive num_layers, so 28 holds for every depth).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, as_ids, need
from ..kernels import make_linear
from .layers import Decoder, KVCache, Step, Weight, _float, apply_rope_, attend

ARCH = "chatglm"
GGUF_ARCHS: tuple[str, ...] = ()
ALPHA = math.sqrt(2 * 28)
GMASK, MASK, SOP = 130001, 130000, 130004  # the ice_text.model ids; config.json may say otherwise

_L = "transformer.layers.(\\d+)."
HF_NAMES = {
    "transformer.word_embeddings.weight": "embed",
    "transformer.final_layernorm.weight": "norm",
    "transformer.final_layernorm.bias": "norm_bias",
    "lm_head.weight": "head",
    "transformer.prefix_encoder.embedding.weight": "prefix_embedding",
    "transformer.prefix_encoder.trans.(\\d+).(weight|bias)": "prefix_mlp.{}.{}",
    _L + "input_layernorm.weight": "layers.{}.attn_norm",
    _L + "input_layernorm.bias": "layers.{}.attn_norm_bias",
    _L + "attention.query_key_value.weight": "layers.{}.qkv",
    _L + "attention.query_key_value.bias": "layers.{}.qkv_bias",
    _L + "attention.dense.weight": "layers.{}.o",
    _L + "attention.dense.bias": "layers.{}.o_bias",
    _L + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    _L + "post_attention_layernorm.bias": "layers.{}.ffn_norm_bias",
    _L + "mlp.dense_h_to_4h.weight": "layers.{}.up",
    _L + "mlp.dense_h_to_4h.bias": "layers.{}.up_bias",
    _L + "mlp.dense_4h_to_h.weight": "layers.{}.down",
    _L + "mlp.dense_4h_to_h.bias": "layers.{}.down_bias",
}


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "chatglm" and bool(cfg.get("position_encoding_2d", False))


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    heads = need(cfg, source, "num_attention_heads")
    hidden = need(cfg, source, "hidden_size")
    head_dim = hidden // heads
    return ModelConfig(
        arch=ARCH,
        family="chatglm",
        vocab_size=need(cfg, source, "vocab_size"),
        hidden_size=hidden,
        num_layers=need(cfg, source, "num_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        ffn_size=need(cfg, source, "inner_hidden_size", default=4 * hidden),
        norm_eps=need(cfg, source, "layernorm_epsilon", default=1e-5),
        rope_dim=head_dim // 2,
        qkv_bias=True,
        o_bias=True,
        max_position=need(cfg, source, "max_sequence_length", default=2048),
        tie_embeddings=True,
        bos_token_id=cfg.get("bos_token_id", SOP),
        eos_token_ids=as_ids(cfg.get("eos_token_id", 130005)),
        extra={"gmask": cfg.get("gmask_token_id", GMASK), "mask": cfg.get("mask_token_id", MASK)},
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def rope_2d_(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """First half of each head rotated by position id, second half by block position id (in place)."""
    half = x.shape[-1] // 2
    apply_rope_(x[..., :half], cs[0], False)
    apply_rope_(x[..., half:], cs[1], False)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.cfg = cfg
        for name in ("attn_norm", "attn_norm_bias", "ffn_norm", "ffn_norm_bias"):
            self.register_buffer(name, _float(w[name], dtype, device), persistent=False)
        self.qkv = make_linear(w["qkv"], w["qkv_bias"], dtype, device)
        self.o = make_linear(w["o"], w["o_bias"], dtype, device)
        self.up = make_linear(w["up"], w["up_bias"], dtype, device)
        self.down = make_linear(w["down"], w["down_bias"], dtype, device)

    def fused_parts(self) -> dict[str, object]:
        """This block for the one-call C++ step (kernels.fused_decoder): LayerNorms with biases, q, k, v
        interleaved per head, a GELU MLP and alpha residuals."""
        return dict(attn_norm=self.attn_norm, attn_norm_bias=self.attn_norm_bias, ffn_norm=self.ffn_norm,
                    ffn_norm_bias=self.ffn_norm_bias, qkv=self.qkv, o=self.o, gate_up=self.up, down=self.down,
                    mlp="gelu", residual_alpha=ALPHA, qkv_per_head=True)

    def forward(self, x: torch.Tensor, cs, layer: int, cache: KVCache, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        h = layer_norm(x, self.attn_norm, self.attn_norm_bias, cfg.norm_eps)
        q, k, v = self.qkv(h).view(B, T, cfg.num_heads, 3 * cfg.head_dim).split(cfg.head_dim, dim=-1)
        rope_2d_(q, cs)
        rope_2d_(k, cs)
        x = h * ALPHA + self.o(attend(q, torch.stack([k, v], dim=2), cache, layer, step))
        h = layer_norm(x, self.ffn_norm, self.ffn_norm_bias, cfg.norm_eps)
        return h * ALPHA + self.down(F.gelu(self.up(h), approximate="tanh"))


class GLMDecoder(Decoder):
    """The shared decoder with GLM's blocks, positions and final LayerNorm."""

    block_class = GLMBlock
    prefix_reusable = False  # the context attends both ways: a new turn changes every earlier state

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Weight], dtype: torch.dtype,
                 device: torch.device | str = "cpu", source: object = "model", name_of=str):
        super().__init__(cfg, weights, dtype, device, source, name_of)
        self.register_buffer("norm_bias", _float(weights["norm_bias"], dtype, device), persistent=False)

    @staticmethod
    def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, f = cfg.hidden_size, cfg.ffn_size
        shapes = {"embed": (cfg.vocab_size, h), "norm": (h,), "norm_bias": (h,), "head": (cfg.vocab_size, h)}
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            shapes.update({p + n: (h,) for n in ("attn_norm", "attn_norm_bias", "ffn_norm", "ffn_norm_bias",
                                                 "o_bias", "down_bias")})
            shapes.update({p + "qkv": (3 * h, h), p + "qkv_bias": (3 * h,), p + "o": (h, h),
                           p + "up": (f, h), p + "up_bias": (f,), p + "down": (h, f)})
        return shapes

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.norm, self.norm_bias, self.config.norm_eps)

    def attention_inputs(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, slots: torch.Tensor):
        """2D positions and the prefix mask, from where each sequence put [gMASK] and <sop>.

        Up to <sop> (the context) tokens see each other both ways; after it, generation is causal
        with position id = the mask position and block position = 1, 2, ... . As in the official code, the
        mask position is that of the first [gMASK] of the sequence so far, or else of its first [MASK].
        """
        position, block, both_ways = self.positions_2d(ids, pos, cache, slots)
        cs = (self.rope[position].unsqueeze(2), self.rope[block].unsqueeze(2))
        return cs, pos + self.prefix_len, self.causal_mask(pos, both_ways)

    def rotary_positions(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                         slots: torch.Tensor) -> torch.Tensor:
        """A one-token step's (position, block position) per row: [B, 2] for the fused step's 2D rotary."""
        position, block, _ = self.positions_2d(ids, pos, cache, slots)
        return torch.stack([position[:, 0], block[:, 0]], dim=1).contiguous()

    def positions_2d(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position ids and block position ids [B, T], and where each row's two-way context ends [B, 1];
        records in cache.meta where each sequence's [gMASK], [MASK] and <sop> first stand."""
        firsts = {"gmask": self.config.extra["gmask"], "mask": self.config.extra["mask"],
                  "context": self.config.bos_token_id}  # where each of these ids first stands
        context, mask_pos = [], []
        for row_ids, row_pos, slot in zip(ids.tolist(), pos.tolist(), slots.tolist()):
            seen = cache.meta.setdefault(slot, dict.fromkeys(firsts))
            if row_pos[0] == 0:
                seen.update(dict.fromkeys(firsts))
            for token, p in zip(row_ids, row_pos):
                for name, id in firsts.items():
                    if token == id and seen[name] is None:
                        seen[name] = p
            context.append(seen["context"])
            mask_pos.append(next((p for p in (seen["gmask"], seen["mask"]) if p is not None), 0))
        # before any <sop> a sequence is plain causal text: 2D positions (pos, 0), no two-way part
        ctx = torch.tensor([c if c is not None else 1 << 30 for c in context], device=pos.device)[:, None]
        both_ways = torch.tensor([c or 0 for c in context], device=pos.device)[:, None]
        generated = pos >= ctx
        position = torch.where(generated, torch.tensor(mask_pos, device=pos.device)[:, None], pos)
        block = torch.where(generated, pos - ctx + 1, torch.zeros_like(pos))
        return position, block, both_ways


DECODER = GLMDecoder
