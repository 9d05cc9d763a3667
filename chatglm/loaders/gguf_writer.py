"""Writing model files tensor by tensor: names from the models' own tables read backwards, and GGUF
files as llama.cpp reads them (its architecture metadata, its tensor names, its q/k row order).

A family's GGUF_NAMES (or HF_NAMES) table maps file names to canonical ones; read backwards it
names each canonical tensor in that file's scheme. Where the table has only the parts of a fused
tensor (llama.cpp's llama keeps q, k, v and gate, up apart) the tensor is written as its parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as QType

from ..config import ModelConfig
from ..errors import ModelFileError
from ..models.layers import Decoder, _float
from ..quant import QTensor
from .names import Weight, assemble


@dataclass
class OutTensor:
    """One tensor of the file being written: its name, torch-order shape, ggml type and how to read it."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], Weight]
    qtype: QType = QType.F32

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


# rows of each part of a fused canonical tensor, in row order
SPLITS: dict[str, Callable[[ModelConfig], tuple[int, ...]]] = {
    "qkv": lambda c: (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim),
    "gate_up": lambda c: (c.ffn_size, c.ffn_size),
    "shared_gate_up": lambda c: (c.moe.shared_ffn_size, c.moe.shared_ffn_size),
}
SPLITS["qkv_bias"] = SPLITS["qkv"]
# heads of the parts whose rows rotate: q and k
ROTATED: dict[tuple[str, int], Callable[[ModelConfig], int]] = {
    (kind, part): heads for kind in ("qkv", "qkv_bias")
    for part, heads in ((0, lambda c: c.num_heads), (1, lambda c: c.num_kv_heads))
}


def reverse(table: Mapping[str, str]) -> list[tuple[re.Pattern[str], str, int | None]]:
    """(regex over canonical names, the file's name template, part index or None); the first pattern wins."""
    out, seen = [], set()
    for pattern, target in table.items():
        canon, _, part = target.partition("#")
        template = pattern.replace("(\\d+)", "{}")
        if (canon, part) in seen or re.search(r"[()\\|]", template):
            continue
        seen.add((canon, part))
        regex = re.compile(re.escape(canon).replace(r"\{\}", r"(\d+)"))
        out.append((regex, template, int(part) if part else None))
    return out


def names_for(rules: list[tuple[re.Pattern[str], str, int | None]], canon: str) -> tuple[str | None, dict[int, str]]:
    """The file's name for a canonical tensor as a whole, and its names for the parts."""
    whole, parts = None, {}
    for regex, template, part in rules:
        m = regex.fullmatch(canon)
        if m:
            name = template.format(*m.groups())
            if part is None:
                whole = whole or name
            else:
                parts.setdefault(part, name)
    return whole, parts


def take_rows(w: Weight, rows: slice | torch.Tensor) -> Weight:
    """Rows of a float tensor or of ggml blocks (a row of blocks is a row of bytes)."""
    if isinstance(w, QTensor):
        raw = w.raw[rows]
        return QTensor(raw, w.qtype, (raw.shape[0], w.shape[1]))
    return w[rows]


def halves_to_pairs(w: Weight, heads: int) -> Weight:
    """llama.cpp's row order for q and k: each head's two rotary halves interleaved, so rotating
    adjacent pairs equals the Hugging Face rotation of halves."""
    rows = w.shape[0]
    order = torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
    return take_rows(w, order)


def _canonical(ckpt: Any, canon: str) -> Weight:
    return assemble({canon: ckpt.layout[canon]}, ckpt.get, ckpt.path, ckpt.transforms)[canon]


def _part(read: Callable[[], Weight], rows: slice | None, heads: int | None) -> Weight:
    w = read()
    w = w if rows is None else take_rows(w, rows)
    return w if heads is None else halves_to_pairs(w, heads)


# MoE experts: llama.cpp stacks each layer's experts into one 3-D tensor per matrix, gate and up apart
EXPERT = re.compile(r"layers\.(\d+)\.experts(?:\.\d+\.(?:gate_up|down)|_gate|_up|_down)")
STACKS = {"experts_gate": ("gate_up", 0), "experts_up": ("gate_up", 1), "experts_down": ("down", None)}


def _stack(ckpt: Any, layer: int, stack: str, shape: tuple[int, int, int]) -> Weight:
    """One stack [experts, rows, cols], from per-expert tensors or from a stack already (GGUF): ggml blocks of one
    type stay blocks (rows one expert after another), anything else becomes float32."""
    if f"layers.{layer}.{stack}" in ckpt.layout:
        pieces = [_canonical(ckpt, f"layers.{layer}.{stack}")]
    else:
        kind, part = STACKS[stack]
        rows = shape[1]
        pieces = [_canonical(ckpt, f"layers.{layer}.experts.{e}.{kind}") for e in range(shape[0])]
        pieces = [w if part is None else take_rows(w, slice(part * rows, (part + 1) * rows)) for w in pieces]
    if all(isinstance(w, QTensor) for w in pieces) and len({w.qtype for w in pieces}) == 1:
        return QTensor(torch.cat([w.raw for w in pieces]), pieces[0].qtype, (shape[0] * shape[1], shape[2]))
    return torch.cat([_float(w, torch.float32, "cpu").reshape(-1, shape[2]) for w in pieces]).reshape(shape)


def expert_stacks(ckpt: Any, rules: list[tuple[re.Pattern[str], str, int | None]]) -> Iterator[OutTensor]:
    """Each MoE layer's experts as llama.cpp's stacks, read (one stack in float32 at a time) when written."""
    cfg, spec = ckpt.config, ckpt.config.moe
    layers = sorted({int(m.group(1)) for canon in ckpt.layout if (m := EXPERT.fullmatch(canon))})
    for i in layers:
        for stack, (kind, _) in STACKS.items():
            name, _ = names_for(rules, f"layers.{i}.{stack}")
            if name is None:
                raise ModelFileError(ckpt.path, "MoE experts have no name in the output format")
            ffn, h = spec.expert_ffn_size, cfg.hidden_size
            shape = (spec.experts, ffn, h) if kind == "gate_up" else (spec.experts, h, ffn)
            yield OutTensor(name, shape, partial(_stack, ckpt, i, stack, shape))


def _latent_part(read: Callable[[], Weight], cfg: ModelConfig, key: bool) -> torch.Tensor:
    spec = cfg.latent
    kv_b = _float(read(), torch.float32, "cpu").view(cfg.num_heads, spec.nope_dim + spec.value_dim, spec.kv_rank)
    return kv_b[:, : spec.nope_dim].transpose(1, 2).contiguous() if key else kv_b[:, spec.nope_dim :].contiguous()


def latent_parts(ckpt: Any, rules: list[tuple[re.Pattern[str], str, int | None]], canon: str,
                 read: Callable[[], Weight]) -> Iterator[OutTensor]:
    """Latent attention's kv_b [heads * (nope + value), rank] as llama.cpp's deepseek2 splits it for absorbing
    it into the queries: attn_k_b [heads, rank, nope] (each head's key part, transposed), attn_v_b [heads, value, rank]."""
    cfg = ckpt.config
    spec, layer = cfg.latent, canon.rsplit(".", 1)[0]
    for part, shape in (("k_b", (cfg.num_heads, spec.kv_rank, spec.nope_dim)),
                        ("v_b", (cfg.num_heads, spec.value_dim, spec.kv_rank))):
        name, _ = names_for(rules, f"{layer}.{part}")
        if name is None:
            raise ModelFileError(ckpt.path, f"tensor {canon!r} has no name in the output format")
        yield OutTensor(name, shape, partial(_latent_part, read, cfg, part == "k_b"))


def file_tensors(ckpt: Any, table: Mapping[str, str], skip: Callable[[str], bool] = lambda _: False,
                 pairs: bool = False) -> Iterator[OutTensor]:
    """The checkpoint's tensors under `table`'s names, each read only when written.

    A fused tensor whose target has parts is split by rows (read part by part when the source holds
    the same parts); with `pairs`, q and k rows go from halves to llama.cpp's interleaved pairs. MoE
    experts come last, stacked per layer.
    """
    rules = reverse(table)
    if ckpt.config.moe is None:
        yield from _tensors(ckpt, rules, skip, pairs)
        return
    yield from _tensors(ckpt, rules, lambda canon: skip(canon) or bool(EXPERT.fullmatch(canon)), pairs)
    yield from expert_stacks(ckpt, rules)


def _tensors(ckpt: Any, rules: list[tuple[re.Pattern[str], str, int | None]], skip: Callable[[str], bool],
             pairs: bool) -> Iterator[OutTensor]:
    cfg = ckpt.config
    expected = getattr(ckpt.family, "DECODER", Decoder).expected_shapes(cfg)
    for canon, names in ckpt.layout.items():
        if skip(canon):
            continue
        whole, parts = names_for(rules, canon)
        read = partial(_canonical, ckpt, canon)
        shape = expected.get(canon) or tuple(read().shape)
        kind = canon.rsplit(".", 1)[-1]
        if whole is None and kind == "kv_b":
            yield from latent_parts(ckpt, rules, canon, read)
            continue
        if whole is None and kind not in SPLITS:
            raise ModelFileError(ckpt.path, f"tensor {canon!r} has no name in the output format")
        if whole is not None:
            yield OutTensor(whole, shape, read)
            continue
        start, direct = 0, len(names) == len(parts)  # direct: the source keeps these parts apart, read each alone
        for k, rows in enumerate(SPLITS[kind](cfg)):
            heads = ROTATED[kind, k](cfg) if pairs and (kind, k) in ROTATED else None
            source = partial(ckpt.get, names[k]) if direct else read
            span = None if direct else slice(start, start + rows)
            yield OutTensor(parts[k], (rows, *shape[1:]), partial(_part, source, span, heads))
            start += rows


# ----- GGUF -----

ARCH_KEYS: tuple[tuple[str, Callable[[ModelConfig], Any]], ...] = (
    ("add_context_length", lambda c: c.max_position),
    ("add_embedding_length", lambda c: c.hidden_size),
    ("add_feed_forward_length", lambda c: c.ffn_size),
    ("add_block_count", lambda c: c.num_layers),
    ("add_head_count", lambda c: c.num_heads),
    ("add_head_count_kv", lambda c: c.num_kv_heads),
    ("add_key_length", lambda c: c.head_dim),
    ("add_value_length", lambda c: c.head_dim),
    ("add_layer_norm_rms_eps", lambda c: c.norm_eps),
    ("add_rope_freq_base", lambda c: c.rope_theta),
    ("add_rope_dimension_count", lambda c: c.rope_dim),  # ChatGLM: half of each head
    ("add_vocab_size", lambda c: c.vocab_size),
)
FILE_TYPES = {q: LlamaFileType.ALL_F32 if q == QType.F32 else LlamaFileType[f"MOSTLY_{q.name}"]
              for q in (QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)}


def write_gguf(path: Path, arch: str, cfg: ModelConfig, name: str, file_type: QType,
               add_vocab: Callable[[gguf.GGUFWriter], None], tensors: list[OutTensor],
               encode: Callable[[OutTensor], np.ndarray],
               progress: Callable[[list[OutTensor]], Iterable[OutTensor]] = iter,
               extra: Mapping[str, Any] = {}) -> None:
    """Header, metadata and tensor table first, then each tensor's data as it is encoded; `extra` holds more
    architecture metadata as GGUFWriter method name -> value (a family's own keys: experts, MoE routing)."""
    w = gguf.GGUFWriter(None, arch)
    try:
        w.add_name(name)
        w.add_file_type(FILE_TYPES[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for method, value in ARCH_KEYS:
            if method not in extra:  # a family's own value wins (latent attention's key and value lengths)
                getattr(w, method)(value(cfg))
        for method, value in extra.items():
            getattr(w, method)(value)
        add_vocab(w)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file(Path(path))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in progress(tensors):
            w.write_tensor_data(encode(t))
    finally:
        w.close()
