"""Pipeline: a model, its tokenizer and its chat format behind chat() and generate()."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .engine import SamplingParams, generate
from .loaders import build_model, open_checkpoint
from .messages import ChatMessage, MessageLike, as_messages


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what could still start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def detokenize(tokens: Iterable[int], tokenizer, stop: Sequence[str] = ()) -> Iterator[str]:
    """Text deltas for a stream of token ids: whole characters only, cut at the first stop string.

    ChatGLM3 and GLM-4 begin each reply with a metadata line (empty for a plain answer) and a
    space: the whitespace before the first visible character is dropped, as their chat() does.
    """
    from .tokenizers import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    cutter = StopStrings(stop)
    leading = tokenizer.family in ("chatglm3", "glm4")

    def emit(text: str) -> str:
        nonlocal leading
        if leading:
            text = text.lstrip()
            leading = not text
        return text

    for token in tokens:
        text = emit(cutter.feed(decoder.put(token)))
        if text:
            yield text
        if cutter.stopped:
            return
    text = cutter.feed(decoder.flush())
    if not cutter.stopped:
        text += cutter.flush()
    text = emit(text)
    if text:
        yield text


class Pipeline:
    """Load once, then chat or complete; 'default' names the bundled SmolLM2 model."""

    def __init__(self, path: str | Path = "default", dtype: str = "auto", device: str = "cpu",
                 threads: int | None = None, lora: str | Path | None = None):
        if threads:
            torch.set_num_threads(threads)
        checkpoint = open_checkpoint(path, lora)
        self.path = checkpoint.path
        self.format = checkpoint.format
        self.model = build_model(checkpoint, dtype, device)
        self.tokenizer = checkpoint.load_tokenizer()
        self.config = self.model.config
        self.stop_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.config.eos_token_ids)

    def _stream(self, prompt: list[int], params: SamplingParams, stop: Sequence[str]) -> Iterator[str]:
        tokens = generate(self.model, prompt, params, self.stop_ids, self.tokenizer.vocab_size)
        return detokenize(tokens, self.tokenizer, stop)

    def chat(self, messages: Sequence[MessageLike], *, stream: bool = False, stop: Sequence[str] = (),
             **sampling) -> ChatMessage | Iterator[str]:
        """The assistant's reply to a conversation; with stream=True, an iterator of text deltas."""
        prompt = self.tokenizer.encode_chat(as_messages(list(messages)))
        deltas = self._stream(prompt, SamplingParams(**sampling), stop)
        if stream:
            return deltas
        return ChatMessage("assistant", "".join(deltas))

    def generate(self, prompt: str, *, stream: bool = False, stop: Sequence[str] = (), **sampling) -> str | Iterator[str]:
        """Plain completion of text (CodeGeeX2's mode, base models)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        deltas = self._stream(ids, SamplingParams(**sampling), stop)
        return deltas if stream else "".join(deltas)
