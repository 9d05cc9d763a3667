"""Keys and values in fixed-size blocks from one pool (paged attention, as vLLM does).

A sequence (a cache slot) holds a block table: its cache row r lives at row r % block_size of block
table[r // block_size]. Blocks are taken as a sequence grows and given back when it ends, so memory follows
the tokens really held, not slots x context. A full block is indexed by a hash of its tokens and of every
token before them; a sequence starting with the same tokens (a system prompt, the conversation so far)
takes that block instead of computing it again. Blocks nobody holds stay indexed until the pool needs
them, least recently used first. Block 0 is never handed out: table entries past a sequence's end point
to it, and a padded batch's padding columns write there.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
from array import array
from typing import Iterator, Sequence, Union

import torch

from .config import ModelConfig
from .errors import ChatGLMError
from .quant import QType, q8_0_bytes, q8_0_values

BLOCK_SIZE = 16  # tokens per block (vLLM's default): prefixes are shared at this granularity
NULL = 0         # the block that stands for "no block"
KVType = Union[torch.dtype, QType]  # a float type, or ggml's q8_0 blocks (llama.cpp's -ctk q8_0 -ctv q8_0)
KV_TYPES: dict[str, KVType] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": QType.Q8_0}


def kv_type_name(kv_type: KVType) -> str:
    """'float16', 'q8_0': how the banner and `chatglm bench` name a cache's storage."""
    return kv_type.name.lower() if isinstance(kv_type, QType) else str(kv_type).removeprefix("torch.")


def row_bytes(width: int, kv_type: KVType) -> int:
    """Memory of one cache row of `width` values: q8_0 takes 34 bytes (a float16 scale, 32 codes) per 32."""
    return width // 32 * 34 if isinstance(kv_type, QType) else width * kv_type.itemsize


class KVMemoryError(ChatGLMError, ValueError):
    """The KV budget cannot hold what was asked of it."""


class KVTypeError(ChatGLMError, ValueError):
    """The model's keys and values cannot be stored as the asked --kv-type."""


class BlockPool:
    """Which blocks each sequence holds: tables, reference counts, the prefix index and its LRU order.

    Pure bookkeeping, so the engine's scheduling works the same over any storage; `KVCache` adds the
    tensors. Counts are in tokens of the sequence; the first `prefix_rows` rows of every sequence hold a
    P-Tuning prefix, shared in whole blocks (a last partial block is copied into each sequence).
    """

    storage = ""  # what the blocks take, for the banner

    def __init__(self, slots: int, max_tokens: int, blocks: int | None = None, block_size: int = BLOCK_SIZE,
                 prefix_rows: int = 0):
        self.block_size, self.prefix_rows = block_size, prefix_rows
        self.width = -(-(max_tokens + prefix_rows) // block_size)      # table entries per sequence
        pinned = -(-prefix_rows // block_size)
        full = 1 + pinned + slots * self.width  # every slot at max_tokens: more is never needed
        self.blocks = full if blocks is None else min(blocks, full)
        if self.blocks < 2 + pinned:
            raise KVMemoryError(f"a KV pool of {self.blocks} blocks holds no block for a sequence "
                                f"(block 0 is reserved{f', {pinned} hold the P-Tuning prefix' if pinned else ''})")
        self.tables = torch.zeros(slots, self.width, dtype=torch.long)
        self.owned: list[list[int]] = [[] for _ in range(slots)]
        self.chains: list[list[bytes]] = [[] for _ in range(slots)]   # hashes of each sequence's full token blocks
        self.refs = [0] * self.blocks
        # the most recently freed block is taken first: the pages in use stay few, fresh ones are touched last
        self.free = collections.deque(range(self.blocks - 1, 0, -1))  # taken from the right: 1, 2, 3, ...
        self.index: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.idle: "collections.OrderedDict[int, None]" = collections.OrderedDict()  # indexed, unheld; oldest first
        self.stats = {"evicted_blocks": 0}
        self.meta: dict[int, dict] = {}  # per-sequence state a model keeps between steps (GLM's <sop> place)
        self.prefix = [self._take() for _ in range(pinned)]  # held for good: never freed or evicted

    # --- what the engine asks -----------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold when it has the pool to itself."""
        own = self.blocks - 1 - len(self.prefix) + self.prefix_rows // self.block_size
        return own * self.block_size - self.prefix_rows

    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached but held by nobody)."""
        return len(self.free) + len(self.idle)

    def describe(self) -> str:
        """One line for the start banner."""
        per_token = f", {format_size(self.token_bytes())} per token" if self.token_bytes() else ""
        return (f"KV cache: {self.storage}{self.blocks - 1} blocks of "
                f"{self.block_size} tokens ({(self.blocks - 1) * self.block_size} tokens in all, "
                f"{self.width * self.block_size - self.prefix_rows} per sequence at most{per_token})")

    def token_bytes(self) -> int:
        """Memory one token takes in the blocks (every layer's keys and values); 0 where nothing is stored."""
        return 0

    def in_use(self) -> int:
        """Blocks some sequence holds (the prefix included)."""
        return self.blocks - 1 - self.available()

    def start(self, slot: int, tokens: Sequence[int] = ()) -> int:
        """Begin a sequence in `slot`: the prefix blocks, then the cached blocks that already hold the
        longest run of `tokens` (leaving at least the last token to compute). Returns the tokens covered."""
        self.release(slot)
        full = self.prefix_rows // self.block_size
        for block in self.prefix[:full]:
            self._append(slot, self._hold(block))
        covered = 0
        if tokens:
            for k, digest in enumerate(self.hashes(tokens, len(tokens) - 1)):
                block = self.index.get(digest)
                if block is None:
                    break
                self._append(slot, self._hold(block))
                self.chains[slot].append(digest)
                covered = (full + k + 1) * self.block_size - self.prefix_rows
        return covered

    def grow(self, slot: int, tokens: int) -> bool:
        """Give `slot` blocks for its first `tokens` tokens; False (taking nothing) when the pool is short."""
        if not self.owned[slot] and self.prefix:
            self.start(slot)
        need = -(-(tokens + self.prefix_rows) // self.block_size) - len(self.owned[slot])
        if need > self.available():
            return False
        for _ in range(need):
            block = self._take()
            self._prepare(block, len(self.owned[slot]))
            self._append(slot, block)
        return True

    def commit(self, slot: int, tokens: Sequence[int]) -> None:
        """`tokens` now have their keys and values written: index the sequence's newly full blocks."""
        chain = self.chains[slot]
        first = self.prefix_rows // self.block_size + len(chain)
        parent = chain[-1] if chain else b""
        for k in range(first, (self.prefix_rows + len(tokens)) // self.block_size):
            parent = _digest(parent, self._tokens_of(tokens, k))
            block = self.owned[slot][k]
            if parent not in self.index and block not in self.hash_of:
                self.index[parent], self.hash_of[block] = block, parent
            chain.append(parent)

    def release(self, slot: int) -> None:
        """End the sequence in `slot`: its indexed blocks stay cached (most recent last), the rest are free."""
        for block in reversed(self.owned[slot]):  # so the next sequence takes them in the same order
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        self.owned[slot].clear()
        self.chains[slot].clear()
        self.tables[slot] = NULL
        self.meta.pop(slot, None)

    def fork(self, source: int, target: int, tokens: int) -> None:
        """Begin `target` as a copy of `source`'s first `tokens` tokens (n > 1 continuations of one prefill):
        their full blocks shared, a last partial block copied. `target`'s own blocks go back first, so a target
        that held blocks for as many tokens always finds the one block it takes."""
        self.release(target)
        full, total = divmod(tokens + self.prefix_rows, self.block_size)
        total = full + (total > 0)
        for block in self.owned[source][:full]:
            self._append(target, self._hold(block))
        for k in range(full, total):
            block = self._take()
            self._copy(self.owned[source][k], block)
            self._append(target, block)
        self.chains[target] = list(self.chains[source][: full - self.prefix_rows // self.block_size])
        if source in self.meta:
            self.meta[target] = dict(self.meta[source])

    def hashes(self, tokens: Sequence[int], limit: int) -> Iterator[bytes]:
        """The chain hashes of the full blocks among the first `limit` tokens (after the full prefix blocks)."""
        parent = b""
        for k in range(self.prefix_rows // self.block_size, (self.prefix_rows + limit) // self.block_size):
            parent = _digest(parent, self._tokens_of(tokens, k))
            yield parent

    # --- inside ---------------------------------------------------------------------------
    def _tokens_of(self, tokens: Sequence[int], k: int) -> Sequence[int]:
        """The tokens in rows of block k (a block that also holds prefix rows has fewer)."""
        return tokens[max(0, k * self.block_size - self.prefix_rows): (k + 1) * self.block_size - self.prefix_rows]

    def _append(self, slot: int, block: int) -> None:
        self.tables[slot, len(self.owned[slot])] = block
        self.owned[slot].append(block)

    def _hold(self, block: int) -> int:
        self.refs[block] += 1
        self.idle.pop(block, None)
        return block

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # the least recently used cached block
            block, _ = self.idle.popitem(last=False)
            del self.index[self.hash_of.pop(block)]
            self.stats["evicted_blocks"] += 1
        self.refs[block] = 1
        return block

    def _prepare(self, block: int, position: int) -> None:
        """Storage hook: make `block` ready to be table entry `position` of a sequence."""

    def _copy(self, source: int, target: int) -> None:
        """Storage hook: `target` takes the rows of block `source`."""


class KVCache(BlockPool):
    """The pool's storage: [layer, key|value, kv_head, block, row, head_dim], or with q8_0 a row's head_dim / 32
    ggml blocks as bytes [..., row, head_dim / 32 * 34], each row quantized as it is written (`store`).

    One block of one key head is a contiguous [block_size, head_dim] tile that follows the same head's tile
    of the next block id, so a sequence whose blocks were taken together (a prompt's) reads one run of
    memory as a contiguous cache would (the C++ decode step reads the tiles in place; with the blocks
    first, each tile start cost a fresh stream of reads: 16 streams decoded 25% slower).
    `by_row[layer]` ([block, row, key|value, kv_head, head_dim]) takes a step's new rows in one write.
    The tensor is allocated empty: the OS commits its pages as blocks are first used.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_tokens: int, dtype: KVType,
                 device: torch.device | str = "cpu", blocks: int | None = None, block_size: int = BLOCK_SIZE,
                 prefix: torch.Tensor | None = None):
        if isinstance(dtype, QType) and cfg.head_dim % 32:
            raise KVTypeError(f"--kv-type q8_0 stores keys and values in blocks of 32 along the head dimension, but "
                              f"this model's head_dim is {cfg.head_dim}, not a multiple of 32; use f16, bf16 or f32")
        super().__init__(slots, max_tokens, blocks, block_size, 0 if prefix is None else prefix.shape[2])
        width = row_bytes(cfg.head_dim, dtype) if isinstance(dtype, QType) else cfg.head_dim
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, self.blocks, block_size, width)
        self.kv = torch.empty(shape, dtype=torch.uint8 if isinstance(dtype, QType) else dtype, device=device)
        self.by_row = [layer.permute(2, 3, 0, 1, 4) for layer in self.kv]
        self.tables = self.tables.to(device)
        self.storage = f"{format_size(self.kv.numel() * self.kv.itemsize)} {kv_type_name(dtype)} in "
        # Masked rows of a batch still meet the values (0 x NaN = NaN): a block is zeroed when first used.
        self.fresh = [True] * self.blocks
        self.kv[:, :, :, NULL].zero_()
        if prefix is not None:  # [layers, 2, P, Hkv, D] into the pinned blocks' first P rows
            rows = torch.zeros(*prefix.shape[:2], len(self.prefix) * block_size, *prefix.shape[3:], dtype=prefix.dtype)
            rows[:, :, : self.prefix_rows] = prefix.cpu()
            rows = rows.unflatten(2, (-1, block_size)).permute(0, 1, 4, 2, 3, 5)
            self.kv[:, :, :, self.prefix] = self.store(rows).to(device)

    @property
    def kv_type(self) -> KVType:
        """What the rows are stored as (uint8 storage holds q8_0 blocks)."""
        return QType.Q8_0 if self.kv.dtype == torch.uint8 else self.kv.dtype

    def store(self, rows: torch.Tensor) -> torch.Tensor:
        """Keys or values [..., head_dim] as the cache stores them (q8_0: rounded into blocks, as ggml rounds)."""
        return q8_0_bytes(rows) if self.kv.dtype == torch.uint8 else rows.to(self.kv.dtype)

    def load(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows [..., storage width] back as `dtype` values [..., head_dim]."""
        return q8_0_values(stored).to(dtype) if self.kv.dtype == torch.uint8 else stored.to(dtype)

    def token_bytes(self) -> int:
        return self.kv.nbytes // (self.blocks * self.block_size)

    @staticmethod
    def block_bytes(cfg: ModelConfig, dtype: KVType, block_size: int = BLOCK_SIZE) -> int:
        """Memory of one block: keys and values of every layer for block_size tokens."""
        return cfg.num_layers * 2 * cfg.num_kv_heads * block_size * row_bytes(cfg.head_dim, dtype)

    def _prepare(self, block: int, position: int) -> None:
        if position == len(self.prefix) - 1 and self.prefix_rows % self.block_size:
            self.kv[:, :, :, block] = self.kv[:, :, :, self.prefix[-1]]  # the prefix's partial block, copied
        elif self.fresh[block]:
            self.kv[:, :, :, block].zero_()
        self.fresh[block] = False

    def _copy(self, source: int, target: int) -> None:
        self.kv[:, :, :, target] = self.kv[:, :, :, source]
        self.fresh[target] = False


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '6G', '512M', '1.5GiB', '4096' (binary units, as llama.cpp and free(1) count)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"--kv-memory {text!r} is not a size; expected a number with an optional unit: 512M, 6G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit.lower()]:
            return f"{n / _UNITS[unit.lower()]:.1f} {unit}iB"
    return f"{n} B"


def available_memory() -> int:
    """Bytes the OS could give this process now (MemAvailable), or the free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


RESERVE = 1 << 30  # left to the OS and the server's own growth when the budget is not given
SHARE = 0.5        # of what remains: the weights are loaded by then, but their mapped pages count as available


def default_budget() -> int:
    """The KV budget when none is given: half of the memory available after a 1 GiB reserve."""
    return int(max(0, available_memory() - RESERVE) * SHARE)
