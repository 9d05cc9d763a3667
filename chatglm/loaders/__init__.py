"""From a path to a model: detect the file kind, read its config and tensors, build the decoder."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from types import ModuleType
from pathlib import Path
from typing import Any, Callable, Iterable

import math

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from ..config import ModelConfig
from ..default_model import DEFAULT_NAME, default_model_path
from ..errors import ModelFileError
from ..kernels import ggml_numerics
from ..kernels.ggml import available as ggml_kernels_built  # (chatglm.loaders.ggml is the GGML file reader)
from ..models.layers import Decoder, Weight
from ..quant import QTensor
from .huge_pages import mmap_option
from .names import assemble, namer


def matrix_dtype(tensors: Iterable[Weight]) -> torch.dtype | None:
    """The float dtype of a file's 2-D weights, or None when any of them is stored as ggml blocks."""
    dtypes = {t.dtype if isinstance(t, torch.Tensor) else None for t in tensors if len(t.shape) == 2}
    return None if None in dtypes or not dtypes else max(dtypes, key=lambda d: d.itemsize)

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
    placement: str = ""                    # where a GGUF/GGML file's weights are (huge_pages.into_huge_pages)


def resolve_path(path: str | Path) -> Path:
    """'default' names the default model; anything else must exist."""
    if str(path) == DEFAULT_NAME:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(p, "no such file or folder (expected a Hugging Face model folder or a .gguf file)")
    return p


def open_checkpoint(path: str | Path, lora: str | Path | None = None, use_mmap: bool = True) -> Checkpoint:
    """Open a model file or folder; with `lora`, a PEFT adapter folder merged into it as it loads; with
    use_mmap=False a GGUF or GGML file's weights moved into huge pages (huge_pages.py) in the background."""
    ckpt = _open(resolve_path(path), mmap_option(use_mmap))
    check_config(ckpt.config, ckpt.path)
    if lora is not None:
        from .lora import merged, read_adapter

        names = {n for parts in ckpt.layout.values() for n in parts}
        ckpt.get = merged(ckpt.get, read_adapter(Path(lora)), names, ckpt.path)
    return ckpt


def _open(p: Path, use_mmap: bool) -> Checkpoint:
    if p.is_dir():
        from .hf import open_hf

        return open_hf(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf import open_gguf

        return open_gguf(p, use_mmap)
    if magic == b"ggml":
        from .ggml import open_ggml

        return open_ggml(p, use_mmap)
    if p.name == "config.json":
        from .hf import open_hf

        return open_hf(p.parent)
    raise ModelFileError(p, f"not a model file: starts with {magic!r}; expected a GGUF file, a chatglm.cpp GGML "
                            "file or a Hugging Face folder")


MAX_POSITION = 1 << 24  # rotary tables are built for the whole context: a larger claim is a damaged file


def check_config(config: ModelConfig, path: Path) -> None:
    """Refuse values the model code would only trip over later (a hang building rotary tables for 2**32
    positions, a division by a string, NaN epsilon giving NaN logits) with one error naming the file."""
    def bad(name: str, value: object, expected: str) -> ModelFileError:
        return ModelFileError(path, f"config {name} is {value!r}; expected {expected}")

    if not isinstance(config.max_position, int) or not 0 < config.max_position <= MAX_POSITION:
        raise bad("max_position (context length)", config.max_position, f"an integer in 1..{MAX_POSITION}")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(name, value, "a positive finite number")
    if config.norm_eps >= 1:
        raise bad("norm_eps", config.norm_eps, "a small positive number")


# ggml block types whose blocks hold f16 scales, and their byte offsets in a block: a NaN/inf scale
# would decode to a whole block of NaN, so it is refused as the tensor is read.
_SCALE_OFFSETS: dict[QType, tuple[int, ...]] = {
    QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
    QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
}


_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                  torch.bfloat16: (torch.int16, 0x7F80)}  # all set: inf or NaN
_CHUNK = 1 << 20  # values checked at a time: the temporaries stay in cache


def _exponent_saturated(bits: np.ndarray, mask: int) -> bool:
    """Whether any of these integer views of floats has every exponent bit set (single-threaded numpy:
    torch's threaded ops stall on a busy machine, and this is memory-bound anyway)."""
    return any(int(np.max(bits[i : i + _CHUNK] & mask)) == mask for i in range(0, len(bits), _CHUNK))


def all_finite(w: Weight) -> bool:
    """Whether a float tensor's values, or a block tensor's f16 scales, are all finite, read in place: the
    scales through a strided view of the blocks (no decoding, no copy)."""
    if isinstance(w, torch.Tensor):
        if w.dtype not in _EXPONENT_BITS:
            return not w.is_floating_point() or bool(torch.isfinite(w).all())
        int_type, mask = _EXPONENT_BITS[w.dtype]
        return w.numel() == 0 or not _exponent_saturated(w.detach().cpu().view(int_type).reshape(-1).numpy(), mask)
    offsets = _SCALE_OFFSETS.get(w.qtype)
    if offsets is None:
        return True
    from gguf import GGML_QUANT_SIZES

    raw = w.raw.detach().cpu().contiguous().numpy()
    block = GGML_QUANT_SIZES[w.qtype][1]
    count = raw.size // block
    return not any(_exponent_saturated(np.ndarray((count,), np.uint16, raw, o, (block,)), 0x7C00) for o in offsets)


def finite_checked(get: Callable[[str], Weight], path: Path) -> Callable[[str], Weight]:
    """A tensor reader that refuses NaN/inf weights or block scales: they would load silently and give
    NaN logits for every prompt touching them."""
    def read(name: str) -> Weight:
        w = get(name)
        if not all_finite(w):
            kind = "block scales" if isinstance(w, QTensor) else "values"
            raise ModelFileError(path, f"tensor {name!r} has NaN or infinite {kind}; the file is damaged")
        return w

    return read


def compute_dtype(ckpt: Checkpoint, dtype: str, device: str) -> torch.dtype:
    """The activations' dtype: the stored float dtype, or `quantized_activations` for weights in ggml blocks."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(sorted(set(DTYPES)))}, "
                             "q4_0, q4_1, q5_0, q5_1, q8_0")
        return DTYPES[dtype]
    return ckpt.stored_dtype or quantized_activations(device)


def quantized_activations(device: str) -> torch.dtype:
    """The activations' dtype for ggml block weights: float32 on the CPU when the C++ kernels are built
    (llama.cpp's numerics: 8-bit activations meet the blocks as stored), else bfloat16, what torch's
    packed int4 kernels are fast for, on the CPU as on GPUs."""
    return torch.float32 if device == "cpu" and ggml_kernels_built() else torch.bfloat16


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
    ckpt = replace(ckpt, get=finite_checked(ckpt.get, ckpt.path))
    if dtype in RUNTIME_QTYPES:
        weights = quantized_weights(ckpt, dtype)
        act = quantized_activations(device)
    else:
        weights = assemble(ckpt.layout, ckpt.get, ckpt.path, ckpt.transforms)
        act = compute_dtype(ckpt, dtype, device)
    sanitize = getattr(ckpt.family, "sanitize", None)  # a family's file layout onto its canonical tensors
    if sanitize is not None:
        weights = sanitize(weights, ckpt.config, ckpt.path)
    factors = weights.pop("rope_factors", None)
    if factors is not None:
        ckpt.config.extra["rope_factors"] = factors if isinstance(factors, torch.Tensor) else factors.dequantize()
    decoder = getattr(ckpt.family, "DECODER", Decoder)
    # "f32" asks for exact float32 arithmetic; the default and the ggml types take llama.cpp's numerics
    with ggml_numerics() if dtype == "auto" or dtype in RUNTIME_QTYPES else nullcontext():
        return decoder(ckpt.config, weights, act, device, ckpt.path, namer(ckpt.layout, ckpt.table))


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", lora: str | Path | None = None,
               use_mmap: bool = True) -> Decoder:
    """A ready model with `.config` and `.logits(ids)`, from a folder, a GGUF or GGML file or 'default'."""
    return build_model(open_checkpoint(path, lora, use_mmap), dtype, device)
