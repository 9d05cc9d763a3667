"""Table-driven renaming of a checkpoint's tensors onto the canonical names of models/layers.py.

A model file gives a table of regular expressions over the file's names; `{}` in the target takes
the layer number, and a `#k` suffix marks part k of a tensor fused along rows (q, k, v -> qkv).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

from ..errors import ModelFileError
from ..quant import QTensor, QType, RowStack
from .transcode import transcode

Weight = torch.Tensor | QTensor


def plan(names: Iterable[str], table: Mapping[str, str]) -> dict[str, list[str]]:
    """canonical name -> the file's tensor names that make it, in row order; unknown names are left out."""
    compiled = [(re.compile(pattern), target) for pattern, target in table.items()]
    parts: dict[str, dict[int, str]] = {}
    for name in names:
        for regex, target in compiled:
            m = regex.fullmatch(name)
            if m:
                canon = target.format(*m.groups())
                canon, _, index = canon.partition("#")
                parts.setdefault(canon, {})[int(index or 0)] = name
                break
    return {canon: [by_index[i] for i in sorted(by_index)] for canon, by_index in parts.items()}


_LAYER = re.compile(r"layers\.(\d+)\.")


def main_layers(layout: dict[str, list[str]], layers: int) -> dict[str, list[str]]:
    """The layout without layers past the decoder's (GLM-4.5's multi-token-prediction layer): never read."""
    return {canon: names for canon, names in layout.items()
            if not ((m := _LAYER.match(canon)) and int(m.group(1)) >= layers)}


def assemble(layout: Mapping[str, list[str]], get: Callable[[str], Weight], source: object,
             transforms: Mapping[str, Callable[[Weight], Weight]] | None = None) -> dict[str, Weight]:
    """Load each canonical tensor, fusing parts along rows, then apply per-name transforms."""
    out: dict[str, Weight] = {}
    for canon, names in layout.items():
        pieces = [get(n) for n in names]
        out[canon] = pieces[0] if len(pieces) == 1 else concat_rows(pieces, names, source)
    for suffix, fn in (transforms or {}).items():
        for canon in out:
            if canon == suffix or canon.endswith("." + suffix):
                out[canon] = fn(out[canon])
    return out


def namer(layout: Mapping[str, list[str]], table: Mapping[str, str]) -> Callable[[str], str]:
    """canonical name -> the file's name(s) for it, guessing absent ones from the file's naming scheme."""
    present = {n.split(".")[0] for names in layout.values() for n in names}

    def name_of(canon: str) -> str:
        if canon in layout:
            return " + ".join(layout[canon])
        layer, _, base = canon.rpartition(".")
        number = layer.rpartition(".")[2]
        guesses = []
        for pattern, target in table.items():
            if target.count("{}") <= 1 and target.partition("#")[0].format(number) == canon:
                guesses.append(pattern.replace("(\\d+)", number).replace("\\", ""))
        preferred = [g for g in guesses if g.split(".")[0] in present]
        return " or ".join(preferred or guesses[:1]) or canon

    return name_of


def concat_rows(pieces: list[Weight], names: list[str], source: object) -> Weight:
    """Stack tensors along rows; blocks of one ggml type stay as they are, blocks of mixed types become q8_0 (the
    loader's transcoding plan gives a file's fused pieces one type; this catches the rest: experts' gate and up),
    floats mixed with blocks become float32."""
    if len({tuple(p.shape[1:]) for p in pieces}) != 1:
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in zip(names, pieces))
        raise ModelFileError(source, f"tensors to fuse disagree in shape: {shapes}")
    if all(isinstance(p, QTensor) for p in pieces) and len({p.qtype for p in pieces}) == 1:
        return RowStack(pieces)  # left where they are (a file's memory map) until something reads .raw
    if all(isinstance(p, QTensor) for p in pieces):
        return RowStack([p if p.qtype == QType.Q8_0 else transcode(p, QType.Q8_0) for p in pieces])
    floats = [p.dequantize(torch.float32) if isinstance(p, QTensor) else p for p in pieces]
    dtype = floats[0].dtype if len({f.dtype for f in floats}) == 1 else torch.float32
    return torch.cat([f.to(dtype) for f in floats])
