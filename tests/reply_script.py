"""A Pipeline over a model that says what a test scripts, with a real ChatGLM3 / GLM-4 tokenizer.

The n-th reply the pipeline generates is the n-th script (the last one repeats), so a test can play a whole
tool loop: a call in the family's own token format, then an answer once the observation is back.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from chatglm.kv_cache import BlockPool

from chatglm.pipeline import Pipeline


class ReplyModel:
    """Answers each prompt with the next scripted ids; records every prompt and counts its forward calls."""

    def __init__(self, vocab_size: int, replies: Sequence[Sequence[int]], end: int, context: int = 4096,
                 interrupt_at: int | None = None):
        self.vocab_size, self.replies, self.end = vocab_size, [list(r) for r in replies], end
        self.config = SimpleNamespace(max_position=context, eos_token_ids=(), arch="scripted")
        self.device = torch.device("cpu")
        self.prompts: list[list[int]] = []
        self.forwards = 0
        self.interrupt_at = interrupt_at  # raise KeyboardInterrupt (as Ctrl-C would) at this forward call
        self._fresh = False
        self._step = 0

    def new_cache(self, slots: int, max_len: int, **sizing) -> BlockPool:
        self._fresh, self._step = True, 0
        return BlockPool(slots, max_len)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache, slots: torch.Tensor, last_only: bool = False,
                 take: torch.Tensor | None = None) -> torch.Tensor:
        self.forwards += 1
        if self.forwards == self.interrupt_at:
            raise KeyboardInterrupt
        if self._fresh:
            self.prompts.append(ids[0].tolist())
            self._fresh = False
        reply = self.replies[min(len(self.prompts), len(self.replies)) - 1]
        token = reply[self._step] if self._step < len(reply) else self.end
        self._step += 1
        logits = torch.full((1, 1, self.vocab_size), -1e4)
        logits[0, -1, token] = 10.0
        return logits


def ids(tokenizer, *parts: str | int) -> list[int]:
    """Reply ids: text encoded as plain text, special-token names as their ids."""
    out: list[int] = []
    for part in parts:
        out += [tokenizer.specials[part]] if part in tokenizer.specials else tokenizer.encode(part)
    return out


def scripted(tokenizer, *replies: Sequence[str], **model_args) -> Pipeline:
    """A real Pipeline whose model speaks `replies` in turn (each a list of texts and special-token names)."""
    model = ReplyModel(tokenizer.vocab_size, [ids(tokenizer, *r) for r in replies],
                       tokenizer.specials["<|user|>"], **model_args)
    return Pipeline.from_model(model, tokenizer, path=f"scripted-{tokenizer.family}", format="test")
