"""The code interpreter's sandbox: notebook behaviour, limits, isolation, and cleanup."""
from __future__ import annotations

import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatglm import sandbox as sandbox_module
from chatglm.errors import ChatGLMError
from chatglm.sandbox import Sandbox


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox(timeout=10) as sandbox:
        yield sandbox


@pytest.fixture(params=["namespace", "audit-hook"])
def isolated_box(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """A sandbox in each network isolation mode this machine offers."""
    if request.param == "namespace" and not sandbox_module.namespace_command():
        pytest.skip("this system does not allow unprivileged user and network namespaces (unshare -rn)")
    if request.param == "audit-hook":
        monkeypatch.setattr(sandbox_module, "namespace_command", lambda: ())
    with Sandbox(timeout=10) as sandbox:
        assert sandbox.network_isolation == request.param
        yield sandbox


def python_error_line(code: str) -> str:
    """The last line Python itself prints for the exception `code` raises."""
    try:
        exec(code, {})
    except Exception as exc:
        return traceback.format_exception_only(type(exc), exc)[-1]
    raise AssertionError(f"{code!r} raised nothing")


def test_state_persists_and_the_final_value_shows(box: Sandbox) -> None:
    assert box.run("import math\nx = 20") == sandbox_module.CellResult("", ok=True)
    assert box.run("x + 1").output == repr(21)
    shown = box.run("print('root of', x * 5)\nmath.sqrt(x * 5)")
    assert shown.ok and shown.output == f"root of 100\n{math.sqrt(100)!r}"
    assert box.run("print('no value'); None").output == "no value\n"


def test_stdout_and_stderr_interleave_as_printed(box: Sandbox) -> None:
    result = box.run("import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')")
    assert result.output == "one\ntwo\nthree\n"


def test_an_exception_fails_the_cell_with_its_error_line_and_keeps_state(box: Sandbox) -> None:
    box.run("kept = 5")
    code = "def f():\n    return 1 / 0\nf()"
    result = box.run(code)
    assert not result.ok and not result.timed_out
    assert result.output.endswith(python_error_line(code))
    assert "return 1 / 0" in result.output  # the cell's source shows in the traceback
    assert sandbox_module.KERNEL.name not in result.output
    syntax = box.run("def broken(:")
    assert not syntax.ok and "SyntaxError" in syntax.output
    assert box.run("kept").output == "5"


def test_an_endless_cell_times_out_and_the_next_runs_in_a_fresh_child() -> None:
    with Sandbox(timeout=1) as box:
        box.run("before = 1")
        stuck = box.run("while True:\n    pass")
        assert stuck.timed_out and not stuck.ok
        assert "timed out after 1 s" in stuck.output and "fresh Python" in stuck.output
        lost = box.run("before")
        assert not lost.ok and lost.output.endswith(python_error_line("before"))
        assert box.run("1 + 1") == sandbox_module.CellResult("2", ok=True)


def test_a_memory_bomb_fails_cleanly() -> None:
    with Sandbox(timeout=10, memory_mb=256) as box:
        box.run("kept = 'still here'")
        bomb = box.run("hog = [bytes(1 << 20) for _ in range(4096)]")
        assert not bomb.ok and not bomb.timed_out
        assert bomb.output.rstrip().endswith("MemoryError")
        assert box.run("kept").output == repr("still here")


def test_files_land_in_the_temporary_folder_which_close_removes() -> None:
    box = Sandbox(timeout=10)
    try:
        assert box.run("open('note.txt', 'w').write('hi')").ok
        assert (box.workdir / "note.txt").read_text() == "hi"
        where = box.run("import os, tempfile\nos.getcwd(), os.environ['HOME'], tempfile.gettempdir()")
        assert where.output == repr((str(box.workdir),) * 3)
    finally:
        box.close()
    assert not box.workdir.exists()
    with pytest.raises(ChatGLMError, match="closed"):
        box.run("1")


def test_close_kills_the_processes_the_cells_started() -> None:
    box = Sandbox(timeout=10)
    if box.network_isolation != "namespace":
        box.close()
        pytest.skip("without a network namespace the sandbox refuses to start processes at all")
    try:
        pid = int(box.run("import subprocess\nsubprocess.Popen(['sleep', '600']).pid").output)
    finally:
        box.close()
    for _ in range(100):  # SIGKILL is sent; the kernel takes a moment to finish the process
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in "ZX":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} started in the sandbox outlived close() (state {state})")


def test_a_given_workdir_is_used_and_kept(tmp_path) -> None:
    with Sandbox(timeout=10, workdir=tmp_path) as box:
        box.run("open('kept.txt', 'w').write('yes')")
    assert (tmp_path / "kept.txt").read_text() == "yes"


def test_connecting_to_a_local_listener_fails(isolated_box: Sandbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = isolated_box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not result.ok and "Error" in result.output.splitlines()[-1]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_the_namespace_cuts_off_processes_the_cells_start(isolated_box: Sandbox) -> None:
    if isolated_box.network_isolation != "namespace":
        result = isolated_box.run("import subprocess\nsubprocess.run(['true'])")
        assert not result.ok and "PermissionError" in result.output
        return
    assert isolated_box.run("import os\nos.readlink('/proc/self/ns/net')").output != repr(
        os.readlink("/proc/self/ns/net"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # a child process has no audit hook: only the network namespace stands in its way
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = isolated_box.run(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {probe!r}]).returncode")
        assert result.ok and result.output.endswith("1") and "OSError" in result.output
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_huge_output_and_values_are_cut_with_a_marker(box: Sandbox) -> None:
    printed = box.run("for i in range(50000):\n    print(i)")
    assert printed.ok and len(printed.output) < 5000
    assert printed.output.startswith("0\n1\n2\n") and printed.output.endswith("\n49999\n")
    assert "of output cut" in printed.output
    value = box.run("'y' * 10**6")
    assert value.ok and len(value.output) < 3000 and "of output cut" in value.output


def test_the_child_environment_lacks_our_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGLM_TEST_SECRET", "hunter2")
    with Sandbox(timeout=10) as box:
        assert box.run("import os\n'CHATGLM_TEST_SECRET' in os.environ").output == "False"
        assert "hunter2" not in box.run("dict(os.environ)").output
        assert box.run("os.environ['PATH']").output == repr(os.environ["PATH"])


@pytest.mark.parametrize("options", [{"timeout": 0}, {"memory_mb": -1}, {"workdir": sys.executable}])
def test_bad_options_are_one_clear_error(options: dict) -> None:
    with pytest.raises(ChatGLMError):
        Sandbox(**options)
