"""ModelConfig: the one description of a decoder every family's loader fills in.

Each model file turns its checkpoint's own config (config.json, GGUF metadata, a GGML header) into
this dataclass; the shared layers read nothing else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelFileError


@dataclass
class MoESpec:
    """A mixture-of-experts feed-forward (GLM-4.5/4.6, GLM-4.7-Flash): sigmoid router with a correction bias,
    grouped top-k, routed scaling, a shared expert; `dense_layers` keep a plain SwiGLU of ffn_size."""

    experts: int
    experts_per_token: int
    expert_ffn_size: int           # each routed expert's intermediate size
    shared_ffn_size: int = 0       # the shared experts' intermediate size together (0: none)
    groups: int = 1                # experts fall in `groups` groups; a token picks from its best `groups_per_token`
    groups_per_token: int = 1
    scaling: float = 1.0           # routed weights are multiplied by this
    normalize: bool = True         # routed weights are divided by their sum first
    dense_layers: tuple[int, ...] = ()


@dataclass
class LatentSpec:
    """Latent attention (GLM-4.7-Flash, as DeepSeek-V2): keys and values come from a compressed latent of
    kv_rank values per token plus a shared rotary key of rope_dim values, and that is what the cache holds."""

    kv_rank: int
    q_rank: int                    # 0: queries from one projection, else through a rank-q_rank bottleneck
    nope_dim: int                  # each head's key dims without rotary
    value_dim: int                 # each head's value dims
    scale: float                   # softmax scale (1/sqrt(nope_dim + rope_dim), times a YaRN factor if any)
    norm_eps: float = 1e-6         # the latents' RMSNorm epsilon (transformers' default, not the config's)


@dataclass
class ModelConfig:
    arch: str                     # registry key of the model file: "chatglm2", "llama", ...
    family: str                   # tokenizer / chat-format family: chatglm2, chatglm3, glm4, codegeex2, llama
    vocab_size: int               # rows of the output head (ChatGLM's padded_vocab_size)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_dim: int = 0             # rotated dims of each head (0: the whole head)
    rope_interleaved: bool = False  # rotate pairs (x0,x1),(x2,x3)... instead of the two halves
    qkv_bias: bool = False
    o_bias: bool = False
    max_position: int = 2048      # context length
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False         # RMSNorm over each query and key head before rotary (GLM-4.5)
    post_norms: bool = False      # RMSNorm on the attention and MLP outputs before their residuals (GLM-4-0414)
    moe: MoESpec | None = None
    latent: LatentSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rope_dim == 0:
            self.rope_dim = self.head_dim
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value > 1 << 24:
                raise ValueError(f"config field {name} must be a positive integer, found {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rotary dims {self.rope_dim} must be even and at most head_dim {self.head_dim}")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, naming the file when it is absent or not JSON."""
    if not path.is_file():
        raise ModelFileError(path, "file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def need(cfg: Mapping[str, Any], source: object, *names: str, default: Any = ...) -> Any:
    """The first present key among names (configs spell fields differently), or a clear error."""
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is not ...:
        return default
    raise ModelFileError(source, f"config field {' / '.join(names)} is missing")


def as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
