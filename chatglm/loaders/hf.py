"""Hugging Face folders: config.json and safetensors or PyTorch .bin weights, single or sharded.

Safetensors shards are opened lazily and read one tensor at a time; .bin files load with
`weights_only=True` (never arbitrary pickles) and mmap, so no full extra copy is made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from gguf import GGMLQuantizationType as QType

from ..config import read_json
from ..errors import ModelFileError
from ..models import family_for_hf
from ..quant import QTensor
from .names import main_layers, plan

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weight_files(folder: Path) -> list[Path]:
    """The shards that hold the weights, from the index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(index, "has no 'weight_map' object")
            files = sorted({folder / str(f) for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise ModelFileError(f, f"shard listed in {index_name} is missing")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise ModelFileError(folder, "no weights found (expected model.safetensors, shards with an index, or pytorch_model*.bin)")


def tensor_source(files: list[Path]) -> tuple[dict[str, Path], Callable[[str], torch.Tensor]]:
    """Name -> file, and a reader that loads one tensor by name."""
    where: dict[str, Path] = {}
    handles: dict[Path, object] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelFileError(f, f"not a valid safetensors file ({e})") from None
        else:
            try:
                handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated zip, pickle with forbidden globals, not a torch file
                raise ModelFileError(f, f"not a loadable PyTorch weights file ({e})") from None
            if not isinstance(handle, dict):
                raise ModelFileError(f, "does not hold a dict of tensors")
            names = list(handle)
        handles[f] = handle
        for name in names:
            where[name] = f

    def get(name: str) -> torch.Tensor:
        f = where[name]
        handle = handles[f]
        try:
            t = handle.get_tensor(name) if f.suffix == ".safetensors" else handle[name]
        except Exception as e:
            raise ModelFileError(f, f"tensor {name!r} cannot be read ({e})") from None
        if not isinstance(t, torch.Tensor):
            raise ModelFileError(f, f"entry {name!r} is not a tensor")
        return t

    return where, get


def thudm_blocks(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> QTensor:
    """THUDM's int8 / int4 weights (one f16 scale per output row) as ggml blocks, losslessly.

    int8 rows become q8_0 blocks whose scale is the row's; int4 bytes hold two signed values, the
    high nibble first, and become q4_0 blocks (stored value + 8, same scale).
    """
    rows = weight.shape[0]
    if bits == 4:
        high = weight.to(torch.int16).bitwise_right_shift(4)                   # arithmetic: signed high nibble
        low = (weight.to(torch.int16).bitwise_left_shift(12)).bitwise_right_shift(12)  # signed low nibble
        values = torch.stack([high, low], dim=-1).reshape(rows, -1)
    else:
        values = weight.to(torch.int16)
    cols = values.shape[1]
    blocks = values.reshape(rows, cols // 32, 32)
    d = scale.to(torch.float16).reshape(rows, 1, 1).expand(rows, cols // 32, 1).contiguous().view(torch.uint8)
    if bits == 8:
        body, qtype = blocks.to(torch.int8).view(torch.uint8), QType.Q8_0
    else:
        u = (blocks + 8).to(torch.uint8)
        body, qtype = u[..., :16] | (u[..., 16:] << 4), QType.Q4_0
    raw = torch.cat([d.reshape(rows, cols // 32, 2), body], dim=-1).reshape(rows, -1)
    return QTensor(raw.contiguous(), qtype, (rows, cols))


def thudm_quantized(get: Callable[[str], torch.Tensor], where: dict[str, Path], bits: int,
                    folder: Path) -> Callable[[str], torch.Tensor | QTensor]:
    """A tensor reader that turns each quantized weight and its `_scale` into ggml blocks."""
    def read(name: str) -> torch.Tensor | QTensor:
        t = get(name)
        if t.dtype != torch.int8:
            return t
        scale_name = name + "_scale"
        if scale_name not in where:
            raise ModelFileError(folder, f"quantized tensor {name!r} has no {scale_name!r}")
        scale = get(scale_name)
        cols = t.shape[1] * (2 if bits == 4 else 1)
        if scale.shape != (t.shape[0],) or cols % 32:
            raise ModelFileError(folder, f"tensor {name!r} {list(t.shape)} with scale {list(scale.shape)} is not a "
                                         f"{bits}-bit row-quantized weight (expected scale [{t.shape[0]}], columns % 32 == 0)")
        return thudm_blocks(t, scale, bits)

    return read


def open_hf(folder: Path):
    from . import Checkpoint

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(folder, "config.json is missing (expected a Hugging Face model folder)")
    raw = read_json(cfg_path)
    family = family_for_hf(raw, cfg_path)
    try:
        config = family.config_from_hf(raw, cfg_path)
    except ModelFileError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:  # a string or 0 where a size belongs
        raise ModelFileError(cfg_path, f"bad config value ({type(e).__name__}: {e})") from None
    where, get = tensor_source(weight_files(folder))
    layout = main_layers(plan(where, family.HF_NAMES), config.num_layers)
    stored = _DTYPE_NAMES.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""), None)
    if stored is None:
        embed = layout.get("embed")
        stored = get(embed[0]).dtype if embed else torch.float32
    transforms = getattr(family, "hf_transforms", lambda _: {})(config)
    bits = raw.get("quantization_bit")
    if bits:
        if bits not in (4, 8):
            raise ModelFileError(cfg_path, f"quantization_bit {bits} is not supported; expected 4 or 8")
        get = thudm_quantized(get, where, bits, folder)

    def tokenizer():
        from ..tokenizers import load_tokenizer

        return load_tokenizer(folder, family=config.family)

    return Checkpoint(folder, family, config, layout, family.HF_NAMES, get, stored, tokenizer, transforms, "hf")

