"""Replies marked up with tags, as GLM-4.5/4.6/4.7 and GLM-Z1 write them: reasoning and tool calls.

Reasoning comes between ``<think>`` and ``</think>`` (when the prompt itself ends with ``<think>`` the reply
starts inside it) and is returned apart from the answer, as OpenAI-style ``reasoning_content`` (vLLM's and
DeepSeek's name). A tool call is ``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>``
(GLM-4.5's chat template; newlines between the parts are optional): a value is taken as written when the
function's schema says the argument is a string, else as JSON (a Python literal, or the text, when it is not).
A ``<tool_call>`` holding a JSON ``{"name", "arguments"}`` object (the Hermes / Qwen form) is read too.

Which models speak this is read from their chat template: it writes ``<tool_call>`` or ``<think>``.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Mapping, Sequence

from .tools import ToolCall

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ARG_TAGS = ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
MARKUP_TOKENS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, *ARG_TAGS)  # kept when decoding, even if special
_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
# what ends each state, and the state it leads to
_ENDS = {"text": ((THINK_OPEN, "reasoning"), (CALL_OPEN, "call")), "reasoning": ((THINK_CLOSE, "text"),),
         "call": ((CALL_CLOSE, "text"),)}


class Reasoning(str):
    """A piece of the model's reasoning (not of its answer): shown dimmed, sent as reasoning_content."""


def speaks_markup(chat_template: str | None) -> bool:
    """Whether a chat template writes tagged reasoning or tool calls."""
    return bool(chat_template) and (CALL_OPEN in chat_template or THINK_OPEN in chat_template)


def takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template offers tools and writes calls as tagged parts."""
    return bool(chat_template) and CALL_OPEN in chat_template and "tools" in chat_template


def openai_tools(functions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Function definitions as the ``tools`` a chat template reads (OpenAI's entries, as transformers passes)."""
    return [{"type": "function", "function": dict(f)} for f in functions]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return text


def parse_call(body: str, functions: Mapping[str, Mapping[str, Any]]) -> ToolCall | None:
    """The call inside one ``<tool_call>`` part, or None when it names no offered function or does not parse."""
    body = body.strip()
    if body.startswith("{"):
        obj = _value(body)
        if not isinstance(obj, dict) or obj.get("name") not in functions:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        args = _value(args) if isinstance(args, str) else args
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None
    name = body.split("<arg_key>", 1)[0].strip()
    if name not in functions:
        return None
    properties = (functions[name].get("parameters") or {}).get("properties") or {}
    args = {}
    for key, value in _ARGUMENT.findall(body):
        key, value = key.strip(), value.strip()
        args[key] = value if (properties.get(key) or {}).get("type") == "string" else _value(value)
    try:
        return ToolCall(name, json.dumps(args, ensure_ascii=False))
    except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes)
        return None


def _held_back(text: str, tags: Sequence[str]) -> int:
    """How many trailing characters could be the start of one of the tags (wait for more before showing)."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-n:]) for tag in tags):
            return n
    return 0


class MarkupParser:
    """Reads a tagged reply as it streams: ``feed`` returns the pieces to show now, answer text as ``str`` and
    reasoning as ``Reasoning``; calls to the offered `functions` (name -> definition) are held back and
    listed in ``calls``, and a part that is no such call is shown as the text it was."""

    def __init__(self, functions: Mapping[str, Mapping[str, Any]] = {}, reasoning: bool = False):
        self.functions = functions
        self.calls: list[ToolCall] = []
        self._state = "reasoning" if reasoning else "text"
        self._pending = ""                        # text not yet shown: it may begin a tag
        self._body = ""                           # the call part being read
        self._space = {"text": "", "reasoning": ""}  # trailing whitespace, shown only if more text follows
        self._started = {"text": False, "reasoning": False}

    def feed(self, delta: str) -> list[str]:
        self._pending += delta
        out: list[str] = []
        while True:
            ends = _ENDS[self._state]
            found = [(self._pending.find(tag), tag, after) for tag, after in ends if tag in self._pending]
            if not found:
                keep = _held_back(self._pending, [tag for tag, _ in ends])
                self._take(self._pending[: len(self._pending) - keep], out)
                self._pending = self._pending[len(self._pending) - keep :]
                return out
            at, tag, after = min(found)
            self._take(self._pending[:at], out)
            self._pending = self._pending[at + len(tag) :]
            if self._state == "call":
                self._end_call(out)
            self._state = after

    def close(self) -> list[str]:
        """The end of the reply: what was held back (an unfinished call is shown as text)."""
        out: list[str] = []
        self._take(self._pending, out)
        self._pending = ""
        if self._state == "call":
            self._show(CALL_OPEN + self._body, "text", out)
            self._body, self._state = "", "text"
        return out

    def _take(self, text: str, out: list[str]) -> None:
        if self._state == "call":
            self._body += text
        elif self._state == "reasoning":
            self._show(text, "reasoning", out)
        else:
            self._show(text, "text", out)

    def _end_call(self, out: list[str]) -> None:
        call = parse_call(self._body, self.functions)
        if call is None:
            self._show(f"{CALL_OPEN}{self._body}{CALL_CLOSE}", "text", out)
        else:
            self.calls.append(call)
        self._body = ""

    def _show(self, text: str, kind: str, out: list[str]) -> None:
        """Leading whitespace of the answer and of the reasoning is dropped, trailing whitespace held back."""
        text = self._space[kind] + text
        if not self._started[kind]:
            text = text.lstrip()
        shown = text.rstrip()
        self._space[kind] = text[len(shown) :]
        if shown:
            self._started[kind] = True
            out.append(Reasoning(shown) if kind == "reasoning" else shown)


def markup_parser(tokenizer: Any, prompt: Sequence[int], functions: Sequence[Mapping[str, Any]] = ()) -> MarkupParser | None:
    """The parser for a reply to `prompt` when the tokenizer's chat template writes tags, else None; the reply
    starts inside its reasoning when the prompt ends by opening it (GLM-Z1's and GLM-4.5's thinking mode)."""
    if tokenizer.family != "llama" or not speaks_markup(tokenizer.chat_template):
        return None
    return MarkupParser({f["name"]: f for f in functions}, reasoning=opens_reasoning(tokenizer, prompt))


def opens_reasoning(tokenizer: Any, prompt: Sequence[int]) -> bool:
    """Whether a reply to `prompt` starts inside its reasoning: the prompt ends by opening it (GLM-Z1, GLM-4.5
    thinking), in a tokenizer whose chat template writes tags."""
    return _prompt_ends_with(tokenizer, prompt, THINK_OPEN)


def closes_reasoning(tokenizer: Any, prompt: Sequence[int]) -> bool:
    """Whether `prompt` ends with the reasoning already closed (GLM-4.5 with thinking off writes <think></think>)."""
    return _prompt_ends_with(tokenizer, prompt, THINK_CLOSE)


def _prompt_ends_with(tokenizer: Any, prompt: Sequence[int], tag: str) -> bool:
    if tokenizer.family != "llama" or not speaks_markup(tokenizer.chat_template):
        return False
    return "".join(tokenizer.token_text(i) for i in prompt[-4:]).rstrip().endswith(tag)
