"""Where one prompt forward's time goes: torch's profiler over an N-token prefill, with the C++ calls named (the q4_0
products, each prompt kernel of kernels/prompt.py), which the profiler cannot see inside an extension on its own.

    .venv/bin/python bench/prompt_profile.py FILE.gguf [--tokens 3000] [--threads 2] [--rows 22]

Self CPU in the table is the calling thread's wall time inside each call; the first line gives the forward's wall
and process CPU time.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from chatglm.bench import prompt_ids
from chatglm.kernels import ggml
from chatglm.loaders import load_model

KERNELS = ("rms_norm_rows", "add_rms_norm_rows", "swiglu_rows", "rope_rows_", "causal_attention")


def named(fn, tag: str):
    """fn, its calls shown in the profile as `tag`."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with record_function(tag):
            return fn(*args, **kwargs)
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=22)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = ggml._ggml
    ext.linear = named(ext.linear, "cpp::linear (block products)")
    for name in KERNELS:
        if hasattr(ext, name):
            setattr(ext, name, named(getattr(ext, name), "cpp::" + name))
    model = load_model(args.model)
    n = args.tokens
    ids = torch.tensor([prompt_ids(model.config.vocab_size, n)])
    cache = model.new_cache(1, n)
    wall, cpu = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids, torch.arange(n)[None], cache, torch.zeros(1, dtype=torch.long), last_only=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{n} tokens: wall {wall:.2f} s ({n / wall:.1f} tok/s), process CPU {cpu:.2f} s, {args.threads} threads")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
