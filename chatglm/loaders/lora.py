"""LoRA adapters (PEFT folders) merged into the base weights as they are read.

W' = W + (alpha / r) * B @ A for every targeted module, computed in float32 one tensor at a time;
a quantized base weight is dequantized for the merge and stays float afterwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import read_json
from ..errors import ModelFileError
from ..quant import QTensor
from .hf import tensor_source

Weight = torch.Tensor | QTensor
_PREFIX = "base_model.model."


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """Base tensor name -> the float32 delta to add to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(folder, "LoRA adapter folder not found")
    cfg = read_json(folder / "adapter_config.json")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelFileError(folder / "adapter_config.json", f"peft_type {cfg.get('peft_type')!r} is not LORA")
    files = [f for f in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if f.is_file()]
    if not files:
        raise ModelFileError(folder, "no adapter_model.safetensors or adapter_model.bin")
    where, get = tensor_source(files[:1])
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    scale = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    deltas: dict[str, torch.Tensor] = {}
    for name in where:
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in where:
            raise ModelFileError(files[0], f"{name!r} has no matching {b_name!r}")
        a, b = get(name).float(), get(b_name).float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ModelFileError(files[0], f"LoRA pair {module!r} has shapes A {list(a.shape)}, B {list(b.shape)}; "
                                           "expected A [r, in] and B [out, r]")
        delta = (b @ a) * scale
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        base = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        deltas[base + ".weight"] = delta
    if not deltas:
        raise ModelFileError(files[0], "holds no lora_A / lora_B tensors")
    return deltas


def merged(get: Callable[[str], Weight], deltas: dict[str, torch.Tensor], names: set[str],
           source: object) -> Callable[[str], Weight]:
    """A tensor reader that adds each adapter delta to its base weight."""
    missing = sorted(set(deltas) - names)
    if missing:
        raise ModelFileError(source, f"the LoRA adapter targets tensors the model does not have: {missing[:3]}")

    def read(name: str) -> Weight:
        w = get(name)
        if name not in deltas:
            return w
        base = w.dequantize(torch.float32) if isinstance(w, QTensor) else w.float()
        if base.shape != deltas[name].shape:
            raise ModelFileError(source, f"LoRA delta for {name!r} is {list(deltas[name].shape)}, "
                                         f"the weight is {list(base.shape)}")
        out = base + deltas[name]
        return out if isinstance(w, QTensor) else out.to(w.dtype)

    return read
