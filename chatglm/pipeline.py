"""Pipeline: a model, its tokenizer and its chat format behind chat() and generate()."""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .engine import SamplingParams, TokenMask, generate
from .errors import ChatFormatError
from .grammar import Vocabulary, for_prompt, response_grammar
from .loaders import build_model, mmap_option, open_checkpoint
from .markup import MarkupParser, Reasoning, markup_parser, openai_tools, takes_tools
from .messages import ChatMessage, MessageLike, as_messages
from .speculative import Drafter, PromptLookup, open_draft
from .tools import INTERPRETER, TOOL_FAMILIES, ReplyParser, ToolCall, model_messages, read_tools, system_messages


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


def detokenize(tokens: Iterable[int], tokenizer, stop: Sequence[str] = (), lstrip: bool = True) -> Iterator[str]:
    """Text deltas for a stream of token ids: whole characters only, cut at the first stop string.

    ChatGLM3 and GLM-4 begin each reply with a metadata line (empty for a plain answer) and a
    space: the whitespace before the first visible character is dropped, as their chat() does,
    unless lstrip=False (a ReplyParser, which reads the metadata line, drops it itself).
    """
    from .tokenizers import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    cutter = StopStrings(stop)
    leading = lstrip and tokenizer.family in TOOL_FAMILIES

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


def reply_text(tokens: Iterable[int], tokenizer, stop: Sequence[str] = (),
               parser: ReplyParser | MarkupParser | None = None) -> Iterator[str]:
    """The text to show of a chat reply's token ids.

    With a ReplyParser (ChatGLM3 / GLM-4) the reply is read part by part, a part beginning at each
    ``<|assistant|>``: metadata lines are removed and tool calls are held back in the parser. With a
    MarkupParser (tagged replies: GLM-4.5, GLM-Z1) reasoning comes as ``Reasoning`` pieces and tool
    calls are held back.
    """
    if parser is None:
        yield from detokenize(tokens, tokenizer, stop)
        return
    if isinstance(parser, MarkupParser):
        for delta in detokenize(tokens, tokenizer, stop):
            yield from parser.feed(delta)
        yield from parser.close()
        return
    marker = tokenizer.specials["<|assistant|>"]
    tokens = iter(tokens)
    more = True

    def part() -> Iterator[int]:
        nonlocal more
        for token in tokens:
            if token == marker:
                more = True
                return
            yield token

    while more:
        more = False
        for delta in detokenize(part(), tokenizer, stop, lstrip=False):
            if text := parser.feed(delta):
                yield text
        if text := parser.end_part():
            yield text


def _template_offers(tokenizer, functions: Sequence[Mapping[str, Any]]) -> None:
    """Refuse functions a model's chat template cannot offer (ChatFormatError)."""
    if functions and not takes_tools(tokenizer.chat_template):
        raise ChatFormatError("tool calls need a ChatGLM3 or GLM-4 model, or a chat template that offers tools "
                              f"(GLM-4.5/4.6/4.7); this one is of family {tokenizer.family!r} and its template "
                              "has no tool calls")


def template_chat(tokenizer, messages: Sequence[MessageLike], functions: Sequence[Mapping[str, Any]] = (),
                  template_kwargs: Mapping[str, Any] = {}) -> tuple[list[int], MarkupParser | None]:
    """The prompt of a conversation for a model whose Jinja chat template writes it (observations as the
    "tool" role templates know), the functions offered through the template, and the reply's parser when
    the template writes tagged reasoning or calls."""
    _template_offers(tokenizer, functions)
    history = [replace(m, role="tool") if m.role == "observation" else m for m in as_messages(list(messages))]
    prompt = tokenizer.encode_chat(history, tools=openai_tools(functions), template_kwargs=template_kwargs)
    return prompt, markup_parser(tokenizer, prompt, functions)


class ChatStream(Iterator[str]):
    """A chat reply as it is generated: iterate for the text to show.

    Tool calls are held back from the text; once the reply has ended, ``tool_calls`` lists them and
    ``message()`` is the whole reply. ``close()`` stops generating (nothing more is computed).
    """

    def __init__(self, texts: Iterator[str], parser: ReplyParser | MarkupParser | None):
        self._texts = texts
        self._parser = parser
        self._shown: list[str] = []

    def __next__(self) -> str:
        text = next(self._texts)
        self._shown.append(text)
        return text

    def close(self) -> None:
        self._texts.close()

    @property
    def content(self) -> str:
        """The answer shown so far (reasoning apart)."""
        return "".join(t for t in self._shown if not isinstance(t, Reasoning))

    @property
    def reasoning_content(self) -> str:
        """The reasoning shown so far (the ``Reasoning`` pieces)."""
        return "".join(t for t in self._shown if isinstance(t, Reasoning))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._parser.calls if self._parser is not None else []

    def message(self) -> ChatMessage:
        """The reply as a message (read to its end first); calls in OpenAI's shape, as the server returns them."""
        for _ in self:
            pass
        return ChatMessage("assistant", self.content, tool_calls=[c.to_openai() for c in self.tool_calls] or None,
                           reasoning_content=self.reasoning_content)


class Pipeline:
    """Load once, then chat or complete; 'default' names the bundled SmolLM2 model."""

    def __init__(self, path: str | Path = "default", dtype: str = "auto", device: str = "cpu",
                 threads: int | None = None, lora: str | Path | None = None, draft: str | Path | None = None,
                 lookup: int = 0, use_mmap: bool | None = None):
        """draft: a smaller model over the same vocabulary whose drafts the model checks (speculative decoding);
        lookup: draft up to this many tokens from n-grams of the prompt and reply instead (0: off);
        use_mmap: False moves a GGUF or GGML file's weights into huge pages after load, True reads them from the file's
        mapping; None moves them on a CPU (`placement` says where they are)."""
        if threads:
            torch.set_num_threads(threads)
        if draft and lookup:
            raise ValueError("--draft and --lookup are two ways of drafting tokens; give one of them")
        checkpoint = open_checkpoint(path, lora, mmap_option(use_mmap, device))
        self._attach(build_model(checkpoint, dtype, device), checkpoint.load_tokenizer(), checkpoint.path,
                     checkpoint.format)
        self.placement = checkpoint.placement
        if draft:
            self.drafter = open_draft(draft, self.path, self.tokenizer, self.config.max_position, dtype, device)
        elif lookup:
            self.drafter = PromptLookup(lookup)

    @classmethod
    def from_model(cls, model, tokenizer, path: str | Path = "memory", format: str = "memory") -> Pipeline:
        """A Pipeline over a model and tokenizer already in memory (built in code, or loaded elsewhere)."""
        pipe = cls.__new__(cls)
        pipe._attach(model, tokenizer, Path(path), format)
        return pipe

    def _attach(self, model, tokenizer, path: Path, format: str) -> None:
        self.path = path
        self.format = format
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.stop_ids = frozenset(tokenizer.eos_ids) | frozenset(self.config.eos_token_ids)
        self.drafter: Drafter | None = None  # speculative decoding (speculative.py): None decodes one token a step
        self.placement = ""  # where a GGUF/GGML file's weights are: mapped, or in huge pages (--no-mmap)

    @functools.cached_property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer's vocabulary as the grammar engine reads it (built on first use)."""
        return Vocabulary(self.tokenizer, self.stop_ids)

    def token_mask(self, grammar: str | None, param: str = "response_format") -> TokenMask | None:
        """A fresh grammar state for one reply, after checking the grammar (GrammarError names `param`)."""
        if grammar is None:
            return None
        self.vocabulary.check(grammar, param)
        return self.vocabulary.mask(grammar)

    def _tokens(self, prompt: list[int], sampling: dict[str, Any], grammar: str | None = None) -> Iterator[int]:
        return generate(self.model, prompt, SamplingParams(**sampling), self.stop_ids, self.tokenizer.vocab_size,
                        self.token_mask(grammar), self.drafter)

    def chat(self, messages: Sequence[MessageLike], *, tools: Sequence[Mapping[str, Any]] | None = None,
             stream: bool = False, stop: Sequence[str] = (), template_kwargs: Mapping[str, Any] | None = None,
             response_format: Mapping[str, Any] | None = None, **sampling) -> ChatMessage | ChatStream:
        """The assistant's reply to a conversation; with stream=True, a ChatStream of text deltas.

        tools (ChatGLM3, GLM-4, and models whose chat template offers tools: GLM-4.5/4.6/4.7): function
        definitions, OpenAI's shape or ChatGLM3's bare one, and ``{"type": "code_interpreter"}`` (ChatGLM3).
        A reply that calls them carries ``tool_calls`` in OpenAI's shape; results go back as "observation"
        (or "tool") messages after that reply. A reasoning model's thoughts (GLM-Z1, GLM-4.5) come apart:
        ``Reasoning`` pieces in a stream, ``reasoning_content`` in the message. template_kwargs are more
        variables for a Jinja chat template (``{"enable_thinking": False}`` turns GLM-4.5's thinking off).

        response_format: OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
        {"name", "schema"}}``, enforced while decoding (grammar.py); a bad schema raises GrammarError.
        """
        prompt, parser = self.chat_prompt(messages, tools, template_kwargs)
        grammar = for_prompt(response_grammar(self.tokenizer.family, response_format), self.tokenizer, prompt)
        tokens = self._tokens(prompt, sampling, grammar)
        reply = ChatStream(reply_text(tokens, self.tokenizer, stop, parser), parser)
        return reply if stream else reply.message()

    def chat_prompt(self, messages: Sequence[MessageLike], tools: Sequence[Mapping[str, Any]] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], ReplyParser | MarkupParser | None]:
        """The prompt ids of a conversation in the family's chat format, and the parser its reply needs."""
        family = self.tokenizer.family
        functions, interpreter = self.check_tools(tools)
        if family in TOOL_FAMILIES:
            names = [f["name"] for f in functions] + ([INTERPRETER] if interpreter else [])
            history = system_messages(family, functions, interpreter) + as_messages(list(messages))
            return self.tokenizer.encode_chat(model_messages(family, history)), ReplyParser(family, names)
        return template_chat(self.tokenizer, messages, functions, template_kwargs or {})

    def check_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> tuple[list[dict[str, Any]], bool]:
        """The functions and whether the code interpreter is asked for, or ChatFormatError where the model cannot
        be offered them: ChatGLM3 / GLM-4 in their own system messages (the interpreter: ChatGLM3 only), other
        models through a chat template that offers tools (GLM-4.5/4.6/4.7)."""
        family = self.tokenizer.family
        functions, interpreter = read_tools(tools or ())
        if family in TOOL_FAMILIES:
            system_messages(family, functions, interpreter)
        elif interpreter:
            raise ChatFormatError(f"the code interpreter needs a ChatGLM3 model; this one is of family {family!r}")
        else:
            _template_offers(self.tokenizer, functions)
        return functions, interpreter

    def generate(self, prompt: str, *, stream: bool = False, stop: Sequence[str] = (), parse_special: bool | None = None,
                 response_format: Mapping[str, Any] | None = None, **sampling) -> str | Iterator[str]:
        """Plain completion of text (CodeGeeX2's mode, base models).

        parse_special=True reads special-token text in the prompt ("<|user|>", "[gMASK]") as control tokens, for
        hand-built prompts; the default is the family's (GLM: plain text, as the official tokenizers).
        """
        ids = self.tokenizer.encode(prompt, add_special_tokens=True, parse_special=parse_special)
        deltas = detokenize(self._tokens(ids, sampling, response_grammar("llama", response_format)), self.tokenizer,
                            stop)
        return deltas if stream else "".join(deltas)
