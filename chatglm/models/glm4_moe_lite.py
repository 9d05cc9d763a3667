"""GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`, model_type `glm4_moe_lite`): latent attention + GLM-4.5's experts.

Latent attention (DeepSeek-V2's MLA): each token's keys and values are made from a compressed latent
(kv_lora_rank values, RMSNormed) through kv_b_proj, plus one rotary key of qk_rope_head_dim values
shared by all heads. The cache holds only that latent and rotary key per token, not expanded keys and
values: kv_b_proj's key half is folded into the queries (q_nope @ W_uk lands in latent space) and its
value half is applied after attention, so every head attends over the same cached rows, as one
multi-query head of kv_lora_rank + qk_rope_head_dim dims whose values are the latent.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LatentSpec, ModelConfig, as_ids, need
from ..errors import ModelFileError
from ..kernels import latent_moe_decoder, make_linear
from ..kv_cache import BLOCK_SIZE, NULL, BlockPool, KVCache, KVType, KVTypeError, format_size, kv_type_name
from ..quant import QTensor, QType
from . import glm4_moe
from .glm4 import gguf_config, gguf_key, gguf_layers, glm4_shapes, norm_weight
from .glm4_moe import MOE_NAMES, Glm4MoeDecoder, MoEBlock, moe_shapes, moe_spec, rope_parameters
from .layers import Step, Weight, _float, apply_rope_, rms_norm
from .moe_gguf import SIGMOID, check_gating, moe_from_gguf, moe_metadata, unstack_experts

ARCH = "glm4_moe_lite"
GGUF_ARCHS = ("deepseek2",)

_L = "model.layers.(\\d+)."
HF_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
    _L + "input_layernorm.weight": "layers.{}.attn_norm",
    _L + "self_attn.q_proj.weight": "layers.{}.q",
    _L + "self_attn.q_a_proj.weight": "layers.{}.q_a",
    _L + "self_attn.q_a_proj.bias": "layers.{}.q_a_bias",
    _L + "self_attn.q_a_layernorm.weight": "layers.{}.q_a_norm",
    _L + "self_attn.q_b_proj.weight": "layers.{}.q_b",
    _L + "self_attn.kv_a_proj_with_mqa.weight": "layers.{}.kv_a",
    _L + "self_attn.kv_a_proj_with_mqa.bias": "layers.{}.kv_a_bias",
    _L + "self_attn.kv_a_layernorm.weight": "layers.{}.kv_a_norm",
    _L + "self_attn.kv_b_proj.weight": "layers.{}.kv_b",
    _L + "self_attn.o_proj.weight": "layers.{}.o",
    _L + "self_attn.o_proj.bias": "layers.{}.o_bias",
    _L + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    **MOE_NAMES,
}
_B = "blk.(\\d+)."
GGUF_NAMES = {  # llama.cpp's deepseek2, which its converter writes GLM-4.7-Flash as
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
    _B + "attn_norm.weight": "layers.{}.attn_norm",
    _B + "attn_q.weight": "layers.{}.q",
    _B + "attn_q_a.weight": "layers.{}.q_a",
    _B + "attn_q_a_norm.weight": "layers.{}.q_a_norm",
    _B + "attn_q_b.weight": "layers.{}.q_b",
    _B + "attn_kv_a_mqa.weight": "layers.{}.kv_a",
    _B + "attn_kv_a_norm.weight": "layers.{}.kv_a_norm",
    _B + "attn_k_b.weight": "layers.{}.k_b",  # kv_b's key half per head, transposed: [heads, rank, nope]
    _B + "attn_v_b.weight": "layers.{}.v_b",  # its value half: [heads, value, rank]
    _B + "attn_output.weight": "layers.{}.o",
    _B + "ffn_norm.weight": "layers.{}.ffn_norm",
    **{k: v for k, v in glm4_moe.GGUF_NAMES.items() if "ffn_" in k or "exp_probs" in k},
}


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "glm4_moe_lite"


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    rope = rope_parameters(cfg, source)
    heads = need(cfg, source, "num_attention_heads")
    nope, rope_dim = need(cfg, source, "qk_nope_head_dim"), need(cfg, source, "qk_rope_head_dim")
    layers = need(cfg, source, "num_hidden_layers")
    kinds = cfg.get("mlp_layer_types") or ["dense"] * need(cfg, source, "first_k_dense_replace", default=1)
    kinds = list(kinds) + ["sparse"] * (layers - len(kinds))
    biased = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        arch=ARCH,
        family="llama",
        vocab_size=need(cfg, source, "vocab_size"),
        hidden_size=need(cfg, source, "hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope_dim,
        ffn_size=need(cfg, source, "intermediate_size"),
        norm_eps=need(cfg, source, "rms_norm_eps", default=1e-5),
        rope_theta=float(rope["rope_theta"]),
        rope_dim=rope_dim,
        rope_interleaved=bool(cfg.get("rope_interleave", True)),
        o_bias=biased,
        max_position=need(cfg, source, "max_position_embeddings", default=202752),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=as_ids(cfg.get("eos_token_id")),
        moe=moe_spec(cfg, source, tuple(i for i, kind in enumerate(kinds[:layers]) if kind == "dense")),
        latent=LatentSpec(kv_rank=need(cfg, source, "kv_lora_rank"), q_rank=cfg.get("q_lora_rank") or 0,
                          nope_dim=nope, value_dim=need(cfg, source, "v_head_dim"),
                          scale=(nope + rope_dim) ** -0.5),
    )


SOFTMAX = 1
FLASH_LAYERS, FLASH_VOCAB = (47, 48), 154880  # GLM-4.7-Flash's blocks (without and with its MTP layer), vocabulary


def unsaid_gating(meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """What llama.cpp's deepseek2 routes by when a file has no expert_gating_func (its converter writes none for
    GLM-4.7-Flash, whose config.json names no scoring_func): sigmoid where the shapes are GLM-4.7-Flash's, as
    llama.cpp tells them apart, else softmax (DeepSeek-V2's)."""
    blocks = meta.get(f"{meta['general.architecture']}.block_count")
    vocab = shapes.get("token_embd.weight", (0,))[0]
    return int(SIGMOID) if blocks in FLASH_LAYERS and vocab == FLASH_VOCAB else SOFTMAX


def config_from_gguf(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """llama.cpp's deepseek2 metadata (GLM-4.7-Flash): key_length_mla / value_length_mla are the heads' own sizes,
    key_length and value_length the latent's."""
    check_gating(meta, source, unsaid_gating(meta, shapes))
    key = gguf_key(meta, source)
    scaling = meta.get(f"{meta['general.architecture']}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelFileError(source, f"rope scaling {scaling!r} is not supported; expected none")
    heads, rope_dim = key("attention.head_count"), key("rope.dimension_count")
    head_dim = key("attention.key_length_mla")
    latent = LatentSpec(kv_rank=key("attention.kv_lora_rank"), q_rank=key("attention.q_lora_rank", default=0),
                        nope_dim=head_dim - rope_dim, value_dim=key("attention.value_length_mla"),
                        scale=head_dim ** -0.5)
    return gguf_config(meta, source, shapes, arch=ARCH, num_kv_heads=heads, head_dim=head_dim, rope_interleaved=True,
                       qkv_bias=False, max_position=key("context_length"), moe=moe_from_gguf(key, gguf_layers(key)),
                       latent=latent)


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """deepseek2's keys: latent attention is one key/value head of the latent's size, the MoE keys as GLM-4.5's."""
    spec = cfg.latent
    if cfg.o_bias or not cfg.rope_interleaved:
        raise ValueError("llama.cpp's deepseek2 has no attention biases and rotates interleaved pairs")
    keys = {k: v for k, v in moe_metadata(cfg).items() if k != "add_nextn_predict_layers"}
    keys.update({"add_head_count_kv": 1, "add_key_length": spec.kv_rank + cfg.rope_dim,
                 "add_value_length": spec.kv_rank,
                 "add_key_length_mla": cfg.head_dim, "add_value_length_mla": spec.value_dim,
                 "add_kv_lora_rank": spec.kv_rank, "add_expert_gating_func": SIGMOID})
    if spec.q_rank:
        keys["add_q_lora_rank"] = spec.q_rank
    return keys


def sanitize(weights: dict[str, Weight], cfg: ModelConfig, source: object) -> dict[str, Weight]:
    """GLM-4.5's expert stacks, and a GGUF file's attn_k_b / attn_v_b: block-quantized ones are kept as they are,
    so that each head's part is read from the file's blocks, as llama.cpp reads them; float ones are joined back
    into kv_b (folded into the queries and values anyway)."""
    weights = unstack_experts(weights, cfg, source)
    spec = cfg.latent
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        k_b, v_b = weights.pop(p + "k_b", None), weights.pop(p + "v_b", None)
        if k_b is None and v_b is None:
            continue
        if k_b is None or v_b is None:
            raise ModelFileError(source, f"layer {i} has only one of attn_k_b and attn_v_b")
        if isinstance(k_b, QTensor) and isinstance(v_b, QTensor):
            weights[p + "k_b"], weights[p + "v_b"] = k_b, v_b
            continue
        keys = _float(k_b, torch.float32, "cpu").reshape(cfg.num_heads, spec.kv_rank, spec.nope_dim).transpose(1, 2)
        values = _float(v_b, torch.float32, "cpu").reshape(cfg.num_heads, spec.value_dim, spec.kv_rank)
        weights[p + "kv_b"] = torch.cat([keys, values], dim=1).reshape(-1, spec.kv_rank)
    return weights


def per_head(w: QTensor, heads: int) -> list[QTensor]:
    """Each head's rows of a [heads * rows, cols] block tensor, as views of its bytes."""
    rows = w.shape[0] // heads
    return [QTensor(w.raw[h * rows : (h + 1) * rows], w.qtype, (rows, w.shape[1])) for h in range(heads)]


class LatentCache(KVCache):
    """Per token and layer, the normed latent then the rotated shared key, in the pool's blocks:
    [layer, 1, 1, block, row, kv_rank + rope_dim] (one entry of one head where others keep keys and values)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", blocks: int | None = None, block_size: int = BLOCK_SIZE):
        BlockPool.__init__(self, slots, max_tokens, blocks, block_size)
        width = cfg.latent.kv_rank + cfg.rope_dim
        self.kv = torch.empty((cfg.num_layers, 1, 1, self.blocks, block_size, width), dtype=dtype, device=device)
        self.by_row = [layer.permute(2, 3, 0, 1, 4) for layer in self.kv]
        self.tables = self.tables.to(device)
        self.storage = f"{format_size(self.kv.numel() * self.kv.itemsize)} {str(dtype).removeprefix('torch.')} in "
        self.fresh = [True] * self.blocks
        self.kv[:, :, :, NULL].zero_()

    @staticmethod
    def block_bytes(cfg: ModelConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
        return cfg.num_layers * block_size * (cfg.latent.kv_rank + cfg.rope_dim) * dtype.itemsize


class LatentAttention(nn.Module):
    """Queries (through a low-rank bottleneck when q_rank > 0), the latent and rotary key into the cache,
    attention in latent space, values and the output projection after it."""

    def __init__(self, cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.cfg, spec = cfg, cfg.latent
        if spec.q_rank:
            self.q_a = make_linear(w["q_a"], w.get("q_a_bias"), dtype, device)
            self.q_a_norm = norm_weight(w["q_a_norm"], dtype, device)
            self.q_b = make_linear(w["q_b"], None, dtype, device)
        else:
            self.q = make_linear(w["q"], None, dtype, device)
        self.kv_a = make_linear(w["kv_a"], w.get("kv_a_bias"), dtype, device)
        self.kv_a_norm = norm_weight(w["kv_a_norm"], dtype, device)
        if "k_b" in w:  # a file's attn_k_b [H * rank, nope] and attn_v_b [H * value, rank] blocks: a linear per head
            self.k_b = nn.ModuleList(make_linear(t, None, dtype, device) for t in per_head(w["k_b"], cfg.num_heads))
            self.v_b = nn.ModuleList(make_linear(t, None, dtype, device) for t in per_head(w["v_b"], cfg.num_heads))
        else:
            kv_b = _float(w["kv_b"], dtype, device).view(cfg.num_heads, spec.nope_dim + spec.value_dim, spec.kv_rank)
            self.register_buffer("k_up", kv_b[:, : spec.nope_dim].contiguous(), persistent=False)   # [H, nope, rank]
            self.register_buffer("v_up", kv_b[:, spec.nope_dim :].contiguous(), persistent=False)   # [H, value, rank]
        self.o = make_linear(w["o"], w.get("o_bias"), dtype, device)

    def absorbed(self, q_nope: torch.Tensor) -> torch.Tensor:
        """Each head's query [B, T, H, nope] in latent space: [B, T, H, rank]."""
        if hasattr(self, "k_b"):
            return torch.stack([k_b(q_nope[:, :, h]) for h, k_b in enumerate(self.k_b)], dim=2)
        return torch.einsum("bthn,hnr->bthr", q_nope, self.k_up)

    def values(self, att: torch.Tensor) -> torch.Tensor:
        """Each head's weighted latent [B, H, T, rank] as its values: [B, T, H, value]."""
        if hasattr(self, "v_b"):
            return torch.stack([v_b(att[:, h]) for h, v_b in enumerate(self.v_b)], dim=2)
        return torch.einsum("bhtr,hvr->bthv", att, self.v_up)

    def forward(self, x: torch.Tensor, cs: torch.Tensor, layer: int, cache: KVCache, step: Step) -> torch.Tensor:
        cfg, spec = self.cfg, self.cfg.latent
        B, T, _ = x.shape
        q = self.q_b(rms_norm(self.q_a(x), self.q_a_norm, spec.norm_eps)) if spec.q_rank else self.q(x)
        q = q.unflatten(-1, (cfg.num_heads, cfg.head_dim))
        apply_rope_(q[..., spec.nope_dim :], cs, cfg.rope_interleaved)
        kv = self.kv_a(x)
        entry = torch.cat([rms_norm(kv[..., : spec.kv_rank], self.kv_a_norm, spec.norm_eps), kv[..., spec.kv_rank :]], -1)
        apply_rope_(entry[:, :, None, spec.kv_rank :], cs, cfg.rope_interleaved)
        cache.by_row[layer].index_put_((step.blocks, step.offsets), entry[:, :, None, None].to(cache.kv.dtype))
        rows = cache.kv[layer][0, 0][step.table].flatten(1, 2)[:, None, : step.span].to(x.dtype)  # [B, 1, span, rank + rope]
        query = torch.cat([self.absorbed(q[..., : spec.nope_dim]), q[..., spec.nope_dim :]], -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(query, rows, rows[..., : spec.kv_rank], attn_mask=step.mask,
                                             scale=spec.scale, enable_gqa=True)  # [B, H, T, rank]
        return self.o(self.values(att).reshape(B, T, -1))


class LatentBlock(MoEBlock):
    attention_class = LatentAttention


def latent_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GLM-4.5's tensors with latent attention's in place of q, k, v and o."""
    spec, h, heads = cfg.latent, cfg.hidden_size, cfg.num_heads
    shapes = moe_shapes(cfg, glm4_shapes(cfg))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        del shapes[p + "qkv"], shapes[p + "qkv_bias"]
        if spec.q_rank:
            shapes.update({p + "q_a": (spec.q_rank, h), p + "q_a_bias": (spec.q_rank,), p + "q_a_norm": (spec.q_rank,),
                           p + "q_b": (heads * cfg.head_dim, spec.q_rank)})
        else:
            shapes[p + "q"] = (heads * cfg.head_dim, h)
        shapes.update({p + "kv_a": (spec.kv_rank + cfg.rope_dim, h), p + "kv_a_bias": (spec.kv_rank + cfg.rope_dim,),
                       p + "kv_a_norm": (spec.kv_rank,), p + "kv_b": (heads * (spec.nope_dim + spec.value_dim), spec.kv_rank),
                       p + "o": (h, heads * spec.value_dim)})
    return shapes


class Glm4MoeLiteDecoder(Glm4MoeDecoder):
    block_class = LatentBlock

    def __init__(self, cfg: ModelConfig, *args: Any, **kwargs: Any):
        super().__init__(cfg, *args, **kwargs)
        # one-token steps as one C++ call where every block's weights are ggml blocks (latent_moe_step.cpp)
        self.fused = latent_moe_decoder(self.layers, cfg) if self.device.type == "cpu" else None

    @staticmethod
    def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return latent_shapes(cfg)

    def shapes_of(self, cfg: ModelConfig, weights: Mapping[str, Weight]) -> dict[str, tuple[int, ...]]:
        """kv_b, or in a layer whose file's attn_k_b / attn_v_b blocks are kept (sanitize), those per head."""
        shapes, spec = latent_shapes(cfg), cfg.latent
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            if p + "k_b" in weights:
                del shapes[p + "kv_b"]
                shapes[p + "k_b"] = (cfg.num_heads * spec.kv_rank, spec.nope_dim)
                shapes[p + "v_b"] = (cfg.num_heads * spec.value_dim, spec.kv_rank)
        return shapes

    @staticmethod
    def required(cfg: ModelConfig) -> dict[str, bool]:
        """attention_bias gives q_a, kv_a and o a bias (held as cfg.o_bias)."""
        return {"q_a_bias": cfg.o_bias, "kv_a_bias": cfg.o_bias, "o_bias": cfg.o_bias, "head": not cfg.tie_embeddings}

    def new_cache(self, slots: int, max_len: int, memory: int | None = None, dtype: KVType | None = None,
                  block_size: int = BLOCK_SIZE) -> KVCache:
        """A latent cache: kv_rank + rope_dim values per token and layer, whatever the number of heads."""
        dtype = dtype or self.kv_dtype
        if isinstance(dtype, QType):
            raise KVTypeError(f"--kv-type {kv_type_name(dtype)} is not supported for GLM-4.7-Flash ({ARCH}): its "
                              f"latent cache is stored as a float type; use f16, bf16 or f32")
        blocks = None if memory is None else memory // LatentCache.block_bytes(self.config, dtype, block_size)
        return LatentCache(self.config, slots, max_len, dtype, self.device, blocks, block_size)


DECODER = Glm4MoeLiteDecoder
