"""The decoder every family shares: norms, rotary, attention over a paged KV cache, SwiGLU.

Families differ in names, configs and a few switches (rotary style and span, biases, ALiBi), not in
the block itself, so one `Decoder` serves them and each model file only maps its checkpoint onto it.
Weights arrive in their stored form (float tensors or `QTensor` blocks) and go through
`chatglm.kernels` so each format runs on its fastest exact kernel.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ChatGLMError, ModelFileError
from ..kernels import fused_decoder, in_ggml_numerics, make_embedding, make_linear, tied_head
from ..kernels.prompt import add_rms_norm, apply_rope_, causal_attention, rms_norm, swiglu
from ..kernels.threads import StepThreads
from ..kv_cache import BLOCK_SIZE, KVCache, KVMemoryError, KVType, format_size, kv_type_name
from ..quant import QTensor

Weight = Union[torch.Tensor, QTensor]
# the block storage the C++ decode step reads (uint8: q8_0 blocks); others take torch's
FUSED_KV_TYPES = (torch.float32, torch.float16, torch.uint8)


@dataclass
class Step:
    """What every layer of one forward shares, worked out once: where the new keys go, which
    cache rows each query reads, and how it weighs them."""

    blocks: torch.Tensor              # [B, T] the block each new key and value goes to
    offsets: torch.Tensor             # [B, T] ... and its row in that block
    table: torch.Tensor               # [B, span blocks] the blocks each sequence reads, in order
    span: int                         # cache rows attended: the longest sequence's prefix + past + itself
    mask: torch.Tensor                # bool [B,1,T,span] keys each query sees, or a float bias [B,H,T,span]
    bias: torch.Tensor | None = None  # one-token steps: float32 [B, kv_heads or 1, group or 1, span], None: no mask
    causal: bool = False              # fresh prompts, each token seeing exactly its own past: no cache read, no mask


def fresh_causal(rows: torch.Tensor, mask: torch.Tensor, span: int) -> bool:
    """Whether a forward is fresh prompts with a plain causal mask: rows 0..T-1 of each sequence, nothing cached
    before them, each token seeing exactly its own past (so attention needs neither the pages nor the mask)."""
    T = rows.shape[1]
    order = torch.arange(T, device=rows.device)
    return (span == T and mask.dtype == torch.bool and torch.equal(rows, order.expand_as(rows)) and
            torch.equal(mask, (order[:, None] >= order).expand_as(mask)))


def rope_table(cfg: ModelConfig, device: torch.device | str) -> torch.Tensor:
    """cos + i sin for every position: complex64 [max_position, rope_dim/2]."""
    half = cfg.rope_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / cfg.rope_dim))
    factors = cfg.extra.get("rope_factors")
    if factors is not None:
        inv_freq = inv_freq / factors.float()
    angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(device)


def attend(q: torch.Tensor, kv: torch.Tensor, cache: KVCache, layer: int, step: Step) -> torch.Tensor:
    """Write kv [B,T,2,Hkv,D] into the cache rows, attend q [B,T,H,D] over the span; returns [B,T,H*D].

    In a one-token step the query heads that share a key head become that head's rows of queries,
    in float32: torch's CPU attention then reads each key once instead of once per query head, and
    runs far faster than on bf16. A fresh prompt (`step.causal`) attends over its own keys and values as the
    cache holds them (`kernels.prompt.causal_attention`): no gather of the pages, no T x T mask. Otherwise only the
    span's blocks are gathered and decoded (q8_0).
    """
    B, T, H, D = q.shape
    stored = cache.store(kv)
    cache.by_row[layer].index_put_((step.blocks, step.offsets), stored)
    if step.causal:  # float cache rows go as stored (the C++ kernel reads float16 itself); q8_0 ones decoded
        rows = stored if stored.is_floating_point() else cache.load(stored, q.dtype)
        return causal_attention(q, rows).reshape(B, T, H * D)
    pages = cache.kv[layer][:, :, step.table]  # [2, Hkv, B, blocks, block_size, row]: one gather
    pages = pages.transpose(1, 2).flatten(3, 4)[..., : step.span, :]  # [2, B, Hkv, span, row]
    if T > 1:
        keys, values = cache.load(pages, q.dtype)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=step.mask, enable_gqa=True)
        return att.transpose(1, 2).reshape(B, T, H * D)
    keys, values = cache.load(pages, torch.float32)
    grouped = q.float().reshape(B, keys.shape[1], -1, D)
    att = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=step.bias)
    return att.view(B, 1, H * D).to(q.dtype)


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP with residuals around each."""

    def __init__(self, cfg: ModelConfig, w: Mapping[str, Weight], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.Parameter(_float(w["attn_norm"], dtype, device), requires_grad=False)
        self.ffn_norm = nn.Parameter(_float(w["ffn_norm"], dtype, device), requires_grad=False)
        self.qkv = make_linear(w["qkv"], w.get("qkv_bias"), dtype, device)
        self.o = make_linear(w["o"], w.get("o_bias"), dtype, device)
        self.gate_up = make_linear(w["gate_up"], None, dtype, device)
        self.down = make_linear(w["down"], None, dtype, device)

    def fused_parts(self) -> dict[str, object]:
        """This block for the one-call C++ step (kernels.fused_decoder): its norms and products."""
        return dict(attn_norm=self.attn_norm, ffn_norm=self.ffn_norm, qkv=self.qkv, o=self.o, gate_up=self.gate_up,
                    down=self.down)

    def forward(self, x: torch.Tensor, cs: torch.Tensor | None, layer: int, cache: KVCache,
                step: Step) -> torch.Tensor:
        cfg = self.cfg
        nq, hd = cfg.num_heads * cfg.head_dim, cfg.head_dim
        qkv = self.qkv(rms_norm(x, self.attn_norm, cfg.norm_eps))
        if cs is not None:  # None: positions come from an attention bias instead (ALiBi)
            heads = qkv[..., : nq + cfg.num_kv_heads * hd].unflatten(-1, (-1, hd))  # q and k heads: one rotation
            apply_rope_(heads[..., : cfg.rope_dim], cs, cfg.rope_interleaved)
        kv = qkv[..., nq:].unflatten(-1, (2, cfg.num_kv_heads, hd))
        h = self.o(attend(qkv[..., :nq].unflatten(-1, (cfg.num_heads, hd)), kv, cache, layer, step))
        normed = add_rms_norm(h, x, self.ffn_norm, cfg.norm_eps)  # h = x + attention, in place: the next residual
        return self.down(swiglu(self.gate_up(normed))).add_(h)


class Decoder(nn.Module):
    """Embedding, blocks, final norm and head over canonical weight names.

    Canonical names: embed, norm, head (absent when tied), and per layer `layers.{i}.` + attn_norm,
    qkv, qkv_bias, o, o_bias, ffn_norm, gate_up (gate rows first), down.
    """

    block_class: type[nn.Module] = Block

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Weight], dtype: torch.dtype,
                 device: torch.device | str = "cpu", source: object = "model",
                 name_of: Callable[[str], str] = str):
        super().__init__()
        check_shapes(self.shapes_of(cfg, weights), weights, source, self.required(cfg), name_of)
        self.config = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = make_embedding(weights["embed"], dtype, device)
        self.layers = nn.ModuleList(
            self.block_class(cfg, _layer(weights, i), dtype, device) for i in range(cfg.num_layers)
        )
        self.norm = nn.Parameter(_float(weights["norm"], dtype, device), requires_grad=False)
        self.head = tied_head(self.embed) if "head" not in weights else make_linear(weights["head"], None, dtype, device)
        self.register_buffer("rope", rope_table(cfg, device), persistent=False)
        # one-token steps over ggml weights run as one C++ call where the blocks describe themselves for it
        # (fused_parts); ALiBi has no rotary there
        fusable = not cfg.extra.get("alibi") and self.device.type == "cpu"
        self.fused = fused_decoder(self.layers, cfg) if fusable else None
        self.step_threads = StepThreads()  # one-token steps: as many threads as run them fastest here and now
        prefix = prefix_kv(cfg, weights, source)
        self.prefix = None if prefix is None else prefix.to(device=device, dtype=dtype)
        # keys and values as stored: float16 where the blocks take llama.cpp's numerics (as llama.cpp keeps its
        # cache), else the activations' dtype; the cache owner may pick another (`new_cache(dtype=...)`, --kv-type)
        blocks = in_ggml_numerics() and any(isinstance(w, QTensor) for w in weights.values())
        self.kv_dtype = torch.float16 if blocks and dtype == torch.float32 else dtype

    @property
    def prefix_len(self) -> int:
        """P-Tuning v2 virtual tokens held in cache rows 0..prefix_len-1 of every slot."""
        return 0 if self.prefix is None else self.prefix.shape[2]

    def new_cache(self, slots: int, max_len: int, memory: int | None = None, dtype: KVType | None = None,
                  block_size: int = BLOCK_SIZE) -> KVCache:
        """A paged cache for `slots` sequences of up to `max_len` tokens each, holding `memory` bytes of
        blocks (default: enough for every slot at max_len, committed by the OS only as blocks are used),
        stored as `dtype` (a float type or q8_0 blocks; default: the model's cache type)."""
        dtype = dtype or self.kv_dtype
        per_block = KVCache.block_bytes(self.config, dtype, block_size)
        blocks = None if memory is None else memory // per_block
        try:
            return KVCache(self.config, slots, max_len, dtype, self.device, blocks, block_size, self.prefix)
        except KVMemoryError:
            need = 2 + -(-self.prefix_len // block_size)
            raise KVMemoryError(f"--kv-memory {format_size(memory)} holds no KV block for a sequence: a block of "
                                f"{block_size} tokens takes {format_size(per_block)} for this model "
                                f"({kv_type_name(dtype)}); give at least {format_size(need * per_block)}") from None

    def causal_mask(self, pos: torch.Tensor, both_ways: torch.Tensor | None = None) -> torch.Tensor:
        """[B,1,T,span] keys each token sees: the prefix rows, its own past, and (GLM) a two-way context."""
        P = self.prefix_len
        keys = torch.arange(int(pos.max()) + 1 + P, device=pos.device) - P
        mask = (keys < 0) | (keys <= pos[..., None])
        if both_ways is not None:
            mask |= keys < both_ways[..., None]
        return mask.unsqueeze(1)

    # The hooks a family with other positions or norms overrides (see glm.py).
    @staticmethod
    def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return decoder_shapes(cfg)

    prefix_reusable = True  # a cached prefix stays valid when later tokens change (causal attention)

    def shapes_of(self, cfg: ModelConfig, weights: Mapping[str, Weight]) -> dict[str, tuple[int, ...]]:
        """What these weights must measure: expected_shapes, unless a family's file may hold some tensors in
        another form."""
        return self.expected_shapes(cfg)

    @staticmethod
    def required(cfg: ModelConfig) -> dict[str, bool]:
        """Which optional tensors (by last name part) this config needs."""
        return {"qkv_bias": cfg.qkv_bias, "o_bias": cfg.o_bias, "head": not cfg.tie_embeddings}

    def attention_inputs(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, slots: torch.Tensor):
        """Rotary rows [B,T,1,rope_dim/2], cache rows to write and the attention mask [B,1,T,span] (causal)."""
        return self.rope[pos].unsqueeze(2), pos + self.prefix_len, self.causal_mask(pos)

    def rotary_positions(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                         slots: torch.Tensor) -> torch.Tensor:
        """A one-token step's rotary positions for the fused step: int64 [B] (GLM v1: [B, 2], its 2D positions)."""
        return pos[:, 0].contiguous()

    def step(self, cache: KVCache, slots: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> Step:
        """The per-forward attention plan; a one-token step takes its mask as a float32 bias over
        the grouped query heads, or none when every query sees its whole span."""
        B, T = rows.shape
        span = mask.shape[-1]
        table = cache.tables[slots, : -(-span // cache.block_size)]
        blocks = table.gather(1, rows // cache.block_size)
        bias = None
        if T == 1 and mask.dtype != torch.bool:  # an additive bias per query head [B,H,1,span] (ALiBi)
            bias = mask.float().view(B, self.config.num_kv_heads, -1, mask.shape[-1])
        elif T == 1 and not bool(mask.all()):
            bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        return Step(blocks, rows % cache.block_size, table, span, mask, bias, T > 1 and fresh_causal(rows, mask, span))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm, self.config.norm_eps)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                last_only: bool = False, take: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ids [B,T] at positions pos [B,T] of the sequences in cache `slots` [B].

        Each token attends to its own sequence's cache up to its position; the cache rows before
        pos must already hold that sequence's earlier tokens; a sequence short of blocks takes them here.
        last_only keeps the last column, take [B] one column per row (a batch of prompts padded to one
        length): [B, 1, vocab].
        """
        last = pos[:, -1] if take is None else pos.gather(1, take[:, None])[:, 0]
        for slot, tokens in zip(slots.tolist(), (last + 1).tolist()):  # padding columns past `take` take no block
            if not cache.grow(slot, tokens):
                raise ChatGLMError(f"the KV cache has no free block for sequence {slot} at {tokens} tokens")
        with self.step_threads.chosen(len(ids)) if ids.shape[1] == 1 and self.device.type == "cpu" else nullcontext():
            return self._forward(ids, pos, cache, slots, last_only, take)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, slots: torch.Tensor, last_only: bool,
                 take: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(ids)
        if self.fused is not None and ids.shape[1] == 1 and cache.kv.dtype in FUSED_KV_TYPES:
            rows = pos[:, 0].contiguous() + self.prefix_len
            x = self.fused.step(x[:, 0], cache.kv, cache.tables[slots], self.rotary_positions(ids, pos, cache, slots),
                                rows, torch.view_as_real(self.rope))[:, None]
        else:
            cs, rows, mask = self.attention_inputs(ids, pos, cache, slots)
            step = self.step(cache, slots, rows, mask)
            for i, layer in enumerate(self.layers):
                x = layer(x, cs, i, cache, step)
        if take is not None:
            x = x[torch.arange(len(x), device=x.device), take][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.head(self.final_norm(x)).float()

    def logits(self, ids: list[int], kv_dtype: KVType | None = None) -> "numpy.ndarray":  # noqa: F821
        """Full-prefill logits [len(ids), vocab] as float32 numpy (tests and perplexity), keys and values stored
        as `kv_dtype` (default: the model's cache type)."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        cache = self.new_cache(1, t.shape[1], dtype=kv_dtype)
        pos = torch.arange(t.shape[1], device=self.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=self.device)
        return self.forward(t, pos, cache, slots)[0].cpu().numpy()


def prefix_kv(cfg: ModelConfig, weights: dict[str, Weight], source: object) -> torch.Tensor | None:
    """P-Tuning v2: the prefix encoder's output as keys and values, [layers, 2, pre_seq_len, kv_heads, head_dim].

    The official get_prompt views each virtual token's vector as [layers*2, kv_heads, head_dim],
    rows 2l and 2l+1 being layer l's key and value; with prefix_projection a two-layer tanh MLP
    maps the embedding to that vector first. Nothing else is applied (no rotary, no norm).
    """
    emb = weights.pop("prefix_embedding", None)
    mlp = [weights.pop(f"prefix_mlp.{n}", None) for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
    if emb is None:
        return None
    x = _float(emb, torch.float32, "cpu")
    if all(t is not None for t in mlp):
        w0, b0, w2, b2 = (_float(t, torch.float32, "cpu") for t in mlp)
        x = F.linear(torch.tanh(F.linear(x, w0, b0)), w2, b2)
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    if x.dim() != 2 or x.shape[1] != per_token:
        raise ModelFileError(source, f"P-Tuning prefix has shape {list(x.shape)}, expected [pre_seq_len, {per_token}] "
                                     f"(num_layers*2*kv_heads*head_dim)")
    x = x.view(x.shape[0], cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    return x.permute(1, 2, 0, 3, 4).contiguous()


def _float(t: Weight, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if isinstance(t, QTensor):
        t = t.dequantize(torch.float32)
    return t.to(device=device, dtype=dtype)


def _layer(weights: Mapping[str, Weight], i: int) -> dict[str, Weight]:
    prefix = f"layers.{i}."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def decoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """What every canonical tensor must measure for this config."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, h), "norm": (h,), "head": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm": (h,), p + "ffn_norm": (h,),
            p + "qkv": (q + 2 * kv, h), p + "qkv_bias": (q + 2 * kv,),
            p + "o": (h, q), p + "o_bias": (h,),
            p + "gate_up": (2 * cfg.ffn_size, h), p + "down": (h, cfg.ffn_size),
        })
    return shapes


def check_shapes(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, Weight], source: object,
                 required: Mapping[str, bool], name_of: Callable[[str], str] = str) -> None:
    """Name the first missing or mis-shaped tensor (by its name in the file), with the expected shape."""
    for name, shape in expected.items():
        shown = name_of(name)
        if name not in weights:
            if required.get(name.rsplit(".", 1)[-1], True):
                raise ModelFileError(source, f"tensor {shown!r} is missing (expected shape {list(shape)})")
            continue
        found = tuple(weights[name].shape)
        if found != shape:
            raise ModelFileError(source, f"tensor {shown!r} has shape {list(found)}, expected {list(shape)}")
