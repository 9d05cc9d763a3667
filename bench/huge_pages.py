"""Whether decode's matrix-vector products read weights faster from 2 MB pages: the same ggml blocks multiplied
as memory-mapped from a file (4 KB page-cache pages) and as copied into an anonymous MADV_HUGEPAGE buffer,
alternating A/B in one process (the shared machine's load swings between runs, less within one).

The weights are the first --layers blocks' qkv, o, gate_up, down of a GGUF file (q4_0: the 6B-shape synthetic
file's ~115 MB a layer), or, with --qtype q8_0, random q8_0 blocks of the 6B layer shapes written to a temporary
file (the 6.6 GB q8_0 file is too large to read here). One "pass" multiplies a one-token activation by every
weight, as a decode step does. Reports each variant's best wall GB/s (the bytes of the weights over the pass's
wall time) and process CPU seconds per pass, and the huge pages the copy really got (/proc/self/smaps).

Usage: .venv/bin/python bench/huge_pages.py [--gguf /tmp/synth/synthetic-chatglm3-6b-q4_0.gguf] [--layers 10]
       [--qtype q4_0|q8_0] [--threads 2] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chatglm.kernels import ggml
from chatglm.loaders.gguf import read_gguf
from chatglm.loaders.huge_pages import HugePageArena, huge_pages_of
from kernel_cost import QTYPE, random_blocks

SHAPES_6B = ((4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696))  # qkv, o, gate_up, down


def file_weights(path: Path, layers: int) -> list[tuple[torch.Tensor, int]]:
    """The first `layers` blocks' four products, as views of the mapped file."""
    f = read_gguf(path)
    names = [f"blk.{i}.{n}.weight" for i in range(layers) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]
    return [(f.tensor(n).raw, int(f.tensors[n].qtype)) for n in names]


def q8_file(layers: int, directory: str) -> Path:
    """Random q8_0 blocks of the 6B layer shapes in a file of our own."""
    path = Path(directory) / "q8_0.blocks"
    with open(path, "wb") as out:
        for _ in range(layers):
            for rows, k in SHAPES_6B:
                out.write(random_blocks(rows, k, "q8_0").numpy().tobytes())
    return path


def mapped_q8(path: Path, layers: int) -> list[tuple[torch.Tensor, int]]:
    import mmap

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out, at = [], 0
    for _ in range(layers):
        for rows, k in SHAPES_6B:
            n = rows * k // 32 * 34
            out.append((torch.frombuffer(m, dtype=torch.uint8, count=n, offset=at).view(rows, -1), QTYPE["q8_0"]))
            at += n
    return out


def copied(weights: list[tuple[torch.Tensor, int]]) -> tuple[list[tuple[torch.Tensor, int]], HugePageArena]:
    arena = HugePageArena(sum(w.numel() for w, _ in weights))
    return [(arena.copy(w), q) for w, q in weights], arena


def file_pmd_mapped() -> int:
    """Bytes of this process's file mappings the kernel maps with 2 MB entries (the page cache's large folios)."""
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("FilePmdMapped:"))


def one_pass(weights: list[tuple[torch.Tensor, int]], xs: dict[int, torch.Tensor]) -> None:
    for w, q in weights:
        ggml._ggml.linear(xs[w.shape[1] // (18 if q == QTYPE["q4_0"] else 34) * 32], [w], q, ggml.TILE_ROWS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="/tmp/synth/synthetic-chatglm3-6b-q4_0.gguf")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--qtype", default="q4_0", choices=("q4_0", "q8_0"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="A/B alternations")
    ap.add_argument("--passes", type=int, default=3, help="passes timed per round (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        if args.qtype == "q8_0":
            mapped = mapped_q8(q8_file(args.layers, tmp), args.layers)
        else:
            mapped = file_weights(Path(args.gguf), args.layers)
        t0 = time.perf_counter()
        huge, arena = copied(mapped)
        copy_s = time.perf_counter() - t0
        nbytes = sum(w.numel() for w, _ in mapped)
        gen = torch.Generator().manual_seed(0)
        xs = {k: torch.randn(1, k, generator=gen) for k in (4096, 13696)}
        for w, _ in mapped:  # fault the file's pages in before timing
            w.sum(dtype=torch.int64)
        best = {"mapped": [float("inf"), float("inf")], "huge": [float("inf"), float("inf")]}
        ratios = []  # each round's mapped over huge wall time (its best pass each)
        for _ in range(args.rounds):
            walls = {}
            for tag, weights in (("mapped", mapped), ("huge", huge)):
                one_pass(weights, xs)
                walls[tag] = float("inf")
                for _ in range(args.passes):
                    w0, c0 = time.perf_counter(), time.process_time()
                    one_pass(weights, xs)
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                    walls[tag] = min(walls[tag], wall)
                    best[tag] = [min(best[tag][0], wall), min(best[tag][1], cpu)]
            ratios.append(walls["mapped"] / walls["huge"])
        result = {"qtype": args.qtype, "threads": args.threads, "GB": round(nbytes / 1e9, 3),
                  "copy_s": round(copy_s, 3), "huge_MB": huge_pages_of(arena) >> 20}
        for tag, (wall, cpu) in best.items():
            result[tag] = {"wall_GB_per_s": round(nbytes / wall / 1e9, 1), "cpu_s": round(cpu, 4)}
        result["huge_over_mapped"] = round(best["mapped"][0] / best["huge"][0], 3)
        result["round_ratios_median"] = round(statistics.median(ratios), 3)
        result["round_ratios"] = [round(r, 3) for r in ratios]
        result["file_pmd_MB"] = file_pmd_mapped() >> 20
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
