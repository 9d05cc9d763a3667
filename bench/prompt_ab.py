"""One prompt forward with the C++ prompt kernels (kernels/prompt.py: norms, rotary, SwiGLU, causal attention)
against the same forward on the torch operators they replace, in one process, alternating rounds (A/B/A/B).

Process CPU time is the steadier figure on a shared machine (both sides run the same q4_0 products). A synthetic
file with the family's widths and few layers gives the per-layer ratio of the full model.

    .venv/bin/python bench/prompt_ab.py [FILE.gguf | --synthetic chatglm3-6b --layers 2] [--tokens 64 3000]
        [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chatglm.bench import prompt_ids
from chatglm.kernels import prompt
from chatglm.loaders import load_model
from chatglm.synthetic import synthetic_file


def forward_seconds(model, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one fresh n-token prompt forward."""
    ids = torch.tensor([prompt_ids(model.config.vocab_size, n)])
    cache = model.new_cache(1, n)
    wall, cpu = time.perf_counter(), time.process_time()
    model(ids, torch.arange(n)[None], cache, torch.zeros(1, dtype=torch.long), last_only=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a GGUF file (default: a synthetic one, see --synthetic)")
    p.add_argument("--synthetic", default="chatglm3-6b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--qtype", default="q4_0")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 3000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.gettempdir()) / "chatglm-synthetic"
    path = args.model or str(synthetic_file(args.synthetic, args.qtype, folder, args.layers))
    model = load_model(path)
    kernels = prompt._ggml
    for n in args.tokens:
        times: dict[str, list[tuple[float, float]]] = {"cpp": [], "torch": []}
        forward_seconds(model, n)  # warm: pages of the file and the cache touched once
        for _ in range(args.rounds):
            for side in times:
                prompt._ggml = kernels if side == "cpp" else None  # None: kernels/prompt.py's torch expressions
                times[side].append(forward_seconds(model, n))
        prompt._ggml = kernels
        med = {side: [statistics.median(t[i] for t in ts) for i in (0, 1)] for side, ts in times.items()}
        print(json.dumps({"file": Path(path).name, "tokens": n, "threads": args.threads,
                          "cpp_wall_s": round(med["cpp"][0], 3), "torch_wall_s": round(med["torch"][0], 3),
                          "cpp_cpu_s": round(med["cpp"][1], 3), "torch_cpu_s": round(med["torch"][1], 3),
                          "cpu_ratio": round(med["torch"][1] / med["cpp"][1], 3)}))


if __name__ == "__main__":
    main()
