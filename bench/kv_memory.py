"""What the paged KV pool costs and saves (docs/BENCHMARKS.md, "KV memory").

  server   `chatglm serve` in a subprocess: resident memory at start and its peak while N concurrent
           conversations of about T tokens each are answered.
  decode   16 streams decoding through blocks of 16 tokens against the same forward with one block per
           sequence (the slots x context layout of the contiguous cache), alternating step by step in one
           run; tokens/s from the median step.
  shared   16 requests sharing a system prompt of about 1,000 tokens, with prefix sharing on and off:
           mean time to first token and the KV blocks held at the peak.

Usage: .venv/bin/python bench/kv_memory.py server [-m MODEL] [--requests 8] [--tokens 4000] [-- serve flags]
       .venv/bin/python bench/kv_memory.py decode [--streams 16] [--context 512] [--threads 2]
       .venv/bin/python bench/kv_memory.py shared [--requests 16] [--threads 2]
Each prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from chatglm import Pipeline
from chatglm.engine import BatchEngine, SamplingParams

WORDS = "the quick brown fox jumps over a lazy dog while seven tired owls watch from an old oak tree".split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.load(r)


def server(args: argparse.Namespace) -> dict:
    port = 8765
    cmd = [sys.executable, "-m", "chatglm", "serve", "-m", args.model, "--port", str(port), "--max-batch",
           str(args.requests), "--log-level", "warning", *args.serve_flags]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        banner = proc.stderr.readline().strip()
        start = rss_mb(proc.pid)
        peak, done, usage = start, threading.Event(), []

        def ask(k: int) -> None:
            text = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(int(args.tokens * 0.97)))
            usage.append(post(f"{base}/v1/chat/completions", {
                "model": "m", "max_tokens": args.new_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Conversation {k}: {text}"}]})["usage"])

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(args.requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mb(proc.pid))
            time.sleep(0.2)
        return {"model": args.model, "banner": banner, "requests": args.requests,
                "prompt_tokens": [u["prompt_tokens"] for u in usage], "rss_start_mb": round(start),
                "rss_peak_under_load_mb": round(peak), "wall_s": round(time.perf_counter() - t0, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def decode(args: argparse.Namespace) -> dict:
    model = Pipeline(args.model).model
    B, n = args.streams, args.context
    prompt = torch.randint(100, 1000, (B, n // 2), generator=torch.Generator().manual_seed(0))
    slots = torch.arange(B)
    caches = {"paged": model.new_cache(B, n), "contiguous": model.new_cache(B, n, block_size=n)}
    for cache in caches.values():
        model(prompt, torch.arange(n // 2).expand(B, -1), cache, slots, last_only=True)
    times: dict[str, list[float]] = {name: [] for name in caches}
    token = prompt[:, -1:]
    for k in range(args.rounds * args.steps):  # alternate step by step, so both see the same machine load
        pos = torch.full((B, 1), n // 2 + k)
        for name, cache in caches.items():
            t = time.perf_counter()
            model(token, pos, cache, slots)
            times[name].append(time.perf_counter() - t)
    rate = {name: B / statistics.median(s) for name, s in times.items()}  # the median step: load spikes aside
    return {"model": args.model, "streams": B, "context_reached": n // 2 + args.rounds * args.steps,
            "paged_tok_s": round(rate["paged"], 1), "contiguous_tok_s": round(rate["contiguous"], 1),
            "ratio": round(rate["paged"] / rate["contiguous"], 3), "threads": torch.get_num_threads()}


def shared(args: argparse.Namespace) -> dict:
    pipe = Pipeline(args.model)
    system = " ".join(WORDS[j % len(WORDS)] for j in range(975))  # about 1,000 tokens
    prompts = [pipe.tokenizer.encode_chat([{"role": "system", "content": system},
                                           {"role": "user", "content": f"Question {k}: name a colour."}])
               for k in range(args.requests)]
    out = {"model": args.model, "requests": args.requests, "prompt_tokens": len(prompts[0])}
    for share in (True, False):
        engine = BatchEngine(pipe.model, max_batch=args.requests, max_queue=args.requests, share_prefixes=share)
        list(engine.submit(prompts[0][-8:], SamplingParams(do_sample=False, max_new_tokens=2)))  # warm-up
        ttft = []

        def one(prompt: list[int]) -> None:
            t = time.perf_counter()
            request = engine.submit(prompt, SamplingParams(do_sample=False, max_new_tokens=8))
            tokens = iter(request)
            next(tokens, None)
            ttft.append(time.perf_counter() - t)
            list(tokens)

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        key = "shared" if share else "unshared"
        per_block = engine.cache.kv[:, :, :, 0].numel() * engine.cache.kv.itemsize
        out.update({f"{key}_wall_s": round(time.perf_counter() - start, 2),
                    f"{key}_mean_ttft_s": round(sum(ttft) / len(ttft), 2),
                    f"{key}_prefill_tokens": engine.stats["prefill_tokens"],
                    f"{key}_peak_kv_mb": round(engine.stats["peak_blocks"] * per_block / 2**20, 1)})
        engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["server", "decode", "shared"])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4000, help="server: prompt tokens per conversation, about")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--context", type=int, default=512, help="decode: tokens per stream the caches hold")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("serve_flags", nargs="*", help="server: flags passed to chatglm serve (after --)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"server": server, "decode": decode, "shared": shared}[args.what](args)))


if __name__ == "__main__":
    main()
