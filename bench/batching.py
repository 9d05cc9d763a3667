"""16 streamed requests on the default model: all at once through the batch engine, then one after another.

Usage: .venv/bin/python bench/batching.py [--requests 16] [--new-tokens 64] [--threads 2]
Prints one JSON line with both wall times and their ratio (sequential / concurrent).
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from chatglm import Pipeline
from chatglm.engine import BatchEngine, SamplingParams


def run(engine: BatchEngine, prompts: list[list[int]], new_tokens: int, stop: frozenset[int], concurrent: bool) -> float:
    params = dict(do_sample=False, max_new_tokens=new_tokens)

    def one(prompt: list[int]) -> None:
        assert len(list(engine.submit(prompt, SamplingParams(**params), stop))) > 0

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for p in prompts:
            one(p)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline("default")
    topics = ["the sea", "a city", "music", "the moon", "trains", "bread", "winter", "a garden"]
    prompts = [pipe.tokenizer.encode_chat([{"role": "user", "content": f"Write a long poem about {topics[i % 8]} ({i})."}])
               for i in range(args.requests)]
    engine = BatchEngine(pipe.model, max_batch=args.requests, max_queue=args.requests)
    run(engine, prompts[:2], 4, frozenset(), True)  # warm-up
    # no stop ids: every request generates exactly new_tokens, so both runs do the same work
    sequential = run(engine, prompts, args.new_tokens, frozenset(), False)
    concurrent = run(engine, prompts, args.new_tokens, frozenset(), True)
    engine.close()
    print(json.dumps({"requests": args.requests, "new_tokens": args.new_tokens, "threads": args.threads,
                      "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent, 2),
                      "ratio": round(sequential / concurrent, 2)}))


if __name__ == "__main__":
    main()
