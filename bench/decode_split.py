"""One decode step split into the linear modules (the kernels) and everything else (the "glue"):
the glue is the step of the torch blocks with every linear swapped for a stub returning a tensor of the
right shape. Where the step is fused in C++ (ggml weights) there is no glue to isolate: "step_ms" is the
fused step, beside the torch blocks' step and glue and the linears called one by one from Python.
Process CPU time, lowest of several repeats: wall time on a shared CPU swings too much.

Usage: .venv/bin/python bench/decode_split.py [MODEL] [--threads 1] [--position 64]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import nn

from chatglm import load_model


class Stub(nn.Module):
    """Stands in for a linear module: a fresh output of its shape, no arithmetic."""

    def __init__(self, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.out = torch.randn(1, 1, out_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.clone()


def cpu_ms(fn: Callable[[], object], calls: int = 30, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e3


def prefilled(name: str, position: int) -> tuple[nn.Module, Callable[[], None]]:
    """The model with `position` tokens cached, and one decode step at the next position (repeatable)."""
    model = load_model(name)
    cache = model.new_cache(1, position + 8)
    slots = torch.zeros(1, dtype=torch.long)
    model(torch.randint(100, 1000, (1, position)), torch.arange(position)[None], cache, slots)
    token, pos = torch.tensor([[5]]), torch.tensor([[position]])

    def step() -> None:
        model(token, pos, cache, slots, last_only=True)

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--position", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, step = prefilled(args.model, args.position)
    cfg = model.config
    whole = cpu_ms(step)
    names = ("qkv", "o", "gate_up", "up", "down")  # wherever a family's block holds them (GLM-4-0414: attn.qkv)
    real = {(i, path): module for i, layer in enumerate(model.layers) for path, module in layer.named_modules()
            if path.rsplit(".", 1)[-1] in names}
    x = torch.randn(1, 1, cfg.hidden_size).to(model.dtype)
    wide = torch.randn(1, 1, cfg.ffn_size).to(model.dtype)

    def linears() -> None:
        for (_, path), module in real.items():
            module(wide if path.endswith("down") else x)
        model.head(x)

    def put(i: int, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.layers[i].get_submodule(parent), name, module)

    kernels = cpu_ms(linears)
    fused, model.fused = model.fused, None  # the torch blocks, whose glue the stubs isolate
    torch_step = cpu_ms(step)
    head = model.head
    with torch.inference_mode():
        for (i, path), module in real.items():
            put(i, path, Stub(module.out_features, model.dtype))
        model.head = Stub(cfg.vocab_size, model.dtype)
        glue = cpu_ms(step)
    for (i, path), module in real.items():
        put(i, path, module)
    model.head, model.fused = head, fused
    print(json.dumps({"model": args.model, "layers": cfg.num_layers, "threads": args.threads,
                      "step_ms": round(whole, 2), "fused": fused is not None, "linears_ms": round(kernels, 2),
                      "torch_blocks": {"step_ms": round(torch_step, 2), "glue_ms": round(glue, 2),
                                       "glue_us_per_layer": round(glue / cfg.num_layers * 1e3)}}))

if __name__ == "__main__":
    main()
