"""The filesystem, network and process walls the sandbox's child puts up around itself before any cell runs.

Loaded by path from sandbox_kernel.py (and run as ``python -I sandbox_jail.py KIND`` to probe), so it imports
only the standard library. Three protections, strongest first; each lets the code read this Python (interpreter,
standard library, installed packages) and the system files it needs, and write only in the working folder:

- ``namespace``: new user, mount, PID, network, IPC and UTS namespaces. The root is a read-only tmpfs holding
  read-only binds of that view, the working folder bound writable, a fresh /proc of the sandbox's own
  processes, and a few devices; nothing else of the host exists there. The first process in the new PID
  namespace sets its pid_max (the smallest the kernel accepts, about 300; Linux 6.14 and later, where it is
  the namespace's own) and allows no nested user namespaces,
  then drops every capability; the kernel runs as its child. When that first process dies, all die.
- ``landlock``: Landlock rules on the same view (other paths can be stat'ed, not read or listed), TCP closed,
  and, from Landlock ABI 6, no signals or abstract Unix sockets outside the sandbox.

Both join a session keyring of their own, so keys the user's session holds cannot be read.
- ``audit-hook``: an audit hook that refuses opening files outside the view. Best effort: ctypes gets past it.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import signal
import struct
import sys
from pathlib import Path

PROTECTIONS = ("namespace", "landlock", "audit-hook")  # strongest first
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc entries the runtime reads (dynamic loader, time zone, user names, certificates, fonts); not shadow & co.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "nsswitch.conf", "passwd",
               "group", "hosts", "ssl", "ca-certificates", "mime.types", "fonts", "alternatives", "os-release")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
PID_MAX = 301  # the smallest pid_max a PID namespace takes: at most about 300 processes and threads
PID_MAX_PER_NAMESPACE = (6, 14)  # Linux release from which pid_max is per PID namespace (before: host-wide!)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x1000, 0x4000, 1 << 18, 2
MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # mount_setattr(2), Linux 5.12, same on every arch
READ_ONLY, NO_SUID_OR_DEVICES = 1, 2 | 4  # MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 24, 38, 1
CAPABILITY_VERSION_3 = 0x20080522
# (pivot_root, keyctl) system call numbers: older calls differ between architectures
SYSCALLS = {"x86_64": (155, 250), "aarch64": (41, 219), "riscv64": (41, 219)}
KEYCTL_JOIN_SESSION_KEYRING = 1
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on every arch
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
# filesystem rights each Landlock ABI handles (execute, write, read, read dir, remove/make all kinds; refer,
# truncate, device ioctl came later)
LANDLOCK_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
LANDLOCK_READ = 1 | 4 | 8  # execute, read file, read dir
LANDLOCK_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # the rights a rule on a file (not a folder) may hold
LANDLOCK_TCP = 1 | 2  # bind, connect (ABI 4)
LANDLOCK_SCOPES = 1 | 2  # abstract Unix sockets, signals (ABI 6)

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(OSError):
    """A protection this system does not allow; the message says which step failed."""


def pid_max_per_namespace() -> bool:
    """Whether this kernel keeps pid_max per PID namespace; before, writing it would limit the whole host."""
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    return release is not None and tuple(map(int, release.groups())) >= PID_MAX_PER_NAMESPACE


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise JailError(errno, f"{what}: {os.strerror(errno)}")
    return result


def readable_paths() -> list[str]:
    """This Python (its prefixes: interpreter, standard library, site-packages) and the system files it needs.

    Paths that a ``.pth`` file adds outside the prefixes (an editable checkout, say) stay hidden."""
    python = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable))}
    etc = [os.path.join("/etc", name) for name in ETC_ENTRIES]
    return _outermost([p for p in [*SYSTEM_DIRS, *map(os.path.realpath, python), *etc, *DEVICES]
                       if os.path.exists(p)])


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without those inside another one, in order."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


# ---- namespace ----

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target}")


def _bind(path: str, *, writable: bool = False) -> None:
    """Bind the old root's `path` at `path` in the new one; read-only, nosuid and nodev unless a device."""
    source = "/oldroot" + path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.islink(source):  # /bin -> usr/bin, /etc/localtime -> /usr/share/...: the same link
        os.symlink(os.readlink(source), path)
        return
    if os.path.isdir(source):
        os.makedirs(path, exist_ok=True)
    else:
        open(path, "a").close()
    _mount(source, path, None, MS_BIND | MS_REC)
    if path not in DEVICES:
        _restrict_mount(path, NO_SUID_OR_DEVICES | (0 if writable else READ_ONLY))


def _restrict_mount(path: str, attributes: int, *, recursive: bool = True) -> None:
    """Set mount attributes on `path` and every mount below it (a plain remount would miss those)."""
    attr = struct.pack("QQQQ", attributes, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns fd
    _check(_libc.syscall(MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0, attr,
                         ctypes.c_size_t(len(attr))), f"mount_setattr {path}")


def _drop_capabilities() -> None:
    """No capabilities now or after any exec, and no way back (no_new_privs)."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            break  # past the last capability this kernel knows
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    header = struct.pack("Ii", CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, bytes(24)), "capset")


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_for(pid: int, *, reap_all: bool) -> int:
    """`pid`'s exit code (128 + signal when killed), reaping every other child meanwhile if `reap_all`."""
    while True:
        done, status = os.wait() if reap_all else os.waitpid(pid, 0)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def _exit_like(code: int) -> None:
    """Exit as the waited-for process did: by its signal if it was killed (128 + signal), else with its code."""
    if code > 128 and code - 128 in signal.valid_signals():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if code - 128 != signal.SIGKILL:  # which has no handler to reset
            signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    os._exit(code)


def _syscalls() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise JailError(0, f"no pivot_root and keyctl system call numbers known for {machine}")
    return SYSCALLS[machine]


def _leave_session_keyring() -> None:
    """Join a new session keyring: the one inherited may hold the user's keys (Kerberos, ecryptfs, tokens)."""
    _check(_libc.syscall(_syscalls()[1], KEYCTL_JOIN_SESSION_KEYRING, None), "keyctl(join session keyring)")


def _build_root(workdir: str) -> None:
    """Make the mount namespace's root a tmpfs with the view, the working folder and a fresh /proc."""
    view = readable_paths()  # before the root changes
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.mkdir("/tmp/oldroot")
    _check(_libc.syscall(_syscalls()[0], b"/tmp", b"/tmp/oldroot"), "pivot_root")
    os.chdir("/")
    for path in view:
        _bind(path)
    _bind(workdir, writable=True)
    os.mkdir("/proc")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _seal() -> None:
    """Detach the old root and make the new root and /proc read-only (so no sysctl, sysrq or pid_max changes)."""
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount /oldroot")
    os.rmdir("/oldroot")
    _restrict_mount("/proc", READ_ONLY | NO_SUID_OR_DEVICES)
    _restrict_mount("/", READ_ONLY, recursive=False)  # the root tmpfs alone: the working folder stays writable


def enter_namespaces(workdir: str) -> None:
    """Return in a process inside the jail (see the module docstring); the calling process only waits and exits.

    Three processes: this one (outside the new PID namespace) waits for the namespace's first process, which
    builds and seals the root, drops its capabilities and reaps orphans until its child, the one that returns,
    exits. /proc is read-only because the user namespace maps our own uid: where that is the host's root, a
    writable /proc would let code without capabilities still write sysctls (core_pattern) and sysrq-trigger.
    Each exits as the one it waited for did, so the parent sees the kernel's own exit status."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    first = os.fork()
    if first:
        os.closerange(3, 1 << 16)
        _drop_capabilities()
        _exit_like(_wait_for(first, reap_all=False))
    _die_with_parent()
    _build_root(workdir)
    if pid_max_per_namespace():  # else only RLIMIT_NPROC bounds processes, and not for root
        _write("/proc/sys/kernel/pid_max", str(PID_MAX))
    _write("/proc/sys/user/max_user_namespaces", "0")
    _seal()
    _leave_session_keyring()
    _drop_capabilities()
    os.chdir(workdir)
    kernel = os.fork()
    if kernel:
        os.closerange(3, 1 << 16)  # hold no pipe to the parent: it sees EOF as soon as the kernel exits
        _exit_like(_wait_for(kernel, reap_all=True))
    _die_with_parent()


# ---- landlock ----

def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers (0: none)."""
    version = _libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(version, 0)


def restrict_landlock(workdir: str) -> None:
    """Landlock rules: read the view, write the working folder, nothing else; no TCP, no signals out (ABI 6)."""
    abi = landlock_abi()
    if abi < 1:
        raise JailError(0, "Landlock is not enabled in this kernel")
    handled_fs = LANDLOCK_FS[max(v for v in LANDLOCK_FS if v <= abi)]
    attr = struct.pack("Q", handled_fs)
    if abi >= 4:
        attr += struct.pack("Q", LANDLOCK_TCP)
    if abi >= 6:
        attr += struct.pack("Q", LANDLOCK_SCOPES)
    ruleset = _check(_libc.syscall(LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        rules = [(p, LANDLOCK_READ | (LANDLOCK_FILE_RIGHTS if p in DEVICES else 0)) for p in readable_paths()]
        for path, access in [*rules, (workdir, handled_fs)]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    access &= LANDLOCK_FILE_RIGHTS
                rule = struct.pack("=Qi", access & handled_fs, fd)
                _check(_libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                       f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
        _leave_session_keyring()
    finally:
        os.close(ruleset)


# ---- audit hook ----

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# events that change files, with the positions of the paths they change
CHANGE_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                 "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.rename": (0, 1),
                 "os.link": (0, 1), "shutil.move": (0, 1), "os.symlink": (1,), "shutil.copyfile": (1,)}
LIST_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob"})


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def guard_files(workdir: str) -> None:
    """An audit hook that refuses reading outside the view and changing anything outside the working folder."""
    readable, writable = readable_paths(), [os.path.realpath(workdir)]

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            checks = [(path, bool((flags or 0) & WRITE_FLAGS) or any(c in (mode or "") for c in "wax+"))]
        elif event in CHANGE_EVENTS:
            checks = [(args[i], True) for i in CHANGE_EVENTS[event]]
        elif event in LIST_EVENTS:
            checks = [(args[0], False)]
        else:
            return
        for path, write in checks:
            if path is None or isinstance(path, int):
                continue
            real = os.path.realpath(os.fsdecode(path))
            if not _inside(real, writable) and (write or not _inside(real, readable)):
                raise PermissionError(f"{path}: outside what this sandbox may {'change' if write else 'read'}")

    sys.addaudithook(hook)


def probe(kind: str, workdir: str) -> None:
    """Put up protection `kind` in this process; raises JailError where the system refuses it."""
    if kind == "namespace":
        enter_namespaces(workdir)
    elif kind == "landlock":
        restrict_landlock(workdir)
    elif kind == "audit-hook":
        guard_files(workdir)
    else:
        raise ValueError(f"unknown protection {kind!r}; expected one of {', '.join(PROTECTIONS)}")


if __name__ == "__main__":  # the parent's probe: exits 0 where protection argv[1] holds, else prints why
    try:
        probe(sys.argv[1], sys.argv[2])
        Path(sys.argv[2], "probe").write_text("ok")
    except OSError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
