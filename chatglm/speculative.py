"""Speculative decoding: cheap drafts of the next tokens, checked by the target model in one forward.

One token at a time cannot read the weights faster than memory allows; a forward over the last token and
drafted ones reads them once and scores every position (up to VERIFY_ROWS a forward, see there). Two drafters, as llama.cpp offers them:
`PromptLookup` (the tokens that followed an earlier occurrence of the text's last n-gram, as llama.cpp's
``--lookup``, llama-cpp-python's LlamaPromptLookupDecoding and transformers' prompt_lookup_num_tokens) and
`DraftModel` (a small model over the same vocabulary, ``--draft``). Both propose deterministically (q is a
point mass), so the standard rejection rule keeps every sampled reply distributed exactly as plain decoding:
a draft is accepted with probability p(draft) under the sampler's own distribution (penalties, grammar mask,
temperature, top-k, top-p), and on rejection the token is drawn from p without the draft. Greedy replies are
the plain ones token for token. Rejected tokens' cache rows are left behind the sequence's length: later
tokens overwrite them, attention never reads past a query's position, and the paged pool indexes only
blocks whose tokens were all accepted (`BlockPool.commit` is given the accepted tokens only).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch

from .errors import ChatGLMError

if TYPE_CHECKING:
    from .engine import Sampler

LOOKUP_TOKENS = 10  # drafted tokens at most per step (llama-cpp-python's num_pred_tokens)
LOOKUP_NGRAM = 2    # longest n-gram looked up; shorter ones are tried next, down to one token
# Rows a verifying forward takes at most: the ggml kernels take up to 4 activation rows through the decode step's
# per-block path (DECODE_ROWS in kernels/csrc/ggml_kernels.cpp), whose rows round exactly as a one-row step;
# more rows take the prompt's tiled path, which rounds differently and flipped near-ties of the default model.
VERIFY_ROWS = 4
DRAFT_TOKENS = 5    # tokens a draft model proposes per step (llama.cpp's --draft-max is 16; small models err early)


class Drafter(Protocol):
    """Proposes up to `limit` tokens to follow `history` (the prompt and the reply so far)."""

    def draft(self, history: Sequence[int], limit: int) -> list[int]: ...


class PromptLookup:
    """Drafts the tokens that followed the first earlier occurrence of the history's last n-gram, trying the
    longest n-gram first (llama-cpp-python's and transformers' rule). Costs one scan of the history per step;
    proposes nothing when the last tokens never occurred before (a prompt with nothing to copy decodes as
    without it)."""

    def __init__(self, tokens: int = LOOKUP_TOKENS, max_ngram: int = LOOKUP_NGRAM, min_ngram: int = 1):
        if tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"--lookup must be at least 1 (drafted tokens) with 1 <= min n-gram <= max n-gram, "
                             f"not tokens={tokens}, n-grams {min_ngram}..{max_ngram}")
        self.tokens, self.max_ngram, self.min_ngram = tokens, max_ngram, min_ngram

    def draft(self, history: Sequence[int], limit: int) -> list[int]:
        limit = min(limit, self.tokens)
        if limit <= 0:
            return []
        ids = np.asarray(history, dtype=np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids[:-1], n) == tail).all(axis=1))
            if len(hits):
                start = int(hits[0]) + n
                return ids[start: start + limit].tolist()
        return []


class DraftModel:
    """A smaller model over the target's vocabulary proposes its greedy continuation. Its own one-sequence
    cache follows the history: each step recomputes only from where its cached tokens and the history part."""

    def __init__(self, model, context: int, tokens: int = DRAFT_TOKENS):
        self.model, self.tokens = model, tokens
        self.context = min(context, model.config.max_position)
        self.cache = model.new_cache(1, self.context)
        self.slot = torch.zeros(1, dtype=torch.long, device=model.device)
        self.written: list[int] = []  # tokens whose keys and values the draft cache holds, in order

    def draft(self, history: Sequence[int], limit: int) -> list[int]:
        limit = min(limit, self.tokens, self.context - len(history))
        if limit <= 0:
            return []
        same = 0
        for a, b in zip(self.written, history[:-1]):  # the last token is always fed: its logits are needed
            if a != b:
                break
            same += 1
        feed, out = list(history[same:]), []
        self.written = list(history[:same])
        while True:
            device = self.model.device
            ids = torch.tensor([feed], device=device)
            pos = torch.arange(len(self.written), len(self.written) + len(feed), device=device)[None]
            logits = self.model(ids, pos, self.cache, self.slot, last_only=True)[0, -1]
            self.written += feed
            out.append(int(torch.argmax(logits)))
            if len(out) == limit:
                return out
            feed = out[-1:]


def open_draft(path: str | Path, target_path: Path, tokenizer, context: int, dtype: str = "auto",
               device: str = "cpu", tokens: int = DRAFT_TOKENS) -> DraftModel:
    """Load `--draft MODEL` for a target read from `target_path`; refused unless both vocabularies are the same,
    id for id (a draft token must mean the same text to the target)."""
    from .loaders import build_model, open_checkpoint

    checkpoint = open_checkpoint(path)
    other = checkpoint.load_tokenizer()
    same = other.vocab_size == tokenizer.vocab_size and all(
        other.token_text(i) == tokenizer.token_text(i) for i in range(tokenizer.vocab_size))
    if not same:
        raise ChatGLMError(f"--draft {checkpoint.path}: its vocabulary ({other.vocab_size} tokens) differs from the "
                           f"model's {target_path} ({tokenizer.vocab_size} tokens); a draft model must share the "
                           "target's tokenizer, id for id")
    return DraftModel(build_model(checkpoint, dtype, device), context, tokens)


def resolve(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    """The standard rejection rule for a point-mass proposal q = 1[draft]: accept with probability
    min(1, p/q) = p(draft), else draw from norm(max(0, p - q)), which is p with the draft taken out."""
    probs = probs / probs.sum()  # top-p leaves the kept mass unnormalized
    p = float(probs[draft]) if draft < probs.shape[-1] else 0.0
    if float(torch.rand((), generator=generator)) < p:
        return draft
    rest = probs.clone()
    if draft < rest.shape[-1]:
        rest[draft] = 0.0
    return int(torch.multinomial(rest, 1, generator=generator))


def verify(model, cache, slot: int, history: list[int], drafts: Sequence[int], sampler: "Sampler",
           stop_ids: frozenset[int] | set[int]) -> list[int]:
    """Score the last token of `history` (its keys and values not yet written) and `drafts` at their positions
    in the target; return the accepted drafts and one token more, ending early at a stop id. The caller has
    checked that the cache holds rows up to len(history) + len(drafts) - 1.

    The tokens go as one-token rows of the same sequence (a decode step's batch; every layer writes all their
    keys and values before any row attends, so each row sees the ones before it), VERIFY_ROWS rows a forward,
    so the arithmetic is the plain decode step's and greedy replies match it exactly. A later forward runs
    only while every draft so far was accepted.
    """
    device = model.device
    tokens = [history[-1], *drafts]
    out: list[int] = []
    for first in range(0, len(tokens), VERIFY_ROWS):
        chunk = tokens[first: first + VERIFY_ROWS]
        ids = torch.tensor(chunk, device=device)[:, None]
        pos = torch.arange(len(history) - 1 + first, len(history) - 1 + first + len(chunk), device=device)[:, None]
        rows = model(ids, pos, cache, torch.full((len(chunk),), slot, device=device))[:, -1]
        for i, logits in enumerate(rows, first):
            shaped = sampler.penalized(logits, history + out if out else history)
            draft = drafts[i] if i < len(drafts) else None
            if draft is None or sampler.params.greedy:  # greedy: the argmax, accepted when the draft is it
                token = sampler.pick(shaped)
            else:
                token = resolve(sampler.probabilities(shaped), draft, sampler.generator)
            sampler.record(token, logits)
            out.append(token)
            if token != draft or token in stop_ids:
                return out
    return out


def accepted(tokens: Sequence[int], drafts: Sequence[int]) -> int:
    """How many drafts `verify` accepted: the run of its tokens that equals them."""
    n = 0
    while n < min(len(tokens), len(drafts)) and tokens[n] == drafts[n]:
        n += 1
    return n
