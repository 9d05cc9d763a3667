"""Time to first token of turn 1 and turn 5 of one conversation through the batch engine, and of
the same turn-5 prompt on a fresh engine (nothing cached): what prefix reuse saves.

Usage: .venv/bin/python bench/prefix_reuse.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from chatglm import Pipeline
from chatglm.engine import BatchEngine, SamplingParams

QUESTIONS = ["Tell me about the history of Paris.", "What about its museums?", "Which one is the largest?",
             "How many visitors does it have each year?", "Summarize our conversation in two sentences."]


def first_token_s(engine: BatchEngine, prompt: list[int], stop: frozenset[int]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    request = engine.submit(prompt, SamplingParams(do_sample=False, max_new_tokens=48), stop)
    tokens = iter(request)
    first = next(tokens)
    ttft = time.perf_counter() - start
    return ttft, [first, *tokens]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline("default")
    engine = BatchEngine(pipe.model, max_batch=4)
    first_token_s(engine, pipe.tokenizer.encode_chat([{"role": "user", "content": "hi"}]), pipe.stop_ids)  # warm-up
    messages, ttfts = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        prompt = pipe.tokenizer.encode_chat(messages)
        ttft, reply = first_token_s(engine, prompt, pipe.stop_ids)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": pipe.tokenizer.decode(reply)})
    engine.close()
    fresh = BatchEngine(pipe.model, max_batch=4)  # its own pool: nothing of the conversation is cached
    cold, _ = first_token_s(fresh, prompt, pipe.stop_ids)
    fresh.close()
    print(json.dumps({"turn5_prompt_tokens": len(prompt), "ttft_turn1_s": round(ttfts[0], 4),
                      "ttft_turn5_s": round(ttfts[-1], 4), "ttft_turn5_without_reuse_s": round(cold, 4),
                      "speedup_turn5": round(cold / ttfts[-1], 2)}))


if __name__ == "__main__":
    main()
