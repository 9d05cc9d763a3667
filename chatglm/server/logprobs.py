"""Logprobs in OpenAI's two shapes: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` and the legacy
completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` (the one lm-evaluation-harness reads).

The engine gives (id, logprob, top entries) per token, the log-softmax of the model's raw logits.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..engine import Logprob


def token_piece(tokenizer, id: int) -> tuple[str, bytes]:
    """A token as text and bytes: a special token by its name, others by the bytes they add to the text."""
    data = tokenizer.token_bytes(id) or tokenizer.token_text(id).encode()  # b"": a special id, named by token_text
    return data.decode("utf-8", "replace"), data


def chat_logprobs(tokenizer, entries: Sequence[Logprob]) -> dict[str, Any]:
    def one(id: int, value: float) -> dict[str, Any]:
        text, data = token_piece(tokenizer, id)
        return {"token": text, "logprob": value, "bytes": list(data)}

    return {"content": [{**one(id, value), "top_logprobs": [one(t, v) for t, v in top]} for id, value, top in entries],
            "refusal": None}


def completion_logprobs(tokenizer, entries: Sequence[Logprob | None], ids: Sequence[int],
                        offset: int = 0) -> dict[str, Any]:
    """`entries` aligned with `ids` (None where a token has no logprob: the prompt's first); offsets from `offset`."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for id, entry in zip(ids, entries):
        text, _ = token_piece(tokenizer, id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(entry[1] if entry else None)
        out["top_logprobs"].append({token_piece(tokenizer, t)[0]: v for t, v in entry[2]} if entry else None)
    return out
