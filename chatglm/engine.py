"""Prefill, decode and sampling over a KV cache allocated once per sequence.

Generation is a generator of token ids (as in mlx-lm), so every surface streams by default and
stops early simply by not asking for the next token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import ChatGLMError

log = logging.getLogger("chatglm")


class ContextLengthError(ChatGLMError, ValueError):
    """The prompt alone does not fit in the model's context."""


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None   # new tokens at most
    max_length: int | None = None       # prompt + new tokens at most (THUDM's and chatglm.cpp's meaning)
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def budget(prompt_len: int, params: SamplingParams, context: int) -> int:
    """How many tokens may be generated; a request past the context is clamped with a warning."""
    if prompt_len >= context:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the model's context is {context}; shorten the conversation"
        )
    limit = context
    if params.max_length is not None:
        if params.max_length > context:
            log.warning("max_length %d exceeds the model's context %d; clamped", params.max_length, context)
        limit = min(limit, params.max_length)
    new = limit - prompt_len
    if params.max_new_tokens is not None:
        new = min(new, params.max_new_tokens)
    return max(new, 0)


class Sampler:
    """Turns one row of logits into a token id: penalty, temperature, top-k, top-p, draw."""

    def __init__(self, params: SamplingParams, vocab_limit: int | None = None):
        params.validate()
        self.params = params
        self.vocab_limit = vocab_limit
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, previous: Sequence[int]) -> int:
        p = self.params
        logits = logits.float()
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits = logits[: self.vocab_limit]  # padded rows past the tokenizer are never tokens
        if p.repetition_penalty != 1.0 and previous:
            ids = torch.tensor(sorted(set(previous)), dtype=torch.long)
            ids = ids[ids < logits.shape[-1]]
            seen = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def generate(model, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int] | set[int] = frozenset(),
             vocab_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), the token budget or the caller stops."""
    sampler = Sampler(params, vocab_limit)
    new = budget(len(prompt), params, model.config.max_position)
    if new == 0:
        return
    device = model.device
    cache = model.new_cache(1, len(prompt) + new)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    pos = torch.arange(len(prompt), device=device)[None]
    history = list(prompt)
    logits = model(ids, pos, cache, slots, last_only=True)[0, -1]
    for step in range(new):
        token = sampler(logits, history)
        if token in stop_ids:
            return
        yield token
        if step + 1 == new:
            return
        history.append(token)
        position = len(history) - 1
        logits = model(torch.tensor([[token]], device=device), torch.tensor([[position]], device=device),
                       cache, slots, last_only=True)[0, -1]
