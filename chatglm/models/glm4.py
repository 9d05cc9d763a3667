"""GLM-4-0414 and GLM-Z1 (`Glm4ForCausalLM`, model_type `glm4`): GLM-4 with two more norms.

The block of GLM-4-9B-chat (grouped attention with a qkv bias, rotary on the first half of each head in
interleaved pairs, SwiGLU with a fused gate_up) plus an RMSNorm on the attention output and one on the
MLP output, each before its residual. The block is written here with its attention and feed-forward as
parts so that GLM-4.5 (glm4_moe.py: QK norm, experts) and GLM-4.7-Flash (glm4_moe_lite.py: latent
attention) swap one part each. Folders carry tokenizer.json and a Jinja chat template, so they chat
through the template (tokenizer family "llama").
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import ModelConfig, as_ids, need
from ..kernels import make_linear
from ..kernels.prompt import swiglu
from .glm2 import config_from_transformers
from .layers import Decoder, KVCache, Step, Weight, _float, apply_rope_, attend, decoder_shapes, rms_norm

ARCH = "glm4"
GGUF_ARCHS = ("glm4",)

_L = "model.layers.(\\d+)."
HF_ATTENTION = {  # what GLM-4-0414 and GLM-4.5 name alike
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
    _L + "input_layernorm.weight": "layers.{}.attn_norm",
    _L + "self_attn.q_proj.weight": "layers.{}.qkv#0",
    _L + "self_attn.k_proj.weight": "layers.{}.qkv#1",
    _L + "self_attn.v_proj.weight": "layers.{}.qkv#2",
    _L + "self_attn.q_proj.bias": "layers.{}.qkv_bias#0",
    _L + "self_attn.k_proj.bias": "layers.{}.qkv_bias#1",
    _L + "self_attn.v_proj.bias": "layers.{}.qkv_bias#2",
    _L + "self_attn.o_proj.weight": "layers.{}.o",
}
HF_NAMES = {
    **HF_ATTENTION,
    _L + "post_self_attn_layernorm.weight": "layers.{}.attn_post_norm",
    _L + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    _L + "mlp.gate_up_proj.weight": "layers.{}.gate_up",
    _L + "mlp.down_proj.weight": "layers.{}.down",
    _L + "post_mlp_layernorm.weight": "layers.{}.ffn_post_norm",
}
_B = "blk.(\\d+)."
GGUF_ATTENTION = {  # llama.cpp's names for the same, in glm4 and glm4moe (q, k, v apart, as its converter writes)
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
    _B + "attn_norm.weight": "layers.{}.attn_norm",
    _B + "attn_q.weight": "layers.{}.qkv#0",
    _B + "attn_k.weight": "layers.{}.qkv#1",
    _B + "attn_v.weight": "layers.{}.qkv#2",
    _B + "attn_q.bias": "layers.{}.qkv_bias#0",
    _B + "attn_k.bias": "layers.{}.qkv_bias#1",
    _B + "attn_v.bias": "layers.{}.qkv_bias#2",
    _B + "attn_output.weight": "layers.{}.o",
}
GGUF_NAMES = {  # llama.cpp's glm4: gate and up fused in ffn_up; q, k, v fused too in some files
    **GGUF_ATTENTION,
    _B + "attn_qkv.weight": "layers.{}.qkv",
    _B + "attn_qkv.bias": "layers.{}.qkv_bias",
    _B + "post_attention_norm.weight": "layers.{}.attn_post_norm",
    _B + "ffn_norm.weight": "layers.{}.ffn_norm",
    _B + "ffn_up.weight": "layers.{}.gate_up",
    _B + "ffn_down.weight": "layers.{}.down",
    _B + "post_ffw_norm.weight": "layers.{}.ffn_post_norm",
}


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "glm4"


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    return replace(config_from_transformers(cfg, source), arch=ARCH, family="llama", post_norms=True)


def gguf_key(meta: Mapping[str, Any], source: object) -> Callable[..., Any]:
    """meta[f"{architecture}.{name}"], or its default, or a clear error."""
    arch = meta["general.architecture"]
    return lambda name, **default: need(meta, source, f"{arch}.{name}", **default)


def gguf_config(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]],
                **fields: Any) -> ModelConfig:
    """A config from the metadata llama.cpp's architectures spell alike (a block count that includes
    multi-token-prediction layers, left out); `fields` are the family's own and win."""
    key = gguf_key(meta, source)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", default=hidden // heads)
    common = dict(
        family="gguf",
        vocab_size=shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else 0,
        hidden_size=hidden,
        num_layers=gguf_layers(key),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", default=heads),
        head_dim=head_dim,
        ffn_size=key("feed_forward_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon", default=1e-5),
        rope_theta=float(key("rope.freq_base", default=10000.0)),
        rope_dim=key("rope.dimension_count", default=head_dim // 2),
        qkv_bias="blk.0.attn_q.bias" in shapes or "blk.0.attn_qkv.bias" in shapes,
        max_position=key("context_length", default=32768),
        tie_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=as_ids(meta.get("tokenizer.ggml.eos_token_id")),
    )
    return ModelConfig(**{**common, **fields})


def gguf_layers(key: Callable[..., Any]) -> int:
    return key("block_count") - key("nextn_predict_layers", default=0)


def config_from_gguf(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """llama.cpp's glm4 metadata: GLM-4-0414 and GLM-Z1."""
    return gguf_config(meta, source, shapes, arch=ARCH, rope_interleaved=True, post_norms=True)


def norm_weight(t: Weight, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(_float(t, dtype, device), requires_grad=False)


class Attention(nn.Module):
    """Grouped-query attention over the shared cache: q, k, v as one matmul, optionally an RMSNorm over
    each query and key head (GLM-4.5), rotary on the first rope_dim dims of each head."""

    def __init__(self, cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.cfg = cfg
        self.qkv = make_linear(w["qkv"], w.get("qkv_bias"), dtype, device)
        self.o = make_linear(w["o"], w.get("o_bias"), dtype, device)
        self.q_norm = norm_weight(w["q_norm"], dtype, device) if cfg.qk_norm else None
        self.k_norm = norm_weight(w["k_norm"], dtype, device) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cs: torch.Tensor, layer: int, cache: KVCache, step: Step) -> torch.Tensor:
        cfg = self.cfg
        nq = cfg.num_heads * cfg.head_dim
        qkv = self.qkv(x)
        q = qkv[..., :nq].unflatten(-1, (cfg.num_heads, cfg.head_dim))
        kv = qkv[..., nq:].unflatten(-1, (2, cfg.num_kv_heads, cfg.head_dim))
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, cfg.norm_eps)
            kv = torch.stack([rms_norm(kv[:, :, 0], self.k_norm, cfg.norm_eps), kv[:, :, 1]], dim=2)
        apply_rope_(q[..., : cfg.rope_dim], cs, cfg.rope_interleaved)
        apply_rope_(kv[:, :, 0, :, : cfg.rope_dim], cs, cfg.rope_interleaved)
        return self.o(attend(q, kv, cache, layer, step))


class SwiGLU(nn.Module):
    """down(silu(gate) * up), gate and up as one matmul (gate rows first)."""

    def __init__(self, gate_up: Weight, down: Weight, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.gate_up = make_linear(gate_up, None, dtype, device)
        self.down = make_linear(down, None, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))


class Glm4Block(nn.Module):
    """Pre-norm attention and feed-forward with residuals, each output normed first when cfg.post_norms."""

    attention_class: type[nn.Module] = Attention

    def __init__(self, cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn_norm = norm_weight(w["attn_norm"], dtype, device)
        self.ffn_norm = norm_weight(w["ffn_norm"], dtype, device)
        self.attn = self.attention_class(cfg, w, dtype, device)
        self.ffn = self.feed_forward(cfg, w, dtype, device)
        self.attn_post_norm = norm_weight(w["attn_post_norm"], dtype, device) if cfg.post_norms else None
        self.ffn_post_norm = norm_weight(w["ffn_post_norm"], dtype, device) if cfg.post_norms else None

    @staticmethod
    def feed_forward(cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype,
                     device: torch.device | str) -> nn.Module:
        return SwiGLU(w["gate_up"], w["down"], dtype, device)

    def fused_parts(self) -> dict[str, object] | None:
        """This block for the one-call C++ step (kernels.fused_decoder): grouped-query attention (with QK norm or
        not) and the feed-forward's parts; None for latent attention, which has its own step."""
        ffn = self.fused_feed_forward()
        if type(self.attn) is not Attention or ffn is None:
            return None
        return dict(attn_norm=self.attn_norm, ffn_norm=self.ffn_norm, qkv=self.attn.qkv, o=self.attn.o,
                    q_norm=self.attn.q_norm, k_norm=self.attn.k_norm, attn_post_norm=self.attn_post_norm,
                    ffn_post_norm=self.ffn_post_norm, **ffn)

    def fused_feed_forward(self) -> dict[str, object] | None:
        """The feed-forward's parts for the one-call step: a SwiGLU's gate_up and down."""
        return dict(gate_up=self.ffn.gate_up, down=self.ffn.down) if type(self.ffn) is SwiGLU else None

    def forward(self, x: torch.Tensor, cs: torch.Tensor, layer: int, cache: KVCache, step: Step) -> torch.Tensor:
        h = self.attn(rms_norm(x, self.attn_norm, self.eps), cs, layer, cache, step)
        x = x + (h if self.attn_post_norm is None else rms_norm(h, self.attn_post_norm, self.eps))
        h = self.ffn(rms_norm(x, self.ffn_norm, self.eps))
        return x + (h if self.ffn_post_norm is None else rms_norm(h, self.ffn_post_norm, self.eps))


def glm4_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shared decoder's tensors plus the post norms and QK norms this config has."""
    shapes = decoder_shapes(cfg)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if cfg.post_norms:
            shapes.update({p + "attn_post_norm": (cfg.hidden_size,), p + "ffn_post_norm": (cfg.hidden_size,)})
        if cfg.qk_norm:
            shapes.update({p + "q_norm": (cfg.head_dim,), p + "k_norm": (cfg.head_dim,)})
    return shapes


class Glm4Decoder(Decoder):
    block_class = Glm4Block

    @staticmethod
    def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return glm4_shapes(cfg)


DECODER = Glm4Decoder
