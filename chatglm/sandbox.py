"""The sandbox that runs the Python ChatGLM3's code interpreter writes (``--code-interpreter``).

ChatGLM3's demo runs the model's code in a Jupyter kernel, so variables and imports persist between cells and a
final expression's value shows. Here a long-lived child ``python -I`` running ``sandbox_kernel.py`` plays that
kernel; the parent sends it cells and gets replies as JSON lines on two pipes, and reads what the cell prints from
the child's stdout and stderr, which share a third pipe so that they interleave as printed.

Set up before any cell runs:

- a working folder (also HOME and TMPDIR): a fresh temporary one, removed on close, or one the user shares;
- a filesystem view (sandbox_jail.py): this Python (interpreter, standard library, installed packages) and the
  system files it needs are read-only, the working folder is the only place it can write, and nothing else of
  the user's (home folder, the project, other users' files) can be read. ``Sandbox.protection`` says how:
  ``"namespace"`` (user, mount, PID and network namespaces: a read-only root of its own; processes are counted
  and die with the sandbox), ``"landlock"`` (Landlock rules; TCP closed), or ``"audit-hook"`` (an audit hook:
  best effort, ctypes gets past it, so only with ``unsafe=True`` or when asked for by name);
- an environment with nothing of ours but PATH and LANG, so no secrets leak;
- resource limits: address space (``memory_mb``), CPU time, file size, open files, no core files, and in a
  namespace at most PROCESSES processes (RLIMIT_NPROC; the namespace's pid_max stops root too);
- a wall-clock limit per cell: on expiry the child's whole process group is killed and the next cell starts a
  fresh Python (its state is lost, and the output says so);
- no network: the namespace has no interfaces and, with a root of its own, none of the host's Unix sockets;
  Landlock closes TCP; an audit hook refuses connects and name lookups in every mode (outside a namespace it
  refuses starting processes too, since they would not carry the hook).
"""
from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChatGLMError
from . import sandbox_jail
from .sandbox_jail import PID_MAX, PROTECTIONS, pid_max_per_namespace, readable_paths

KERNEL = Path(__file__).with_name("sandbox_kernel.py")
OUTPUT_HEAD = OUTPUT_TAIL = 2048  # bytes kept from each end of what a cell prints
VALUE_LIMIT = ERROR_LIMIT = 2048  # characters shown of a final value (its start) and of a traceback (its end)
FILE_LIMIT_MB = 64
OPEN_FILES = 256
PROCESSES = 64  # processes and threads, set only in a namespace, where the kernel counts them per sandbox
START_TIMEOUT = 15.0  # seconds for a fresh child to say it is ready
REPLY_LIMIT = 4 << 20  # bytes of one reply before the child counts as broken
DRAIN_LIMIT = 1 << 20  # bytes read after a reply, so a printing grandchild cannot keep us draining forever
# RLIMIT_AS counts the address space every thread reserves (malloc arenas, BLAS buffers): keep threads few.
CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
JAIL = Path(sandbox_jail.__file__)
SAFE = PROTECTIONS[:2]  # those that hold against any code, ctypes included
DESCRIPTIONS = {
    "namespace": "namespace sandbox (own root, read-only Python, no network, {processes})",
    "landlock": "Landlock sandbox (read-only Python, no TCP, no new processes)",
    "audit-hook": "UNSAFE audit-hook sandbox (best effort: code using ctypes can reach your files)",
}


@dataclass(frozen=True)
class CellResult:
    """What one cell showed: printed output, then the final value or the traceback's end, each cut to a few KB."""

    output: str
    ok: bool
    timed_out: bool = False


@functools.cache
def refusal(protection: str) -> str | None:
    """Why this system refuses `protection` (a probe child puts it up on itself), or None where it holds."""
    if protection not in PROTECTIONS:
        raise ChatGLMError(f"sandbox protection must be one of {', '.join(PROTECTIONS)}, got {protection!r}")
    with tempfile.TemporaryDirectory(prefix="chatglm-probe-") as folder:
        try:
            probe = subprocess.run([sys.executable, "-I", str(JAIL), protection, folder], check=False,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT,
                                   env={"PATH": os.environ.get("PATH", os.defpath)})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if probe.returncode == 0 and Path(folder, "probe").is_file():
            return None
        return probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit status {probe.returncode}"


def strongest_protection() -> str | None:
    """The strongest protection this system allows of those that hold against any code, or None."""
    return next((kind for kind in SAFE if refusal(kind) is None), None)


def choose_protection(protection: str | None, unsafe: bool) -> str:
    """`protection` if this system allows it, else the strongest safe one; the audit hook only if `unsafe`."""
    if protection is not None:
        if (why := refusal(protection)) is not None:
            raise ChatGLMError(f"this system refuses the {protection} sandbox: {why}")
        return protection
    chosen = strongest_protection()
    if chosen is None and not unsafe:
        reasons = "; ".join(f"{kind}: {refusal(kind)}" for kind in SAFE)
        raise ChatGLMError(f"this system allows no safe sandbox for model-written code ({reasons}); pass "
                           "--unsafe-code-interpreter (Sandbox(unsafe=True)) to run it under a best-effort audit "
                           "hook that code using ctypes can get past")
    return chosen or "audit-hook"


def process_bound() -> str:
    """How many processes a namespace sandbox may hold: RLIMIT_NPROC does not bind root, the pid_max may."""
    if os.geteuid() != 0:
        return f"at most {PROCESSES} processes"
    return f"at most {PID_MAX - 1} processes" if pid_max_per_namespace() else "processes unbounded (root, Linux < 6.14)"


def _check_shared(folder: Path) -> None:
    """A shared working folder may neither hold nor lie in what the sandbox keeps read-only."""
    for path in readable_paths():
        real = Path(path).resolve()
        where = "holds" if real.is_relative_to(folder) else "lies in" if folder.is_relative_to(real) else None
        if where:
            raise ChatGLMError(f"{folder}: {where} {path}, which the sandbox keeps read-only; share a folder "
                               "apart from Python's and the system's files")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Lost(Exception):
    """The child gave no usable reply; the message says how it ended, to follow 'the sandbox's Python'."""

    def __init__(self, how: str, *, timed_out: bool = False) -> None:
        super().__init__(how)
        self.timed_out = timed_out


class _Clipped:
    """The start and end of a byte stream of any length, counting what was dropped between them."""

    def __init__(self, head: int, tail: int) -> None:
        self._head, self._tail = bytearray(), bytearray()
        self._head_size, self._tail_size = head, tail
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self._head_size - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        self._tail += data
        excess = len(self._tail) - self._tail_size
        if excess > 0:
            del self._tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        head, tail = self._head.decode("utf-8", "replace"), self._tail.decode("utf-8", "replace")
        return f"{head}{_cut_marker(self.dropped, 'bytes')}{tail}" if self.dropped else head + tail


def _cut_marker(count: int, unit: str) -> str:
    return f"\n... [{count} {unit} of output cut] ...\n"


def _clip(text: str, head: int, tail: int) -> str:
    """`text` cut to its first `head` and last `tail` characters, with a marker where it was cut."""
    cut = len(text) - head - tail
    return text if cut <= 0 else text[:head] + _cut_marker(cut, "characters") + text[len(text) - tail:]


def _join(parts: list[str]) -> str:
    """Parts one after another, each starting on a line of its own."""
    out = ""
    for part in filter(None, parts):
        out += part if not out or out.endswith("\n") else "\n" + part
    return out


class _Kernel:
    """One child Python and its three pipes: cells in, replies out, and its stdout and stderr as one stream."""

    def __init__(self, argv: list[str], config: dict[str, Any], cwd: Path, env: dict[str, str]) -> None:
        command_r, command_w = os.pipe()
        reply_r, reply_w = os.pipe()
        output_r, output_w = os.pipe()
        config = {**config, "command_fd": command_r, "reply_fd": reply_w}
        try:
            self.process = subprocess.Popen(
                [*argv, json.dumps(config)], stdin=subprocess.DEVNULL, stdout=output_w, stderr=output_w,
                pass_fds=(command_r, reply_w), cwd=cwd, env=env, start_new_session=True)
        except BaseException:
            for fd in (command_w, reply_r, output_r):
                os.close(fd)
            raise
        finally:
            for fd in (command_r, reply_w, output_w):
                os.close(fd)
        self._kill_group = weakref.finalize(self, _kill_group, self.process.pid)  # also when never closed
        self._commands = open(command_w, "wb")
        self._replies, self._output = reply_r, output_r
        os.set_blocking(reply_r, False)
        os.set_blocking(output_r, False)
        self._output_open = True
        self._pending = bytearray()

    def send(self, code: str) -> None:
        try:
            self._commands.write(json.dumps({"code": code}).encode("ascii") + b"\n")
            self._commands.flush()
        except OSError:
            raise _Lost(self._exit_reason()) from None

    def receive(self, stream: _Clipped, deadline: float) -> dict[str, Any]:
        """The child's next reply, copying what it prints into `stream` meanwhile."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._replies, selectors.EVENT_READ)
                if self._output_open:
                    selector.register(self._output, selectors.EVENT_READ)
                while b"\n" not in self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _Lost("timed out", timed_out=True)
                    for key, _ in selector.select(remaining):
                        chunk = self._read(key.fd)
                        if chunk is None:
                            continue
                        if key.fd == self._output:
                            stream.add(chunk)
                            if not chunk:
                                selector.unregister(self._output)
                                self._output_open = False
                        elif not chunk:
                            raise _Lost(self._exit_reason())
                        else:
                            self._pending += chunk
                            if len(self._pending) > REPLY_LIMIT:
                                raise _Lost("sent a reply too long to read")
        finally:
            self._drain(stream)
        line, _, rest = self._pending.partition(b"\n")
        self._pending = bytearray(rest)
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise _Lost("sent a reply that is not the sandbox's JSON")
        return reply

    @staticmethod
    def _read(fd: int) -> bytes | None:
        try:
            return os.read(fd, 1 << 16)
        except BlockingIOError:
            return None

    def _drain(self, stream: _Clipped) -> None:
        """Take what the child printed up to now: all of it was written before the reply or the exit."""
        taken = 0
        while self._output_open and taken < DRAIN_LIMIT:
            chunk = self._read(self._output)
            if chunk is None:
                return
            stream.add(chunk)
            taken += len(chunk)
            self._output_open = bool(chunk)

    def _exit_reason(self) -> str:
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "closed its reply pipe"
        if code >= 0:
            return f"exited with status {code}"
        if -code == signal.SIGXCPU:
            return "ran out of CPU time"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (often: out of memory)" if -code == signal.SIGKILL else "")

    def kill(self) -> None:
        """Kill the child's process group, so what its cells started goes too, and close the pipes."""
        self._kill_group()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            self._commands.close()
        except OSError:
            pass
        os.close(self._replies)
        os.close(self._output)


class Sandbox:
    """One conversation's Python: cells share state until a cell fails hard; see the module docstring."""

    def __init__(self, *, timeout: float = 30.0, memory_mb: int = 1024, workdir: Path | None = None,
                 protection: str | None = None, unsafe: bool = False) -> None:
        """`workdir`: the folder the code runs in (and the only one it may write), kept on close; by default a
        fresh temporary one, removed. `protection`: one of PROTECTIONS, by default the strongest this system
        allows; where neither a namespace nor Landlock is allowed, only `unsafe` accepts the audit hook."""
        if not timeout > 0:
            raise ChatGLMError(f"sandbox timeout must be a positive number of seconds, got {timeout!r}")
        if not memory_mb > 0:
            raise ChatGLMError(f"sandbox memory limit must be a positive number of MB, got {memory_mb!r}")
        if workdir is not None and not Path(workdir).is_dir():
            raise ChatGLMError(f"{workdir}: not a folder; the sandbox runs code in an existing folder")
        if workdir is not None:
            _check_shared(Path(workdir).resolve())
        self.protection = choose_protection(protection, unsafe)
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.workdir = Path(tempfile.mkdtemp(prefix="chatglm-sandbox-") if workdir is None else workdir).resolve()
        # removes the folder when the sandbox is dropped or the interpreter exits without close()
        self._remove_workdir = weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        if workdir is not None:
            self._remove_workdir.detach()
        self._kernel: _Kernel | None = None
        self._closed = False
        try:
            self._kernel = self._start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def description(self) -> str:
        """One line for the chat's banner: which protection holds and where the code may write."""
        return f"{DESCRIPTIONS[self.protection].format(processes=process_bound())}, writing only in {self.workdir}"

    def run(self, code: str) -> CellResult:
        """Run one cell; a timeout or a crash of the child is reported in the result, never raised."""
        if self._closed:
            raise ChatGLMError("this sandbox is closed; start a new one to run code")
        if self._kernel is None:
            self._kernel = self._start()
        stream = _Clipped(OUTPUT_HEAD, OUTPUT_TAIL)
        try:
            self._kernel.send(code)
            reply = self._kernel.receive(stream, time.monotonic() + self.timeout)
        except _Lost as lost:
            self._kernel.kill()
            self._kernel = None
            how = f"timed out after {self.timeout:g} s" if lost.timed_out else str(lost)
            note = (f"[The sandbox's Python {how} and was stopped; the next cell runs in a fresh Python, "
                    "without the variables and imports of earlier cells.]")
            return CellResult(_join([stream.text(), note]), ok=False, timed_out=lost.timed_out)
        except BaseException:  # e.g. Ctrl-C: the cell may still run, and its reply would answer the next one
            self._kernel.kill()
            self._kernel = None
            raise
        value, error = reply.get("value"), reply.get("error")
        parts = [stream.text(), _clip(str(value), VALUE_LIMIT, 0) if value is not None else "",
                 _clip(str(error), 0, ERROR_LIMIT) if error else ""]
        return CellResult(_join(parts), ok=reply.get("ok") is True)

    def close(self) -> None:
        """Kill the child and everything it started, and remove the temporary folder; safe to call twice."""
        self._closed = True
        if self._kernel is not None:
            self._kernel.kill()
            self._kernel = None
        self._remove_workdir()

    def _start(self) -> _Kernel:
        config = {
            "memory_bytes": int(self.memory_mb * (1 << 20)), "cpu_seconds": math.ceil(self.timeout) + 1,
            "file_bytes": FILE_LIMIT_MB << 20, "open_files": OPEN_FILES, "processes": PROCESSES,
            "protection": self.protection, "workdir": str(self.workdir),
        }
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(self.workdir), "TMPDIR": str(self.workdir),
               **CHILD_ENV}
        if "LANG" in os.environ:
            env["LANG"] = os.environ["LANG"]
        argv = [sys.executable, "-I", "-u", "-X", "utf8", str(KERNEL)]
        kernel = _Kernel(argv, config, self.workdir, env)
        stream = _Clipped(OUTPUT_HEAD, OUTPUT_TAIL)
        try:
            reply = kernel.receive(stream, time.monotonic() + START_TIMEOUT)
            if reply != {"ready": True}:
                raise _Lost("answered something other than 'ready'")
        except _Lost as lost:
            kernel.kill()
            printed = stream.text().strip().replace("\n", " | ")[-500:] or "nothing"
            raise ChatGLMError(f"the Python sandbox did not start: it {lost} and printed {printed}") from None
        except BaseException:
            kernel.kill()
            raise
        return kernel
