"""The interactive chat in a terminal (``chatglm chat``).

At a terminal the prompt is prompt_toolkit's: line editing, and a history kept in
``~/.cache/chatglm/chat_history`` ($XDG_CACHE_HOME respected; in memory if that cannot be written). Enter
sends, Alt+Enter (or Esc then Enter) starts a new line, Ctrl-C clears the line, Ctrl-D ends. When stdin is not
a terminal (a pipe, a test) each line read is one message, so ``echo hi | chatglm chat`` works.

Replies stream as they are generated. Ctrl-C during a reply stops it: the generator is closed, so nothing more
is computed, and the part already shown stays in the conversation, so the next message follows what the user
saw. ``clear`` empties the conversation (the ``--system`` prompt stays); ``stop``, ``exit`` or ``quit`` ends.
An error in one turn (a conversation too long for the context, say) is printed as one line and that turn is
dropped from the conversation.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from .agent import Agent, Call, Event, Notice, Observation, Text, load_tool_module, load_tool_specs
from .errors import ChatGLMError
from .markup import Reasoning
from .messages import ChatMessage

if TYPE_CHECKING:
    from .sandbox import Sandbox

EXIT_WORDS = {"stop", "exit", "quit"}
KEYS = "Enter sends, Alt+Enter new line, Ctrl-C stops a reply, 'clear' starts over, 'stop' or Ctrl-D ends"
PIPED = "One message per line; 'clear' starts over, 'stop' or end of input ends"
DIM, UNDIM = "\x1b[2m", "\x1b[0m"  # a reasoning model's thoughts, on a terminal


def history_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "chatglm" / "chat_history"


def prompt_history() -> History:
    """The prompt's history across sessions, or one in memory where the cache folder cannot be written."""
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


def prompt_session(history: History | None = None, **io: Any) -> PromptSession:
    """A prompt where Enter sends and Alt+Enter (Esc, Enter) inserts a new line; `io`: input=, output=."""
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _new_line(event) -> None:
        event.current_buffer.insert_text("\n")

    return PromptSession(history=history or InMemoryHistory(), key_bindings=keys, multiline=False,
                         prompt_continuation="  ", **io)


def read_messages(session: PromptSession | None = None, stdin: TextIO | None = None) -> Iterator[str]:
    """The user's messages until stop/exit/quit or end of input; Ctrl-C at the prompt clears the line.

    Without a session, lines come from stdin, each after a "> " on stdout, as input() would show it.
    """
    while True:
        try:
            if session is not None:
                text = session.prompt("> ")
            else:
                print("> ", end="", flush=True)
                text = (stdin or sys.stdin).readline()
                if not text:
                    print()
                    return
        except EOFError:
            return
        except KeyboardInterrupt:
            continue
        text = text.strip()
        if text.lower() in EXIT_WORDS:
            return
        if text:
            yield text


class Terminal:
    """One conversation shown in a terminal: the user's messages in, the agent's events out."""

    def __init__(self, agent: Agent, system: str | None = None, sampling: dict[str, Any] | None = None,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.agent = agent
        self.system = [ChatMessage("system", system)] if system else []
        self.history: list[ChatMessage] = list(self.system)
        self.sampling = sampling or {}
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._line_start = True
        self._thinking = False  # the last text shown was reasoning

    def banner(self, interactive: bool) -> str:
        pipe = self.agent.pipe
        extras = [pipe.placement] if pipe.placement else []
        if self.agent.specs:
            extras.append(f"tools: {', '.join(f['name'] for f in self.agent.specs)}")
        if self.agent.interpreter is not None:
            extras.append(f"code interpreter: {getattr(self.agent.interpreter, 'description', 'on')}")
        extra = "; ".join(extras)
        return (f"chatglm: {pipe.path.name} ({pipe.format}, {pipe.config.arch}, {pipe.model.device})"
                f"{'; ' + extra if extra else ''}. {KEYS if interactive else PIPED}.")

    def run(self, messages: Iterable[str]) -> None:
        for text in messages:
            if text.lower() == "clear":
                self.history = list(self.system)
                self._write("(new conversation)\n")
            else:
                self.turn(text)

    def turn(self, text: str) -> bool:
        """Send one message and show the reply; on an error (one line) the turn is forgotten and False returned."""
        start = len(self.history)
        self.history.append(ChatMessage("user", text))
        try:
            self.show(self.agent.run(self.history, **self.sampling))
        except (ChatGLMError, ValueError) as e:
            del self.history[start:]
            return self._error(e)
        return True

    def complete(self, text: str, parse_special: bool | None = None) -> bool:
        """Plain completion (--mode generate): the text continued, not a conversation."""
        try:
            deltas = self.agent.pipe.generate(text, stream=True, parse_special=parse_special, **self.sampling)
            self.show(Text(delta) for delta in deltas)
        except (ChatGLMError, ValueError) as e:
            return self._error(e)
        return True

    def _error(self, e: Exception) -> bool:
        self._end_line()
        print(f"error: {e}", file=self.err, flush=True)
        return False

    def show(self, events: Iterator[Event]) -> None:
        """Print events as they come; Ctrl-C closes the generator, so generation stops at once."""
        try:
            for event in events:
                self._show(event)
        except KeyboardInterrupt:
            events.close()
            self._write(" [stopped]")
        finally:
            if self._thinking:
                self._shade(False)
            self._end_line()

    def _show(self, event: Event) -> None:
        thinking = isinstance(event, Text) and isinstance(event.text, Reasoning)
        if thinking != self._thinking:
            self._shade(thinking)
        if isinstance(event, Text):
            self._write(event.text)
        elif isinstance(event, Call):
            self._end_line()
            self._write(f"[{event}]\n")
        elif isinstance(event, Observation):
            self._write(f"[{event.name} returned]\n{event.content}\n")
        elif isinstance(event, Notice):
            self._end_line()
            self._write(f"[{event.text}]\n")

    def _shade(self, thinking: bool) -> None:
        """Reasoning starts (dim, on a terminal) or ends (normal again; what follows starts a line)."""
        self._thinking = thinking
        if self.out.isatty():
            self.out.write(DIM if thinking else UNDIM)
        if not thinking:
            self._end_line()

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._line_start = text.endswith("\n")

    def _end_line(self) -> None:
        if not self._line_start:
            self._write("\n")


def run_chat(args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    """`chatglm chat`: tools and sandbox set up first (cheap checks before the model loads), then the chat."""
    from .kv_cache import KV_TYPES
    from .pipeline import Pipeline

    if args.tool_module and not args.tools:
        raise ChatGLMError("--tool-module needs --tools FILE: the JSON list of the functions the model may call")
    if args.mode == "generate" and (args.tools or args.code_interpreter):
        raise ChatGLMError("tools and the code interpreter need --mode chat")
    if (args.code_workdir or args.unsafe_code_interpreter) and not args.code_interpreter:
        raise ChatGLMError("--code-workdir and --unsafe-code-interpreter need --code-interpreter")
    tools = load_tool_specs(args.tools) if args.tools else []
    functions = load_tool_module(args.tool_module) if args.tool_module else None
    if tools and functions is None:
        raise ChatGLMError("--tools needs --tool-module: the module (dotted name or .py file) whose functions "
                           "run the calls")
    with ExitStack() as stack:
        box = stack.enter_context(open_sandbox(args)) if args.code_interpreter else None
        if box is not None and args.prompt is not None:
            print(f"[code interpreter: {box.description}]", file=sys.stderr, flush=True)
        pipe = Pipeline(args.model, dtype=args.dtype, device=args.device, threads=args.threads, draft=args.draft,
                        lookup=args.lookup, use_mmap=args.use_mmap)
        if args.kv_type != "auto":  # the cache every turn takes
            pipe.model.kv_dtype = KV_TYPES[args.kv_type]
        term = Terminal(Agent(pipe, tools, functions, box), system=args.system, sampling=sampling)
        act = partial(term.complete, parse_special=args.parse_special or None) if args.mode == "generate" else term.turn
        if args.prompt is not None:
            return 0 if act(args.prompt) else 1
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        print(term.banner(interactive), flush=True)
        inputs = read_messages(prompt_session(prompt_history()) if interactive else None)
        if args.mode == "generate":
            for text in inputs:
                act(text)
        else:
            term.run(inputs)
    return 0


def open_sandbox(args: argparse.Namespace) -> Sandbox:
    """The code interpreter's sandbox for --code-interpreter; refuses an unsafe one unless the user said so."""
    try:
        from .sandbox import Sandbox
    except ImportError as e:
        raise ChatGLMError(f"the code interpreter is unavailable: {e}") from None
    workdir = Path(args.code_workdir) if args.code_workdir else None
    return Sandbox(timeout=30.0, memory_mb=1024, workdir=workdir, unsafe=args.unsafe_code_interpreter)
