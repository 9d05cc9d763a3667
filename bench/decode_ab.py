"""Our decode step against llama.cpp's on the same GGUF file in one process, alternating rounds (A/B/A/B), with the
bytes a token reads (every block linear but the embedding, only the chosen experts, the float32 routers).

On a shared machine wall time swings with the neighbours' load for both engines; `--cpu-time` with `--threads 1`
(process CPU time: llama.cpp's single thread does not spin) is the steadier comparison.

    .venv/bin/python bench/decode_ab.py FILE.gguf [--rounds 8] [--tokens 8] [--threads 2] [--cpu-time]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from chatglm.bench import prompt_ids
from chatglm.kernels.ggml import GGMLLinear
from chatglm.loaders import load_model

PROMPT = 16


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: block linears less the embedding (rows looked up) and unchosen experts."""
    size = lambda m: sum(p.numel() for p in m.parts)  # noqa: E731
    total = sum(size(m) for m in model.modules() if isinstance(m, GGMLLinear)) - size(model.embed.table)
    for layer in model.layers:
        experts = getattr(getattr(layer, "ffn", None), "experts", None)
        if experts is not None:
            unchosen = len(experts) - model.config.moe.experts_per_token
            total += layer.ffn.router.weight.numel() * 4 - unchosen * (size(experts[0].gate_up) + size(experts[0].down))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8, help="tokens per engine per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    args = p.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    model = load_model(args.model)
    ctx = PROMPT + args.rounds * args.tokens + 8
    ids = prompt_ids(model.config.vocab_size, PROMPT)
    cache, slots = model.new_cache(1, ctx), torch.zeros(1, dtype=torch.long)
    model(torch.tensor([ids]), torch.arange(PROMPT)[None], cache, slots)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    llm.eval(ids)
    ours, theirs, pos = [], [], PROMPT
    try:
        for _ in range(args.rounds):
            t = clock()
            for _ in range(args.tokens):
                model(torch.tensor([[ids[-1]]]), torch.tensor([[pos]]), cache, slots)
                pos += 1
            ours.append((clock() - t) / args.tokens)
            t = clock()
            for _ in range(args.tokens):
                llm.eval([ids[-1]])
            theirs.append((clock() - t) / args.tokens)
    finally:
        llm.close()
    per_token = bytes_per_token(model)
    print(json.dumps({
        "model": args.model, "threads": args.threads, "clock": "cpu" if args.cpu_time else "wall",
        "fused": type(model.fused).__name__ if model.fused is not None else None,
        "bytes_per_token_mb": round(per_token / 1e6, 1),
        "ours_ms": [round(t * 1e3, 1) for t in ours], "llama_cpp_ms": [round(t * 1e3, 1) for t in theirs],
        "median_ratio": round(statistics.median(t / o for t, o in zip(theirs, ours)), 3),
        "ours_gb_s": round(per_token / statistics.median(ours) / 1e9, 1),
        "llama_cpp_gb_s": round(per_token / statistics.median(theirs) / 1e9, 1),
    }))


if __name__ == "__main__":
    main()
