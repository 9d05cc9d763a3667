"""GGUF files through the `gguf` package, memory-mapped: tensors stay as the file's blocks."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType

from ..errors import ModelFileError
from ..models import family_for_gguf
from ..quant import QTensor
from .names import plan

_FLOAT = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
_SMALL_ARRAY = 4096  # arrays longer than this (vocabularies) stay in the reader


def read_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning the reader's low-level errors into one that names the file."""
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damaged files
        raise ModelFileError(path, f"damaged or truncated GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and short-array metadata as Python values."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > _SMALL_ARRAY:
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # a field the package cannot decode is not one we need
            continue
    return meta


def to_weight(t: Any, path: Path) -> torch.Tensor | QTensor:
    """A torch view of one tensor's bytes in the mapped file (no copy)."""
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapping is read-only
        data = torch.from_numpy(np.asarray(t.data))
    qtype = QType(t.tensor_type)
    if qtype in _FLOAT:
        return data.view(_FLOAT[qtype]).reshape(shape)
    if len(shape) != 2:
        raise ModelFileError(path, f"tensor {t.name!r} is a {len(shape)}-D {qtype.name} tensor; only 2-D blocks are supported")
    return QTensor(data.view(torch.uint8).reshape(shape[0], -1), qtype, shape)


def open_gguf(path: Path):
    from . import Checkpoint, matrix_dtype

    reader = read_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(path, "metadata general.architecture is missing")
    family = family_for_gguf(arch, path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    try:
        config = family.config_from_gguf(meta, path, shapes)
    except ValueError as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, str(e)) from None
    layout = plan(tensors, family.GGUF_NAMES)

    def tokenizer():
        from ..tokenizers import tokenizer_from_gguf

        return tokenizer_from_gguf(reader, path)

    stored = matrix_dtype(to_weight(t, path) for t in tensors.values())
    return Checkpoint(path, family, config, layout, family.GGUF_NAMES, lambda name: to_weight(tensors[name], path), stored,
                      tokenizer, {}, "gguf")
