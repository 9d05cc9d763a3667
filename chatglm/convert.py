"""`chatglm convert`: a model folder or file to a quantized GGUF (llama.cpp) or GGML (chatglm.cpp) file,
and the same quantization applied as an HF folder loads (`Pipeline(path, dtype="q4_0")`).

Every tensor is read, converted and written before the next is read, so at most one tensor is ever
held in float32; the output appears under its name only once it is complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from tqdm import tqdm

from .errors import ModelFileError
from .loaders import Checkpoint, open_checkpoint
from .loaders.ggml import TYPES as GGML_TYPES
from .loaders.ggml import write_ggml
from .loaders.gguf_writer import OutTensor, file_tensors, write_gguf
from .loaders.names import Weight, assemble
from .loaders.vocab_writer import ggml_tokenizer, gguf_vocab
from .models.layers import prefix_kv
from .quant import NAMES, QTensor, qtype_of, quantize

log = logging.getLogger(__name__)

RUNTIME_QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # dtypes that quantize an HF folder as it loads
GGML_FAMILIES = {"codegeex2": "chatglm2"}  # chatglm.cpp stores CodeGeeX2 as ChatGLM2 (its tokenizer tells them apart)
ROUTER_NAMES = ("ffn_gate_inp.weight", "mlp.gate.weight")  # MoE routers: f32 in files, as llama.cpp keeps them
PAD_TOKENS = {"chatglm": "<pad>", "glm4": "<|endoftext|>"}  # what THUDM's configs give as pad_token_id (else <unk>)


def target_type(shape: tuple[int, ...], qtype: QType) -> QType:
    """1-D tensors stay f32; matrices (and 3-D stacks of them: MoE experts) take the asked type, or f16 where
    rows do not split into its blocks."""
    if len(shape) not in (2, 3):
        return QType.F32
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        log.warning("a %s tensor is not quantized (f16 in files): %d columns are not whole %s blocks",
                    list(shape), shape[-1], qtype.name)
        return QType.F16
    return qtype


def _floats(w: Weight) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QTensor) else w.float()


def encode(w: Weight, qtype: QType) -> np.ndarray:
    """ggml's bytes of a weight in `qtype` (through gguf.quants); blocks already of that type are kept."""
    if isinstance(w, QTensor) and w.qtype == qtype:
        return w.raw.numpy()
    return quantize(_floats(w).numpy(), qtype)


def _encoded(source: Any, t: OutTensor) -> np.ndarray:
    w = t.load()
    stacked = isinstance(w, QTensor) and len(t.shape) == 3 and tuple(w.shape) == (t.shape[0] * t.shape[1], t.shape[2])
    if tuple(w.shape) != t.shape and not stacked:  # (MoE experts' blocks come as one stack of rows)
        raise ModelFileError(source, f"tensor for {t.name!r} has shape {list(w.shape)}, expected {list(t.shape)}")
    return encode(w, t.qtype)


def _typed(tensors: Iterable[OutTensor], qtype: QType) -> list[OutTensor]:
    out = list(tensors)
    for t in out:
        t.qtype = QType.F32 if t.name.endswith(ROUTER_NAMES) else target_type(t.shape, qtype)
    return out


def _not_written(ckpt: Checkpoint) -> Callable[[str], bool]:
    """Names not written: the P-Tuning encoder (GGML stores its output instead) and a head tied to the embedding."""
    return lambda canon: canon.startswith("prefix_") or (canon == "head" and ckpt.config.tie_embeddings)


# ----- GGUF -----

def _check_gguf(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    refusals = (
        (not ckpt.family.GGUF_ARCHS, f"{cfg.arch} (ChatGLM-6B) has no llama.cpp architecture; use --format ggml"),
        ("prefix_embedding" in ckpt.layout, "a P-Tuning v2 prefix has no place in llama.cpp's GGUF; use --format ggml"),
        (cfg.extra.get("alibi"), "ALiBi models (Baichuan-13B) are not llama.cpp's llama architecture"),
        (cfg.arch == "chatglm2" and cfg.num_heads * cfg.head_dim != cfg.hidden_size,
         "llama.cpp's chatglm needs kv_channels * num_attention_heads == hidden_size"),
    )
    for refused, why in refusals:
        if refused:
            raise ValueError(f"cannot write {ckpt.path} as GGUF: {why}")


def _write_gguf(path: Path, ckpt: Checkpoint, qtype: QType, progress: Callable) -> None:
    _check_gguf(ckpt)
    cfg = ckpt.config
    add_vocab = gguf_vocab(ckpt.load_tokenizer(), cfg.vocab_size)
    # llama.cpp rotates pairs, except in architectures that keep each head's halves (glm4moe)
    pairs = not cfg.rope_interleaved and not getattr(ckpt.family, "GGUF_ROPE_HALVES", False)
    names = file_tensors(ckpt, ckpt.family.GGUF_NAMES, _not_written(ckpt), pairs=pairs)
    tensors = _typed(names, qtype)
    extra = getattr(ckpt.family, "gguf_metadata", lambda _: {})(cfg)
    write_gguf(path, ckpt.family.GGUF_ARCHS[0], cfg, ckpt.path.stem, qtype, add_vocab, tensors,
               lambda t: _encoded(ckpt.path, t), progress, extra)


# ----- GGML (chatglm.cpp) -----

def _past_key_values(ckpt: Checkpoint) -> OutTensor | None:
    """The P-Tuning v2 prefix as chatglm.cpp stores it: keys and values [layers*2, kv_heads, pre_seq_len, head_dim]."""
    prefix = {c: assemble({c: names}, ckpt.get, ckpt.path)[c]
              for c, names in ckpt.layout.items() if c.startswith("prefix_")}
    kv = prefix_kv(ckpt.config, prefix, ckpt.path)  # [layers, 2, pre_seq_len, kv_heads, head_dim]
    if kv is None:
        return None
    past = kv.permute(0, 1, 3, 2, 4).reshape(-1, kv.shape[3], kv.shape[2], kv.shape[4])
    return OutTensor("past_key_values", tuple(past.shape), lambda: past, QType.F16)


def _write_ggml(path: Path, ckpt: Checkpoint, qtype: QType, progress: Callable) -> None:
    cfg = ckpt.config
    if ckpt.family.ARCH not in ("chatglm", "chatglm2") or qtype not in GGML_TYPES:
        raise ValueError(f"cannot write {ckpt.path} as GGML: chatglm.cpp's files hold ChatGLM-family models in "
                         f"{', '.join(t.name.lower() for t in GGML_TYPES)}; use --format gguf")
    tok = ckpt.load_tokenizer()
    data = ggml_tokenizer(tok)
    past = _past_key_values(ckpt)
    tensors = ([past] if past else []) + _typed(file_tensors(ckpt, ckpt.family.HF_NAMES, _not_written(ckpt)), qtype)
    record = dict(dtype=qtype.value, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                  num_kv_heads=cfg.num_kv_heads, num_layers=cfg.num_layers, ffn_size=cfg.ffn_size,
                  norm_eps=cfg.norm_eps, num_virtual_tokens=past.shape[2] if past else 0, rope_theta=cfg.rope_theta,
                  max_length=cfg.max_position, eos_token_id=(cfg.eos_token_ids or (-1,))[0],
                  pad_token_id=tok.specials.get(PAD_TOKENS.get(cfg.family, "<unk>"), -1))
    with open(path, "wb") as f:
        write_ggml(f, GGML_FAMILIES.get(cfg.family, cfg.family), record, data,
                   ((t.name, t.shape, _encoded(ckpt.path, t), t.qtype) for t in progress(tensors)))


WRITERS = {"gguf": _write_gguf, "ggml": _write_ggml}


def convert(src: str | Path, out: str | Path, qtype: str | QType = "q4_0", fmt: str = "gguf",
            lora: str | Path | None = None, progress: bool = True) -> Path:
    """Write `src` (an HF folder, GGUF or GGML file; with `lora` merged) to `out` in `qtype`.

    The file is written under a temporary name in the same folder and renamed when complete, so an
    error or Ctrl-C leaves no partial `out`.
    """
    if fmt not in WRITERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(WRITERS)}")
    qt, out = qtype_of(qtype), Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder to write {out.name} in")
    ckpt = open_checkpoint(src, lora)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")  # created by the writer, with the umask's mode

    def bar(tensors: list[OutTensor]) -> Iterable[OutTensor]:
        return tqdm(tensors, desc=f"{out.name} ({qt.name.lower()})", unit="tensor", disable=not progress)

    try:
        WRITERS[fmt](tmp, ckpt, qt, bar)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def quantized_weights(ckpt: Checkpoint, qtype: str | QType) -> dict[str, Weight]:
    """The checkpoint's canonical weights with every 2-D one quantized as it is read (runtime quantization).

    One tensor is in float32 at a time; a progress bar shows after two seconds.
    """
    qt = qtype_of(qtype)
    if qt.name.lower() not in RUNTIME_QTYPES:
        raise ValueError(f"{qtype!r} is not a block type to quantize to; expected one of {', '.join(RUNTIME_QTYPES)}")
    weights: dict[str, Weight] = {}
    for canon in tqdm(ckpt.layout, desc=f"quantizing to {qt.name.lower()}", unit="tensor", delay=2, leave=False):
        w = assemble({canon: ckpt.layout[canon]}, ckpt.get, ckpt.path, ckpt.transforms)[canon]
        target = target_type(tuple(w.shape), qt)
        # MoE routers stay float, as llama.cpp keeps them: a rounded score can send a token to another expert
        keep = canon.startswith("prefix_") or canon.endswith(".router")
        if target == qt and not keep and not (isinstance(w, QTensor) and w.qtype == qt):
            w = QTensor(torch.from_numpy(encode(w, qt)), qt, tuple(w.shape))
        weights[canon] = w
    return weights


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.input, args.output, args.type, args.format, args.lora)
    print(f"wrote {out} ({args.format}, {args.type}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `chatglm convert` on the CLI's subparsers."""
    p = subparsers.add_parser("convert", help="write a quantized GGUF (llama.cpp) or GGML (chatglm.cpp) file")
    p.add_argument("-i", "--input", required=True, metavar="HF_FOLDER_OR_FILE",
                   help="Hugging Face folder, GGUF or GGML file to convert")
    p.add_argument("-t", "--type", default="q4_0", choices=list(NAMES), help="weight type (default q4_0)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    p.add_argument("-l", "--lora", default=None, metavar="LORA_FOLDER", help="PEFT LoRA adapter to merge first")
    p.add_argument("--format", default="gguf", choices=list(WRITERS),
                   help="gguf (llama.cpp, default) or ggml (chatglm.cpp)")
    p.set_defaults(func=cmd_convert)
    return p
