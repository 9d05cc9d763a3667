"""Tokenizers written into other files: GGUF metadata as llama.cpp's converter writes it, and the
bytes chatglm.cpp embeds in its GGML files.

GGUF forms (facts of llama.cpp's convert_hf_to_gguf.py and src/llama-vocab.cpp):
- ChatGLM2/3, CodeGeeX2: a SentencePiece ("llama") vocabulary with scores and types; the special
  tokens after the pieces are control tokens, spelled [MASK] [gMASK] [sMASK] sop eop as THUDM's
  tokenizer spells them (llama.cpp recognises ChatGLM3's chat template by "[gMASK]sop").
- GLM-4: byte-level BPE ("gpt2") with pre-tokenizer "chatglm-bpe"; tiktoken has no merges, so each
  token's merge is the last pair its own bytes leave when BPE stops short of it.
- llama-family folders: tokenizer.json (BPE; the pre-tokenizer is whichever of llama.cpp's regex sets
  splits text as the file does) or a SentencePiece tokenizer.model; GGUF sources keep theirs.
Rows the tokenizer does not use (padded vocabularies) become unused "[PAD{id}]" tokens.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
from gguf import GGUFValueType, TokenType

from ..errors import ModelFileError
from ..tokenizers import (_BYTE_DECODER, _PRE, GGUFTokenizer, HFJsonTokenizer, SentencePieceGLM, SentencePieceTemplate,
                          TiktokenGLM4, Tokenizer, _adds_dummy_prefix, _bpe_backend, load_tokenizer)

_ROLE = "{% set role = {'tool': 'observation', 'interpreter': 'observation'}.get(m['role'], m['role']) %}"
GLM_TEMPLATES = {  # the prompts chat_format builds, as Jinja over the GGUF's token names
    "chatglm2": ("[gMASK]sop{% for m in messages if m['role'] in ('user', 'assistant') %}{% if m['role'] == 'user' %}"
                 "{{ '[Round ' ~ (loop.index0 // 2 + 1) ~ ']\\n\\n问：' ~ m['content'] ~ '\\n\\n答：' }}"
                 "{% else %}{{ m['content'] ~ '\\n\\n' }}{% endif %}{% endfor %}"),
    "chatglm3": ("[gMASK]sop{% for m in messages %}" + _ROLE + "{{ '<|' ~ role ~ '|>' ~ (m['metadata'] or '') ~ "
                 "'\\n ' ~ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"),
    "glm4": ("[gMASK]<sop>{% for m in messages %}" + _ROLE + "{{ '<|' ~ role ~ '|>' ~ (m['metadata'] or '') ~ "
             "'\\n' ~ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}
GLM_TEMPLATES["codegeex2"] = GLM_TEMPLATES["chatglm2"]
GLM_STOPS = {  # family -> eos, eot, eom token names (llama.cpp stops at each)
    "chatglm2": ("</s>", None, None), "codegeex2": ("</s>", None, None),
    "chatglm3": ("</s>", "<|user|>", "<|observation|>"), "glm4": ("<|endoftext|>", "<|user|>", "<|observation|>"),
}
SPM_SPELLING = {"<sop>": "sop", "<eop>": "eop"}  # THUDM's names for ChatGLM2/3's specials
SP_TYPES = (("is_unknown", TokenType.UNKNOWN), ("is_control", TokenType.CONTROL), ("is_unused", TokenType.UNUSED),
            ("is_byte", TokenType.BYTE))
UNFIT_PRE = {"gpt2", "roberta-bpe"}  # our reader's alias llama.cpp does not know; one that adds a separator token
PROBE = ("Hello world! I've 12345 apples, 3.14159 pears.\n\n  indented\tcode() {x: 'y'}  \r\n"
         "日本語 Ünïcödé 你好，世界 emoji 🚀 don't  REALLY   'LL")
_BYTE_ENCODER = {b: c for c, b in _BYTE_DECODER.items()}


@dataclass
class Vocab:
    """tokenizer.* metadata of a GGUF file."""

    model: str                                   # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[TokenType]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    ids: dict[str, int | None] = field(default_factory=dict)   # bos, eos, eot, eom, unk, pad
    flags: dict[str, bool] = field(default_factory=dict)       # add_bos_token, add_eos_token, add_space_prefix
    template: str | None = None

    def write(self, w: gguf.GGUFWriter, rows: int) -> None:
        if len(self.tokens) > rows:
            raise ValueError(f"the tokenizer has {len(self.tokens)} tokens but the model only {rows} embedding rows")
        pad = range(len(self.tokens), rows)
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens + [f"[PAD{i}]" for i in pad])
        w.add_token_types(self.types + [TokenType.UNUSED] * len(pad))
        if self.scores is not None:
            w.add_token_scores(self.scores + [0.0] * len(pad))
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for kind, id in self.ids.items():
            if id is not None:
                getattr(w, f"add_{kind}_token_id")(id)
        for flag, value in self.flags.items():
            getattr(w, f"add_{flag}")(value)
        if self.template:
            w.add_chat_template(self.template)


def _sp_pieces(sp: Any) -> tuple[list[str], list[TokenType], list[float]]:
    n = sp.get_piece_size()
    types = [next((t for test, t in SP_TYPES if getattr(sp, test)(i)), TokenType.NORMAL) for i in range(n)]
    return [sp.id_to_piece(i) for i in range(n)], types, [sp.get_score(i) for i in range(n)]


def _glm_ids(tok: Tokenizer) -> dict[str, int | None]:
    eos, eot, eom = GLM_STOPS[tok.family]
    return {"eos": tok.specials[eos], "eot": tok.specials.get(eot), "eom": tok.specials.get(eom)}


def _glm_sentencepiece(tok: SentencePieceGLM) -> Vocab:
    if tok.family not in GLM_TEMPLATES:
        raise ValueError("ChatGLM-6B has no llama.cpp architecture; convert it with --format ggml")
    tokens, types, scores = _sp_pieces(tok._sp)
    for name, i in sorted(tok.specials.items(), key=lambda item: item[1]):
        if i >= len(tokens):  # the specials THUDM's tokenizer adds after the pieces, in id order
            tokens.append(SPM_SPELLING.get(name, name))
            types.append(TokenType.CONTROL)
            scores.append(0.0)
    return Vocab("llama", tokens, types, scores, pre="chatglm-spm", ids=_glm_ids(tok),
                 flags={"add_bos_token": False, "add_space_prefix": tok.family != "codegeex2"},
                 template=GLM_TEMPLATES[tok.family])


def _byte_level(token: bytes) -> str:
    return "".join(_BYTE_ENCODER[b] for b in token)


def last_merge(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """The parts BPE leaves of a token's own bytes when every merge but the one making it is allowed."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = enumerate(zip(parts, parts[1:], strict=False))
        candidates = [(ranks[a + b], i) for i, (a, b) in pairs if a + b in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_tokens(tok: TiktokenGLM4) -> list[bytes]:
    """GLM-4's ranked tokens, rank order."""
    return [tok._enc.decode_single_token_bytes(i) for i in range(tok.vocab_size - len(tok.specials))]


def _glm4_tiktoken(tok: TiktokenGLM4) -> Vocab:
    pieces = tiktoken_tokens(tok)
    ranks = {p: i for i, p in enumerate(pieces)}
    merges = [" ".join(map(_byte_level, parts)) for p in pieces if len(p) > 1
              and len(parts := last_merge(p, ranks)) == 2]
    specials = sorted(tok.specials, key=tok.specials.__getitem__)
    tokens = [_byte_level(p) for p in pieces] + specials
    types = [TokenType.NORMAL] * len(pieces) + [TokenType.CONTROL] * len(specials)
    ids = _glm_ids(tok)
    ids.update(unk=ids["eos"], pad=ids["eos"])
    return Vocab("gpt2", tokens, types, merges=merges, pre="chatglm-bpe", ids=ids, flags={"add_bos_token": False},
                 template=GLM_TEMPLATES["glm4"])


def _decoration(tok: Tokenizer) -> dict[str, bool]:
    """Whether encoding adds bos / eos, seen from what encode(add_special_tokens=True) does."""
    bare, full = tok.encode("a"), tok.encode("a", add_special_tokens=True)
    return {"add_bos_token": tok.bos_id is not None and full[:1] == [tok.bos_id] != bare[:1],
            "add_eos_token": tok.eos_id is not None and full[-1:] == [tok.eos_id] != bare[-1:]}


def _llama_ids(tok: Tokenizer) -> dict[str, int | None]:
    """bos and eos; and GLM-4.5's other stops (a template folder's generation_config lists them), as llama.cpp's
    converter keeps them: <|user|> as end of turn, <|observation|> (a tool call's end) as end of message."""
    ids = {"bos": tok.bos_id, "eos": tok.eos_id}
    _, eot, eom = GLM_STOPS["glm4"]
    for key, name in (("eot", eot), ("eom", eom)):
        if tok.specials.get(name) in tok.eos_ids:
            ids[key] = tok.specials[name]
    return ids


def _pre_tokenizer(tok: HFJsonTokenizer, vocab: dict[str, int], merges: list[str], ignore_merges: bool) -> str:
    """The llama.cpp pre-tokenizer name whose splitting gives this tokenizer's ids on a probe text."""
    expected = tok.encode(PROBE)
    tried = set()
    for name, (regexes, ignore) in _PRE.items():
        key = (tuple(regexes), ignore)
        if ignore != ignore_merges or key in tried or name in UNFIT_PRE:
            continue
        tried.add(key)
        if _bpe_backend(vocab, merges, name, tok.path).encode(PROBE, add_special_tokens=False).ids == expected:
            return name
    raise ModelFileError(tok.path, "its pre-tokenizer splits text unlike any of llama.cpp's; it cannot be "
                                   "embedded in a GGUF file faithfully")


def _hf_json(tok: HFJsonTokenizer) -> Vocab:
    data = json.loads(tok._backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        model_file = tok.path.parent / "tokenizer.model"  # Llama-2 style folders keep the SentencePiece original
        if model_file.is_file():
            return _sentencepiece(load_tokenizer(model_file, family="llama"))
        raise ModelFileError(tok.path, "only byte-level BPE tokenizer.json files (or a SentencePiece "
                                       "tokenizer.model beside them) can be written to GGUF")
    names = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    names.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(max(names) + 1):
        tokens.append(names.get(i, f"[PAD{i}]"))
        types.append(TokenType.UNUSED if i not in names else TokenType.NORMAL if i not in added
                     else TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = _pre_tokenizer(tok, vocab, merges, bool(model.get("ignore_merges")))
    return Vocab("gpt2", tokens, types, merges=merges, pre=pre, ids=_llama_ids(tok), flags=_decoration(tok),
                 template=tok.chat_template)


def _sentencepiece(tok: SentencePieceTemplate) -> Vocab:
    tokens, types, scores = _sp_pieces(tok._sp)
    return Vocab("llama", tokens, types, scores, ids=_llama_ids(tok),
                 flags=dict(_decoration(tok), add_space_prefix=_adds_dummy_prefix(tok._sp)), template=tok.chat_template)


def _copy_gguf(tok: GGUFTokenizer, w: gguf.GGUFWriter) -> None:
    """A GGUF source keeps its own tokenizer metadata as it is."""
    reader = gguf.GGUFReader(tok.path, "r")
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)


VOCABS: dict[type, Callable[[Any], Vocab]] = {
    SentencePieceGLM: _glm_sentencepiece, TiktokenGLM4: _glm4_tiktoken, HFJsonTokenizer: _hf_json,
    SentencePieceTemplate: _sentencepiece,
}


def gguf_vocab(tok: Tokenizer, rows: int) -> Callable[[gguf.GGUFWriter], None]:
    """What writes `tok` into a GGUF file's metadata for a model of `rows` embedding rows."""
    if isinstance(tok, GGUFTokenizer):
        return lambda w: _copy_gguf(tok, w)
    make = VOCABS.get(type(tok))
    if make is None:
        raise ModelFileError(tok.path, f"a {type(tok).__name__} tokenizer cannot be written to GGUF")
    vocab = make(tok)
    return lambda w: vocab.write(w, rows)


def ggml_tokenizer(tok: Tokenizer) -> bytes:
    """chatglm.cpp's embedded tokenizer: the SentencePiece model proto, or GLM-4's tiktoken ranks text."""
    if isinstance(tok, SentencePieceGLM):
        return tok._sp.serialized_model_proto()
    if isinstance(tok, TiktokenGLM4):
        return b"".join(base64.b64encode(p) + b" %d\n" % i for i, p in enumerate(tiktoken_tokens(tok)))
    raise ModelFileError(tok.path, f"chatglm.cpp files embed a ChatGLM SentencePiece model or GLM-4's tiktoken "
                                   f"ranks; this model's tokenizer is a {type(tok).__name__}")
