"""GLM-4.5, GLM-4.5-Air and GLM-4.6 (`Glm4MoeForCausalLM`, model_type `glm4_moe`): mixture of experts.

Attention is grouped-query with an optional qkv bias, an RMSNorm over each query and key head
(`use_qk_norm`) and rotary on the first half of each head, rotating its two halves (not pairs). The
first `first_k_dense_replace` layers keep a SwiGLU; the others route each token to
`num_experts_per_tok` of `n_routed_experts` SwiGLU experts: sigmoid scores, plus a correction bias
for choosing only, best `topk_group` of `n_group` groups (a group scores its two best), weights
normalised and scaled by `routed_scaling_factor`; a shared expert adds to every token.

Each expert is its own linear pair over its own tensors (in a memory-mapped file, its blocks in
place), so a token reads only the experts it was routed to, and a batch runs each chosen expert
once over all the tokens routed to it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoESpec, as_ids, need
from ..errors import ModelFileError
from .glm4 import (GGUF_ATTENTION, HF_ATTENTION, Glm4Block, Glm4Decoder, SwiGLU, gguf_config, gguf_key, gguf_layers,
                   glm4_shapes)
from .layers import Weight, _float
from .moe_gguf import SIGMOID, check_gating, moe_from_gguf, moe_metadata, unstack_experts

ARCH = "glm4_moe"
GGUF_ARCHS = ("glm4moe",)

_L = "model.layers.(\\d+)."
# the feed-forward names GLM-4.5 and GLM-4.7-Flash share
MOE_NAMES = {
    _L + "mlp.gate_proj.weight": "layers.{}.gate_up#0",
    _L + "mlp.up_proj.weight": "layers.{}.gate_up#1",
    _L + "mlp.down_proj.weight": "layers.{}.down",
    _L + "mlp.gate.weight": "layers.{}.router",
    _L + "mlp.gate.e_score_correction_bias": "layers.{}.router_bias",
    _L + "mlp.experts.(\\d+).gate_proj.weight": "layers.{}.experts.{}.gate_up#0",
    _L + "mlp.experts.(\\d+).up_proj.weight": "layers.{}.experts.{}.gate_up#1",
    _L + "mlp.experts.(\\d+).down_proj.weight": "layers.{}.experts.{}.down",
    _L + "mlp.shared_experts.gate_proj.weight": "layers.{}.shared_gate_up#0",
    _L + "mlp.shared_experts.up_proj.weight": "layers.{}.shared_gate_up#1",
    _L + "mlp.shared_experts.down_proj.weight": "layers.{}.shared_down",
}
HF_NAMES = {
    **HF_ATTENTION,
    _L + "self_attn.q_norm.weight": "layers.{}.q_norm",
    _L + "self_attn.k_norm.weight": "layers.{}.k_norm",
    _L + "post_attention_layernorm.weight": "layers.{}.ffn_norm",
    **MOE_NAMES,
}
_B = "blk.(\\d+)."
GGUF_NAMES = {  # llama.cpp's glm4moe
    **GGUF_ATTENTION,
    _B + "attn_q_norm.weight": "layers.{}.q_norm",
    _B + "attn_k_norm.weight": "layers.{}.k_norm",
    _B + "post_attention_norm.weight": "layers.{}.ffn_norm",
    _B + "ffn_gate.weight": "layers.{}.gate_up#0",
    _B + "ffn_up.weight": "layers.{}.gate_up#1",
    _B + "ffn_down.weight": "layers.{}.down",
    _B + "ffn_gate_inp.weight": "layers.{}.router",
    _B + "exp_probs_b.bias": "layers.{}.router_bias",
    _B + "ffn_gate_exps.weight": "layers.{}.experts_gate",
    _B + "ffn_up_exps.weight": "layers.{}.experts_up",
    _B + "ffn_down_exps.weight": "layers.{}.experts_down",
    _B + "ffn_gate_shexp.weight": "layers.{}.shared_gate_up#0",
    _B + "ffn_up_shexp.weight": "layers.{}.shared_gate_up#1",
    _B + "ffn_down_shexp.weight": "layers.{}.shared_down",
}
sanitize = unstack_experts      # a GGUF file's expert stacks as each expert's tensors
gguf_metadata = moe_metadata    # the MoE keys llama.cpp's glm4moe reads
GGUF_ROPE_HALVES = True  # llama.cpp's glm4moe rotates each head's halves, as transformers does: no q/k reordering


def accepts_hf(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "glm4_moe"


def rope_parameters(cfg: Mapping[str, Any], source: object) -> dict[str, Any]:
    """rope_parameters (transformers 5) or the older top-level keys; scaled rotary is refused by name."""
    rope = dict(cfg.get("rope_parameters") or {})
    kind = rope.get("rope_type") or (cfg.get("rope_scaling") or {}).get("type") or "default"
    if kind != "default":
        raise ModelFileError(source, f"config rope_parameters.rope_type {kind!r} is not supported; expected 'default'")
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return rope


def moe_spec(cfg: Mapping[str, Any], source: object, dense_layers: tuple[int, ...]) -> MoESpec:
    """The experts' settings from a config.json, checked so that routing cannot fail later."""
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ModelFileError(source, f"config scoring_func={cfg['scoring_func']!r} is not supported; GLM's experts "
                                     "route by sigmoid scores")
    ffn = need(cfg, source, "moe_intermediate_size")
    spec = MoESpec(
        experts=need(cfg, source, "n_routed_experts", "num_local_experts"),
        experts_per_token=need(cfg, source, "num_experts_per_tok"),
        expert_ffn_size=ffn,
        shared_ffn_size=ffn * need(cfg, source, "n_shared_experts", default=0),
        groups=need(cfg, source, "n_group", default=1),
        groups_per_token=need(cfg, source, "topk_group", default=1),
        scaling=float(need(cfg, source, "routed_scaling_factor", default=1.0)),
        normalize=bool(cfg.get("norm_topk_prob", True)),
        dense_layers=dense_layers,
    )
    per_group = spec.experts // spec.groups if spec.groups > 0 else 0
    if spec.groups <= 0 or spec.experts % spec.groups or (spec.groups > 1 and per_group < 2):
        raise ModelFileError(source, f"config n_group={spec.groups} must divide n_routed_experts={spec.experts} "
                                     "into groups of at least 2")
    if not 0 < spec.groups_per_token <= spec.groups:
        raise ModelFileError(source, f"config topk_group={spec.groups_per_token} must be in 1..n_group={spec.groups}")
    if not 0 < spec.experts_per_token <= spec.groups_per_token * per_group:
        raise ModelFileError(source, f"config num_experts_per_tok={spec.experts_per_token} must be in 1.."
                                     f"{spec.groups_per_token * per_group} (the experts of topk_group groups)")
    return spec


def config_from_hf(cfg: Mapping[str, Any], source: object) -> ModelConfig:
    rope = rope_parameters(cfg, source)
    heads = need(cfg, source, "num_attention_heads")
    hidden = need(cfg, source, "hidden_size")
    head_dim = need(cfg, source, "head_dim", default=hidden // heads)
    layers = need(cfg, source, "num_hidden_layers")
    return ModelConfig(
        arch=ARCH,
        family="llama",
        vocab_size=need(cfg, source, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=need(cfg, source, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        ffn_size=need(cfg, source, "intermediate_size"),
        norm_eps=need(cfg, source, "rms_norm_eps", default=1e-5),
        rope_theta=float(rope["rope_theta"]),
        rope_dim=int(head_dim * rope["partial_rotary_factor"]),
        rope_interleaved=False,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=bool(cfg.get("use_qk_norm", False)),
        max_position=need(cfg, source, "max_position_embeddings", default=131072),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=as_ids(cfg.get("eos_token_id")),
        moe=moe_spec(cfg, source, tuple(range(min(layers, need(cfg, source, "first_k_dense_replace", default=1))))),
    )


def config_from_gguf(meta: Mapping[str, Any], source: object, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """llama.cpp's glm4moe metadata (rotating each head's halves)."""
    check_gating(meta, source, SIGMOID)
    key = gguf_key(meta, source)
    return gguf_config(meta, source, shapes, arch=ARCH, rope_interleaved=False, max_position=key("context_length"),
                       qk_norm="blk.0.attn_q_norm.weight" in shapes, moe=moe_from_gguf(key, gguf_layers(key)))


class Router(nn.Module):
    """Which experts each token goes to, and with what weight (float32, as the reference computes it)."""

    def __init__(self, spec: MoESpec, weight: Weight, bias: Weight, device: torch.device | str):
        super().__init__()
        self.spec = spec
        self.register_buffer("weight", _float(weight, torch.float32, device), persistent=False)
        self.register_buffer("bias", _float(bias, torch.float32, device), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> weights [N, k] float32 and expert ids [N, k]."""
        spec = self.spec
        scores = F.linear(x.float(), self.weight).sigmoid()
        choice = scores + self.bias
        if spec.groups > 1:
            grouped = choice.view(len(x), spec.groups, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(spec.groups_per_token, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(len(x), -1)
        ids = choice.topk(spec.experts_per_token, dim=-1).indices
        weights = scores.gather(1, ids)
        if spec.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * spec.scaling, ids


class MoE(nn.Module):
    """Routed experts plus the shared expert."""

    def __init__(self, spec: MoESpec, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.router = Router(spec, w["router"], w["router_bias"], device)
        self.experts = nn.ModuleList(SwiGLU(w[f"experts.{e}.gate_up"], w[f"experts.{e}.down"], dtype, device)
                                     for e in range(spec.experts))
        self.shared = SwiGLU(w["shared_gate_up"], w["shared_down"], dtype, device) if spec.shared_ffn_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.router(flat)
        # group the (token, choice) pairs by expert: each chosen expert runs once over its tokens
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        tokens = order // ids.shape[1]
        scale = weights.flatten()[order]
        out = torch.zeros_like(flat)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                rows = tokens[start : start + n]
                out.index_add_(0, rows, (expert(flat[rows]) * scale[start : start + n, None]).to(out.dtype))
                start += n
        out = out.view_as(x)
        return out if self.shared is None else out + self.shared(x)


class MoEBlock(Glm4Block):
    """GLM-4's block with experts in the layers that have a router."""

    @staticmethod
    def feed_forward(cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype,
                     device: torch.device | str) -> nn.Module:
        if "router" in w:
            return MoE(cfg.moe, w, dtype, device)
        return SwiGLU(w["gate_up"], w["down"], dtype, device)

    def fused_feed_forward(self) -> dict[str, object] | None:
        """The one-call step's SwiGLU is the shared expert, the router and routed experts added to it; a layer
        without a shared expert keeps the torch step."""
        if not isinstance(self.ffn, MoE):
            return super().fused_feed_forward()
        shared = self.ffn.shared
        if shared is None:
            return None
        return dict(gate_up=shared.gate_up, down=shared.down, router=self.ffn.router, experts=list(self.ffn.experts))


def moe_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Replace the SwiGLU tensors of the expert layers with the router's and the experts'."""
    spec, h = cfg.moe, cfg.hidden_size
    for i in range(cfg.num_layers):
        if i in spec.dense_layers:
            continue
        p = f"layers.{i}."
        del shapes[p + "gate_up"], shapes[p + "down"]
        shapes.update({p + "router": (spec.experts, h), p + "router_bias": (spec.experts,)})
        for e in range(spec.experts):
            shapes.update({f"{p}experts.{e}.gate_up": (2 * spec.expert_ffn_size, h),
                           f"{p}experts.{e}.down": (h, spec.expert_ffn_size)})
        if spec.shared_ffn_size:
            shapes.update({p + "shared_gate_up": (2 * spec.shared_ffn_size, h),
                           p + "shared_down": (h, spec.shared_ffn_size)})
    return shapes


class Glm4MoeDecoder(Glm4Decoder):
    block_class = MoEBlock

    @staticmethod
    def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return moe_shapes(cfg, glm4_shapes(cfg))


DECODER = Glm4MoeDecoder
