"""The LLaMA family: SmolLM2 and any llama GGUF, InternLM (qkv and o biases), Baichuan-7B and
Baichuan2-7B (fused `W_pack`; Baichuan2 normalises its head rows, "NormHead").

Hugging Face checkpoints rotate the two halves of each head; llama.cpp's converter permutes q and
k rows so that rotating interleaved pairs gives the same result, so GGUF files rotate pairs.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..config import ModelConfig, as_ids, need
from ..errors import ModelFileError
from .layers import Decoder, KVCache

ARCH = "llama"
GGUF_ARCHS = ("llama", "baichuan", "internlm2")  # llama.cpp writes these with llama's tensor names
HF_MODEL_TYPES = ("llama", "baichuan", "internlm", "mistral")
BAICHUAN2_VOCAB = 125696  # Baichuan2's vocabulary; only Baichuan2 uses the NormHead

_L = "model.layers.(\\d+)."
HF_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
    _L + "input_layernorm.weight": "layers.{}.attn_norm",
    _L + "self_attn.W_pack.weight": "layers.{}.qkv",
    _L + "self_attn.q_proj.weight": "layers.{}.qkv#0",
    _L + "self_attn.k_proj.weight": "layers.{}.qkv#1",
    _L + "self_attn.v_proj.weight": "layers.{}.qkv#2",
    _L + "self_attn.q_proj.bias": "layers.{}.qkv_bias#0",
    _L + "self_attn.k_proj.bias": "layers.{}.qkv_bias#1",
    _L + "self_attn.v_proj.bias": "layers.{}.qkv_bias#2",
    _L + "self_attn.o_proj.weight": "layers.{}.o",
    _L + "self_attn.o_proj.bias": "layers.{}.o_bias",
    _L + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    _L + "mlp.gate_proj.weight": "layers.{}.gate_up#0",
    _L + "mlp.up_proj.weight": "layers.{}.gate_up#1",
    _L + "mlp.down_proj.weight": "layers.{}.down",
}

_B = "blk.(\\d+)."
GGUF_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
    "rope_freqs.weight": "rope_factors",
    _B + "attn_norm.weight": "layers.{}.attn_norm",
    _B + "attn_q.weight": "layers.{}.qkv#0",
    _B + "attn_k.weight": "layers.{}.qkv#1",
    _B + "attn_v.weight": "layers.{}.qkv#2",
    _B + "attn_q.bias": "layers.{}.qkv_bias#0",
    _B + "attn_k.bias": "layers.{}.qkv_bias#1",
    _B + "attn_v.bias": "layers.{}.qkv_bias#2",
    _B + "attn_output.weight": "layers.{}.o",
    _B + "attn_output.bias": "layers.{}.o_bias",
    _B + "ffn_norm.weight": "layers.{}.ffn_norm",
    _B + "ffn_gate.weight": "layers.{}.gate_up#0",
    _B + "ffn_up.weight": "layers.{}.gate_up#1",
    _B + "ffn_down.weight": "layers.{}.down",
}


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") in HF_MODEL_TYPES


def hf_transforms(cfg: ModelConfig) -> dict[str, Any]:
    """Baichuan2's NormHead: the official code divides each head row by its L2 norm."""
    if cfg.extra.get("norm_head"):
        return {"head": lambda w: torch.nn.functional.normalize(w.float(), dim=-1).to(w.dtype)}
    return {}


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    kind = cfg["model_type"]
    heads = need(cfg, source, "num_attention_heads")
    hidden = need(cfg, source, "hidden_size")
    if cfg.get("mlp_bias"):
        raise ModelFileError(source, "config mlp_bias=true is not supported")
    rope = cfg.get("rope_parameters") or {}
    if (rope.get("rope_type") or (cfg.get("rope_scaling") or {}).get("type") or "default") not in ("default",):
        raise ModelFileError(source, f"rope scaling {rope or cfg.get('rope_scaling')} is not supported yet")
    vocab = need(cfg, source, "vocab_size")
    biased = bool(cfg.get("bias", cfg.get("attention_bias", False)))
    return ModelConfig(
        arch=ARCH,
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=need(cfg, source, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=need(cfg, source, "num_key_value_heads", default=heads),
        head_dim=need(cfg, source, "head_dim", default=hidden // heads),
        ffn_size=need(cfg, source, "intermediate_size"),
        norm_eps=need(cfg, source, "rms_norm_eps", default=1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_interleaved=False,
        qkv_bias=biased,
        o_bias=kind == "internlm" and biased,
        max_position=need(cfg, source, "max_position_embeddings", "model_max_length", default=4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=as_ids(cfg.get("eos_token_id")),
        # Baichuan-13B and Baichuan2-13B have no rotary: ALiBi, told apart by their missing max_position_embeddings
        extra={"norm_head": kind == "baichuan" and vocab == BAICHUAN2_VOCAB,
               "alibi": kind == "baichuan" and "max_position_embeddings" not in cfg},
    )


def config_from_gguf(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    arch = meta["general.architecture"]

    def key(name: str, **default: Any) -> Any:
        return need(meta, source, f"{arch}.{name}", **default)

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", default=hidden // heads)
    layers = key("block_count")
    return ModelConfig(
        arch=ARCH,
        family="gguf",
        vocab_size=shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else 0,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", default=heads),
        head_dim=head_dim,
        ffn_size=key("feed_forward_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon", default=1e-5),
        rope_theta=float(key("rope.freq_base", default=10000.0)),
        rope_dim=key("rope.dimension_count", default=head_dim),
        rope_interleaved=True,
        qkv_bias="blk.0.attn_q.bias" in shapes,
        o_bias="blk.0.attn_output.bias" in shapes,
        max_position=key("context_length", default=4096),
        tie_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=as_ids(meta.get("tokenizer.ggml.eos_token_id")),
        # llama.cpp takes a 40-layer Baichuan for the 13B model, which uses ALiBi instead of rotary
        extra={"alibi": arch == "baichuan" and layers == 40},
    )


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head slopes 2^(-8(h+1)/n); for n not a power of two, the power-of-two set below n plus
    every other slope of the set for twice that power (the ALiBi paper's rule, as Baichuan-13B uses)."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    base = 1 << (heads.bit_length() - 1)
    slopes = power_of_two(base) + power_of_two(2 * base)[0::2][: heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


class LlamaDecoder(Decoder):
    """The shared decoder; for Baichuan-13B, ALiBi biases instead of rotary."""

    def __init__(self, cfg: ModelConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.slopes = alibi_slopes(cfg.num_heads).to(self.device) if cfg.extra.get("alibi") else None

    def attention_inputs(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, slots: torch.Tensor):
        if self.slopes is None:
            return super().attention_inputs(ids, pos, cache, slots)
        mask = self.causal_mask(pos)  # [B,1,T,span]
        keys = torch.arange(mask.shape[-1], device=pos.device, dtype=torch.float32)
        bias = self.slopes[None, :, None, None] * keys  # a per-row constant shift of j-i: softmax ignores it
        bias = bias.masked_fill(~mask, float("-inf")).to(self.dtype)
        return None, pos + self.prefix_len, bias


DECODER = LlamaDecoder
