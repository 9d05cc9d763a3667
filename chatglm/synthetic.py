"""Random-weight GGUF files of real model shapes, so speed can be measured without the real weights.

The blocks are random bytes with a fixed small scale (no quantization pass: a 6B file is written
in seconds), in llama.cpp's own `chatglm` / `llama` layouts, with the default model's vocabulary
padded to the shape's size so llama.cpp loads the same file for a side-by-side run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import TokenType

from .config import LatentSpec, ModelConfig, MoESpec
from .default_model import default_model_path
from .loaders.gguf import read_gguf
from .loaders.gguf_writer import OutTensor, write_gguf
from .loaders.vocab_writer import Vocab
from .quant import FLOAT_TYPES, QTensor, qtype_of

SHAPES = {
    "chatglm3-6b": dict(arch="chatglm", hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, head_dim=128,
                        ffn_size=13696, vocab_size=65024),
    "glm4-9b": dict(arch="chatglm", hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128,
                    ffn_size=13696, vocab_size=151552),
    # GLM-4-9B-chat's attention and context (40 layers, 2 key heads of 128, 131,072 tokens) at a narrow width:
    # its KV cache and scheduling at their real size, without a 9B model's compute
    "glm4-9b-attention": dict(arch="chatglm", hidden_size=256, num_layers=40, num_heads=2, num_kv_heads=2, head_dim=128,
                              ffn_size=512, vocab_size=49152, max_position=131072),
    "chatglm-tiny": dict(arch="chatglm", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                         ffn_size=512, vocab_size=49152),  # for tests
    "llama-7b": dict(arch="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                     ffn_size=11008, vocab_size=49152),
}
# The newer GLM generations, written through their own model files' GGUF tables (q/k/v, post norms, expert stacks,
# latent attention as llama.cpp lays them out): the real models' config.json sizes
FAMILY_SHAPES = {
    "glm4-9b-0414": dict(arch="glm4", hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128,
                         ffn_size=13696, vocab_size=151552, rope_dim=64, rope_interleaved=True, qkv_bias=True,
                         post_norms=True),
    "glm-4.7-flash": dict(arch="glm4_moe_lite", hidden_size=2048, num_layers=47, num_heads=20, num_kv_heads=20,
                          head_dim=256, ffn_size=10240, vocab_size=154880, rope_dim=64, rope_interleaved=True,
                          moe=MoESpec(64, 4, 1536, 1536, scaling=1.8, dense_layers=(0,)),
                          latent=LatentSpec(kv_rank=512, q_rank=768, nope_dim=192, value_dim=256, scale=256 ** -0.5)),
    # GLM-4.5-Air (zai-org/GLM-4.5-Air config.json: no QK norm, one expert group, routed_scaling_factor 1.0, one
    # shared expert, first_k_dense_replace 1, rope_theta 1e6); 46 layers are about 57 GB in q4_0: use
    # --synthetic-layers (each MoE layer ~1.26 GB, the first, dense one ~0.14 GB, embedding and head ~0.7 GB)
    "glm-4.5-air": dict(arch="glm4_moe", hidden_size=4096, num_layers=46, num_heads=96, num_kv_heads=8, head_dim=128,
                        ffn_size=10944, vocab_size=151552, rope_dim=64, rope_theta=1e6, qkv_bias=True,
                        moe=MoESpec(128, 8, 1408, 1408, dense_layers=(0,))),
    "glm4-tiny": dict(arch="glm4", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                      ffn_size=512, vocab_size=49152, rope_dim=32, rope_interleaved=True, qkv_bias=True,
                      post_norms=True),  # for tests
    "glm4-moe-tiny": dict(arch="glm4_moe", hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64,
                          ffn_size=512, vocab_size=49152, rope_dim=32, qkv_bias=True, qk_norm=True,
                          moe=MoESpec(8, 2, 128, 128, scaling=1.5, dense_layers=(0,))),  # for tests, with QK norm
    "glm4-moe-lite-tiny": dict(arch="glm4_moe_lite", hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=4,
                               head_dim=96, ffn_size=512, vocab_size=49152, rope_dim=32, rope_interleaved=True,
                               moe=MoESpec(8, 2, 128, 128, scaling=1.8, dense_layers=(0,)),
                               latent=LatentSpec(kv_rank=64, q_rank=128, nope_dim=64, value_dim=64, scale=96 ** -0.5)),
}
# chatglm.cpp's GGML .bin files (GLM v1 has no llama.cpp architecture), written by our converter from random blocks
# so that ours and chatglm.cpp run the same file: each shape's config.json, and a SentencePiece tokenizer made to
# measure (the real one's piece count, its special tokens at their real ids)
_CHATGLM_6B = dict(model_type="chatglm", position_encoding_2d=True, vocab_size=130528, hidden_size=4096,
                   num_attention_heads=32, num_layers=28, inner_hidden_size=16384, layernorm_epsilon=1e-5,
                   max_sequence_length=2048, bos_token_id=130004, eos_token_id=130005, mask_token_id=130000,
                   gmask_token_id=130001, pad_token_id=3)
_ICE_TEXT = (130344, {1: "<s>", 2: "</s>", 3: "<pad>", 130000: "[MASK]", 130001: "[gMASK]", 130002: "[sMASK]",
                      130004: "<sop>", 130005: "<eop>"})  # ice_text.model: its pieces, its control pieces
_CHATGLM3_6B = {"model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b", "multi_query_attention": True,
                "padded_vocab_size": 65024, "hidden_size": 4096, "num_attention_heads": 32, "multi_query_group_num": 2,
                "kv_channels": 128, "num_layers": 28, "ffn_hidden_size": 13696, "layernorm_epsilon": 1e-5,
                "seq_length": 8192, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "eos_token_id": 2}
GGML_SHAPES = {
    "chatglm-6b": (_CHATGLM_6B, _ICE_TEXT),
    # ChatGLM3-6B as chatglm.cpp's file (its tokenizer.model: 64789 pieces, the special tokens after them)
    "chatglm3-6b-ggml": (_CHATGLM3_6B, (64789, {1: "<s>", 2: "</s>"})),
    "chatglm-6b-tiny": (dict(_CHATGLM_6B, hidden_size=256, num_attention_heads=4, num_layers=2,
                             inner_hidden_size=1024), _ICE_TEXT),  # for tests
}
SCALES = {QType.Q4_0: 0.004, QType.Q4_1: 0.004, QType.Q5_0: 0.002, QType.Q5_1: 0.002, QType.Q8_0: 0.0002}


def _tensors(shape: dict, cfg: ModelConfig, qtype: QType) -> list[OutTensor]:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [OutTensor("token_embd.weight", (cfg.vocab_size, h), None, qtype), OutTensor("output_norm.weight", (h,), None),
           OutTensor("output.weight", (cfg.vocab_size, h), None, qtype)]
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        out += [OutTensor(b + "attn_norm.weight", (h,), None), OutTensor(b + "ffn_norm.weight", (h,), None),
                OutTensor(b + "attn_output.weight", (h, q), None, qtype),
                OutTensor(b + "ffn_down.weight", (h, cfg.ffn_size), None, qtype)]
        if shape["arch"] == "chatglm":
            out += [OutTensor(b + "attn_qkv.weight", (q + 2 * kv, h), None, qtype),
                    OutTensor(b + "attn_qkv.bias", (q + 2 * kv,), None),
                    OutTensor(b + "ffn_up.weight", (2 * cfg.ffn_size, h), None, qtype)]
        else:
            out += [OutTensor(b + f"attn_{p}.weight", (n, h), None, qtype) for p, n in (("q", q), ("k", kv), ("v", kv))]
            out += [OutTensor(b + f"ffn_{p}.weight", (cfg.ffn_size, h), None, qtype) for p in ("gate", "up")]
    return out


def _random_data(t: OutTensor, rng: np.random.Generator) -> np.ndarray:
    """Random codes with one fixed scale per block; norms are ones, biases small."""
    if len(t.shape) == 1:
        return (np.ones(t.shape) if t.name.endswith("norm.weight") else rng.normal(0, 0.02, t.shape)).astype(np.float32)
    if t.qtype in (QType.F32, QType.F16):
        return rng.normal(0, 0.02, t.shape).astype(np.float32 if t.qtype == QType.F32 else np.float16)
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    blocks = rng.integers(0, 256, (t.shape[0], t.shape[1] // block, size), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(SCALES[t.qtype]).tobytes(), np.uint8)
    if t.qtype in (QType.Q4_1, QType.Q5_1):  # the block minimum: centre the values on zero
        blocks[..., 2:4] = np.frombuffer(np.float16(-8 * SCALES[t.qtype]).tobytes(), np.uint8)
    return blocks.reshape(t.shape[0], -1)


def _default_vocab() -> Vocab:
    f = read_gguf(default_model_path()).meta  # our one-pass reader: gguf.GGUFReader takes seconds here
    return Vocab(model=f["tokenizer.ggml.model"], tokens=f["tokenizer.ggml.tokens"],
                 types=[TokenType(t) for t in f["tokenizer.ggml.token_type"]], merges=f.get("tokenizer.ggml.merges"),
                 pre=f.get("tokenizer.ggml.pre"), ids={"bos": f.get("tokenizer.ggml.bos_token_id"),
                                                      "eos": f.get("tokenizer.ggml.eos_token_id")})


def _random_tensors(decoder: Any, cfg: ModelConfig,
                    q: QType) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Any]]:
    """The canonical tensors `decoder` needs for `cfg` (optional ones it does not need left out), and a getter
    that draws each at random: matrices as blocks of type q, vectors and MoE routers as float32 (as files keep
    them)."""
    required = decoder.required(cfg)
    sizes = {c: s for c, s in decoder.expected_shapes(cfg).items() if required.get(c.rsplit(".", 1)[-1], True)}
    rng = np.random.default_rng(0)

    def get(canon: str):
        blocks = len(sizes[canon]) == 2 and not canon.endswith("router")
        t = OutTensor(canon, sizes[canon], None, q if blocks else QType.F32)
        data = torch.from_numpy(_random_data(t, rng))
        return QTensor(data, q, t.shape) if t.qtype == q and q not in FLOAT_TYPES else data

    return sizes, get


def _family_file(path: Path, name: str, q: QType, layers: int | None = None) -> None:
    """A family's random-weight file through its own GGUF table and the converter's writer: each canonical
    tensor drawn as random blocks (MoE routers as float32, as files keep them)."""
    from .convert import ROUTER_NAMES, encode, target_type
    from .loaders import Checkpoint
    from .loaders.gguf_writer import file_tensors
    from .models import FAMILIES

    shape = {**FAMILY_SHAPES[name], **({"num_layers": layers} if layers else {})}
    family = FAMILIES[shape.pop("arch")]
    cfg = ModelConfig(arch=family.ARCH, family="gguf", norm_eps=1e-5, max_position=8192, **shape)
    sizes, get = _random_tensors(family.DECODER, cfg, q)
    vocab = _default_vocab()
    ckpt = Checkpoint(path, family, cfg, {c: [c] for c in sizes}, family.GGUF_NAMES, get, None, lambda: None)
    tensors = list(file_tensors(ckpt, family.GGUF_NAMES))
    for t in tensors:
        t.qtype = QType.F32 if t.name.endswith(ROUTER_NAMES) else target_type(t.shape, q)
    write_gguf(path, family.GGUF_ARCHS[0], cfg, f"synthetic {name}", q, lambda w: vocab.write(w, cfg.vocab_size),
               tensors, lambda t: encode(t.load(), t.qtype), extra=getattr(family, "gguf_metadata", lambda _: {})(cfg))


def sentencepiece_model(pieces: int, specials: dict[int, str]) -> bytes:
    """A SentencePiece model of exactly `pieces` pieces with `specials` at their ids: <unk> at 0, the specials and
    placeholders up to the last special as control pieces, then user-defined placeholders and a few hundred BPE
    pieces learned from the alphabet."""
    import io

    import sentencepiece as spm

    learned = 200
    top = max(specials) + 1
    controls = [specials.get(i, f"<synthetic_{i}>") for i in range(1, top)]
    users = [f"<synthetic_{i}>" for i in range(top, pieces - learned)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = [" ".join(letters[i:] + letters[:i] for i in range(len(letters)))] * 50
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=pieces, model_type="bpe",
                                   control_symbols=controls,
                                   user_defined_symbols=users, unk_id=0, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    return out.getvalue()


def _ggml_file(path: Path, name: str, q: QType) -> None:
    """A GLM v1 file as `chatglm convert --format ggml` writes it, from a checkpoint of random blocks."""
    from .convert import WRITERS
    from .loaders import Checkpoint
    from .models import family_for_hf
    from .models.layers import Decoder
    from .tokenizers import tokenizer_from_bytes

    config, (pieces, specials) = GGML_SHAPES[name]
    family = family_for_hf(config, path)
    cfg = family.config_from_hf(config, path)
    sizes, get = _random_tensors(getattr(family, "DECODER", Decoder), cfg, q)  # the decoder as the loader picks it
    tokenizer = sentencepiece_model(pieces, specials)
    ckpt = Checkpoint(path, family, cfg, {c: [c] for c in sizes}, family.HF_NAMES, get, None,
                      lambda: tokenizer_from_bytes(tokenizer, cfg.family, path), format="ggml")
    WRITERS["ggml"](path, ckpt, q, lambda tensors: tensors)


def synthetic_file(name: str, qtype: str, folder: Path, layers: int | None = None) -> Path:
    """`synthetic_gguf`, or for the GGML shapes (chatglm.cpp's format) a .bin file: written once, reused after."""
    if name not in GGML_SHAPES:
        return synthetic_gguf(name, qtype, folder, layers)
    if layers is not None:
        raise ValueError(f"--synthetic-layers: the chatglm.cpp shape {name!r} is written at its own depth only")
    q = qtype_of(qtype)
    path = Path(folder) / f"synthetic-{name}-{q.name.lower()}.bin"
    if not path.is_file():
        _written(path, lambda partial: _ggml_file(partial, name, q))
    return path


def _written(path: Path, write) -> None:
    """write(partial), then the partial file renamed to `path`: no half-written file is ever reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    try:
        write(partial)
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)


# llama.cpp's K-quant mixes (what most downloaded GGUFs are), made by llama.cpp's own quantizer from the q8_0 file
K_MIXES = ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k")


def llama_quantized(src: Path, mix: str, out: Path) -> Path:
    """`src` requantized by llama.cpp (llama-cpp-python's llama_model_quantize) to a mix such as "q4_k_m"; where a
    matrix's width is not a multiple of 256 llama.cpp picks a legacy type for it instead."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"the {mix} mix is made by llama.cpp's quantizer: install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = 2
    params.allow_requantize = True  # from a block file: llama.cpp decodes it to float first
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp could not quantize {src} to {mix}")
    return out


def synthetic_gguf(name: str, qtype: str, folder: Path, layers: int | None = None) -> Path:
    """The file for shape `name` and type `qtype` (a ggml type, or a K-quant mix of K_MIXES), written once into
    `folder` and reused after; `layers` keeps the shape's widths with fewer (or more) layers, so a large model's
    per-layer speed is measured in small files."""
    if name not in SHAPES and name not in FAMILY_SHAPES:
        known = ", ".join([*SHAPES, *FAMILY_SHAPES, *GGML_SHAPES])
        raise ValueError(f"unknown synthetic shape {name!r}; expected one of {known}")
    if qtype.lower() in K_MIXES:
        path = Path(folder) / f"synthetic-{name}{f'-{layers}l' if layers else ''}-{qtype.lower()}.gguf"
        if not path.is_file():
            src = synthetic_gguf(name, "q8_0", folder, layers)
            _written(path, lambda partial: llama_quantized(src, qtype, partial))
        return path
    least = 2 if "moe" in FAMILY_SHAPES.get(name, {}) else 1  # the MoE shapes' first layer is dense
    if layers is not None and layers < least:
        raise ValueError(f"--synthetic-layers {layers}: give at least {least} for {name}")
    q = qtype_of(qtype)
    path = Path(folder) / f"synthetic-{name}{f'-{layers}l' if layers else ''}-{q.name.lower()}.gguf"
    if path.is_file():
        return path
    if name in FAMILY_SHAPES:
        _written(path, lambda partial: _family_file(partial, name, q, layers))
        return path
    shape = {**SHAPES[name], **({"num_layers": layers} if layers else {})}
    cfg = ModelConfig(arch=shape["arch"], family="gguf", norm_eps=1e-5,
                      rope_dim=shape["head_dim"] // 2 if shape["arch"] == "chatglm" else 0,
                      **{"max_position": 8192, **{k: v for k, v in shape.items() if k != "arch"}})
    vocab, rng = _default_vocab(), np.random.default_rng(0)
    _written(path, lambda partial: write_gguf(partial, shape["arch"], cfg, f"synthetic {name}", q,
                                              lambda w: vocab.write(w, cfg.vocab_size), _tensors(shape, cfg, q),
                                              lambda t: _random_data(t, rng)))
    return path
