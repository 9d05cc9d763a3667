"""Weights in 2 MB pages: an anonymous buffer the kernel backs with transparent huge pages, and the file's
tensor bytes read into it in parallel. A memory-mapped file is read out of the page cache's pages, often 4 KB
(2 MB only where the cache happens to hold large folios; the kernel refuses MADV_COLLAPSE on a file mapping), and
decode, reading every weight once a token, goes faster from huge pages (docs/BENCHMARKS.md, "Weights in huge
pages"). llama.cpp's `--no-mmap` reads a file into allocated memory too.
"""
from __future__ import annotations

import mmap
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import torch

from ..kv_cache import RESERVE, available_memory

HUGE = 2 << 20
ALIGN = 64            # each tensor's start in the buffer: a cache line, a multiple of every dtype's size
CHUNK = 64 << 20      # bytes one read takes: large enough that a read's cost is the copy, small enough to share
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


class HugePageArena:
    """One anonymous buffer, its start 2 MB-aligned and advised MADV_HUGEPAGE, handed out as uint8 tensors."""

    def __init__(self, nbytes: int):
        # private: Python's default anonymous mapping is shared memory, which THP's `madvise` mode leaves in 4 KB
        self.buffer = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.whole = torch.frombuffer(self.buffer, dtype=torch.uint8)
        self.start = -self.whole.data_ptr() % HUGE
        self.buffer.madvise(mmap.MADV_HUGEPAGE, self.start - self.start % mmap.PAGESIZE,
                            len(self.buffer) - self.start + self.start % mmap.PAGESIZE)
        self.at = self.start

    @staticmethod
    def size_for(sizes: list[int]) -> int:
        """The bytes an arena needs to hand out tensors of these sizes."""
        return sum(-(-n // ALIGN) * ALIGN for n in sizes)

    def take(self, nbytes: int) -> torch.Tensor:
        """The next `nbytes` of the buffer, not yet written."""
        if self.at + nbytes > len(self.buffer):
            raise ValueError(f"huge-page buffer of {len(self.buffer)} bytes has no room for {nbytes} more")
        out = self.whole[self.at : self.at + nbytes]
        self.at += -(-nbytes // ALIGN) * ALIGN
        return out

    @property
    def address(self) -> int:
        return self.whole.data_ptr() + self.start


def read_into(fd: int, pieces: list[tuple[torch.Tensor, int]], threads: int) -> None:
    """Fill each (uint8 tensor, file offset) piece from the file, in CHUNK-sized reads on `threads` threads
    (os.preadv releases the GIL: the copies from the page cache run side by side)."""
    jobs = [(t, offset, at, min(CHUNK, t.numel() - at)) for t, offset in pieces for at in range(0, t.numel(), CHUNK)]

    def read(job: tuple[torch.Tensor, int, int, int]) -> None:
        t, offset, at, n = job
        view = memoryview(t[at : at + n].numpy())
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + at + done)
            if got <= 0:
                raise OSError(f"the file ended {n - done} bytes short of a tensor at offset {offset + at + done}")
            done += got

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(read, jobs))


def huge_pages_of(arena: HugePageArena) -> int:
    """Bytes of the arena the kernel backs with huge pages (AnonHugePages in /proc/self/smaps)."""
    at = arena.address
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= at < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


MAPPED = "weights mapped from the file"


def mmap_option(value: object) -> bool:
    """The loader's `use_mmap` option checked (llama-cpp-python's name; llama.cpp's --mmap / --no-mmap): True
    reads weights in place from the file's mapping, False copies them into huge pages."""
    if not isinstance(value, bool):
        raise ValueError(f"use_mmap (--mmap/--no-mmap) is {value!r}; expected true (weights read in place from the "
                         "file's mapping) or false (copied into huge pages: --no-mmap)")
    return value


def copy_to_huge_pages(path: Path, spans: Mapping[str, tuple[int, int]],
                       threads: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Each named (file offset, byte count) span of the file read into one huge-page buffer, as uint8 tensors,
    and a line saying where the weights are; no copies (the weights stay mapped) where huge pages cannot be had."""
    total = HugePageArena.size_for([n for _, n in spans.values()])
    reason = unavailable_reason(total)
    if reason is not None:
        return {}, f"{MAPPED} ({reason})"
    arena = HugePageArena(total)
    copies = {name: arena.take(n) for name, (_, n) in spans.items()}
    with open(path, "rb") as f:
        read_into(f.fileno(), [(copies[name], offset) for name, (offset, _) in spans.items()],
                  threads or torch.get_num_threads())
    huge = min(huge_pages_of(arena), total)  # the last 2 MB page may run past the weights
    return copies, f"weights in huge pages ({huge >> 20} of {total >> 20} MiB in 2 MB pages)"
