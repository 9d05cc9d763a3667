"""GGUF files through the `gguf` package, memory-mapped: tensors stay as the file's blocks."""
from __future__ import annotations

import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType

from ..errors import ModelFileError
from ..models import family_for_gguf
from ..quant import QTensor
from .names import plan

_FLOAT = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
_SMALL_ARRAY = 4096  # arrays longer than this (vocabularies) stay in the reader


_SCALAR_SIZES = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
                 GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
                 GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
_MAX_DIMS = 4


def check_header(path: Path, data: memoryview) -> None:
    """Walk the header with every count, length, shape and offset checked against the file's size.

    Runs before GGUFReader, which trusts them: a damaged array length makes it loop 2**64 times, and
    a damaged shape or offset gives tensors that run past the end of the file.
    """
    from .ggml import _Reader  # bounds-checked reads that raise ModelFileError naming the file

    r = _Reader(path, data)
    r.take(4, "magic")
    (version,) = struct.unpack("<I", r.take(4, "version"))
    order = ">" if version & 0xFFFF == 0 else "<"  # a file written on a big-endian machine

    def num(fmt: str, what: str) -> int:
        return struct.unpack(order + fmt, r.take(struct.calcsize(fmt), what))[0]

    def text(what: str) -> bytes:
        return bytes(r.take(num("Q", f"{what} length"), what))

    def value(vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return text(what)
        if vtype in _SCALAR_SIZES:
            raw = r.take(_SCALAR_SIZES[GGUFValueType(vtype)], what)
            return int.from_bytes(raw, "little" if order == "<" else "big")
        if vtype == GGUFValueType.ARRAY and depth < 2:
            itype, count = num("I", f"{what} item type"), num("Q", f"{what} length")
            least = _SCALAR_SIZES.get(itype, 8)  # strings and arrays take 8 bytes at least
            if count * least > len(data) - r.at:
                raise ModelFileError(path, f"{what}: array of {count} items cannot fit in the "
                                           f"{len(data) - r.at} bytes left at offset {r.at}")
            if itype in _SCALAR_SIZES:
                r.take(count * least, what)
            else:
                for i in range(count):
                    value(itype, f"{what}[{i}]", depth + 1)
            return None
        raise ModelFileError(path, f"{what} has unknown value type {vtype} at offset {r.at}")

    tensor_count, kv_count = num("Q", "tensor count"), num("Q", "metadata count")
    if kv_count * 13 > len(data) or tensor_count * 24 > len(data):  # the least a pair / a tensor info takes
        raise ModelFileError(path, f"header claims {tensor_count} tensors and {kv_count} metadata pairs, more "
                                   f"than a {len(data)}-byte file holds")
    alignment = 32
    for i in range(kv_count):
        key = text(f"metadata key #{i}").decode("utf-8", "replace")
        vtype = num("I", f"metadata {key!r} type")
        got = value(vtype, f"metadata {key!r}")
        if key == "general.alignment" and vtype == GGUFValueType.UINT32 and got and not got & (got - 1):
            alignment = got
    ends = []
    for i in range(tensor_count):
        name = text(f"tensor #{i} name").decode("utf-8", "replace")
        ndim = num("I", f"tensor {name!r} rank")
        if not 0 < ndim <= _MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} has rank {ndim}; expected 1-{_MAX_DIMS}")
        dims = [num("Q", f"tensor {name!r} shape") for _ in range(ndim)]
        code = num("I", f"tensor {name!r} type")
        if code not in QType._value2member_map_ or QType(code) not in GGML_QUANT_SIZES:
            raise ModelFileError(path, f"tensor {name!r} has unknown ggml type {code}")
        block, block_bytes = GGML_QUANT_SIZES[QType(code)]
        if any(d <= 0 or d >= 1 << 40 for d in dims) or dims[0] % block:
            raise ModelFileError(path, f"tensor {name!r} has shape {dims[::-1]} of type {QType(code).name}; "
                                       f"expected positive sizes, the fastest a multiple of {block}")
        offset = num("Q", f"tensor {name!r} offset")
        ends.append((name, offset, int(np.prod(dims, dtype=object)) // block * block_bytes))
    start = -(-r.at // alignment) * alignment
    for name, offset, nbytes in ends:
        if start + offset + nbytes > len(data):
            raise ModelFileError(path, f"tensor {name!r}: {nbytes} bytes at offset {start + offset} run past "
                                       f"the end of the {len(data)}-byte file (truncated or damaged)")


def read_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning the reader's low-level errors into one that names the file."""
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    check_header(path, view)
                finally:
                    view.release()
        except ValueError as e:  # an empty file cannot be mapped
            raise e if isinstance(e, ModelFileError) else ModelFileError(path, "empty file") from None
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damaged files
        raise ModelFileError(path, f"damaged or truncated GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and short-array metadata as Python values."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > _SMALL_ARRAY:
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # a field the package cannot decode is not one we need
            continue
    return meta


def to_weight(t: Any, path: Path) -> torch.Tensor | QTensor:
    """A torch view of one tensor's bytes in the mapped file (no copy)."""
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapping is read-only
        data = torch.from_numpy(np.asarray(t.data))
    qtype = QType(t.tensor_type)
    if qtype in _FLOAT:
        return data.view(_FLOAT[qtype]).reshape(shape)
    if len(shape) != 2:
        raise ModelFileError(path, f"tensor {t.name!r} is a {len(shape)}-D {qtype.name} tensor; only 2-D blocks are supported")
    return QTensor(data.view(torch.uint8).reshape(shape[0], -1), qtype, shape)


def open_gguf(path: Path):
    from . import Checkpoint, matrix_dtype

    reader = read_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(path, "metadata general.architecture is missing")
    family = family_for_gguf(arch, path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    try:
        config = family.config_from_gguf(meta, path, shapes)
    except ModelFileError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:  # a string or 0 where a size belongs
        raise ModelFileError(path, f"bad metadata value ({type(e).__name__}: {e})") from None
    layout = plan(tensors, family.GGUF_NAMES)

    def tokenizer():
        from ..tokenizers import tokenizer_from_gguf

        return tokenizer_from_gguf(reader, path)

    stored = matrix_dtype(to_weight(t, path) for t in tensors.values())
    return Checkpoint(path, family, config, layout, family.GGUF_NAMES, lambda name: to_weight(tensors[name], path), stored,
                      tokenizer, {}, "gguf")
