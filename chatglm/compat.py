"""THUDM's `AutoModel` / `AutoTokenizer` surface, so scripts written for the official code run
with only their import line (and the model path) changed:

    from chatglm.compat import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).half().cuda().eval()
    response, history = model.chat(tokenizer, "你好", history=[])

The model loads on first use, so the chained `.half()`, `.cuda()`, `.quantize(4)` choose how it
loads instead of converting a loaded copy. History keeps each family's shape: (query, response)
pairs for ChatGLM-6B/ChatGLM2 and llama-family models, role dicts for ChatGLM3 and GLM-4.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .loaders import resolve_path
from .markup import Reasoning
from .messages import ChatMessage
from .pipeline import Pipeline
from .tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger("chatglm")
ROLE_HISTORY = ("chatglm3", "glm4")


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | Path, trust_remote_code: bool = True, **_: Any) -> "THUDMTokenizer":
        """The folder's or file's tokenizer with the official call shapes; model.chat uses the model's own."""
        return THUDMTokenizer(load_tokenizer(resolve_path(path)))


class THUDMTokenizer:
    """Our tokenizer behind the Hugging Face methods THUDM's scripts call: ``encode`` adds the family's
    decoration by default and keeps typed special-token text as text, as the official tokenizers do."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int] | torch.Tensor, **_: Any) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))

    def __getattr__(self, name: str) -> Any:  # vocab_size, specials, encode_chat, ... as our tokenizer has them
        return getattr(self.tokenizer, name)


class AutoModel:
    @staticmethod
    def from_pretrained(path: str | Path, trust_remote_code: bool = True, **_: Any) -> "ChatModel":
        return ChatModel(resolve_path(path))


AutoModelForCausalLM = AutoModel


class ChatModel:
    """A lazily loaded Pipeline behind THUDM's `chat` / `stream_chat`."""

    def __init__(self, path: Path):
        self.path = path
        self._dtype, self._device = "auto", "cpu"
        self._pipeline: Pipeline | None = None

    # --- the chainable setup calls of the official code ---------------------------------
    def _set(self, **changes: str) -> "ChatModel":
        if self._pipeline is not None and any(getattr(self, "_" + k) != v for k, v in changes.items()):
            self._pipeline = None  # reload with the new choice on next use
        for k, v in changes.items():
            setattr(self, "_" + k, v)
        return self

    def half(self) -> "ChatModel":
        return self._set(dtype="f16" if self._dtype in ("auto", "f32", "bf16") else self._dtype)

    def bfloat16(self) -> "ChatModel":
        return self._set(dtype="bf16")

    def float(self) -> "ChatModel":
        return self._set(dtype="f32")

    def quantize(self, bits: int, *_: Any, **__: Any) -> "ChatModel":
        if bits not in (4, 8):
            raise ValueError(f"quantize({bits}): only 4 and 8 bits are supported")
        return self._set(dtype="q4_0" if bits == 4 else "q8_0")

    def cuda(self, device: int | str | None = None) -> "ChatModel":
        if not torch.cuda.is_available():
            log.warning("cuda() was called but no CUDA GPU is available: the model stays on the CPU")
            return self
        return self._set(device="cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def cpu(self) -> "ChatModel":
        return self._set(device="cpu")

    def to(self, device: str | torch.device) -> "ChatModel":
        return self.cuda() if str(device).startswith("cuda") else self.cpu()

    def eval(self) -> "ChatModel":
        return self

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = self._load()
        return self._pipeline

    def _load(self) -> Pipeline:
        dtype = self._dtype
        if self.path.is_file() and dtype != "auto":
            # a GGUF / GGML file is already in its own format: .half() or .quantize() do not apply
            log.info("%s is kept as stored: dtype %s applies to Hugging Face folders", self.path, dtype)
            dtype = "auto"
        return Pipeline(self.path, dtype=dtype, device=self._device)

    # --- chat -------------------------------------------------------------------------------
    def chat(self, tokenizer: Any, query: str, history: Sequence | None = None, role: str = "user",
             max_length: int = 8192, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.8,
             temperature: float = 0.8, **kwargs: Any) -> tuple[str, list]:
        """One reply and the history that now includes it."""
        response, new_history = "", list(history or [])
        for response, new_history in self.stream_chat(tokenizer, query, history, role=role, max_length=max_length,
                                                      num_beams=num_beams, do_sample=do_sample, top_p=top_p,
                                                      temperature=temperature, **kwargs):
            pass
        return response, new_history

    def stream_chat(self, tokenizer: Any, query: str, history: Sequence | None = None, role: str = "user",
                    max_length: int = 8192, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.8,
                    temperature: float = 0.8, **kwargs: Any) -> Iterator[tuple[str, list]]:
        """Yield (response so far, history with it) as the reply grows; a reasoning model's thoughts are left out,
        as the official API has no place for them."""
        if num_beams != 1:
            log.warning("num_beams=%d is not supported; sampling one sequence", num_beams)
        pipe = self.pipeline
        roles = pipe.tokenizer.family in ROLE_HISTORY
        messages = _messages(history or [], roles) + [ChatMessage(role, query)]
        response = ""
        for delta in pipe.chat(messages, stream=True, max_length=max_length, do_sample=do_sample, top_p=top_p,
                               temperature=temperature, seed=kwargs.get("seed")):
            if isinstance(delta, Reasoning):
                continue
            response += delta
            yield response, _history(history or [], role, query, response, roles)
        if not response:  # an empty reply still answers once
            yield response, _history(history or [], role, query, response, roles)


def _messages(history: Sequence, roles: bool) -> list[ChatMessage]:
    """Either history shape, as messages."""
    out: list[ChatMessage] = []
    for item in history:
        if isinstance(item, dict):
            out.append(ChatMessage(item["role"], item.get("content", ""), metadata=item.get("metadata") or ""))
        else:
            query, answer = item
            out += [ChatMessage("user", query), ChatMessage("assistant", answer)]
    return out


def _history(history: Sequence, role: str, query: str, response: str, roles: bool) -> list:
    if roles:
        return [*(dict(h) if isinstance(h, dict) else h for h in history), {"role": role, "content": query},
                {"role": "assistant", "metadata": "", "content": response}]
    return [*(tuple(h) for h in history), (query, response)]
