"""llama.cpp's layout of GLM's mixture of experts (its glm4moe and deepseek2 architectures): the routing
metadata, and each layer's experts as 3-D stacks [experts, rows, cols] per matrix, gate and up apart.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from gguf import ExpertGatingFuncType

from ..config import ModelConfig, MoESpec
from ..errors import ModelFileError
from ..quant import QTensor
from .layers import Weight

SIGMOID = ExpertGatingFuncType.SIGMOID  # llama.cpp's expert_gating_func for sigmoid scores (2)


def check_gating(meta: Mapping[str, Any], source: object, default: int) -> None:
    """Refuse a file whose experts are not routed by sigmoid scores (llama.cpp's `default` when the key is absent)."""
    found = meta.get(f"{meta['general.architecture']}.expert_gating_func", default)
    if found != SIGMOID:
        raise ModelFileError(source, f"metadata {meta['general.architecture']}.expert_gating_func is {found} "
                                     f"(or absent, meaning {default}); GLM's experts route by sigmoid scores "
                                     f"({int(SIGMOID)})")


def moe_from_gguf(key: Callable[..., Any], layers: int) -> MoESpec:
    """The experts' settings from llama.cpp's metadata (glm4moe and deepseek2 share the keys)."""
    ffn = key("expert_feed_forward_length")
    return MoESpec(experts=key("expert_count"), experts_per_token=key("expert_used_count"), expert_ffn_size=ffn,
                   shared_ffn_size=ffn * key("expert_shared_count", default=0),
                   groups=key("expert_group_count", default=1),
                   groups_per_token=key("expert_group_used_count", default=1),
                   scaling=float(key("expert_weights_scale", default=1.0)),
                   normalize=bool(key("expert_weights_norm", default=False)),
                   dense_layers=tuple(range(min(layers, key("leading_dense_block_count", default=0)))))


def moe_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The MoE keys llama.cpp's glm4moe (and deepseek2) read (GGUFWriter method -> value), besides the shared ones."""
    spec = cfg.moe
    dense = spec.dense_layers
    if dense != tuple(range(len(dense))):
        raise ValueError(f"llama.cpp takes GLM's dense layers only first; these are {list(dense)}")
    # llama.cpp groups experts as the config does, but asks for fewer groups used than there are: all used is
    # the same routing as one group
    groups = (spec.groups, spec.groups_per_token) if spec.groups_per_token < spec.groups else (1, 1)
    return {"add_expert_count": spec.experts, "add_expert_used_count": spec.experts_per_token,
            "add_expert_group_count": groups[0], "add_expert_group_used_count": groups[1],
            "add_expert_feed_forward_length": spec.expert_ffn_size,
            "add_expert_shared_count": spec.shared_ffn_size // spec.expert_ffn_size,
            "add_leading_dense_block_count": len(dense), "add_expert_gating_func": SIGMOID,
            "add_expert_weights_scale": spec.scaling, "add_expert_weights_norm": spec.normalize,
            "add_nextn_predict_layers": 0}


def unstack_experts(weights: dict[str, Weight], cfg: ModelConfig, source: object) -> dict[str, Weight]:
    """A GGUF file's expert stacks ([experts * rows, cols], gate and up apart) as each expert's own tensors,
    views of the file's blocks (no copy); a Hugging Face folder's per-expert tensors pass as they are."""
    from ..loaders.names import concat_rows  # the loaders import the models: imported when called

    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        stacks = [weights.pop(p + k, None) for k in ("experts_gate", "experts_up", "experts_down")]
        if all(w is None for w in stacks):
            continue
        if any(w is None for w in stacks):
            raise ModelFileError(source, f"layer {i} has only some of ffn_gate_exps, ffn_up_exps and ffn_down_exps")
        gate, up, down = (_expert_views(w, cfg.moe.experts, i, source) for w in stacks)
        for e in range(cfg.moe.experts):
            weights[f"{p}experts.{e}.gate_up"] = concat_rows([gate[e], up[e]], [f"{p}gate[{e}]", f"{p}up[{e}]"], source)
            weights[f"{p}experts.{e}.down"] = down[e]
    return weights


def _expert_views(w: Weight, experts: int, layer: int, source: object) -> list[Weight]:
    rows = w.shape[0] * (w.shape[1] if len(w.shape) == 3 else 1) // experts
    if len(w.shape) == 3:
        w = w.reshape(-1, w.shape[-1])
    if rows * experts != w.shape[0]:
        raise ModelFileError(source, f"layer {layer}'s expert stack has {w.shape[0]} rows, not {experts} "
                                     "experts' worth")
    if isinstance(w, torch.Tensor):
        return list(w.split(rows))
    return [QTensor(w.raw[e * rows : (e + 1) * rows], w.qtype, (rows, w.shape[1])) for e in range(experts)]
