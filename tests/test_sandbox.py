"""The code interpreter's sandbox: notebook behaviour, limits, the filesystem view, isolation, and cleanup.

Each protection (sandbox_jail.PROTECTIONS) is tested where this kernel allows it and skipped, with the kernel's
own refusal as the reason, where it does not. Tests run as root in CI: the view must hide what root can read.
"""
from __future__ import annotations

import ctypes
import math
import os
import socket
import sys
import sysconfig
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import chatglm
from chatglm import sandbox as sandbox_module
from chatglm.errors import ChatGLMError
from chatglm.sandbox import Sandbox
from chatglm.sandbox_jail import PID_MAX, PROTECTIONS, pid_max_per_namespace
from chatglm.terminal import open_sandbox

from patience import PATIENCE

PROJECT = Path(chatglm.__file__).resolve().parents[1]


@pytest.fixture
def box() -> Iterator[Sandbox]:
    """The strongest sandbox this machine allows (the audit hook only where it allows no other)."""
    with Sandbox(timeout=10, unsafe=True) as sandbox:
        yield sandbox


@pytest.fixture(params=PROTECTIONS)
def protected_box(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox under each protection this machine allows."""
    needs(request.param)
    with Sandbox(timeout=30, protection=request.param) as sandbox:
        assert sandbox.protection == request.param
        yield sandbox


def needs(protection: str) -> None:
    """Skip, with the kernel's own reason, where this machine refuses `protection`."""
    why = sandbox_module.refusal(protection)
    if why is not None:
        pytest.skip(f"this kernel refuses the {protection} sandbox: {why}")


@pytest.fixture
def home_secret() -> Iterator[tuple[Path, str]]:
    """A token in a file of the user's home folder, readable only by its owner, as ~/.ssh keys are."""
    token = uuid.uuid4().hex
    path = Path.home() / f".chatglm-sandbox-test-{token[:8]}"
    path.write_text(token)
    path.chmod(0o600)
    try:
        yield path, token
    finally:
        path.unlink()


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
    with Sandbox(timeout=1, unsafe=True) as box:
        box.run("before = 1")
        stuck = box.run("while True:\n    pass")
        assert stuck.timed_out and not stuck.ok
        assert "timed out after 1 s" in stuck.output and "fresh Python" in stuck.output
        lost = box.run("before")
        assert not lost.ok and lost.output.endswith(python_error_line("before"))
        assert box.run("1 + 1") == sandbox_module.CellResult("2", ok=True)


def test_a_memory_bomb_fails_cleanly() -> None:
    with Sandbox(timeout=10, memory_mb=256, unsafe=True) as box:
        box.run("kept = 'still here'")
        bomb = box.run("hog = [bytes(1 << 20) for _ in range(4096)]")
        assert not bomb.ok and not bomb.timed_out
        assert bomb.output.rstrip().endswith("MemoryError")
        assert box.run("kept").output == repr("still here")


def test_files_land_in_the_temporary_folder_which_close_removes() -> None:
    box = Sandbox(timeout=10, unsafe=True)
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


def host_processes_with(marker: str) -> list[int]:
    """Host pids of the live processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in "ZX":
            found.append(int(entry.name))
    return found


def test_close_kills_the_processes_the_cells_started_even_in_sessions_of_their_own() -> None:
    needs("namespace")
    marker = f"600.{uuid.uuid4().int % 10**15:015d}"  # a sleep length no other process has, to look for
    box = Sandbox(timeout=10, protection="namespace")
    try:
        started = box.run(f"import subprocess\nfor new_session in (False, True):\n"
                          f"    subprocess.Popen(['sleep', '{marker}'], start_new_session=new_session)")
        assert started.ok, started.output
        # exec(2) lets Popen return a moment before the new command line shows in /proc
        wait_until(lambda: len(host_processes_with(marker)) == 2, f"two 'sleep {marker}' processes")
    finally:
        box.close()
    # SIGKILL is sent; the kernel takes a moment to finish the processes
    wait_until(lambda: not host_processes_with(marker), f"'sleep {marker}' gone after close()")


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"waited {PATIENCE} s for {what}"
        time.sleep(0.05)


def test_a_given_workdir_is_used_and_kept(tmp_path) -> None:
    with Sandbox(timeout=10, workdir=tmp_path, unsafe=True) as box:
        box.run("open('kept.txt', 'w').write('yes')")
    assert (tmp_path / "kept.txt").read_text() == "yes"


def test_connecting_to_a_local_listener_fails(protected_box: Sandbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = protected_box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not result.ok and "Error" in result.output.splitlines()[-1]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_the_network_stays_closed_to_processes_and_ctypes() -> None:
    """In a namespace no audit hook guards a child process or a raw connect(2): only the namespace does."""
    needs("namespace")
    with Sandbox(timeout=30, protection="namespace") as box, socket.create_server(("127.0.0.1", 0)) as listener:
        assert box.run("import os\nos.readlink('/proc/self/ns/net')").output != repr(os.readlink("/proc/self/ns/net"))
        port = listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = box.run(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {probe!r}]).returncode")
        assert result.ok and result.output.endswith("1") and "OSError" in result.output
        raw = box.run("import ctypes, socket, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
                      f"address = struct.pack('!HH4s8x', socket.AF_INET, {port}, bytes([127, 0, 0, 1]))\n"
                      "address = struct.pack('=H', socket.AF_INET) + address[2:]\n"
                      "libc.connect(fd, address, len(address)), ctypes.get_errno() != 0")
        assert raw.ok and raw.output == "(-1, True)", raw.output
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
    with Sandbox(timeout=10, unsafe=True) as box:
        assert box.run("import os\n'CHATGLM_TEST_SECRET' in os.environ").output == "False"
        assert "hunter2" not in box.run("dict(os.environ)").output
        assert box.run("os.environ['PATH']").output == repr(os.environ["PATH"])


@pytest.mark.parametrize("options", [{"timeout": 0}, {"memory_mb": -1}, {"workdir": sys.executable}, {"workdir": "/"},
                                     {"workdir": sys.prefix}, {"workdir": sysconfig.get_paths()["purelib"]},
                                     {"protection": "chroot"}])
def test_bad_options_are_one_clear_error(options: dict) -> None:
    with pytest.raises(ChatGLMError):
        Sandbox(**options)


def refused(result: sandbox_module.CellResult) -> bool:
    """The cell failed on an OSError: no such file in the view, read-only, or denied (EACCES or the hook)."""
    last = result.output.rstrip().splitlines()[-1]
    return not result.ok and last.startswith(("FileNotFoundError:", "OSError: [Errno 30]", "PermissionError:"))


def test_a_secret_in_the_home_folder_cannot_be_read(protected_box: Sandbox, home_secret: tuple[Path, str]) -> None:
    path, token = home_secret
    read = protected_box.run(f"open({str(path)!r}).read()")
    assert refused(read) and token not in read.output
    listed = protected_box.run(f"import os\n{path.name!r} in os.listdir({str(path.parent)!r})")
    assert listed.output == "False" or not listed.ok
    project = protected_box.run(f"open({str(PROJECT / 'pyproject.toml')!r}).read()")
    assert not project.ok and "[project]" not in project.output
    if protected_box.protection == "audit-hook":
        return  # best effort: a raw open(2) does not pass through the hook, hence --unsafe-code-interpreter
    raw = protected_box.run(f"import ctypes\nctypes.CDLL(None).open({str(path).encode()!r}, 0)")
    assert raw.output == "-1"
    if protected_box.protection == "namespace":  # processes run, but in the same view
        cat = protected_box.run(f"import subprocess\nsubprocess.run(['cat', {str(path)!r}], capture_output=True)")
        assert cat.ok and token not in cat.output and "returncode=1" in cat.output


def test_writes_outside_the_working_folder_leave_nothing_behind(protected_box: Sandbox, tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    places = [Path.home(), PROJECT, Path(tempfile.gettempdir()), tmp_path, Path(sysconfig.get_paths()["purelib"]),
              Path(os.__file__).parent]
    targets = [place / f"chatglm-escape-{token}" for place in places]
    for target in targets:
        for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.mkdir({str(target)!r})"):
            assert refused(protected_box.run(code))
        if protected_box.protection != "audit-hook":  # a raw open(2) does not pass through an audit hook
            raw = protected_box.run(f"import ctypes, os\n"
                                    f"ctypes.CDLL(None).open({str(target).encode()!r}, os.O_CREAT | os.O_WRONLY, 0o644)")
            assert raw.output == "-1"
        if protected_box.protection == "namespace":
            touch = protected_box.run(f"import subprocess\nsubprocess.run(['touch', {str(target)!r}]).returncode")
            assert touch.output.endswith("1"), touch.output
    assert [target for target in targets if os.path.lexists(target)] == []


FORK_LOOP = """import os, time
started = 0
try:
    while started < 5000:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        started += 1
except OSError as exc:
    print(type(exc).__name__)
started"""


def test_a_fork_loop_is_stopped_in_a_namespace() -> None:
    """RLIMIT_NPROC does not bind root; the namespace's pid_max does. close() ends the sleeping children."""
    needs("namespace")
    if os.geteuid() == 0 and not pid_max_per_namespace():
        pytest.skip(f"Linux {os.uname().release} keeps pid_max host-wide, and root ignores RLIMIT_NPROC")
    with Sandbox(timeout=120, protection="namespace") as box:
        result = box.run(FORK_LOOP)
        assert result.ok and result.output.startswith("BlockingIOError\n"), result.output
        bound = PID_MAX if os.geteuid() == 0 else sandbox_module.PROCESSES
        assert int(result.output.split()[-1]) < bound
        assert box.run("1 + 1").output == "2"


@pytest.mark.parametrize("protection", ["landlock", "audit-hook"])
def test_outside_a_namespace_new_processes_are_refused(protection: str) -> None:
    needs(protection)
    with Sandbox(timeout=10, protection=protection) as box:
        for code in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])"):
            result = box.run(code)
            assert not result.ok and "PermissionError: starting processes is not allowed" in result.output


def test_numpy_files_and_state_work_in_the_working_folder(protected_box: Sandbox) -> None:
    numpy = pytest.importorskip("numpy")
    matrix = [[2.0, 1.0], [1.0, 3.0]]
    det = protected_box.run(f"import numpy as np\nm = np.array({matrix})\nfloat(np.linalg.det(m))")
    assert det.output == repr(float(numpy.linalg.det(numpy.array(matrix))))
    assert protected_box.run("np.save('m.npy', m)\nfloat(np.load('m.npy').sum())").output == repr(7.0)
    assert numpy.load(protected_box.workdir / "m.npy").tolist() == matrix
    assert protected_box.run("import os\nos.makedirs('out/deep')\nopen('out/deep/t.txt', 'w').write('ok')").ok
    assert protected_box.run("open('out/deep/t.txt').read()").output == repr("ok")


def test_pandas_reads_what_a_cell_wrote(protected_box: Sandbox) -> None:
    pandas = pytest.importorskip("pandas")
    assert protected_box.run("open('data.csv', 'w').write('a,b\\n1,2\\n3,4\\n')").ok
    result = protected_box.run("import pandas as pd\nint(pd.read_csv('data.csv')['b'].sum())")
    assert result.output == repr(int(pandas.read_csv(protected_box.workdir / "data.csv")["b"].sum()))


def test_matplotlib_saves_a_png_in_the_working_folder(protected_box: Sandbox) -> None:
    pytest.importorskip("matplotlib")
    code = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3], [1, 4, 9])\nplt.savefig('plot.png')")
    result = protected_box.run(code)
    assert result.ok, result.output
    assert (protected_box.workdir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_safe_protection_it_refuses_unless_told_unsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that allows neither namespaces nor Landlock, as the probes would report it."""
    monkeypatch.setattr(sandbox_module, "refusal", lambda kind: None if kind == "audit-hook" else "not allowed")
    with pytest.raises(ChatGLMError, match="--unsafe-code-interpreter"):
        Sandbox(timeout=10)
    with Sandbox(timeout=10, unsafe=True) as box:
        assert box.protection == "audit-hook" and box.description.startswith("UNSAFE")
        assert box.run("1 + 1").output == "2"


def test_the_chat_flags_share_a_folder_and_refuse_unsafe_by_default(tmp_path: Path, monkeypatch) -> None:
    from chatglm import cli

    if sandbox_module.strongest_protection() is None:
        pytest.skip("this kernel allows neither a namespace nor Landlock sandbox: "
                    + "; ".join(f"{kind}: {sandbox_module.refusal(kind)}" for kind in sandbox_module.SAFE))
    args = cli.build_parser().parse_args(["chat", "--code-interpreter", "--code-workdir", str(tmp_path)])
    with open_sandbox(args) as box:
        assert box.workdir == tmp_path.resolve() and str(tmp_path.resolve()) in box.description
        assert box.run("open('shared.txt', 'w').write('from the sandbox')").ok
        assert box.protection == sandbox_module.strongest_protection()
    assert (tmp_path / "shared.txt").read_text() == "from the sandbox"
    monkeypatch.setattr(sandbox_module, "refusal", lambda kind: None if kind == "audit-hook" else "not allowed")
    with pytest.raises(ChatGLMError, match="--unsafe-code-interpreter"):
        open_sandbox(cli.build_parser().parse_args(["chat", "--code-interpreter"]))
    unsafe = cli.build_parser().parse_args(["chat", "--code-interpreter", "--unsafe-code-interpreter"])
    with open_sandbox(unsafe) as box:
        assert box.protection == "audit-hook"


def test_code_flags_without_the_interpreter_are_one_line_errors(capsys) -> None:
    from chatglm import cli

    for flags in (["--code-workdir", "."], ["--unsafe-code-interpreter"]):
        assert cli.main(["chat", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "need --code-interpreter" in err and err.count("\n") == 1


def test_how_the_kernel_ended_reaches_the_parent_through_the_jail(protected_box: Sandbox) -> None:
    """In a namespace two waiting processes stand between us and the kernel: each passes its end on."""
    killed = protected_box.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not killed.ok and "was killed by SIGKILL" in killed.output
    exited = protected_box.run("import os\nos._exit(3)")
    assert not exited.ok and "exited with status 3" in exited.output
    assert protected_box.run("1 + 1").output == "2"


KEY_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl
KEYCTL_READ, KEYCTL_UNLINK, SESSION_KEYRING = 11, 9, -3


@pytest.mark.parametrize("protection", ["namespace", "landlock"])
def test_a_key_in_our_session_keyring_cannot_be_read(protection: str) -> None:
    """The kernel's keyrings are outside any filesystem: the sandbox joins a session keyring of its own."""
    needs(protection)
    if os.uname().machine not in KEY_SYSCALLS:
        pytest.skip(f"no add_key/keyctl numbers here for {os.uname().machine}")
    add_key, keyctl = KEY_SYSCALLS[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    token = uuid.uuid4().hex.encode()
    key = libc.syscall(add_key, b"user", b"chatglm-sandbox-test", token, len(token), ctypes.c_long(SESSION_KEYRING))
    if key < 0:
        pytest.skip(f"no session keyring to put a key in: {os.strerror(ctypes.get_errno())}")
    try:
        buffer = ctypes.create_string_buffer(64)
        assert libc.syscall(keyctl, KEYCTL_READ, key, buffer, 64) == len(token) and buffer.value == token
        with Sandbox(timeout=10, protection=protection) as box:
            read = box.run(f"import ctypes\nbuffer = ctypes.create_string_buffer(64)\n"
                           f"ctypes.CDLL(None).syscall({keyctl}, {KEYCTL_READ}, {key}, buffer, 64), buffer.value")
            assert read.ok and read.output == "(-1, b'')", read.output
    finally:
        libc.syscall(keyctl, KEYCTL_UNLINK, key, ctypes.c_long(SESSION_KEYRING))
