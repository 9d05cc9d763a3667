"""chatglm.cpp's GGML `.bin` files: read them as they are, and write ones chatglm.cpp reads.

Layout: b"ggml", int32 model type (1 ChatGLM-6B, 2 ChatGLM2, 3 ChatGLM3, 4 GLM-4), int32 config
version (1 or 2) and its record, int32 size + the tokenizer (a SentencePiece model, or GLM-4's
tiktoken ranks text), then tensors to the end: int32 name length, name, int32 ndim, the dims in
PyTorch order, int32 ggml type, padding to 16 bytes, the data. Tensor names are the Hugging Face
names; a P-Tuning v2 prefix is `past_key_values` [layers*2, kv_heads, pre_seq_len, head_dim], f16.
"""
from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from ..errors import ModelFileError
from ..quant import QTensor
from .huge_pages import MAPPED, into_huge_pages

MAGIC = b"ggml"
ALIGN = 16
MODEL_TYPES = {1: "chatglm", 2: "chatglm2", 3: "chatglm3", 4: "glm4"}
_NAME_OF = {"chatglm2": "THUDM/chatglm2-6b", "chatglm3": "THUDM/chatglm3-6b", "glm4": "THUDM/glm-4-9b-chat"}
TYPES = (QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)
V2 = struct.Struct("<7ifif3i")  # dtype vocab hidden heads kv_heads layers ffn | eps | virtual | theta | max eos pad
V1 = struct.Struct("<11i")      # dtype vocab hidden heads layers ffn max_length bos eos pad sep
V1_GQA = struct.Struct("<12i")  # V1 + kv_heads (ChatGLM2/3)


@dataclass
class GGMLFile:
    family: str
    config: dict[str, Any]        # an HF-style config.json for the family's config_from_hf
    tokenizer: bytes
    tensors: dict[str, torch.Tensor | QTensor]
    placement: str = MAPPED         # where the tensors' bytes are: huge_pages.into_huge_pages's line


class _Reader:
    def __init__(self, path: Path, data: memoryview):
        self.path, self.data, self.at = path, data, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise ModelFileError(self.path, f"truncated: {what} needs {n} bytes at offset {self.at}, "
                                            f"the file has {len(self.data)}")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def ints(self, count: int, what: str) -> tuple[int, ...]:
        return struct.unpack(f"<{count}i", self.take(4 * count, what))


def read_ggml(path: Path, use_mmap: bool = True) -> GGMLFile:
    """Parse a chatglm.cpp file; tensors are views on the memory-mapped file (with use_mmap=False moving into huge
    pages in the background)."""
    with open(path, "rb") as f:
        try:
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except ValueError:
            raise ModelFileError(path, "empty file") from None
    r = _Reader(path, data)
    if bytes(r.take(4, "magic")) != MAGIC:
        raise ModelFileError(path, "not a GGML file (no 'ggml' magic)")
    model_type, version = r.ints(2, "header")
    if model_type not in MODEL_TYPES:
        raise ModelFileError(path, f"unknown model type {model_type}; expected 1-4 (ChatGLM-6B, ChatGLM2, ChatGLM3, GLM-4)")
    family = MODEL_TYPES[model_type]
    config = _read_config(r, family, version)
    size = r.ints(1, "tokenizer size")[0]
    tokenizer = bytes(r.take(size, "tokenizer"))
    tensors: dict[str, torch.Tensor | QTensor] = {}
    spans = []
    while r.at < len(data):
        name = bytes(r.take(r.ints(1, "tensor name size")[0], "tensor name")).decode("utf-8", "replace")
        ndim = r.ints(1, f"tensor {name!r} rank")[0]
        if not 0 < ndim <= 4:
            raise ModelFileError(path, f"tensor {name!r} has rank {ndim}; expected 1-4")
        shape = r.ints(ndim, f"tensor {name!r} shape")
        code = r.ints(1, f"tensor {name!r} type")[0]
        if code not in {t.value for t in TYPES} or any(d <= 0 for d in shape):
            raise ModelFileError(path, f"tensor {name!r} has type {code} and shape {list(shape)}; "
                                       f"expected a type among {[t.name for t in TYPES]} and positive sizes")
        qtype = QType(code)
        if qtype not in (QType.F32, QType.F16) and ndim != 2:
            raise ModelFileError(path, f"tensor {name!r} is a {ndim}-D {qtype.name} tensor; blocks must be 2-D")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ModelFileError(path, f"tensor {name!r} has {shape[-1]} columns, not a multiple of {qtype.name}'s {block}")
        nbytes = int(np.prod(shape)) // block * block_bytes
        r.at = (r.at + ALIGN - 1) // ALIGN * ALIGN
        spans.append((r.at, nbytes))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapping is read-only
            raw = torch.frombuffer(r.take(nbytes, f"tensor {name!r} data"), dtype=torch.uint8)
        tensors[name] = _tensor(raw, qtype, tuple(shape))
    placement = MAPPED if use_mmap else into_huge_pages(path, data, spans)
    if "past_key_values" in tensors:  # back to the prefix encoder's embedding layout
        past = tensors.pop("past_key_values").float()
        tensors["transformer.prefix_encoder.embedding.weight"] = past.permute(2, 0, 1, 3).reshape(past.shape[2], -1)
    return GGMLFile(family, config, tokenizer, tensors, placement)


def _tensor(raw: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor | QTensor:
    if qtype == QType.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == QType.F16:
        return raw.view(torch.float16).reshape(shape)
    return QTensor(raw.reshape(shape[0], -1), qtype, (shape[0], shape[1]))


def _read_config(r: _Reader, family: str, version: int) -> dict[str, Any]:
    if version == 2:
        (_, vocab, hidden, heads, kv, layers, ffn, eps, virtual, theta, max_len, eos, _pad) = struct.unpack(
            V2.format, r.take(V2.size, "config"))
    elif version == 1:
        record = V1_GQA if family != "chatglm" else V1
        values = struct.unpack(record.format, r.take(record.size, "config"))
        _, vocab, hidden, heads, layers, ffn, max_len, _bos, eos, _pad, _sep = values[:11]
        kv, eps, theta, virtual = (values[11] if family != "chatglm" else heads), 1e-5, 10000.0, 0
    else:
        raise ModelFileError(r.path, f"config version {version} is not supported; expected 1 or 2")
    sizes = {"vocab": vocab, "hidden": hidden, "heads": heads, "kv_heads": kv, "layers": layers, "ffn": ffn}
    for what, value in sizes.items():  # a 0 here would divide by zero below; negatives make no model
        if value <= 0:
            raise ModelFileError(r.path, f"config record: {what} is {value}; expected a positive size")
    if family == "chatglm":
        return {"model_type": "chatglm", "position_encoding_2d": True, "vocab_size": vocab, "hidden_size": hidden,
                "num_attention_heads": heads, "num_layers": layers, "inner_hidden_size": ffn,
                "layernorm_epsilon": eps, "max_sequence_length": max_len, "eos_token_id": eos, "pre_seq_len": virtual}
    return {"model_type": "chatglm", "_name_or_path": _NAME_OF[family], "multi_query_attention": True,
            "padded_vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": heads,
            "multi_query_group_num": kv, "kv_channels": hidden // heads, "num_layers": layers,
            "ffn_hidden_size": ffn, "layernorm_epsilon": eps, "rope_ratio": theta / 10000.0, "seq_length": max_len,
            "eos_token_id": eos, "pre_seq_len": virtual}


def open_ggml(path: Path, use_mmap: bool = True):
    from ..models import family_for_hf
    from . import Checkpoint, matrix_dtype
    from .names import plan

    parsed = read_ggml(path, use_mmap)
    family = family_for_hf(parsed.config, path)
    try:
        config = family.config_from_hf(parsed.config, path)
    except ModelFileError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:
        raise ModelFileError(path, f"bad config record ({type(e).__name__}: {e})") from None
    tensors = parsed.tensors

    def tokenizer():
        from ..tokenizers import tokenizer_from_bytes

        return tokenizer_from_bytes(parsed.tokenizer, parsed.family, path)

    stored = matrix_dtype(tensors.values())
    return Checkpoint(path, family, config, plan(tensors, family.HF_NAMES), family.HF_NAMES, tensors.__getitem__,
                      stored, tokenizer, {}, "ggml", parsed.placement)


GGML_CONFIG_KEYS = ("dtype", "vocab_size", "hidden_size", "num_heads", "num_kv_heads", "num_layers", "ffn_size",
                    "norm_eps", "num_virtual_tokens", "rope_theta", "max_length", "eos_token_id", "pad_token_id")


def write_ggml(f: BinaryIO, family: str, record: dict[str, Any], tokenizer: bytes,
               tensors: Iterable[tuple[str, tuple[int, ...], np.ndarray, QType]]) -> None:
    """Write a version-2 file that chatglm.cpp reads. Each tensor comes as (HF name, PyTorch-order
    shape, its data: ggml block bytes or an f32/f16 array, its type); `record` holds GGML_CONFIG_KEYS."""
    model_type = {v: k for k, v in MODEL_TYPES.items()}[family]
    f.write(MAGIC + struct.pack("<2i", model_type, 2))
    f.write(V2.pack(*(record[k] for k in GGML_CONFIG_KEYS)))
    f.write(struct.pack("<i", len(tokenizer)) + tokenizer)
    for name, shape, data, qtype in tensors:
        encoded = name.encode()
        f.write(struct.pack("<i", len(encoded)) + encoded)
        f.write(struct.pack(f"<{len(shape) + 2}i", len(shape), *shape, qtype.value))
        f.write(b"\0" * (-f.tell() % ALIGN))
        f.write(np.ascontiguousarray(data).tobytes())
