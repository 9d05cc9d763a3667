"""What a decode matrix-vector product costs in compute, apart from the memory bus: a weight matrix small enough
to stay in L2 (resident), called over and over, against the same product streaming a matrix far larger than the
caches (the 6B shape's gate_up, 13696x2x4096). The resident cost per 32-value block says how fast a bus the kernel
can keep up with: at ns per block t, one core consumes (block bytes / t) GB/s. A faster bus than that makes the
kernel the limit; llama.cpp's 8.2-10 tok/s on the 6B q4_0 file is ~34 GB/s, ~17 GB/s a core at 2 threads.

Process CPU time (the shared machine's wall time swings), lowest of several repeats; `--old DIR` times a second
build of the extension (DIR/old/_ggml.so, e.g. a copy of main's) in the same process, alternating A/B; the
streaming case also gives the wall-clock GB/s, and `--busy` puts a CPU-bound process on core 0 beside it.

Usage: .venv/bin/python bench/kernel_cost.py [--threads 1] [--old /tmp/old_build] [--busy]
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import subprocess
import sys
import time
from types import ModuleType

import torch

from chatglm.kernels import ggml

BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
QTYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}


def random_blocks(rows: int, k: int, name: str) -> torch.Tensor:
    """Random codes with a valid f16 scale (and offset) in each block: timing does not depend on the values."""
    size = BLOCK_BYTES[name]
    raw = torch.randint(0, 256, (rows, k // 32, size), dtype=torch.uint8)
    halves = 2 if name in ("q4_1", "q5_1") else 1
    raw[:, :, : 2 * halves] = torch.tensor([0x00, 0x24] * halves, dtype=torch.uint8)  # f16 0.0156
    return raw.view(rows, -1)


def seconds(fn, repeats: int, clock=time.process_time) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def time_kernel(mod: ModuleType, x: torch.Tensor, w: torch.Tensor, qtype: int, calls: int, repeats: int,
                clock=time.process_time) -> float:
    """Seconds per call: process CPU time (summed over threads: the cost, not the latency) or `clock`'s."""
    parts = [w]

    def run() -> None:
        for _ in range(calls):
            mod.linear(x, parts, qtype, ggml.TILE_ROWS)

    return seconds(run, repeats, clock) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old", help="a directory holding old/_ggml.so, timed beside this tree's build")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--rounds", type=int, default=3, help="A/B alternations")
    ap.add_argument("--busy", action="store_true", help="a CPU-bound process pinned to core 0 runs beside the kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.busy:
        busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while 1: pass"])
        atexit.register(busy.kill)
    mods = {"new": ggml._ggml}
    if args.old:
        sys.path.insert(0, args.old)
        mods["old"] = importlib.import_module("old._ggml")
    gen = torch.Generator().manual_seed(0)
    out = {"threads": args.threads, "results": []}
    for name in args.types.split(","):
        # resident: 4096 inputs x 256 rows (q4_0 0.6 MB, q8_0 1.1 MB: inside a 2 MB L2); streaming: 27392 x 4096
        for label, rows, k, calls in (("resident", 256, 4096, 200), ("resident-wide", 64, 13696, 200),
                                      ("streaming", 27392, 4096, 3)):
            w = random_blocks(rows, k, name)
            x = torch.randn(1, k, generator=gen)
            blocks = rows * k // 32
            row = {"type": name, "case": label, "rows": rows, "k": k}
            best = {m: float("inf") for m in mods}
            wall = dict(best)
            for _ in range(args.rounds):
                for tag, mod in mods.items():
                    best[tag] = min(best[tag], time_kernel(mod, x, w, QTYPE[name], calls, 5))
                    if label == "streaming":  # and the latency: how fast the threads together read the weights
                        wall[tag] = min(wall[tag], time_kernel(mod, x, w, QTYPE[name], calls, 5, time.perf_counter))
            for tag, sec in best.items():
                ns = sec / blocks * 1e9
                row[tag] = {"us_per_call": round(sec * 1e6, 1), "ns_per_block": round(ns, 3),
                            "GB_per_s_per_core": round(BLOCK_BYTES[name] / ns, 1)}
                if label == "streaming":
                    row[tag]["wall_GB_per_s"] = round(w.numel() / wall[tag] / 1e9, 1)
            out["results"].append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
