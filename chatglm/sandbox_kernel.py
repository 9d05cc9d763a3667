"""The child side of chatglm.sandbox: a tiny notebook kernel that runs the cells it is sent.

The parent starts this file by path (``python -I -u sandbox_kernel.py CONFIG``), so it imports only the standard
library and never the package (sandbox_jail.py beside it is loaded by path). Before it says it is ready it puts
up the protection the parent chose (sandbox_jail.py), its resource limits and an audit hook that refuses network
access, so no cell runs without them. Then it reads ``{"code": ...}`` lines from the command fd and
answers each with ``{"ok", "value", "error"}`` on the reply fd. What a cell prints goes straight to fds 1 and 2,
which the parent reads as one stream; the value of a final expression and an error's traceback come in the reply.
"""
from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import linecache
import math
import os
import resource
import signal
import sys
import traceback
import types
from typing import Any, BinaryIO

JAIL = os.path.join(os.path.dirname(__file__), "sandbox_jail.py")
REPLY_LIMIT = 1 << 20  # characters of a value or a traceback sent back; the parent shows far fewer

# Socket calls that reach another endpoint. Creating sockets stays allowed: asyncio's self-pipe is a socketpair.
NETWORK_EVENTS = frozenset({
    "socket.bind", "socket.connect", "socket.sendmsg", "socket.sendto", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
})
# New processes would not carry the audit hook, so outside a PID namespace they are refused too.
PROCESS_EVENTS = frozenset({
    "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
})


def set_limit(which: int, value: int) -> None:
    """Lower soft and hard limit together, so the cells cannot raise them again."""
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def limit_cpu(seconds: int) -> None:
    """Let the next cell use `seconds` more CPU time: a backstop should the parent die mid-cell.

    Only the soft limit moves, since CPU time adds up over the whole conversation; the parent's wall-clock
    limit is what normally stops a cell."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def refuse(events: frozenset[str]) -> None:
    """Install an audit hook that turns the given events into PermissionError (best effort: ctypes gets past it)."""
    def hook(event: str, _args: tuple[Any, ...]) -> None:
        if event in events:
            what = "network access" if event in NETWORK_EVENTS else "starting processes"
            raise PermissionError(f"{what} is not allowed in this sandbox ({event})")

    sys.addaudithook(hook)


def load_jail() -> types.ModuleType:
    """sandbox_jail.py, imported by path: the package itself is never imported here."""
    spec = importlib.util.spec_from_file_location("sandbox_jail", JAIL)
    jail = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jail)
    return jail


def user_traceback(exc: BaseException) -> str:
    """The traceback without our frames (the cell runner, the audit hooks), which say nothing of the cell."""
    shown = traceback.TracebackException.from_exception(exc)
    pending = [shown]
    while pending:
        part = pending.pop()
        part.stack = traceback.StackSummary.from_list([f for f in part.stack if f.filename not in (__file__, JAIL)])
        pending += [chained for chained in (part.__cause__, part.__context__) if chained is not None]
    return "".join(shown.format())


def run_cell(code: str, filename: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run one cell like a notebook: statements, then the value of a final expression, if any, as its repr."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source lines in tracebacks
    try:
        tree = ast.parse(code, filename)
    except (SyntaxError, ValueError) as exc:  # ValueError: the code holds a NUL byte
        return {"ok": False, "value": None, "error": "".join(traceback.format_exception_only(type(exc), exc))}
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    try:
        exec(compile(tree, filename, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace) if last else None
        shown = None if value is None else repr(value)[:REPLY_LIMIT]
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: a cell never ends the kernel
        return {"ok": False, "value": None, "error": user_traceback(exc)[-REPLY_LIMIT:]}
    return {"ok": True, "value": shown, "error": None}


def send(replies: BinaryIO, message: dict[str, Any]) -> None:
    replies.write(json.dumps(message).encode("ascii") + b"\n")  # ASCII: lone surrogates cannot break it
    replies.flush()


def main() -> None:
    config = json.loads(sys.argv[1])
    for fd in (config["command_fd"], config["reply_fd"]):
        os.set_inheritable(fd, False)  # processes the cells start must not see the protocol
    jail = load_jail()
    namespaced = config["protection"] == "namespace"
    if namespaced:
        jail.enter_namespaces(config["workdir"])  # returns in the jailed grandchild; the others wait
    elif config["protection"] == "landlock":
        jail.restrict_landlock(config["workdir"])
    commands = os.fdopen(config["command_fd"], "rb")
    replies = os.fdopen(config["reply_fd"], "wb")

    set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    set_limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    set_limit(resource.RLIMIT_NOFILE, config["open_files"])
    set_limit(resource.RLIMIT_CORE, 0)
    if namespaced:  # counted per namespace; root is exempt, which the namespace's pid_max covers
        set_limit(resource.RLIMIT_NPROC, config["processes"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead of killing us
    if config["protection"] == "audit-hook":
        jail.guard_files(config["workdir"])
    refuse(NETWORK_EVENTS | (frozenset() if namespaced else PROCESS_EVENTS))

    sys.argv = [""]
    sys.path.insert(0, "")  # like a notebook: modules the cells write to the working folder import
    cell_module = types.ModuleType("__main__")  # a clean __main__, so pickling what the cells define works
    cell_module.__builtins__ = builtins
    sys.modules["__main__"] = cell_module

    send(replies, {"ready": True})
    for number, line in enumerate(commands, 1):
        limit_cpu(config["cpu_seconds"])
        reply = run_cell(json.loads(line)["code"], f"<cell {number}>", cell_module.__dict__)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):  # a cell may have replaced or closed it
                pass
        send(replies, reply)


if __name__ == "__main__":
    main()
