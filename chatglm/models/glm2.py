"""ChatGLM2-6B, ChatGLM3-6B (base, 32k), CodeGeeX2 and GLM-4-9B: one architecture.

Multi-query/grouped attention with a qkv bias, rotary on the first half of each head in
interleaved pairs (base 10000 x rope_ratio), SwiGLU whose gate is the first half of
dense_h_to_4h, RMSNorm. Read from THUDM folders (`ChatGLMModel`), transformers' `GlmForCausalLM`
folders and llama.cpp's `chatglm` GGUF files.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config import ModelConfig, as_ids, need
from ..errors import ModelFileError

ARCH = "chatglm2"
GGUF_ARCHS = ("chatglm",)

_THUDM = "transformer.encoder.layers.(\\d+)."
_GLM = "model.layers.(\\d+)."
HF_NAMES = {
    # THUDM's modeling_chatglm.py
    "transformer.embedding.word_embeddings.weight": "embed",
    "transformer.encoder.final_layernorm.weight": "norm",
    "transformer.output_layer.weight": "head",
    "transformer.prefix_encoder.embedding.weight": "prefix_embedding",  # P-Tuning v2
    "transformer.prefix_encoder.trans.(\\d+).(weight|bias)": "prefix_mlp.{}.{}",
    _THUDM + "input_layernorm.weight": "layers.{}.attn_norm",
    _THUDM + "self_attention.query_key_value.weight": "layers.{}.qkv",
    _THUDM + "self_attention.query_key_value.bias": "layers.{}.qkv_bias",
    _THUDM + "self_attention.dense.weight": "layers.{}.o",
    _THUDM + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    _THUDM + "mlp.dense_h_to_4h.weight": "layers.{}.gate_up",
    _THUDM + "mlp.dense_4h_to_h.weight": "layers.{}.down",
    # transformers' GlmForCausalLM
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
    _GLM + "input_layernorm.weight": "layers.{}.attn_norm",
    _GLM + "self_attn.q_proj.weight": "layers.{}.qkv#0",
    _GLM + "self_attn.k_proj.weight": "layers.{}.qkv#1",
    _GLM + "self_attn.v_proj.weight": "layers.{}.qkv#2",
    _GLM + "self_attn.q_proj.bias": "layers.{}.qkv_bias#0",
    _GLM + "self_attn.k_proj.bias": "layers.{}.qkv_bias#1",
    _GLM + "self_attn.v_proj.bias": "layers.{}.qkv_bias#2",
    _GLM + "self_attn.o_proj.weight": "layers.{}.o",
    _GLM + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    _GLM + "mlp.gate_up_proj.weight": "layers.{}.gate_up",
    _GLM + "mlp.down_proj.weight": "layers.{}.down",
}

_BLK = "blk.(\\d+)."
GGUF_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
    _BLK + "attn_norm.weight": "layers.{}.attn_norm",
    _BLK + "attn_qkv.weight": "layers.{}.qkv",
    _BLK + "attn_qkv.bias": "layers.{}.qkv_bias",
    _BLK + "attn_q.weight": "layers.{}.qkv#0",
    _BLK + "attn_k.weight": "layers.{}.qkv#1",
    _BLK + "attn_v.weight": "layers.{}.qkv#2",
    _BLK + "attn_q.bias": "layers.{}.qkv_bias#0",
    _BLK + "attn_k.bias": "layers.{}.qkv_bias#1",
    _BLK + "attn_v.bias": "layers.{}.qkv_bias#2",
    _BLK + "attn_output.weight": "layers.{}.o",
    _BLK + "ffn_norm.weight": "layers.{}.ffn_norm",
    _BLK + "ffn_up.weight": "layers.{}.gate_up",
    _BLK + "ffn_down.weight": "layers.{}.down",
}


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    if cfg.get("model_type") == "glm":
        return True
    return cfg.get("model_type") == "chatglm" and not cfg.get("position_encoding_2d", False)


def family_of(cfg: Mapping[str, Any]) -> str:
    """Which tokenizer and chat format a checkpoint speaks; its config says so only indirectly."""
    name = str(cfg.get("_name_or_path", "")).lower()
    vocab = cfg.get("padded_vocab_size") or cfg.get("vocab_size") or 0
    if cfg.get("model_type") == "glm" or vocab >= 150000 or "glm-4" in name or "glm4" in name:
        return "glm4"
    if "codegeex" in name:
        return "codegeex2"
    if "chatglm2" in name:
        return "chatglm2"
    return "chatglm3"


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    if cfg.get("model_type") == "glm":
        return config_from_transformers(cfg, source)
    for flag, wanted in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                         ("add_bias_linear", False), ("post_layer_norm", True)):
        if cfg.get(flag, wanted) != wanted:
            raise ModelFileError(source, f"config {flag}={cfg[flag]!r} is not supported (ChatGLM2-6B and later use {wanted})")
    heads = need(cfg, source, "num_attention_heads")
    hidden = need(cfg, source, "hidden_size")
    head_dim = need(cfg, source, "kv_channels", default=hidden // heads)
    kv_heads = need(cfg, source, "multi_query_group_num") if cfg.get("multi_query_attention") else heads
    return ModelConfig(
        arch=ARCH,
        family=family_of(cfg),
        vocab_size=need(cfg, source, "padded_vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=need(cfg, source, "num_layers", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=need(cfg, source, "ffn_hidden_size"),
        norm_eps=need(cfg, source, "layernorm_epsilon", default=1e-5),
        rope_theta=10000.0 * need(cfg, source, "rope_ratio", default=1),
        rope_dim=head_dim // 2,
        rope_interleaved=True,
        qkv_bias=bool(cfg.get("add_qkv_bias", True)),
        max_position=need(cfg, source, "seq_length", default=8192),
        bos_token_id=None,
        eos_token_ids=as_ids(cfg.get("eos_token_id")),
    )


def config_from_transformers(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    """transformers' GlmConfig (also the base of Glm4Config: GLM-4-0414)."""
    rope = cfg.get("rope_parameters") or {}
    heads = need(cfg, source, "num_attention_heads")
    hidden = need(cfg, source, "hidden_size")
    head_dim = need(cfg, source, "head_dim", default=hidden // heads)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    return ModelConfig(
        arch=ARCH,
        family="glm4",
        vocab_size=need(cfg, source, "vocab_size"),
        hidden_size=hidden,
        num_layers=need(cfg, source, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=need(cfg, source, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        ffn_size=need(cfg, source, "intermediate_size"),
        norm_eps=need(cfg, source, "rms_norm_eps", default=1e-5),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_dim=int(head_dim * partial),
        rope_interleaved=True,
        qkv_bias=bool(cfg.get("attention_bias", True)),
        max_position=need(cfg, source, "max_position_embeddings", default=8192),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=as_ids(cfg.get("eos_token_id")),
    )


def config_from_gguf(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """llama.cpp's chatglm metadata (ChatGLM2/3 and GLM-4 alike)."""
    hidden = need(meta, source, "chatglm.embedding_length")
    heads = need(meta, source, "chatglm.attention.head_count")
    head_dim = hidden // heads
    return ModelConfig(
        arch=ARCH,
        family="gguf",
        vocab_size=shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else 0,
        hidden_size=hidden,
        num_layers=need(meta, source, "chatglm.block_count"),
        num_heads=heads,
        num_kv_heads=need(meta, source, "chatglm.attention.head_count_kv", default=heads),
        head_dim=head_dim,
        ffn_size=need(meta, source, "chatglm.feed_forward_length"),
        norm_eps=need(meta, source, "chatglm.attention.layer_norm_rms_epsilon", default=1e-5),
        rope_theta=float(need(meta, source, "chatglm.rope.freq_base", default=10000.0)),
        rope_dim=need(meta, source, "chatglm.rope.dimension_count", default=head_dim // 2),
        rope_interleaved=True,
        qkv_bias=True,
        max_position=need(meta, source, "chatglm.context_length", default=8192),
        tie_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=as_ids(meta.get("tokenizer.ggml.eos_token_id")),
    )
