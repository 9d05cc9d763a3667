"""`chatglm perplexity`: a model's perplexity on a text, computed the way llama.cpp's perplexity tool
computes it, so the two numbers can be read side by side.

The text is tokenized once (with the vocabulary's own leading decoration, BOS for most GGUF files)
and cut into chunks of `ctx` tokens; each chunk starts over with an empty cache and its first
tokens replaced by that decoration, and only the predictions of its second half are scored, so
every scored token has at least ctx/2 tokens of context. The running estimate is printed after each
chunk; the final PPL comes with its standard error (+/-), propagated from the per-token losses.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cli import kv_type_flag, mmap_flag
from .errors import ChatGLMError
from .kv_cache import KV_TYPES, KVType


@dataclass
class Perplexity:
    """The result: exp(mean NLL), its +/- error, and the running estimate after each chunk."""

    ppl: float
    error: float
    scored: int                                   # tokens whose prediction was scored
    running: list[float]


def leading_ids(tokenizer) -> list[int]:
    """What encode(add_special_tokens=True) puts before the text (BOS; [gMASK] <sop> for ChatGLM2/3),
    or nothing when the decoration is not a pure prefix (an appended eos, ChatGLM-6B's suffix)."""
    head = tokenizer.encode("", add_special_tokens=True)
    return head if tokenizer.encode("a", add_special_tokens=True)[: len(head)] == head else []


def chunk_ids(tokens: Sequence[int], head: Sequence[int], ctx: int, chunks: int | None = None) -> list[list[int]]:
    """Consecutive chunks of ctx tokens (a partial last one is dropped), each beginning with `head`."""
    count = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    out = []
    for c in range(count):
        chunk = list(tokens[c * ctx : (c + 1) * ctx])
        chunk[: len(head)] = head
        out.append(chunk)
    return out


def chunk_nll(logits: torch.Tensor, chunk: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihoods (float64) of the second half of a chunk's tokens, each predicted from
    the logits [ctx, vocab] one position earlier."""
    first = len(chunk) // 2
    rows = logits[first : len(chunk) - 1].double()
    targets = torch.tensor(chunk[first + 1 :], dtype=torch.long)
    return -torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0]


def summarize(nll: torch.Tensor) -> tuple[float, float]:
    """PPL = exp(mean NLL) and its error: the standard error of the mean NLL times PPL."""
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean
    return ppl, (math.sqrt(var / (len(nll) - 1)) * ppl if var > 0 and len(nll) > 1 else 0.0)


def perplexity(model, tokenizer, text: str, ctx: int = 512, chunks: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None, kv_dtype: KVType | None = None) -> Perplexity:
    """The model's perplexity on `text` in chunks of `ctx` tokens (at most `chunks` of them), keys and values
    stored as `kv_dtype` (default: the model's cache type; --kv-type shows what the cache's rounding costs)."""
    if ctx < 4:
        raise ChatGLMError(f"--ctx {ctx} is too small; expected at least 4 tokens")
    if chunks is not None and chunks < 1:
        raise ChatGLMError(f"--chunks {chunks}: expected at least 1")
    if ctx > model.config.max_position:
        raise ChatGLMError(f"--ctx {ctx} exceeds the model's context of {model.config.max_position} tokens")
    head = leading_ids(tokenizer)
    tokens = head + tokenizer.encode(text)
    if len(tokens) < 2 * ctx:
        raise ChatGLMError(f"the text tokenizes to only {len(tokens)} tokens; perplexity at --ctx {ctx} needs at "
                           f"least {2 * ctx}")
    vocab = tokenizer.vocab_size  # logits past the tokenizer's ids (padded heads) are never tokens
    losses: list[torch.Tensor] = []
    running: list[float] = []
    total = 0.0
    for i, chunk in enumerate(chunk_ids(tokens, head, ctx, chunks)):
        losses.append(chunk_nll(torch.from_numpy(model.logits(chunk, kv_dtype))[:, :vocab], chunk))
        total += float(losses[-1].sum())
        running.append(math.exp(total / sum(len(x) for x in losses)))
        if on_chunk is not None:
            on_chunk(i + 1, running[-1])
    nll = torch.cat(losses)
    ppl, error = summarize(nll)
    return Perplexity(ppl, error, len(nll), running)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    pipe = Pipeline(args.model, dtype=args.dtype, device=args.device, threads=args.threads, use_mmap=args.use_mmap)

    def show(i: int, running: float) -> None:
        print(f"[{i}]{running:.4f},", end="", flush=True)

    result = perplexity(pipe.model, pipe.tokenizer, text, args.ctx, args.chunks, None if args.json else show,
                        KV_TYPES.get(args.kv_type))
    out: dict[str, Any] = {"model": str(pipe.path), "file": str(args.file), "ctx": args.ctx, "kv_type": args.kv_type,
                           "chunks": len(result.running), "scored_tokens": result.scored,
                           "ppl": round(result.ppl, 6), "ppl_error": round(result.error, 6),
                           "running": [round(p, 6) for p in result.running]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"\nFinal estimate: PPL = {result.ppl:.4f} +/- {result.error:.5f}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (as llama.cpp computes it)")
    p.add_argument("-m", "--model", default="default")
    p.add_argument("-f", "--file", required=True, help="the text to score (UTF-8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half of each is scored")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto, f32, bf16, f16, or a ggml type to quantize a Hugging Face folder as it loads")
    kv_type_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the running estimates")
    mmap_flag(p)
    p.set_defaults(func=cmd_perplexity)
