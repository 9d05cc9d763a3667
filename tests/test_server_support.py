"""Helpers for the server tests: a scripted model with a real GLM tokenizer, and a server-sent-events reader.

The scripted model lets the whole server path (routes, engine, detokenizer, tool-call parsing) run in
milliseconds with ChatGLM3 or GLM-4 prompts, which the small default model cannot produce.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator, Sequence

import httpx

import torch

from chatglm.kv_cache import BlockPool
from chatglm.pipeline import Pipeline
from chatglm.tokenizers import load_tokenizer

from patience import PATIENCE, free_port

TOKENIZER_FILES = {"chatglm3": "chatglm3-6b/tokenizer.model", "glm4": "glm-4-9b/tokenizer.model"}


class ScriptedModel:
    """Answers every prompt with the same ids, then `end`: whatever the sampling, one token has all the mass.

    The reply so far is found by matching the sequence's last ids against the script, so the model needs no
    state beyond the ids the engine fed it (per cache slot and position).
    """

    prefix_reusable = True  # a slot's cached ids stay valid for a later prompt that starts with them

    def __init__(self, vocab_size: int, script: Sequence[int], end: int, context: int = 1024):
        self.vocab_size, self.script, self.end = vocab_size, list(script), end
        self.config = SimpleNamespace(max_position=context, eos_token_ids=())
        self.device = torch.device("cpu")
        self.seen: dict[int, dict[int, int]] = defaultdict(dict)  # slot -> position -> id

    def new_cache(self, slots: int, max_len: int, **sizing) -> BlockPool:
        return BlockPool(slots, max_len)  # bookkeeping only: this model keeps no keys

    def _next(self, ids: dict[int, int], pos: int) -> int:
        for k in range(min(len(self.script), pos + 1), -1, -1):
            if all(ids.get(pos - k + 1 + j) == self.script[j] for j in range(k)):
                return self.script[k] if k < len(self.script) else self.end
        return self.end

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache, slots: torch.Tensor, last_only: bool = False,
                 take: torch.Tensor | None = None):
        rows, width = ids.shape
        logits = torch.full((rows, 1 if last_only or take is not None else width, self.vocab_size), -1e4)
        for b in range(rows):
            seen = self.seen[int(slots[b])]
            last = width - 1 if take is None else int(take[b])  # padding columns past `take` are not the sequence
            for t in range(last + 1):
                seen[int(pos[b, t])] = int(ids[b, t])
            logits[b, -1, self._next(seen, int(pos[b, last]))] = 10.0
        return logits

    def prompt(self, slot: int = 0) -> list[int]:
        """The ids a slot holds before the reply began (the last prompt it served)."""
        seen = self.seen[slot]
        ids = [seen[p] for p in range(len(seen)) if p in seen]
        for k in range(len(ids)):
            if ids[k:k + len(self.script)] == self.script[: len(ids) - k]:
                return ids[:k]
        return ids


def glm_tokenizer(shared_dir: Path, family: str):
    return load_tokenizer(shared_dir / "tokenizers" / TOKENIZER_FILES[family], family=family)


def scripted_pipeline(tokenizer, reply: str | Sequence[str | int], end_name: str = "<|user|>"):
    """A Pipeline stand-in whose model always answers `reply` (text, or text and special ids), then stops."""
    parts = [reply] if isinstance(reply, str) else reply
    script = [i for p in parts for i in (tokenizer.encode(p) if isinstance(p, str) else [p])]
    model = ScriptedModel(tokenizer.vocab_size, script, tokenizer.specials[end_name])
    return Pipeline.from_model(model, tokenizer, f"scripted-{tokenizer.family}", "test")


def sse_events(lines: Iterable[str]) -> list[tuple[str, str]]:
    """(event name, data) of each server-sent event in a stream's lines; comments (pings) are skipped."""
    events, name, data = [], "message", []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        events.append((name, "\n".join(data)))
    return events


def sse_json(lines: Iterable[str]) -> list[dict]:
    """The JSON data of each event, the OpenAI stream's closing [DONE] left out."""
    return [json.loads(data) for _, data in sse_events(lines) if data != "[DONE]"]


@contextmanager
def serving(args: Sequence[str], log: Path) -> Iterator[str]:
    """`chatglm serve` with `args` in a subprocess on a free port (no API key), its URL once /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CHATGLM_API_KEY"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatglm", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PATIENCE
    try:
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
