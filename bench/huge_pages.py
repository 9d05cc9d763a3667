"""Whether decode reads weights faster from 2 MB pages: the same ggml blocks as memory-mapped from the file (4 KB
page-cache pages) and as `--no-mmap` moves them into anonymous MADV_HUGEPAGE pages
(chatglm/loaders/huge_pages.py), alternating A/B in one process (the shared machine's load swings between runs,
less within one). Development only: the ratio against llama.cpp is `chatglm bench --compare llama.cpp`'s.

kernels (default): the first --layers blocks' qkv, o, gate_up, down of a q4_0 GGUF (the 6B-shape synthetic file's
~115 MB a layer) or, with --qtype q8_0, random q8_0 blocks of the 6B layer shapes in a temporary file (the 6.6 GB
q8_0 file is too large to read here), dropped from the page cache and read back through the mapping as a first
load would; one "pass" multiplies a one-token activation by every weight, as a decode step does.
--decode FILE: whole decode steps of FILE loaded twice, mapped and with use_mmap=False.

Reports each variant's best wall GB/s (kernels) or ms per token (decode), process CPU seconds, the median of the
rounds' mapped/huge ratios (wall and CPU), and the 2 MB pages each side really got (/proc/self/smaps:
AnonHugePages of the moved weights, FilePmdMapped of the file: the page cache's own large folios).

Usage: .venv/bin/python bench/huge_pages.py [--gguf /tmp/synth/synthetic-chatglm3-6b-q4_0.gguf] [--layers 10]
       [--qtype q4_0|q8_0] [--threads 2] [--rounds 10]
       .venv/bin/python bench/huge_pages.py --decode FILE.gguf [--small-pages] [--rounds 10] [--tokens 8]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from chatglm.bench import prompt_ids
from chatglm.kernels import ggml
from chatglm.loaders import load_model
from chatglm.loaders.gguf import read_gguf
from chatglm.loaders.huge_pages import into_huge_pages, settle
from kernel_cost import QTYPE, random_blocks

SHAPES_6B = ((4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696))  # qkv, o, gate_up, down
Weights = list[tuple[torch.Tensor, int, int]]  # (blocks as uint8 [rows, bytes a row], qtype, inputs)


def smaps_total(field: str) -> int:
    """This process's bytes under one /proc/self/smaps field, all mappings together."""
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def gguf_spans(path: Path, layers: int) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int, int]]]:
    """The first `layers` blocks' four products: file spans, and (rows, qtype, inputs) for each."""
    f = read_gguf(path)
    names = [f"blk.{i}.{n}.weight" for i in range(layers) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]
    shapes = {n: (f.tensors[n].shape[0], int(f.tensors[n].qtype), f.tensors[n].shape[1]) for n in names}
    return {n: (f.tensors[n].start, f.tensors[n].nbytes) for n in names}, shapes


def q8_spans(path: Path, layers: int) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int, int]]]:
    """Random q8_0 blocks of the 6B layer shapes written to `path`, then dropped from the page cache."""
    spans, shapes, at = {}, {}, 0
    with open(path, "wb") as out:
        for i in range(layers):
            for j, (rows, k) in enumerate(SHAPES_6B):
                data = random_blocks(rows, k, "q8_0").numpy().tobytes()
                out.write(data)
                spans[f"{i}.{j}"], shapes[f"{i}.{j}"] = (at, len(data)), (rows, QTYPE["q8_0"], k)
                at += len(data)
        out.flush()
        os.fsync(out.fileno())
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return spans, shapes


def as_weights(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int, int]]) -> Weights:
    return [(tensors[n].view(rows, -1), q, k) for n, (rows, q, k) in shapes.items()]


def alternate(variants: dict[str, Callable[[], None]], rounds: int, passes: int) -> tuple[dict, dict]:
    """Each variant's best (wall, CPU) seconds a pass, and the median over rounds of the mapped/huge ratio of
    each round's best wall and best CPU time (CPU time: the threads' work, stalls on memory included, without the
    time a neighbour held the core)."""
    best = {tag: [float("inf"), float("inf")] for tag in variants}
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(rounds):
        this = {tag: [float("inf"), float("inf")] for tag in variants}
        for tag, run in variants.items():
            run()
            for _ in range(passes):
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                this[tag] = [min(this[tag][0], wall), min(this[tag][1], cpu)]
                best[tag] = [min(best[tag][0], wall), min(best[tag][1], cpu)]
        for i, clock in enumerate(ratios):
            ratios[clock].append(this["mapped"][i] / this["huge"][i])
    return best, {f"median_{clock}_ratio": round(statistics.median(r), 3) for clock, r in ratios.items()}


def kernels(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "q8_0.blocks" if args.qtype == "q8_0" else Path(args.gguf)
        spans, shapes = q8_spans(path, args.layers) if args.qtype == "q8_0" else gguf_spans(path, args.layers)
        buffers = []
        for _ in range(2):  # the file mapped twice: one mapping stays, the other's weights move into huge pages
            with open(path, "rb") as f:
                buffers.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapping is read-only
            mapped, huge = (as_weights({n: torch.frombuffer(b, dtype=torch.uint8, count=s[1], offset=s[0])
                                        for n, s in spans.items()}, shapes) for b in buffers)
        for w, _, _ in mapped:  # fault the file's pages in, as a first decode step would
            w.sum(dtype=torch.int64)
        t0 = time.perf_counter()
        placement = into_huge_pages(path, buffers[1], spans.values())
        settle()
        move_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        xs = {k: torch.randn(1, k, generator=gen) for k in {k for _, _, k in mapped}}

        def one_pass(weights: Weights) -> Callable[[], None]:
            return lambda: [ggml._ggml.linear(xs[k], [w], q, ggml.TILE_ROWS) for w, q, k in weights]

        best, ratios = alternate({"mapped": one_pass(mapped), "huge": one_pass(huge)}, args.rounds, args.passes)
        nbytes = sum(n for _, n in spans.values())
        out = {"qtype": args.qtype, "GB": round(nbytes / 1e9, 3), "move_s": round(move_s, 3), "placement": placement,
               "file_pmd_MB": smaps_total("FilePmdMapped") >> 20}
        for tag, (wall, cpu) in best.items():
            out[tag] = {"wall_GB_per_s": round(nbytes / wall / 1e9, 1), "cpu_s": round(cpu, 4)}
        del mapped
        return out | ratios


def into_small_pages(path: str) -> None:
    """The file dropped from the page cache and read back in 64 KB reads with readahead off: the page cache then
    holds it in pages too small to map 2 MB at a time, as it holds the 6B file here (FilePmdMapped 60-150 MB of
    1.1 GB read), where a file read back with readahead would get large folios. Only for a file of your own:
    dropping a shared file makes its other readers read it from disk again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = bytearray(64 << 10)
        for at in range(0, os.fstat(fd).st_size, len(buf)):
            os.preadv(fd, [buf], at)
    finally:
        os.close(fd)


def decode(args: argparse.Namespace) -> dict:
    if args.small_pages:
        into_small_pages(args.decode)
    models = {"mapped": load_model(args.decode), "huge": load_model(args.decode, use_mmap=False)}
    settle()
    ids = prompt_ids(models["mapped"].config.vocab_size, 16)
    ctx = 16 + (args.rounds * (args.passes + 1) + 1) * args.tokens + 8
    state = {}
    for tag, model in models.items():
        cache, slots = model.new_cache(1, ctx), torch.zeros(1, dtype=torch.long)
        model(torch.tensor([ids]), torch.arange(16)[None], cache, slots)
        state[tag] = [cache, slots, 16]

    def steps(tag: str) -> Callable[[], None]:
        def run() -> None:
            cache, slots, pos = state[tag]
            for _ in range(args.tokens):
                models[tag](torch.tensor([[ids[-1]]]), torch.tensor([[pos]]), cache, slots)
                pos += 1
            state[tag][2] = pos
        return run

    best, ratios = alternate({tag: steps(tag) for tag in models}, args.rounds, args.passes)
    out = {"model": args.decode, "tokens_per_pass": args.tokens, "anon_huge_MB": smaps_total("AnonHugePages") >> 20,
           "file_pmd_MB": smaps_total("FilePmdMapped") >> 20}
    for tag, (wall, cpu) in best.items():
        out[tag] = {"ms_per_token": round(wall / args.tokens * 1e3, 2),
                    "cpu_ms_per_token": round(cpu / args.tokens * 1e3, 2)}
    return out | ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="/tmp/synth/synthetic-chatglm3-6b-q4_0.gguf")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--qtype", default="q4_0", choices=("q4_0", "q8_0"))
    ap.add_argument("--decode", metavar="FILE", help="A/B whole decode steps of this file instead of the kernels")
    ap.add_argument("--tokens", type=int, default=8, help="--decode: tokens a pass")
    ap.add_argument("--small-pages", action="store_true",
                    help="--decode: first put the file in the page cache in small pages (see into_small_pages)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="A/B alternations")
    ap.add_argument("--passes", type=int, default=3, help="passes timed per round (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = decode(args) if args.decode else kernels(args)
    print(json.dumps({"threads": args.threads, **out}), flush=True)


if __name__ == "__main__":
    main()
