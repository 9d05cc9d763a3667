"""Where a fused decode step's time goes on a ggml-block model: kernels, glue, threads, and what limits it.

- step: one token at position --position through the model (the fused C++ step, then the head), wall and
  process CPU time;
- kernels: every linear of that step (each layer's qkv, o, gate_up, down, and the head) called alone, at --threads
  and at 1 thread: "glue" is the step less its kernels (attention, norms, rotary, Python), "threads" is how far
  --threads falls short of dividing the kernels' one-thread time;
- compute: the same kernels on a weight matrix that stays in L2 (bench/kernel_cost.py's case), in ns per 32-value
  block, so "compute_bound_ms" is what the kernels would take if memory were infinitely fast, and the weights'
  GB/s over the kernels' wall time is how near the bus they run.

Wall times are the lowest of several repeats; on a busy shared machine only the CPU times mean anything, and with
--threads 1 "glue_cpu_ms" (the step's CPU time less its kernels') is the glue whatever the load. `--old DIR` runs with DIR/old/_ggml.so (e.g.
main's build) instead of this tree's, for an A/B in alternating processes.

Usage: .venv/bin/python bench/decode_profile.py MODEL [--threads 2] [--position 64] [--old DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable

import torch


def best(fn: Callable[[], object], calls: int, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call, each the lowest over the repeats."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall = min(wall, (time.perf_counter() - w0) / calls)
        cpu = min(cpu, (time.process_time() - c0) / calls)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old", help="a directory holding old/_ggml.so to run instead of this tree's kernels")
    args = ap.parse_args()
    if args.old:
        sys.path.insert(0, args.old)
        sys.modules["chatglm.kernels._ggml"] = importlib.import_module("old._ggml")
    from chatglm.kernels import ggml  # after the swap above
    from decode_split import prefilled
    from kernel_cost import BLOCK_BYTES, QTYPE, random_blocks, time_kernel

    torch.set_num_threads(args.threads)
    model, step = prefilled(args.model, args.position)
    cfg = model.config
    assert model.fused is not None, f"{args.model}: the step is not fused (not all ggml blocks), nothing to profile"

    parts = [layer.fused_parts() for layer in model.layers]  # each block's products as the fused step takes them
    linears = [p[n] for p in parts for n in ("qkv", "o", "gate_up", "down")] + [model.head]
    inputs = {m.in_features: torch.randn(1, m.in_features) for m in linears}
    weight_bytes = sum(p.numel() for m in linears for p in m.parts)
    blocks = {m.qtype.name.lower(): 0 for m in linears}
    for m in linears:
        blocks[m.qtype.name.lower()] += m.out_features * m.in_features // 32

    def kernels() -> None:
        for m in linears:
            ggml._ggml.linear(inputs[m.in_features], list(m.parts), int(m.qtype), ggml.TILE_ROWS)

    step_wall, step_cpu = best(step, 3, args.repeats)
    kern_wall, kern_cpu = best(kernels, 3, args.repeats)
    torch.set_num_threads(1)
    kern1_wall, _ = best(kernels, 2, args.repeats)
    compute_ns = {}
    for name in blocks:  # the resident 4096-wide case, one thread
        w, x = random_blocks(256, 4096, name), torch.randn(1, 4096)
        compute_ns[name] = min(time_kernel(ggml._ggml, x, w, QTYPE[name], 200, 5) for _ in range(3)) / (256 * 128) * 1e9
    compute_ms = sum(blocks[n] * compute_ns[n] for n in blocks) / 1e6 / args.threads
    ms = lambda s: round(s * 1e3, 2)  # noqa: E731
    print(json.dumps({
        "model": args.model, "layers": cfg.num_layers, "threads": args.threads, "kernels_build": "old" if args.old else "this",
        "weights_MB": round(weight_bytes / 1e6, 1),
        "step_ms": ms(step_wall), "step_cpu_ms": ms(step_cpu), "tok_per_s": round(1 / step_wall, 2),
        "kernels_ms": ms(kern_wall), "kernels_cpu_ms": ms(kern_cpu), "kernels_1_thread_ms": ms(kern1_wall),
        "glue_ms": ms(step_wall - kern_wall), "glue_cpu_ms": ms(step_cpu - kern_cpu),
        "glue_cpu_us_per_layer": round((step_cpu - kern_cpu) / cfg.num_layers * 1e6),
        "thread_scaling": round(kern1_wall / kern_wall, 2),
        "kernels_GB_per_s": round(weight_bytes / kern_wall / 1e9, 1),
        "compute_ns_per_block": {n: round(v, 3) for n, v in compute_ns.items()},
        "compute_bound_ms": round(compute_ms, 2),
        "compute_share_of_kernels": round(compute_ms / (kern_wall * 1e3), 2),
        "block_bytes": {n: BLOCK_BYTES[n] for n in blocks},
    }))


if __name__ == "__main__":
    main()
