"""`chatglm serve --replicas`: aggregate decode speed and turn-5 time to first token, in one run.

Starts, one after another, the default model on 1 replica, on 2 replicas with prefix routing and on 2 replicas
with load-only routing (1 thread each, a local Ray instance), and against each:
- 32 concurrent streamed chats: generated tokens / wall time;
- 4 conversations of 5 turns at the same time, each about a document of its own (--document-words, so that a
  turn landing on a replica without the conversation's prefix must compute it again), each turn followed by an
  unrelated request: median time to the first streamed token of turn 5.

Usage: .venv/bin/python bench/replicas.py [--streams 32] [--new-tokens 64] [--document-words 600]
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

QUESTIONS = ["Tell me about the history of Paris.", "What about its museums?", "Which one is the largest?",
             "How many visitors does it have each year?", "Summarize our conversation in two sentences."]


def start(replicas: int, routing: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chatglm", "serve", "--replicas", str(replicas), "--threads", "1",
                             "--routing", routing, "--port", str(port), "--max-batch", "16", "--max-queue", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def stream(url: str, messages: list[dict], new_tokens: int) -> tuple[float, str, int]:
    """(seconds to the first content token, the reply, its token count)."""
    body = {"messages": messages, "temperature": 0, "max_tokens": new_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    begin, first, text, tokens = time.perf_counter(), None, [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - begin
                    text.append(choice["delta"]["content"])
    return first or 0.0, "".join(text), tokens


def throughput(url: str, streams: int, new_tokens: int) -> float:
    asks = [[{"role": "user", "content": f"Write a long story about a lighthouse keeper named {k}."}]
            for k in range(streams)]
    stream(url, asks[0], 4)  # warm-up
    begin = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(t for _, _, t in pool.map(lambda m: stream(url, m, new_tokens), asks))
    return tokens / (time.perf_counter() - begin)


def document(c: int, words: int) -> str:
    """A text of its own for conversation c: no two conversations share a prefix beyond the template's."""
    vocabulary = ("river bridge market tower garden museum street square palace church harbour station library "
                  "theatre school park fountain gate wall hill").split()
    return " ".join(vocabulary[(c * 7 + k * k) % len(vocabulary)] for k in range(words))


def conversation(url: str, c: int, words: int) -> float:
    """Five turns about conversation c's document, each followed by an unrelated request; turn 5's time to the
    first token."""
    messages = [{"role": "system", "content": f"You are guide number {c}. Answer in two sentences about this "
                                              f"city's notes: {document(c, words)}"}]
    for k, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        ttft, reply, _ = stream(url, messages, 32)
        messages.append({"role": "assistant", "content": reply})
        stream(url, [{"role": "user", "content": f"Unrelated request {c}-{k}: name a colour."}], 8)
    return ttft


def turn5_ttft(url: str, words: int, conversations: int = 4) -> float:
    """Median turn-5 time to first token of conversations held at the same time, so that every replica is busy
    and a router without affinity spreads a conversation's turns over them."""
    with ThreadPoolExecutor(conversations) as pool:
        return statistics.median(pool.map(lambda c: conversation(url, c, words), range(conversations)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--document-words", type=int, default=600)
    args = ap.parse_args()
    result = {"streams": args.streams, "new_tokens": args.new_tokens, "threads_per_replica": 1,
              "document_words": args.document_words}
    for name, replicas, routing in (("1_replica", 1, "prefix"), ("2_replicas", 2, "prefix"),
                                    ("2_replicas_balanced", 2, "balanced")):
        proc, url = start(replicas, routing)
        try:
            if routing == "prefix":
                result[f"{name}_tok_s"] = round(throughput(url, args.streams, args.new_tokens), 1)
            result[f"{name}_turn5_ttft_s"] = round(turn5_ttft(url, args.document_words), 4)
        finally:
            stop(proc)
    result["scale_2_vs_1"] = round(result["2_replicas_tok_s"] / result["1_replica_tok_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
