"""Soak: one long conversation (1000 turns by default) on the default model through the server's batch
engine, the way a chat client keeps talking to `chatglm serve`: each turn sends the whole history, the
engine reuses the cached prefix, and the client drops the oldest half of the turns whenever the prompt
would not fit the context. Prints the resident memory every 50 turns; it reports, it asserts nothing.

Usage: .venv/bin/python bench/soak.py [--turns 1000] [--max-new-tokens 8] [--context 1024] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chatglm import Pipeline
from chatglm.engine import BatchEngine, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What color is the sky?",
             "Say a word that rhymes with cat.", "How many legs does a spider have?", "Give me a fruit.",
             "What is two plus three?", "Name an ocean."]


def rss_mb() -> float:
    """This process's resident memory now (not its peak), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024, help="the engine's context per sequence")
    ap.add_argument("--every", type=int, default=50, help="report every this many turns")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = Pipeline(args.model)
    engine = BatchEngine(pipe.model, max_batch=1, context=args.context)
    limit = args.context - args.max_new_tokens
    params = SamplingParams(do_sample=False, max_new_tokens=args.max_new_tokens)
    messages: list[dict[str, str]] = []
    rows, trims, start, rss_start = [], 0, time.perf_counter(), rss_mb()
    print(json.dumps({"turn": 0, "rss_mb": round(rss_start, 1)}), flush=True)
    for turn in range(1, args.turns + 1):
        messages.append({"role": "user", "content": f"{QUESTIONS[turn % len(QUESTIONS)]} (turn {turn})"})
        prompt = pipe.tokenizer.encode_chat(messages)
        while len(prompt) > limit and len(messages) > 1:
            messages = messages[(len(messages) // 2) & ~1:]  # the oldest half of the turns, whole turns
            prompt = pipe.tokenizer.encode_chat(messages)
            trims += 1
        reply = list(engine.submit(prompt, params, pipe.stop_ids, pipe.tokenizer.vocab_size))
        messages.append({"role": "assistant", "content": pipe.tokenizer.decode(reply)})
        if turn % args.every == 0:
            row = {"turn": turn, "rss_mb": round(rss_mb(), 1), "prompt_tokens": len(prompt), "trims": trims,
                   "elapsed_s": round(time.perf_counter() - start, 1), **engine.stats}
            rows.append(row)
            print(json.dumps(row), flush=True)
    engine.close()
    first = rows[0]["rss_mb"] if rows else rss_start
    print(json.dumps({"turns": args.turns, "rss_after_load_mb": round(rss_start, 1),
                      f"rss_turn_{args.every}_mb": first, "rss_end_mb": round(rss_mb(), 1),
                      "growth_after_first_report_mb": round(rss_mb() - first, 1),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
