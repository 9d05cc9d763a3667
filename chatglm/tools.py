"""Tool calls in ChatGLM3's and GLM-4's own formats, to and from OpenAI's.

ChatGLM3 (THUDM/ChatGLM3 PROMPT.md; its tokenizer's ``build_chat_input``): the tools go into a system message,
a fixed sentence and then the list of function definitions as JSON indented by 4. The model calls a tool with a
reply part whose metadata line is the function's name and whose body is a ```python block holding
``tool_call(arg=value, ...)``; it then emits ``<|observation|>`` and waits for the result.

GLM-4 (glm-4-9b-chat's chat template): the tools go into a system message after a fixed self-introduction, under
``# 可用工具``, one ``## name`` section each with the function's JSON (indent 4) and a note asking for JSON
arguments. A call is a part whose metadata line is the function's name and whose body is the JSON arguments.

In both, a plain answer is a part with an empty metadata line, and a reply may hold several parts, each begun
by ``<|assistant|>`` (for example a sentence, then a call). Tool results come back as observation messages.

ChatGLM3's code interpreter (PROMPT.md "Code Execution"; its composite demo): a fixed system prompt, a part
whose metadata line is ``interpreter`` and whose body is a ```python block, then the cell's output as an
observation in a ```result block. Here it is a built-in tool named ``interpreter`` taking ``{"code": ...}``,
asked for with OpenAI's ``{"type": "code_interpreter"}`` entry in the tools list.
"""
from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

from .errors import ChatFormatError
from .messages import ChatMessage

TOOL_FAMILIES = ("chatglm3", "glm4")

CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
              "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOLS_HEADING = "# 可用工具"
GLM4_JSON_NOTE = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
INTERPRETER = "interpreter"
INTERPRETER_PROMPT = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
                      "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
                      "你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")

_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)\n?```", re.DOTALL)


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One function call: OpenAI's shape, arguments as JSON object text."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:  # streamed deltas number their calls
            out = {"index": index, **out}
        return out


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def tools_message(family: str, functions: Sequence[Mapping[str, Any]]) -> ChatMessage:
    """The system message that tells a ChatGLM3 or GLM-4 model which functions it may call."""
    if family == "chatglm3":
        return ChatMessage("system", f"{CHATGLM3_TOOLS_PROMPT}\n{_dumps(list(functions), indent=4)}")
    if family == "glm4":
        sections = "".join(f"\n\n## {f['name']}\n\n{_dumps(dict(f), indent=4)}\n{GLM4_JSON_NOTE}" for f in functions)
        return ChatMessage("system", f"{GLM4_INTRO}\n\n{GLM4_TOOLS_HEADING}{sections}")
    raise ChatFormatError(f"tool calls need a ChatGLM3 or GLM-4 model; this one is of family {family!r}")


def read_tools(tools: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The function definitions of a tools list, and whether it asks for the code interpreter.

    An entry is OpenAI's ``{"type": "function", "function": {...}}``, the bare definition ChatGLM3's demos use
    (``{"name", "description", "parameters"}``) or ``{"type": "code_interpreter"}``.
    """
    functions: list[dict[str, Any]] = []
    interpreter = False
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatFormatError(f"tools[{i}] must be an object, not {type(tool).__name__}")
        kind = tool.get("type", "function")
        if kind == "code_interpreter":
            interpreter = True
            continue
        if kind != "function":
            raise ChatFormatError(f"tools[{i}] has type {kind!r}; expected 'function' or 'code_interpreter'")
        spec = tool["function"] if isinstance(tool.get("function"), Mapping) else tool
        spec = {k: v for k, v in spec.items() if k != "type"}
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ChatFormatError(f"tools[{i}] has no function name: expected {{'name': ..., 'parameters': ...}} "
                                  "or OpenAI's {'type': 'function', 'function': {...}}")
        functions.append(spec)
    if interpreter and any(f["name"] == INTERPRETER for f in functions):
        raise ChatFormatError(f"a function named {INTERPRETER!r} clashes with the code interpreter")
    return functions, interpreter


def system_messages(family: str, functions: Sequence[Mapping[str, Any]], interpreter: bool) -> list[ChatMessage]:
    """The system messages that offer the functions and the code interpreter to a ChatGLM3 / GLM-4 model."""
    out = []
    if interpreter:
        if family != "chatglm3":
            raise ChatFormatError(f"the code interpreter needs a ChatGLM3 model; this one is of family {family!r}")
        out.append(ChatMessage("system", INTERPRETER_PROMPT))
    if functions:
        out.append(tools_message(family, functions))
    return out


def as_tool_call(call: ToolCall | Mapping[str, Any]) -> ToolCall:
    """A ToolCall from itself or from OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    if isinstance(call, ToolCall):
        return call
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatFormatError(f"a tool call must be a ToolCall or OpenAI's {{'function': {{'name': ..., "
                              f"'arguments': ...}}}}, not {call!r}")
    arguments = function.get("arguments") or "{}"
    return ToolCall(function["name"], arguments if isinstance(arguments, str) else _dumps(arguments),
                    call.get("id") or _call_id())


def model_messages(family: str, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """A conversation as a ChatGLM3 / GLM-4 model reads it: an assistant message's tool calls become the parts
    the model wrote for them (its text first). Other families' messages pass unchanged."""
    if family not in TOOL_FAMILIES:
        return list(messages)
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            if m.content:
                out.append(ChatMessage("assistant", m.content, metadata=m.metadata))
            out += [call_message(family, c.name, c.arguments) for c in map(as_tool_call, m.tool_calls)]
        else:
            out.append(m)
    return out


def _python_literal(value: Any) -> str:
    """Python source for a JSON value (ChatGLM3 writes call arguments as Python, strings double-quoted)."""
    if isinstance(value, str):
        return _dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_python_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_dumps(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def call_message(family: str, name: str, arguments: str) -> ChatMessage:
    """An earlier call (OpenAI's name and JSON arguments) as the assistant part the model itself writes."""
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"the arguments of the call to {name!r} are not JSON: {e}") from None
    if not isinstance(args, dict):
        raise ChatFormatError(f"the arguments of the call to {name!r} must be a JSON object")
    if name == INTERPRETER:
        if not isinstance(args.get("code"), str):
            raise ChatFormatError(f"a call to the {INTERPRETER} needs {{'code': '...'}}, not {arguments}")
        return ChatMessage("assistant", f"```python\n{args['code']}\n```", metadata=INTERPRETER)
    if family == "chatglm3":
        if not all(isinstance(k, str) and k.isidentifier() for k in args):
            raise ChatFormatError(f"ChatGLM3 passes arguments by keyword: {list(args)} are not all names")
        kwargs = ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items())
        return ChatMessage("assistant", f"```python\ntool_call({kwargs})\n```", metadata=name)
    return ChatMessage("assistant", _dumps(args), metadata=name)


class _JsonNames(ast.NodeTransformer):
    """JSON's true, false and null read as Python's (a model writes them in calls; grammar.py's calls are JSON)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        values = {"true": True, "false": False, "null": None}
        return ast.Constant(values[node.id]) if node.id in values else node


def _keyword_arguments(code: str) -> dict[str, Any] | None:
    """The keyword arguments of ``tool_call(...)``, read as literals with ast (model output is never run)."""
    try:
        call = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
            return None
        if call.args or any(kw.arg is None for kw in call.keywords):
            return None
        return {kw.arg: ast.literal_eval(_JsonNames().visit(kw.value)) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def _object_arguments(text: str) -> dict[str, Any] | None:
    """GLM-4's arguments: a JSON object (a Python dict literal too, which THUDM's own server accepts)."""
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        try:
            args = ast.literal_eval(text.strip())
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return None
    return args if isinstance(args, dict) else None


def parse_call(family: str, name: str, body: str) -> ToolCall | None:
    """A call part's body as a ToolCall, or None when it is not a well-formed call."""
    if name == INTERPRETER:  # the code interpreter's body is a ```python block
        block = _CODE_BLOCK.search(body)
        code = block.group(1) if block else body.strip()
        return ToolCall(INTERPRETER, _dumps({"code": code})) if code.strip() else None
    if family == "chatglm3":
        block = _CODE_BLOCK.search(body)
        args = _keyword_arguments(block.group(1) if block else body)
    else:
        args = _object_arguments(body)
    if args is None:
        return None
    try:
        return ToolCall(name, _dumps(args))
    except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes)
        return None


class ReplyParser:
    """Reads a ChatGLM3 / GLM-4 reply as it streams: text to show at once, tool calls held back.

    Feed the text of each part as it arrives and call ``end_part`` where a part ends (at ``<|assistant|>`` and
    at the end of the reply). A part's first line is its metadata: empty for text; the name of one of
    ``tool_names`` for a call, whose body is kept until the part ends and then parsed. Any other metadata
    (or a call that does not parse) is shown as text, so nothing the model wrote is lost.
    """

    def __init__(self, family: str, tool_names: Collection[str] = ()):
        self.family = family
        self.tool_names = frozenset(tool_names)
        self.calls: list[ToolCall] = []
        self._head: str | None = ""   # the metadata line so far; None once it is complete
        self._name = ""               # the tool this part calls ("" for text)
        self._body = ""               # the call held back
        self._shown = False           # whether text was shown yet (the reply's leading blank is dropped)

    def feed(self, delta: str) -> str:
        """Text of the current part; returns what may be shown now."""
        if self._head is not None:
            self._head += delta
            if "\n" not in self._head:
                return ""
            line, delta = self._head.split("\n", 1)
            self._head = None
            name = line.strip()
            if name in self.tool_names:
                self._name = name
            elif name:
                delta = f"{line}\n{delta}"
        if self._name:
            self._body += delta
            return ""
        return self._show(delta)

    def end_part(self) -> str:
        """Close the current part; returns text it still held (a part without metadata, a call that failed)."""
        out = ""
        if self._head is not None:
            out = self._show(self._head)
        elif self._name:
            call = parse_call(self.family, self._name, self._body)
            if call is not None:
                self.calls.append(call)
            else:
                out = self._show(f"{self._name}\n{self._body}")
        self._head, self._name, self._body = "", "", ""
        return out

    def _show(self, text: str) -> str:
        if not self._shown:
            text = text.lstrip()
            self._shown = bool(text)
        return text
