"""From a path to a model: detect the file kind, read its config and tensors, build the decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..config import ModelConfig
from ..default_model import DEFAULT_NAME, default_model_path
from ..errors import ModelFileError
from ..models.layers import Decoder, Weight
from .names import assemble, namer


def matrix_dtype(tensors: Iterable[Weight]) -> torch.dtype | None:
    """The float dtype of a file's 2-D weights, or None when any of them is stored as ggml blocks."""
    dtypes = {t.dtype if isinstance(t, torch.Tensor) else None for t in tensors if len(t.shape) == 2}
    return None if None in dtypes or not dtypes else max(dtypes, key=lambda d: d.itemsize)

QUANTIZED_ACTIVATIONS = torch.bfloat16  # what the packed int4 kernels are fast for, on the CPU as on GPUs
DTYPES = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "f16": torch.float16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """A model file opened but not yet loaded: its config, where each tensor comes from, its tokenizer."""

    path: Path
    family: ModuleType                     # the model file under chatglm/models that reads it
    config: ModelConfig
    layout: dict[str, list[str]]
    table: dict[str, str]                  # the family's naming table the layout came from
    get: Callable[[str], Weight]
    stored_dtype: torch.dtype | None       # the dtype of its float matrices; None when they are ggml blocks
    load_tokenizer: Callable[[], Any]
    transforms: dict[str, Callable[[Weight], Weight]] = field(default_factory=dict)
    format: str = "hf"


def resolve_path(path: str | Path) -> Path:
    """'default' names the default model; anything else must exist."""
    if str(path) == DEFAULT_NAME:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(p, "no such file or folder (expected a Hugging Face model folder or a .gguf file)")
    return p


def open_checkpoint(path: str | Path, lora: str | Path | None = None) -> Checkpoint:
    """Open a model file or folder; with `lora`, a PEFT adapter folder merged into it as it loads."""
    ckpt = _open(resolve_path(path))
    if lora is not None:
        from .lora import merged, read_adapter

        names = {n for parts in ckpt.layout.values() for n in parts}
        ckpt.get = merged(ckpt.get, read_adapter(Path(lora)), names, ckpt.path)
    return ckpt


def _open(p: Path) -> Checkpoint:
    if p.is_dir():
        from .hf import open_hf

        return open_hf(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf import open_gguf

        return open_gguf(p)
    if magic == b"ggml":
        from .ggml import open_ggml

        return open_ggml(p)
    if p.name == "config.json":
        from .hf import open_hf

        return open_hf(p.parent)
    raise ModelFileError(p, f"not a model file: starts with {magic!r}; expected a GGUF file, a chatglm.cpp GGML "
                            "file or a Hugging Face folder")


def compute_dtype(ckpt: Checkpoint, dtype: str, device: str) -> torch.dtype:
    """The activations' dtype: the stored float dtype, or bfloat16 for weights in ggml blocks."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(sorted(set(DTYPES)))}, "
                             "q4_0, q4_1, q5_0, q5_1, q8_0")
        return DTYPES[dtype]
    return ckpt.stored_dtype or QUANTIZED_ACTIVATIONS


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device {device!r} is not one of cpu, cuda")
    return device


def build_model(ckpt: Checkpoint, dtype: str = "auto", device: str = "cpu") -> Decoder:
    """The decoder for a checkpoint; a ggml type as dtype quantizes a float checkpoint as it loads."""
    from ..convert import RUNTIME_QTYPES, quantized_weights  # convert imports this package

    device = check_device(device)
    if dtype in RUNTIME_QTYPES:
        weights = quantized_weights(ckpt, dtype)
        act = QUANTIZED_ACTIVATIONS
    else:
        weights = assemble(ckpt.layout, ckpt.get, ckpt.path, ckpt.transforms)
        act = compute_dtype(ckpt, dtype, device)
    factors = weights.pop("rope_factors", None)
    if factors is not None:
        ckpt.config.extra["rope_factors"] = factors if isinstance(factors, torch.Tensor) else factors.dequantize()
    decoder = getattr(ckpt.family, "DECODER", Decoder)
    return decoder(ckpt.config, weights, act, device, ckpt.path, namer(ckpt.layout, ckpt.table))


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", lora: str | Path | None = None) -> Decoder:
    """A ready model with `.config` and `.logits(ids)`, from a folder, a GGUF or GGML file or 'default'."""
    return build_model(open_checkpoint(path, lora), dtype, device)
