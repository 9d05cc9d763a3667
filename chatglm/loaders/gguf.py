"""GGUF files, memory-mapped: one bounds-checked pass over the header gives the metadata as Python values
and the tensor table; tensors are zero-copy views of the mapping (float tensors, or the file's blocks).

The `gguf` package supplies the format's constants and writes files; its reader is not used here,
because it trusts every count and length and builds a numpy view per metadata item (seconds for a
150k-token vocabulary).
"""
from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from ..errors import ModelFileError
from ..models import family_for_gguf
from ..quant import FLOAT_TYPES, QTensor
from .huge_pages import MAPPED, into_huge_pages, unavailable_reason
from .names import main_layers, plan
from .transcode import plan as transcode_plan
from .transcode import summary, transcoding

if TYPE_CHECKING:
    from . import Checkpoint

_SCALARS = {VType.UINT8: "B", VType.INT8: "b", VType.UINT16: "H", VType.INT16: "h", VType.UINT32: "I",
            VType.INT32: "i", VType.FLOAT32: "f", VType.UINT64: "Q", VType.INT64: "q", VType.FLOAT64: "d",
            VType.BOOL: "?"}
_SIZES = {t: struct.calcsize(c) for t, c in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MAX_DIMS = 4
_VERSIONS = (2, 3)  # those llama.cpp writes; version 1 had 32-bit counts


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked to lie inside the file."""

    name: str
    shape: tuple[int, ...]  # PyTorch order: the slowest dimension first
    qtype: QType
    start: int              # byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """A mapped GGUF file: its metadata, its tensor table, and the mapping the tensors view."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap

    def tensor(self, name: str) -> torch.Tensor | QTensor:
        """A torch view of one tensor's bytes in the mapping (no copy)."""
        t = self.tensors[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapping is read-only
            data = torch.frombuffer(self.buffer, dtype=torch.uint8, count=t.nbytes, offset=t.start)
        if t.qtype in FLOAT_TYPES:
            dtype = FLOAT_TYPES[t.qtype]
            if t.start % dtype.itemsize:
                raise ModelFileError(self.path, f"tensor {name!r} starts at offset {t.start}, not a multiple of its "
                                                f"{dtype.itemsize}-byte {t.qtype.name} values")
            return data.view(dtype).reshape(t.shape)
        if len(t.shape) not in (2, 3):
            raise ModelFileError(self.path, f"tensor {name!r} is a {len(t.shape)}-D {t.qtype.name} tensor; only 2-D "
                                            "blocks (and 3-D stacks of them: MoE experts) are supported")
        rows = t.shape[0] * t.shape[1] if len(t.shape) == 3 else t.shape[0]  # experts' matrices one after another
        return QTensor(data.reshape(rows, -1), t.qtype, (rows, t.shape[-1]))

    def release(self, name: str) -> None:
        """Drop the whole pages inside one tensor's bytes from this process's mapping (MADV_DONTNEED): once
        transcoded they are not read again, and a read-only file mapping would fault them back in unchanged."""
        t = self.tensors[name]
        start = -(-t.start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (t.start + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self.buffer.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Header:
    """A cursor over the mapped header; every read is checked against the file's size."""

    def __init__(self, path: Path, buffer: mmap.mmap):
        self.path, self.buf, self.size, self.at = path, buffer, len(buffer), 0

    def fail(self, message: str) -> ModelFileError:
        return ModelFileError(self.path, message)

    def need(self, n: int, what: str) -> int:
        """Advance past n bytes, returning where they start."""
        at = self.at
        if n < 0 or at + n > self.size:
            raise self.fail(f"damaged or truncated GGUF file: {what} needs {n} bytes at offset {at}, the file "
                            f"has {self.size}")
        self.at = at + n
        return at

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(f"{what} length")
        at = self.need(n, what)
        try:
            return self.buf[at : at + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8 (at offset {at})") from None

    def texts(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: the vocabulary's hot loop, so the checks are inlined."""
        buf, at, size, unpack = self.buf, self.at, self.size, _U64.unpack_from
        out = []
        for i in range(count):
            n = unpack(buf, at)[0] if at + 8 <= size else size
            if at + 8 + n > size:
                raise self.fail(f"damaged or truncated GGUF file: {what}[{i}] at offset {at} runs past the end "
                                f"of the {size}-byte file")
            out.append(buf[at + 8 : at + 8 + n])
            at += 8 + n
        self.at = at
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError:
            raise self.fail(f"{what} holds a string that is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == VType.STRING:
            return self.text(what)
        if vtype in _SCALARS:
            return struct.unpack_from("<" + _SCALARS[vtype], self.buf, self.need(_SIZES[vtype], what))[0]
        if vtype == VType.ARRAY and depth < 2:
            itype, count = self.u32(f"{what} item type"), self.u64(f"{what} length")
            least = _SIZES.get(itype, 8)  # strings and arrays take 8 bytes at least
            if count * least > self.size - self.at:
                raise self.fail(f"{what}: array of {count} items cannot fit in the {self.size - self.at} bytes "
                                f"left at offset {self.at}")
            if itype in _SCALARS:
                at = self.need(count * least, what)
                return np.frombuffer(self.buf, "<" + _SCALARS[itype], count, at).tolist()
            if itype == VType.STRING:
                return self.texts(count, what)
            return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what} has unknown value type {vtype} at offset {self.at}")


def _parse(path: Path, buffer: mmap.mmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """The metadata and the tensor table, with every count, length, shape and offset checked against the
    file's size (a damaged length must give one clear error, not a 2**64-step loop or a view past the end)."""
    h = _Header(path, buffer)
    h.need(4, "magic")
    if buffer[:4] != struct.pack("<I", GGUF_MAGIC):
        raise h.fail("not a GGUF file (no 'GGUF' magic)")
    version = h.u32("version")
    if version & 0xFFFF == 0:
        raise h.fail("is a big-endian GGUF file; only little-endian files are supported")
    if version not in _VERSIONS:
        raise h.fail(f"GGUF version {version} is not supported; expected one of {_VERSIONS}")
    tensor_count, kv_count = h.u64("tensor count"), h.u64("metadata count")
    if kv_count * 13 > h.size or tensor_count * 24 > h.size:  # the least a pair / a tensor entry takes
        raise h.fail(f"header claims {tensor_count} tensors and {kv_count} metadata pairs, more than a "
                     f"{h.size}-byte file holds")
    meta: dict[str, Any] = {}
    for i in range(kv_count):
        key = h.text(f"metadata key #{i}")
        if key in meta:
            raise h.fail(f"metadata {key!r} appears twice")
        vtype = h.u32(f"metadata {key!r} type")
        meta[key] = h.value(vtype, f"metadata {key!r}")
    alignment = meta.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise h.fail(f"metadata 'general.alignment' is {alignment!r}; expected a power of two")
    entries = []
    for i in range(tensor_count):
        name = h.text(f"tensor #{i} name")
        ndim = h.u32(f"tensor {name!r} rank")
        if not 0 < ndim <= _MAX_DIMS:
            raise h.fail(f"tensor {name!r} has rank {ndim}; expected 1-{_MAX_DIMS}")
        dims = [h.u64(f"tensor {name!r} shape") for _ in range(ndim)]  # the fastest dimension first
        code = h.u32(f"tensor {name!r} type")
        if code not in QType._value2member_map_ or QType(code) not in GGML_QUANT_SIZES:
            raise h.fail(f"tensor {name!r} has unknown ggml type {code}")
        qtype = QType(code)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 or d >= 1 << 40 for d in dims) or dims[0] % block:
            raise h.fail(f"tensor {name!r} has shape {dims[::-1]} of type {qtype.name}; expected positive sizes, "
                         f"the fastest a multiple of {block}")
        offset = h.u64(f"tensor {name!r} offset")
        if offset % alignment:
            raise h.fail(f"tensor {name!r} has offset {offset}, not a multiple of the file's alignment {alignment}")
        nbytes = int(np.prod(dims, dtype=object)) // block * block_bytes
        entries.append((name, tuple(reversed(dims)), qtype, offset, nbytes))
    data_start = -(-h.at // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset, nbytes in entries:
        if name in tensors:
            raise h.fail(f"tensor {name!r} appears twice")
        if data_start + offset + nbytes > h.size:
            raise h.fail(f"damaged or truncated GGUF file: tensor {name!r}'s {nbytes} bytes at offset "
                         f"{data_start + offset} run past the end of the {h.size}-byte file")
        tensors[name] = TensorInfo(name, shape, qtype, data_start + offset, nbytes)
    return meta, tensors


def read_gguf(path: Path) -> GGUFFile:
    """Map and parse a GGUF file; any damage gives one ModelFileError naming the file."""
    with open(path, "rb") as f:
        try:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelFileError(path, "empty file") from None
    try:
        meta, tensors = _parse(path, buffer)
    except BaseException:
        buffer.close()
        raise
    return GGUFFile(path, meta, tensors, buffer)


def open_gguf(path: Path, use_mmap: bool = True) -> Checkpoint:
    """A GGUF file as a checkpoint: config from its metadata, tensors and tokenizer read when asked for; with
    use_mmap=False the tensors move into huge pages in the background, but for MoE expert stacks (`*_exps`): a
    token reads only its chosen experts, so they stay mapped rather than take their whole size in memory."""
    from . import Checkpoint, matrix_dtype

    file = read_gguf(path)
    meta = file.meta
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(path, "metadata general.architecture is missing")
    family = family_for_gguf(arch, path)
    shapes = {name: t.shape for name, t in file.tensors.items()}
    try:
        config = family.config_from_gguf(meta, path, shapes)
    except ModelFileError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:  # a string or 0 where a size belongs
        raise ModelFileError(path, f"bad metadata value ({type(e).__name__}: {e})") from None
    layout = main_layers(plan(file.tensors, family.GGUF_NAMES), config.num_layers)
    read = {n for names in layout.values() for n in names}
    types = {n: t.qtype for n, t in file.tensors.items() if n in read}
    targets = transcode_plan(types, layout.values())  # K-quants and such onto the kernels' block types
    placement, huge = MAPPED, False
    if not use_mmap:  # once the file is known to be a model we read; transcoded tensors are made in huge pages
        spans = [(t.start, t.nbytes) for name, t in file.tensors.items() if "_exps." not in name
                 and name not in targets]
        placement = into_huge_pages(path, file.buffer, spans)
        huge = bool(targets) and unavailable_reason(sum(file.tensors[n].nbytes for n in targets)) is None
    placement = "; ".join(filter(None, (summary(types, targets) + (" (into 2 MB pages)" if huge else ""), placement)))

    def tokenizer():
        from ..tokenizers import tokenizer_from_gguf

        return tokenizer_from_gguf(meta, path)

    stored = matrix_dtype(file.tensor(name) for name in file.tensors)
    get = transcoding(file.tensor, targets, file.release, huge) if targets else file.tensor
    return Checkpoint(path, family, config, layout, family.GGUF_NAMES, get, stored, tokenizer, {}, "gguf", placement)
