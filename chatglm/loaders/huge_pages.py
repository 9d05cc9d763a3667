"""Weights in 2 MB pages: a file mapping's weight bytes replaced, in place, by anonymous pages the kernel backs
with transparent huge pages, holding the same bytes. A memory-mapped file is read out of the page cache's pages,
often 4 KB (2 MB only where the cache happens to hold large folios; the kernel refuses MADV_COLLAPSE on a file
mapping), and decode, reading every weight once a token, goes faster from huge pages (docs/BENCHMARKS.md,
"Weights in huge pages"). llama.cpp's `--no-mmap` reads a file into allocated memory instead.

In place: each 64 MB stretch is read into a fresh 2 MB-aligned MADV_HUGEPAGE buffer, which mremap then moves onto
the mapping's own addresses. Every tensor, and every pointer the C++ decode steps hold, keeps its address and sees
the same bytes before and after, so the move runs in the background after load while the model decodes.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..kv_cache import RESERVE, available_memory

HUGE = 2 << 20
CHUNK = 64 << 20      # bytes moved at a time: at most this much memory held twice while it moves
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page setting (always, madvise, never), or 'unsupported'."""
    try:
        found = re.search(r"\[(\w+)\]", THP_SETTING.read_text())
    except OSError:
        return "unsupported"
    return found.group(1) if found else "unsupported"


def unavailable_reason(nbytes: int) -> str | None:
    """Why weights of `nbytes` cannot go into huge pages here, or None when they can."""
    mode = thp_mode()
    if mode not in ("always", "madvise"):
        return f"transparent huge pages are {mode!r} on this machine"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this Python's mmap cannot ask for huge pages"
    available = available_memory()
    if available < nbytes + RESERVE:  # the 1 GiB the KV pool leaves to the OS too
        return (f"{nbytes >> 20} MiB of weights would leave less than {RESERVE >> 20} MiB of the "
                f"{available >> 20} MiB available")
    return None


MAPPED = "weights mapped from the file"


def mmap_option(value: object, device: str = "cpu") -> bool:
    """The loader's `use_mmap` option checked (llama-cpp-python's name; llama.cpp's --mmap / --no-mmap): True
    reads weights in place from the file's mapping, False moves them into huge pages. None (not given) moves them
    on a CPU, where decode reads every weight once a token and goes faster from 2 MB pages (llama.cpp too decodes
    q4_0 from its own copy in memory), and keeps them mapped for a GPU, which copies them anyway."""
    if value is None:
        return not str(device).startswith("cpu")
    if not isinstance(value, bool):
        raise ValueError(f"use_mmap (--mmap/--no-mmap) is {value!r}; expected true (weights read in place from the "
                         "file's mapping) or false (moved into huge pages: --no-mmap)")
    return value


def _libc() -> ctypes.CDLL:
    """mmap, mremap, mprotect and munmap by address (Python's mmap cannot put pages at a given address)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mremap.restype = ctypes.c_void_p, ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    for name in ("madvise", "mprotect"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def address_of(buffer: Any) -> int:
    """Where a mapping (an mmap, or a memoryview of one) starts in memory."""
    return np.frombuffer(buffer, np.uint8).ctypes.data


def windows(base: int, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (address, bytes) stretches to move for these (file offset, bytes) spans of a mapping at `base`: spans
    that meet (but for the file's alignment padding) joined, each run cut to the whole 2 MB pages inside it, then
    into CHUNK pieces; no byte outside the spans and their padding moves."""
    runs: list[list[int]] = []
    for start, n in sorted(spans):
        if runs and start - runs[-1][1] < mmap.PAGESIZE:
            runs[-1][1] = max(runs[-1][1], start + n)
        else:
            runs.append([start, start + n])
    out = []
    for lo, hi in runs:
        lo, hi = -(-(base + lo) // HUGE) * HUGE, (base + hi) // HUGE * HUGE
        out.extend((at, min(CHUNK, hi - at)) for at in range(lo, hi, CHUNK))
    return out


def _move(libc: ctypes.CDLL, fd: int, base: int, at: int, n: int) -> None:
    """Replace [at, at + n) of the file mapping at `base` by anonymous huge pages holding the same bytes."""
    raw = libc.mmap(None, n + HUGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if raw in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of a buffer for huge pages failed")
    start, moved = -(-raw // HUGE) * HUGE, False
    try:
        libc.madvise(start, n, mmap.MADV_HUGEPAGE)
        view = memoryview((ctypes.c_char * n).from_address(start)).cast("B")
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], at - base + done)
            if got <= 0:
                raise OSError(f"the file ended {n - done} bytes short at offset {at - base + done}")
            done += got
        view.release()
        libc.mprotect(start, n, mmap.PROT_READ)
        moved = libc.mremap(start, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, at) == at
        if not moved:
            raise OSError(ctypes.get_errno(), f"mremap onto the mapping failed: {os.strerror(ctypes.get_errno())}")
    finally:
        libc.munmap(raw, start - raw)
        libc.munmap(start + n, raw + HUGE - start)
        if not moved:
            libc.munmap(start, n)


_moving: list[threading.Thread] = []


def huge_empty(nbytes: int) -> "torch.Tensor":
    """uint8 [nbytes] in fresh memory the kernel backs with 2 MB pages (private anonymous, MADV_HUGEPAGE, 2 MB
    aligned): where weights made at load (transcoded blocks) go when the file's move into huge pages."""
    import torch

    buffer = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem
    start = -address_of(buffer) % HUGE
    buffer.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)  # holds the mapping


def into_huge_pages(path: Path, buffer: Any, spans: Iterable[tuple[int, int]]) -> str:
    """Start moving these (file offset, bytes) spans of the file's mapping `buffer` into huge pages, on one
    background thread at low priority; a line saying where the weights are. Nothing moves (the weights stay
    mapped, no error) where huge pages cannot be had."""
    base = address_of(buffer)
    todo = windows(base, spans)
    total = sum(n for _, n in todo)
    reason = unavailable_reason(total) if total else "no whole 2 MB page of weights"
    if reason is not None:
        return f"{MAPPED} ({reason})"

    def run(mapping: Any) -> None:  # holds the mapping: it must not be unmapped while pages move onto it
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only: decode goes first
        except OSError:
            pass
        at = todo[0][0]
        try:
            libc, fd = _libc(), os.open(path, os.O_RDONLY)
            try:
                for at, n in todo:
                    _move(libc, fd, base, at, n)
            finally:
                os.close(fd)
        except OSError as e:  # what moved stays moved; the rest stays mapped, the same bytes either way
            logging.warning("%s: weights left in the file's mapping from address %#x on (%s)", path, at, e)

    thread = threading.Thread(target=run, args=(buffer,), name="huge-pages", daemon=True)
    thread.start()
    _moving.append(thread)
    return f"weights moving into 2 MB pages in the background ({total >> 20} MiB)"


def settle() -> None:
    """Wait until the moves started so far are done (bench: decode is timed once the weights sit still)."""
    while _moving:
        _moving.pop().join()
