"""Chat prompts per family: which text and which special tokens a conversation becomes, and what stops a reply.

A prompt is built as a list of *segments*: a ``str`` is text that the tokenizer encodes on its own, as plain
text (special-token text inside it stays text), and an ``int`` is a token id. Keeping message content in ``str``
segments is what stops a user from typing a role token into a conversation.

Families:
- ``chatglm`` (ChatGLM-6B): ``[Round i]\\n问：…\\n答：…\\n`` from 0 (one user message alone is used as is),
  encoded with the ChatGLM-6B rules, then ``[gMASK] <sop>``.
- ``chatglm2`` and ``codegeex2``: ``[gMASK] <sop>`` then ``[Round i]\\n\\n问：…\\n\\n答：…\\n\\n`` from 1.
- ``chatglm3`` and ``glm4``: ``[gMASK] <sop>``, then per message ``<|role|>`` + ``metadata\\n`` + content, then
  ``<|assistant|>``.
- ``llama`` (GGUF files, Hugging Face ``tokenizer.json`` folders): the file's own Jinja chat template, ChatML
  when it has none.

The round formats (ChatGLM-6B/2, CodeGeeX2) have no place for a system prompt: system messages are dropped, as
chatglm.cpp does. They have no tool role either, so tool results are refused rather than silently lost.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatFormatError, ModelFileError
from .messages import ChatMessage

if TYPE_CHECKING:
    from .tokenizers import Tokenizer

Segment = Union[str, int]

ROLE_FAMILIES = ("chatglm3", "glm4")

# The role token each message role is written with in ChatGLM3 / GLM-4 prompts.
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
    "tool": "<|observation|>",
    "interpreter": "<|observation|>",
}

# Tokens that end a reply, by family (names in the family's special-token table).
STOP_TOKENS = {
    "chatglm": ("<eop>", "</s>"),
    "chatglm2": ("</s>",),
    "codegeex2": ("</s>",),
    "chatglm3": ("</s>", "<|user|>", "<|observation|>"),
    "glm4": ("<|endoftext|>", "<|user|>", "<|observation|>"),
}

# Vocabulary entries that end a turn in llama-family files, the same list llama.cpp treats as end of
# generation (end-of-turn, end-of-text and the fill-in-the-middle pad/repo/file markers).
END_OF_TURN_NAMES = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "</s>", "<eos>", "<|end_of_text|>", "<end_of_utterance>",
    "<｜end▁of▁sentence｜>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|fim_repo|>",
    "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>", "<eoa>",
})
# Control tokens whose names say "end of turn" count too, whatever the list above misses.
_EOT_LIKE = re.compile(r"eot|end_of_turn|end_of_message|im_end", re.IGNORECASE)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Chat formats of llama-family models whose folders carry no template (chatglm.cpp's rules): Baichuan puts
# its user / assistant token before each message and drops system messages; InternLM writes
# "<|User|>:…<eoh>\n<|Bot|>:…<eoa>\n" after <s>, encoded as one text.
BUILTIN_TEMPLATES = {
    "baichuan": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<reserved_106>' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '<reserved_107>' + m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<reserved_107>' }}{% endif %}"
    ),
    "internlm": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '<|User|>:' + m['content'] + '<eoh>\n<|Bot|>:' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + '<eoa>\n' }}{% endif %}{% endfor %}"
    ),
}
# role tokens that must stay single ids between separately encoded contents
BUILTIN_ROLE_TOKENS = {"baichuan": ("<reserved_106>", "<reserved_107>"), "internlm": ()}


def stop_ids(family: str, specials: Mapping[str, int]) -> frozenset[int]:
    """The ids that end a reply in a GLM family (every listed name must be in the table)."""
    return frozenset(specials[name] for name in STOP_TOKENS[family])


def vocab_stop_ids(vocab: Mapping[str, int], eos_ids: Iterable[int | None], control: Iterable[str]) -> frozenset[int]:
    """Stop ids of a llama-family vocabulary: its eos ids, end-of-turn entries and EOT-named control tokens."""
    ids = {i for i in eos_ids if i is not None}
    ids.update(vocab[name] for name in END_OF_TURN_NAMES if name in vocab)
    ids.update(vocab[name] for name in control if _EOT_LIKE.search(name))
    return frozenset(ids)


def build_prompt(tokenizer: Tokenizer, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                 tools: Sequence[Mapping[str, Any]] = (), template_kwargs: Mapping[str, Any] = {}) -> list[Segment]:
    """The prompt segments of a conversation in the tokenizer's family; tools and template_kwargs (more variables,
    such as GLM-4.5's enable_thinking) are for a Jinja chat template: the GLM role formats have none."""
    if not messages:
        raise ChatFormatError("the conversation is empty: give at least one message")
    family = tokenizer.family
    if tools and family != "llama":
        raise ChatFormatError(f"tools go to a chat template; a model of family {family!r} takes them as messages")
    specials = tokenizer.specials
    if family == "chatglm":
        return [chatglm_text(messages, add_generation_prompt), specials["[gMASK]"], specials["<sop>"]]
    if family in ("chatglm2", "codegeex2"):
        return [specials["[gMASK]"], specials["<sop>"], chatglm2_text(messages, add_generation_prompt)]
    if family in ROLE_FAMILIES:
        return role_prompt(messages, specials, add_generation_prompt)
    if family == "llama":
        return template_prompt(tokenizer, messages, add_generation_prompt, tools, template_kwargs)
    raise ChatFormatError(f"no chat format for tokenizer family {family!r}")


# ----- ChatGLM-6B / ChatGLM2 / CodeGeeX2: rounds of plain text -----


def rounds(messages: Sequence[ChatMessage], add_generation_prompt: bool) -> list[tuple[str, str | None]]:
    """(question, answer) pairs, checked the way chatglm.cpp checks them; system messages are dropped."""
    turns: list[str] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if m.role not in ("user", "assistant"):
            raise ChatFormatError(f"messages[{i}] has role {m.role!r}, which this model's chat format cannot "
                                  "express (it knows only user and assistant turns)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if m.role != expected:
            raise ChatFormatError(f"messages[{i}].role should be {expected!r} but is {m.role!r}: user and "
                                  "assistant messages must alternate, starting with the user")
        turns.append(m.content)
    if not turns:
        raise ChatFormatError("the conversation has no user message")
    if add_generation_prompt and len(turns) % 2 == 0:
        raise ChatFormatError("the last message is the assistant's: end with a user message to get a reply")
    return [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]


def chatglm_text(messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
    """ChatGLM-6B's prompt text: a lone question as is, else numbered rounds from 0."""
    pairs = rounds(messages, add_generation_prompt)
    if len(pairs) == 1 and pairs[0][1] is None:
        return pairs[0][0]
    return "".join(f"[Round {i}]\n问：{q}\n答：" + ("" if a is None else f"{a}\n") for i, (q, a) in enumerate(pairs))


def chatglm2_text(messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
    """ChatGLM2-6B / CodeGeeX2's prompt text: numbered rounds from 1 with blank lines."""
    pairs = rounds(messages, add_generation_prompt)
    return "".join(f"[Round {i}]\n\n问：{q}\n\n答：" + ("" if a is None else f"{a}\n\n")
                   for i, (q, a) in enumerate(pairs, 1))


# ----- ChatGLM3 / GLM-4: role tokens -----


def role_prompt(messages: Sequence[ChatMessage], specials: Mapping[str, int],
                add_generation_prompt: bool) -> list[Segment]:
    """``[gMASK] <sop>`` + ``<|role|>`` ``metadata\\n`` ``content`` per message (each text encoded on its own)."""
    segments: list[Segment] = [specials["[gMASK]"], specials["<sop>"]]
    for m in messages:
        segments += [specials[ROLE_TOKENS[m.role]], f"{m.metadata}\n", m.content]
    if add_generation_prompt:
        segments.append(specials["<|assistant|>"])
    return segments


# ----- llama family: the file's Jinja template -----


STANDARD_VARIABLES = frozenset({"messages", "bos_token", "eos_token", "add_generation_prompt", "tools"})


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """JSON as chat templates expect it (no HTML escaping, unlike Jinja's built-in filter)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatFormatError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in a sandbox (templates come from model files, which we do not trust)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_template(source: str, messages: list[dict[str, Any]], *, bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] = (),
                    variables: Mapping[str, Any] = {}) -> str:
    """Render a chat template the way transformers and llama.cpp call it (``tools`` only when there are some;
    `variables` are the caller's chat_template_kwargs, which cannot replace the standard ones)."""
    template = compile_template(source)
    extra = {"tools": [dict(t) for t in tools]} if tools else {}
    try:
        return template.render(**{**variables, **extra}, messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except ChatFormatError:
        raise
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"the chat template failed on this conversation: {e}") from None


def _place_contents(rendered: str, pieces: list[str], order: list[int], contents: list[str]) -> list[str] | None:
    """How each content appears in the real rendering, between the template's own text pieces.

    ``pieces`` is the sentinel rendering split at the sentinels and ``order`` says whose content each gap
    held. Templates may trim content, so a gap may hold the content or a stripped form of it.
    Returns the rendered forms, or None when the real rendering does not have this shape.
    """
    found: list[str] = []
    pos = 0
    for k, index in enumerate(order):
        if not rendered.startswith(pieces[k], pos):
            return None
        pos += len(pieces[k])
        c = contents[index]
        forms = [f for f in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip()))
                 if rendered.startswith(f, pos) and rendered.startswith(pieces[k + 1], pos + len(f))]
        if not forms:
            return None
        found.append(forms[0])
        pos += len(forms[0])
    return found if rendered[pos:] == pieces[-1] else None


def template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: a call's arguments as an object (templates iterate them), as
    transformers passes them."""
    d = m.to_dict()
    if m.tool_calls:
        d["tool_calls"] = [_with_object_arguments(c) for c in m.tool_calls]
    return d


def _with_object_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return dict(call)
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"the arguments of the call to {function.get('name')!r} are not JSON: {e}") from None
    return {**call, "function": {**function, "arguments": arguments}}


def template_prompt(tokenizer: Tokenizer, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                    tools: Sequence[Mapping[str, Any]] = (), variables: Mapping[str, Any] = {}) -> list[Segment]:
    """Segments of a rendered Jinja template, with special tokens only from the template's own text.

    The template is rendered twice: with the real contents and with a unique sentinel in place of each
    content. The sentinel rendering says which text is the template's (special-token text there becomes
    special ids) and which is content (kept plain). Text around a special token, template text and content
    together, stays one segment, so it is tokenized exactly as llama.cpp tokenizes the rendered prompt.
    """
    source = tokenizer.chat_template or CHATML_TEMPLATE
    dicts = [template_message(m) for m in messages]
    nonce = secrets.token_hex(8)
    marks = [f"@@content-{nonce}-{k}@@" for k in range(len(dicts))]
    kwargs = dict(bos_token=tokenizer.bos_text, eos_token=tokenizer.eos_text,
                  add_generation_prompt=add_generation_prompt, tools=tools,
                  variables={k: v for k, v in variables.items() if k not in STANDARD_VARIABLES})
    try:
        real = render_template(source, dicts, **kwargs)
        marked = render_template(source, [{**d, "content": mark} for d, mark in zip(dicts, marks)], **kwargs)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFileError(tokenizer.path, f"its chat template does not compile: {e}") from None

    owner = {mark: k for k, mark in enumerate(marks)}
    parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", marked)
    pieces, order = parts[0::2], [owner[p] for p in parts[1::2]]
    contents = [d["content"] for d in dicts]
    placed = _place_contents(real, pieces, order, contents)
    if placed is None:
        if any(isinstance(s, int) for c in contents for s in tokenizer.split_specials(c)):
            raise ChatFormatError("the chat template rewrites message content, so special-token text inside a "
                                  "message could not be kept as plain text; remove it from the message")
        return tokenizer.split_specials(real)

    segments: list[Segment] = []
    for k, piece in enumerate(pieces):
        segments += tokenizer.split_specials(piece)
        if k < len(placed):
            segments.append(placed[k])
    return merge_text(segments)


def merge_text(segments: Iterable[Segment]) -> list[Segment]:
    """Join neighbouring text segments, so text between two special tokens is tokenized as one piece."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, str) and out and isinstance(out[-1], str):
            out[-1] += s
        elif not (isinstance(s, str) and not s):
            out.append(s)
    return out
