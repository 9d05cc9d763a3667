"""The tool loop: model -> call -> observation -> model, until the model answers in plain text.

The terminal runs it, and so can any Python code: give it a Pipeline, the functions the model may call (a
module from ``--tool-module``, or any mapping of names to callables) and, for ChatGLM3's code interpreter, a
sandbox. ``Agent.run`` yields what happens as events and appends every reply and observation to the
conversation it was given, so the conversation is always complete, even when the caller stops early.

Each tool name is looked up as a function of that name, called with the model's arguments as keywords; its
result (a string as is, anything else as JSON) goes back as an observation, and so does any exception, as one
line, so a failing tool never ends the conversation. Observations are cut at 1024 characters, as THUDM's and
chatglm.cpp's demos cut them. The code interpreter's output goes back in a ```result block (ChatGLM3's
PROMPT.md). Nothing runs code unless a sandbox is given.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, Union

from .errors import ChatGLMError
from .messages import ChatMessage
from .tools import INTERPRETER, ToolCall, read_tools

OBSERVATION_LIMIT = 1024  # characters of a result the model sees, as in THUDM's and chatglm.cpp's demos
MAX_CALL_ROUNDS = 8        # replies with calls in one turn before the loop gives up


class CellResult(Protocol):
    output: str  # what the cell printed and its value or error (a timeout is told here too)


class CodeRunner(Protocol):
    """What the code interpreter needs: chatglm.sandbox.Sandbox, or anything that runs a cell the same way."""

    def run(self, code: str) -> CellResult: ...


@dataclass
class Text:
    """A piece of the model's reply, to show as it comes."""

    text: str


@dataclass
class Call:
    """The model calls a function (or runs code in the interpreter)."""

    call: ToolCall

    @property
    def code(self) -> str | None:
        """The code of an interpreter call, else None."""
        return _arguments(self.call).get("code") if self.call.name == INTERPRETER else None

    def __str__(self) -> str:
        if self.code is not None:
            return f"running code:\n{self.code}"
        args = _arguments(self.call)
        return f"calling {self.call.name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


@dataclass
class Observation:
    """What a call returned, as it goes back to the model."""

    name: str
    content: str


@dataclass
class Notice:
    """A note from the loop itself (not the model's words), such as why it stopped."""

    text: str


Event = Union[Text, Call, Observation, Notice]


def _arguments(call: ToolCall) -> dict[str, Any]:
    args = json.loads(call.arguments or "{}")  # the parser wrote it, so it is a JSON object
    return args if isinstance(args, dict) else {}


def load_tool_specs(path: str | Path) -> list[dict[str, Any]]:
    """The JSON list of function definitions in a ``--tools`` file (OpenAI's shape or ChatGLM3's bare one)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatGLMError(f"{path}: cannot read the tools file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatGLMError(f"{path}: the tools file is not JSON ({e})") from None
    if not isinstance(tools, list):
        raise ChatGLMError(f"{path}: expected a JSON list of function definitions, not a {type(tools).__name__}")
    read_tools(tools)  # refuses entries of the wrong shape now, with their index
    return tools


def load_tool_module(spec: str) -> ModuleType:
    """The module a ``--tool-module`` names: a path to a .py file, or a dotted name on sys.path."""
    path = Path(spec)
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise ChatGLMError(f"{spec}: no such file (expected the .py file that defines the tools)")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except ChatGLMError:
        raise
    except ImportError as e:
        raise ChatGLMError(f"cannot import the tool module {spec!r}: {e}") from None
    except Exception as e:  # the user's module failed while it loaded
        raise ChatGLMError(f"the tool module {spec!r} failed to load: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return traceback.format_exception_only(type(e), e)[-1].strip()


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _limit(text: str) -> str:
    return text if len(text) <= OBSERVATION_LIMIT else text[:OBSERVATION_LIMIT] + " [TRUNCATED]"


class Agent:
    """Runs a conversation's tool calls with the user's functions and, if given, a code sandbox."""

    def __init__(self, pipe, tools: Sequence[Mapping[str, Any]] = (),
                 functions: ModuleType | Mapping[str, Callable[..., Any]] | None = None,
                 interpreter: CodeRunner | None = None, max_rounds: int = MAX_CALL_ROUNDS):
        self.tools = list(tools) + ([{"type": "code_interpreter"}] if interpreter is not None else [])
        self.specs, _ = pipe.check_tools(self.tools)  # the function definitions; a model without tools: refused
        self.pipe = pipe
        self.functions = functions
        self.interpreter = interpreter
        self.max_rounds = max_rounds
        missing = [f["name"] for f in self.specs if self._function(f["name"]) is None]
        if missing:
            raise ChatGLMError(f"no function for the tools {', '.join(missing)}: the tool module must define "
                               "a function of each tool's name")

    def _function(self, name: str) -> Callable[..., Any] | None:
        source = self.functions
        fn = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        return fn if callable(fn) else None

    def run(self, messages: list[ChatMessage], **sampling: Any) -> Iterator[Event]:
        """Reply to the conversation, running the calls the model makes, until it answers without one.

        Every reply (as much as was generated, if the caller stops early) and every observation is appended
        to `messages`; sampling settings go to Pipeline.chat.
        """
        for _ in range(self.max_rounds):
            reply = self.pipe.chat(messages, tools=self.tools or None, stream=True, **sampling)
            try:
                for text in reply:
                    yield Text(text)
            finally:
                reply.close()
                messages.append(reply.message())
            if not reply.tool_calls:
                return
            for call in reply.tool_calls:
                yield Call(call)
                try:
                    result = self.execute(call)
                except KeyboardInterrupt:
                    messages.append(ChatMessage("observation", "interrupted by the user"))
                    raise
                messages.append(ChatMessage("observation", result))
                yield Observation(call.name, result)
        yield Notice(f"stopped: {self.max_rounds} replies in a row called tools")

    def execute(self, call: ToolCall) -> str:
        """The observation for one call: the function's result, or what went wrong, as text."""
        args = _arguments(call)
        if call.name == INTERPRETER:
            if self.interpreter is None:
                return "the code interpreter is not enabled"
            output = self.interpreter.run(str(args.get("code", ""))).output
            return f"```result\n{_limit(output.strip())}\n```"
        fn = self._function(call.name)
        if fn is None:
            return f"there is no function named {call.name!r}"
        try:
            return _limit(_as_text(fn(**args)))
        except Exception as e:  # the user's function failed: the model hears why
            return _one_line(e)

