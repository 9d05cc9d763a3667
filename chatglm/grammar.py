"""Structured outputs: JSON schemas and tool calls enforced while decoding, by llguidance's token masks.

A request's constraint is a Lark grammar (llguidance's dialect, with ``%json {schema}`` for JSON Schema) over the
reply's bytes. ``Vocabulary`` gives llguidance a tokenizer's own tokens as bytes (specials as ``\\xff<name>``, as its
llama.cpp bridge does), built once per tokenizer; ``TokenMask`` is one sequence's matcher: before each draw the
engine's Sampler has it put the logits the grammar forbids at -inf, after it tells it the id drawn. The engine sees
only ids and logits.
"""
from __future__ import annotations

import json
import re
from typing import Any, Collection, Mapping, Sequence

import llguidance
import numpy
import torch

from .errors import ChatGLMError
from .markup import ARG_TAGS, CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, closes_reasoning, opens_reasoning
from .tools import TOOL_FAMILIES


class GrammarError(ChatGLMError, ValueError):
    """A schema or grammar that is invalid or that the grammar engine does not support; `param` names its place."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Vocabulary:
    """A tokenizer's vocabulary as llguidance reads it; building one takes a moment, so build one per tokenizer."""

    def __init__(self, tokenizer, stop_ids: Collection[int]):
        names = {i: name for name, i in tokenizer.specials.items()}
        self.size = tokenizer.vocab_size
        self.tokens = [b"\xff" + names[i].encode() if i in names else tokenizer.token_bytes(i)
                       for i in range(self.size)]
        self.eos_token_id = min(stop_ids) if stop_ids else None
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer
        self.ll: llguidance.LLTokenizer | None = None
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(self), n_vocab=self.size,
                                         eos_token=sorted(stop_ids) or None)
        # SentencePiece vocabularies spell some bytes twice ("\u2581" and "<0x20>" are both b" "), and where the
        # grammar forces bytes llguidance allows only its own spelling of them: twins share their flags in the
        # mask and one the matcher refuses is consumed as its twin, so the model may write either
        first: dict[bytes, int] = {}
        canonical = numpy.array([first.setdefault(t, i) if t else i for i, t in enumerate(self.tokens)])
        self.later = numpy.flatnonzero(canonical != numpy.arange(self.size))
        self.earlier = canonical[self.later]
        self.twin = {**dict(zip(self.later.tolist(), self.earlier.tolist())),
                     **dict(zip(self.earlier.tolist(), self.later.tolist()))}

    def __call__(self, text: bytes) -> list[int]:
        """UTF-8 text to ids, as llguidance asks when it re-tokenizes forced text.

        Where the tokenizer's ids would not spell exactly these bytes (SentencePiece puts a space first),
        llguidance's own greedy tokenization of the bytes is used instead.
        """
        ids = self._tokenizer.encode(text.decode("utf-8", "replace"))
        if b"".join(self.tokens[i] for i in ids) == text or self.ll is None:  # None: llguidance's probe call
            return ids
        return self.ll.greedy_tokenize(text.decode("utf-8", "replace"))

    def check(self, grammar: str, param: str) -> None:
        """Raise GrammarError (naming `param`) unless llguidance accepts the grammar."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_error:  # "at 1(8): failed to compile JSON schema: Unimplemented keys: ["not"]" and the grammar below
            detail = re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", messages[0].splitlines()[0])
            raise GrammarError(f"{param} is not supported by the grammar engine: {detail}", param.split(".")[0])

    def mask(self, grammar: str) -> TokenMask:
        return TokenMask(self, grammar)


class TokenMask:
    """One sequence's grammar state: which ids may come next, advanced by each id drawn."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
        self.words = (vocab.size + 31) // 32
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"the grammar engine stopped: {self.matcher.get_error()}", "response_format")

    def allowed(self, size: int) -> numpy.ndarray:
        """bool [size]: which ids keep the reply inside the grammar (the stop ids once it may end)."""
        bits = numpy.empty(self.words, dtype=numpy.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, self.words * 4)
        self._check()
        flags = numpy.unpackbits(bits.view(numpy.uint8), bitorder="little").view(bool)
        v = self.vocab
        flags[v.later] |= flags[v.earlier]
        flags[v.earlier] |= flags[v.later]
        if size > flags.size:
            flags = numpy.concatenate([flags, numpy.zeros(size - flags.size, bool)])
        return flags[:size]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [vocab] with every id the grammar forbids at -inf.

        On the CPU in numpy, on one thread: torch would split a 50k-150k row across its thread pool, and waking
        it costs more than the work on a busy machine (measured: 15-20 ms against 0.05 ms).
        """
        flags = self.allowed(logits.shape[-1])
        if not flags.any():  # never a draw from nothing: the request ends with this error instead
            raise GrammarError("the grammar allows no token here (is the stop token outside the vocabulary?)",
                               "response_format")
        if logits.device.type == "cpu":
            return torch.from_numpy(numpy.where(flags, logits.numpy(), numpy.float32(-numpy.inf)).astype(numpy.float32))
        return logits.masked_fill(~torch.from_numpy(flags).to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if token in self.vocab.twin and not self.matcher.validate_tokens([token]):
            token = self.vocab.twin[token]
        self.matcher.consume_token(token)
        self._check()


# ----- grammars for what the APIs ask -----------------------------------------------------------------------------

# One line, OpenAI's separators: a model (a small one above all) may otherwise pad a reply with whitespace to the end.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {**_COMPACT, **schema.get("x-guidance", {})}},
                                 ensure_ascii=False)


def _reply_start(family: str) -> str:
    """What a reply must begin with before its content: ChatGLM3 and GLM-4 write an (empty) metadata line first."""
    return '" "? "\\n" ' if family in TOOL_FAMILIES else ""  # SentencePiece may put its space first


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema as given, or GrammarError naming the part of it that is not a valid schema."""
    import jsonschema

    if not isinstance(schema, Mapping):
        raise GrammarError(f"{param} must be a JSON Schema object, not {type(schema).__name__}", param.split(".")[0])
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise GrammarError(f"{param}{where} is not a valid JSON Schema: {e.message}", param.split(".")[0]) from None
    return dict(schema)


def json_grammar(family: str, schema: Mapping[str, Any] | None = None) -> str:
    """A reply that is one JSON value of `schema` (any JSON object when None), whitespace allowed before it."""
    return f'start: {_reply_start(family)}" "? {_json(schema if schema is not None else {"type": "object"})}'


def tool_call_grammar(family: str, functions: Sequence[Mapping[str, Any]]) -> str:
    """A reply that is one call of one of `functions`, its arguments valid for that function's parameters.

    GLM-4 writes ``name\\n{json}``; ChatGLM3 writes ``name\\n```python\\ntool_call(key=value, ...)\\n```...``
    with each value a JSON literal for its parameter (tools.py reads true, false and null back as Python's); only
    the required parameters are written, in the order of ``properties``.
    """
    rules, names = [], []
    for k, f in enumerate(functions):
        name = json.dumps(f["name"])
        params = dict(f.get("parameters") or {"type": "object"})
        if family == "glm4":
            rules.append(f"call{k}: {name} \"\\n\" {_json(params)}")
        elif family == "chatglm3":
            args = [f'"{key}=" {_json(schema)}' for key, schema in _written(params)]
            body = ' ", " '.join(args)
            rules.append(f'call{k}: {name} "\\n```python\\ntool_call(" {body} ")\\n```"')
        else:
            raise GrammarError(f"tool calls need a ChatGLM3 or GLM-4 model; this one is of family {family!r}",
                               "tool_choice")
        names.append(f"call{k}")
    return "start: " + " | ".join(names) + "\n" + "\n".join(rules)


def _written(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The parameters a forced call writes: the required ones (all when none is marked), in ``properties``' order."""
    props = params.get("properties") or {}
    required = set(params.get("required") or props)
    return [(key, schema) for key, schema in props.items() if key in required]


def _tag(specials: Mapping[str, int], tag: str) -> str:
    """A tag as the grammar writes it: its token where the vocabulary has the tag as a special token (as GLM
    folders and GGUFs do), else its text."""
    return f"<[{specials[tag]}]>" if tag in specials else json.dumps(tag)


def _tagged_value(schema: Mapping[str, Any], text: str) -> str:
    """An argument's value between <arg_value> tags: a string parameter as bare `text` (its enum's words where it
    has one), any other as JSON of its schema (markup.parse_call reads both)."""
    if schema.get("type") != "string":
        return _json(schema)
    if "enum" in schema:
        return "(" + " | ".join(json.dumps(str(v)) for v in schema["enum"]) + ")"
    return text


def markup_call_grammar(specials: Mapping[str, int], functions: Sequence[Mapping[str, Any]]) -> str:
    """A reply that is one call of one of `functions` in GLM-4.5's tagged form, ``<tool_call>name<arg_key>k
    </arg_key><arg_value>v</arg_value>...</tool_call>`` (a newline allowed between the parts); the required
    parameters (all when none is marked) are written, in the order of ``properties``."""
    open_call, close_call, *arg_tags = (_tag(specials, t) for t in (CALL_OPEN, CALL_CLOSE, *ARG_TAGS))
    key_open, key_close, value_open, value_close = arg_tags
    # bare text cannot spell a special token, so it may hold anything; a tag spelled in text ends at its '<'
    text = "/(?s:.*)/" if ARG_TAGS[-1] in specials else "/[^<]*/"
    rules, names = [], []
    for k, f in enumerate(functions):
        args = [f'"\\n"? {key_open} {json.dumps(key)} {key_close} "\\n"? {value_open} {_tagged_value(schema, text)} '
                f'{value_close}' for key, schema in _written(f.get("parameters") or {})]
        rules.append(f'call{k}: {open_call} {json.dumps(f["name"])} {" ".join(args)} "\\n"? {close_call}')
        names.append(f"call{k}")
    return "start: " + " | ".join(names) + "\n" + "\n".join(rules)


def after_reasoning(grammar: str, specials: Mapping[str, int], opened: bool) -> str:
    """`grammar` after the model's reasoning (as vLLM constrains a reasoning model's output only after it): free
    thoughts up to </think>, then the constrained answer, so the answer and not the thoughts holds the JSON or the
    call. `opened`: the prompt opened the reasoning (GLM-Z1), else the reply may open it (GLM-4.5 thinking)."""
    think = (f"think: /(?s:.*)/ {_tag(specials, THINK_CLOSE)}" if THINK_CLOSE in specials
             else "think[lazy]: /(?s:.*?)<\\/think>/")
    start = "think" if opened else f"({_tag(specials, THINK_OPEN)} think)?"
    return f'start: {start} "\\n"? answer\n{think}\n' + grammar.replace("start:", "answer:", 1)


def for_prompt(grammar: str | None, tokenizer: Any, prompt: Sequence[int]) -> str | None:
    """`grammar` as a reply to `prompt` takes it: after the reasoning where the chat template writes one and the
    prompt has not closed it."""
    if grammar is None or tokenizer.family != "llama" or THINK_OPEN not in (tokenizer.chat_template or "") \
            or closes_reasoning(tokenizer, prompt):
        return grammar
    return after_reasoning(grammar, tokenizer.specials, opens_reasoning(tokenizer, prompt))


def response_grammar(family: str, response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar of OpenAI's ``response_format`` (None for plain text), or GrammarError naming the bad part."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind in (None, "text"):
        if kind is None:
            raise GrammarError("response_format must be an object with a type: 'text', 'json_object' or "
                               "'json_schema'", "response_format")
        return None
    if kind == "json_object":
        return json_grammar(family)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise GrammarError("response_format.json_schema must be {'name': ..., 'schema': {...}, 'strict': ...}",
                               "response_format")
        return json_grammar(family, check_schema(spec["schema"], "response_format.json_schema.schema"))
    raise GrammarError(f"response_format.type is {kind!r}; expected 'text', 'json_object' or 'json_schema'",
                       "response_format")
