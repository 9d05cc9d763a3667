"""Tokenizers for every family, and a streaming detokenizer.

- ChatGLM-6B, ChatGLM2/3, CodeGeeX2: SentencePiece models plus the family's special ids
  (see ../shared/tokenizers/README.md for the rules).
- GLM-4: a tiktoken BPE ranks file.
- GGUF files: the file's own vocabulary, built with the `tokenizers` library so that ids match llama.cpp's
  (byte-level BPE with llama.cpp's pre-tokenizer regexes, or SentencePiece-style merges ranked by score).
- Hugging Face folders of the llama family: tokenizer.json (or a SentencePiece tokenizer.model) with the
  chat template from tokenizer_config.json.

Every tokenizer offers the same few methods; the chat prompt of each family is built in chat_format.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm
import tiktoken
import tokenizers as hf
from gguf import TokenType
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from . import chat_format
from .chat_format import Segment
from .errors import ModelFileError
from .markup import MARKUP_TOKENS
from .messages import MessageLike, as_messages

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "codegeex2", "llama")
GLM_FAMILIES = FAMILIES[:5]


class Tokenizer:
    """Text to ids and back for one vocabulary, plus its family's chat prompt.

    Subclasses supply the vocabulary through ``_encode_text`` (plain text, no special tokens), ``decode`` and
    ``token_text``; this class adds special-token parsing, the family's decoration and chat prompts.
    """

    family: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None              # the file's own end-of-sequence id (llama family)
    eos_ids: frozenset[int] = frozenset()  # every id that ends a reply
    chat_template: str | None = None       # llama family: the file's Jinja template (None: ChatML)
    path: Path
    _prefix: Sequence[int] = ()            # decoration of encode(add_special_tokens=True)
    _suffix: Sequence[int] = ()
    # Whether encode() reads special-token text ("<|user|>", "[gMASK]") as control ids by default. THUDM's
    # official tokenizers keep it as text; llama.cpp and Hugging Face tokenizers parse it.
    parse_special: bool = True

    def _index_specials(self, specials: Mapping[str, int]) -> None:
        """Record the special tokens, searched in raw text longest first (as llama.cpp) where parsing is asked."""
        self.specials: dict[str, int] = dict(specials)
        self._names = {i: name for name, i in self.specials.items()}
        self._parsed = sorted(self.specials, key=len, reverse=True)

    # ----- subclass hooks -----

    def _encode_text(self, text: str) -> list[int]:
        """Ids of plain text: no special-token parsing, no decoration."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids; special and out-of-vocabulary ids produce no text."""
        raise NotImplementedError

    def token_text(self, id: int) -> str:
        """One token as readable text: special names as is, partial UTF-8 as <0xNN> bytes."""
        raise NotImplementedError

    def _hold(self, text: str) -> int:
        """How many chars at the end of settled text a later id may still change (family rules)."""
        return 0

    def _piece(self, id: int) -> bytes:
        """The bytes an ordinary (not special) token stands for, leading space and partial UTF-8 kept."""
        raise NotImplementedError

    # ----- shared behaviour -----

    def split_specials(self, text: str) -> list[Segment]:
        """Raw text cut at special-token text: plain ``str`` pieces and special ids.

        Each special token is searched in every remaining piece, longest token first, as llama.cpp does.
        """
        parts: list[Segment] = [text] if text else []
        for name in self._parsed:
            if not any(isinstance(p, str) and name in p for p in parts):
                continue
            out: list[Segment] = []
            for p in parts:
                if isinstance(p, int) or name not in p:
                    out.append(p)
                    continue
                for k, piece in enumerate(p.split(name)):
                    if k:
                        out.append(self.specials[name])
                    if piece:
                        out.append(piece)
            parts = out
        return parts

    def encode(self, text: str, add_special_tokens: bool = False, *, parse_special: bool | None = None) -> list[int]:
        """Ids of raw text, as the family's official tokenizer gives them.

        add_special_tokens=True adds the family's decoration: ChatGLM-6B appends [gMASK] <sop>, ChatGLM2/3,
        CodeGeeX2 and GLM-4 prefix them, GGUF files add bos (and eos) as their metadata says.
        parse_special: whether special-token text in ``text`` becomes control ids; None takes the family's
        default (``self.parse_special``: GLM families keep it as text, llama-family vocabularies parse it).
        """
        parse = self.parse_special if parse_special is None else parse_special
        ids = self._encode_segments(self.split_specials(text) if parse else [text] if text else [])
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids

    def encode_chat(self, messages: Sequence[MessageLike], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] = (), template_kwargs: Mapping[str, Any] = {}) -> list[int]:
        """Prompt ids of a conversation; message content always stays plain text. tools (OpenAI's
        ``{"type": "function", "function": ...}`` entries) and template_kwargs (``{"enable_thinking": False}``)
        go to a Jinja chat template."""
        segments = chat_format.build_prompt(self, as_messages(list(messages)), add_generation_prompt, tools,
                                            template_kwargs)
        return self._encode_segments(segments)

    def _encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        ids: list[int] = []
        for s in segments:
            if isinstance(s, str):
                ids += self._encode_text(s)
            else:
                ids.append(s)
        return ids

    def token_bytes(self, id: int) -> bytes:
        """The bytes one token adds to the text (b"" for a special id), as grammar engines and logprobs need them."""
        _check_id(self, id)
        return b"" if id in self._names else self._piece(id)

    def unsettled(self, text: str) -> int:
        """How many chars at the end of decode(ids) may still change when more ids follow."""
        settled = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes as U+FFFD until it completes
        return len(text) - len(settled) + self._hold(settled)

    @property
    def bos_text(self) -> str:
        return "" if self.bos_id is None else self.token_text(self.bos_id)

    @property
    def eos_text(self) -> str:
        return "" if self.eos_id is None else self.token_text(self.eos_id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family} vocab={self.vocab_size} from {self.path}>"


def _bytes_text(data: bytes) -> str:
    """Readable form of a token's bytes: the text, or <0xNN> per byte when it is not whole UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in data)


def _sp_piece_bytes(sp: spm.SentencePieceProcessor, id: int) -> bytes:
    piece = sp.id_to_piece(id)
    if sp.is_byte(id):
        return bytes([int(piece[3:5], 16)])
    return b"" if sp.is_control(id) or sp.is_unknown(id) else piece.replace("\u2581", " ").encode()


def _check_id(tok: Tokenizer, id: int) -> None:
    if not 0 <= id < tok.vocab_size:
        raise ValueError(f"token id {id} is outside the vocabulary (0..{tok.vocab_size - 1})")


# ===== ChatGLM-6B, ChatGLM2/3, CodeGeeX2: SentencePiece =====

GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

_PUNCT = [(re.compile(f"([\u4e00-\u9fff]){re.escape(h)}"), re.compile(f"{re.escape(h)}([\u4e00-\u9fff])"), f)
          for h, f in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))]
_BLANKS = re.compile(r" {2,80}")
_MARKERS = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")
_PARTIAL_MARKER = re.compile(r"<[|a-z_0-9]{0,11}$")


def cjk_punctuation(text: str) -> str:
    """Half-width , ! : ; ? next to a CJK ideograph become full-width (NFKC made them half-width on encode)."""
    for after_cjk, before_cjk, full in _PUNCT:
        text = after_cjk.sub(rf"\g<1>{full}", text)
        text = before_cjk.sub(rf"{full}\g<1>", text)
    return text


def chatglm_preprocess(text: str) -> str:
    """ChatGLM-6B writes newlines, tabs and runs of 2..80 spaces as tokens of their own."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return _BLANKS.sub(lambda m: f"<|blank_{len(m.group())}|>", text)


def chatglm_postprocess(text: str) -> str:
    def expand(m: re.Match) -> str:
        return " " * int(m.group(1)) if m.group(1) else ("\n" if m.group() == "<n>" else "\t")

    return _MARKERS.sub(expand, text)


class SentencePieceGLM(Tokenizer):
    """ChatGLM-6B (ice_text.model), ChatGLM2/3 and CodeGeeX2 (tokenizer.model) with their special ids.

    ChatGLM-6B's newline, tab and blank markers (<n>, <|tab|>, <|blank_N|>) are ordinary pieces of its model,
    so that text typed by a user reads as whitespace, as it does in chatglm.cpp and transformers.
    """

    parse_special = False  # THUDM's tokenizers (and chatglm.cpp's) encode typed special tokens as text

    def __init__(self, path: Path, sp: spm.SentencePieceProcessor, family: str):
        self.path, self.family, self._sp = path, family, sp
        self._pieces = n = sp.get_piece_size()
        specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        extra: tuple[str, ...] = ()  # ChatGLM-6B's special tokens are pieces; later models add them after
        if family != "chatglm":
            extra = GLM2_SPECIALS + (GLM3_ROLES if family == "chatglm3" else ())
            specials.update({name: n + k for k, name in enumerate(extra)})
        self._index_specials(specials)
        decoration = [specials["[gMASK]"], specials["<sop>"]]
        if family == "chatglm":
            self._suffix = decoration
        else:
            self._prefix = decoration
        self.vocab_size = n + len(extra)
        self.bos_id = specials["<sop>"]
        self.eos_ids = chat_format.stop_ids(family, specials)

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(chatglm_preprocess(text) if self.family == "chatglm" else text)

    def decode(self, ids: Sequence[int]) -> str:
        """Special ids give no text (chatglm.cpp prints ChatGLM3's [gMASK]/sop/eop by name; nobody wants them)."""
        text = self._sp.decode([i for i in ids if 0 <= i < self._pieces])
        if self.family == "chatglm":
            text = chatglm_postprocess(text)
        return text if self.family == "chatglm3" else cjk_punctuation(text)

    def token_text(self, id: int) -> str:
        _check_id(self, id)
        if id in self._names:
            return self._names[id]
        piece = self._sp.id_to_piece(id)
        return piece if self._sp.is_byte(id) else piece.replace("\u2581", " ")

    def _piece(self, id: int) -> bytes:
        if id >= self._pieces:
            return b""
        data = _sp_piece_bytes(self._sp, id)
        return chatglm_postprocess(data.decode("utf-8", "replace")).encode() if self.family == "chatglm" else data

    def _hold(self, text: str) -> int:
        if self.family == "chatglm3" or not text:
            return 0
        hold = 1 if text[-1] in ",!:;?" else 0  # becomes full-width if a CJK char follows
        if self.family == "chatglm":
            marker = _PARTIAL_MARKER.search(text)  # "<n", "<|bla": a marker may still complete
            hold = max(hold, len(marker.group()) if marker else 0)
        return hold


# ===== GLM-4: tiktoken =====

GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")


class TiktokenGLM4(Tokenizer):
    """GLM-4: tiktoken BPE; special-token text in raw text stays text (encode_ordinary), as in GLM-4's tests."""

    family = "glm4"
    parse_special = False

    def __init__(self, path: Path, ranks: dict[bytes, int]):
        self.path = path
        self._ranks = n = len(ranks)
        specials = {name: n + k for k, name in enumerate(GLM4_SPECIALS)}
        self._enc = tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        self._index_specials(specials)
        self._prefix = [specials["[gMASK]"], specials["<sop>"]]
        self.vocab_size = n + len(specials)
        self.bos_id = specials["<sop>"]
        self.eos_ids = chat_format.stop_ids("glm4", specials)

    def _encode_text(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([i for i in ids if 0 <= i < self._ranks])

    def token_text(self, id: int) -> str:
        _check_id(self, id)
        return self._names.get(id) or _bytes_text(self._enc.decode_single_token_bytes(id))

    def _piece(self, id: int) -> bytes:
        return self._enc.decode_single_token_bytes(id)


def read_tiktoken_ranks(path: Path, data: bytes | None = None) -> dict[bytes, int]:
    """A tiktoken ranks file (or its bytes, read elsewhere): one ``base64(token) rank`` per line."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelFileError(path, f"cannot be read ({e})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ModelFileError(path, f"line {number} is not 'base64 rank' ({e}); expected a tiktoken ranks "
                                       "file") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ModelFileError(path, "tiktoken ranks are not 0..n-1 without gaps")
    return ranks


# ===== llama family: GGUF vocabularies, Hugging Face tokenizer.json / tokenizer.model =====


class TemplateTokenizer(Tokenizer):
    """A llama-family vocabulary whose chat prompt comes from its own Jinja template (ChatML without one)."""

    family = "llama"

    def _set_stop_ids(self, eos_ids: Iterable[int | None], control: Iterable[str], vocab: Mapping[str, int]) -> None:
        self.eos_ids = chat_format.vocab_stop_ids(vocab, [self.eos_id, *eos_ids], control)


# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (src/llama-vocab.cpp); each regex of a list splits
# the pieces left by the one before, keeping both the matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DEEPSEEK_LETTERS = (  # the \u escapes are letters that Unicode normalization would rewrite
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
    "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿ"
    "ⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")  # these also add bos by default
_PRE: dict[str, tuple[list[str], bool]] = {  # name -> (regexes, ignore_merges)
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"), ([_GPT2], False)),
    **dict.fromkeys(_LLAMA3_NAMES, ([_LLAMA3], True)),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), ([_LLAMA3], False)),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    ([r"\p{N}", _GPT2], False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ([_QWEN2], False)),
    "deepseek-llm": ([r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+\z",
                      r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"], False),
}


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE writes byte b as itself when printable, else as chr(256 + k) in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + k): b for k, b in enumerate(b for b in range(256) if b not in printable)})
    return table


_BYTE_DECODER = _byte_decoder()
# str.translate table turning byte-level text into one char per byte, so that .encode("latin-1") gives the
# bytes; chars below 256 that stand for no byte map above 255 so that the fast path refuses them.
_BYTE_CHARS = {ord(c): b for c, b in _BYTE_DECODER.items()}
_BYTE_CHARS |= {c: 0x100 for c in range(256) if chr(c) not in _BYTE_DECODER}
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)  # recognised in raw text
_TYPE_VALUES = {t.value for t in TokenType}


def _token_types(tokens: list[str], raw: list[int] | None) -> list[int]:
    """Token types as llama.cpp uses them: end-of-turn names count as control tokens whatever the file says.
    Plain ints compare equal to TokenType members, and 150k of them are much faster to make."""
    raw = raw or [TokenType.NORMAL] * len(tokens)
    types = [t if t in _TYPE_VALUES else TokenType.UNDEFINED for t in raw]
    return [TokenType.CONTROL if t in chat_format.END_OF_TURN_NAMES else ty for t, ty in zip(tokens, types)]


def _bpe_backend(vocab: dict[str, int], merges: list[str], pre: str, path: Path) -> hf.Tokenizer:
    """Byte-level BPE from a GGUF vocabulary and merges, split first by llama.cpp's regexes for ``pre``."""
    if pre not in _PRE:
        warnings.warn(f"{path}: unknown pre-tokenizer {pre!r}; using gpt2's (token ids may differ from llama.cpp)",
                      stacklevel=3)
        pre = "gpt2"
    regexes, ignore_merges = _PRE[pre]
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # llama.cpp splits a merge at its first space after the first char
        a, b = m[:cut], m[cut + 1:]
        if cut > 0 and a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    backend = hf.Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def _spm_backend(vocab: dict[str, int], scores: Sequence[float]) -> hf.Tokenizer:
    """SentencePiece-style BPE: two adjacent pieces merge when they make a token, highest score first.

    That is llama.cpp's SPM tokenizer expressed as BPE merges (every split of every token into two tokens,
    ranked by the whole token's score); chars without a token fall back to <0xNN> byte tokens.
    """
    ranked = sorted((-scores[i], i, t[:k], t[k:]) for t, i in vocab.items() for k in range(1, len(t))
                    if t[:k] in vocab and t[k:] in vocab)
    backend = hf.Tokenizer(models.BPE(vocab, [(a, b) for _, _, a, b in ranked], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    return backend


class GGUFTokenizer(TemplateTokenizer):
    """A GGUF file's own vocabulary, tokenizing as llama.cpp does."""

    def __init__(self, path: Path, meta: Mapping[str, Any]):
        self.path = path
        kind = meta["tokenizer.ggml.model"]
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        n = self.vocab_size = len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        types = _token_types(tokens, meta.get("tokenizer.ggml.token_type"))
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in _SPECIAL_TYPES}
        self._index_specials(specials)

        if kind == "gpt2":
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise ModelFileError(path, "tokenizer.ggml.merges is missing (a gpt2 vocabulary needs its BPE merges)")
            pre = meta.get("tokenizer.ggml.pre") or "default"
            self._backend = _bpe_backend(vocab, merges, pre, path)
            self._space_prefix = False  # llama.cpp adds no space before BPE text
            add_bos_default = pre in _LLAMA3_NAMES
        else:
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
            self._backend = _spm_backend(vocab, scores)
            self._space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        # control tokens decode to nothing, except the tags of reasoning and tool calls, which replies are read by
        self._pieces = [t.encode() if t in MARKUP_TOKENS else self._piece_bytes(t, ty, kind == "gpt2")
                        for t, ty in zip(tokens, types)]

        self.bos_id = self._known_id(meta.get("tokenizer.ggml.bos_token_id"))
        self.eos_id = self._known_id(meta.get("tokenizer.ggml.eos_token_id"))
        if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and self.bos_id is not None:
            self._prefix = [self.bos_id]
        if meta.get("tokenizer.ggml.add_eos_token", False) and self.eos_id is not None:
            self._suffix = [self.eos_id]
        self.chat_template = meta.get("tokenizer.chat_template")
        extra_eos = [self._known_id(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eot", "eom")]
        control = [t for t, ty in zip(tokens, types) if ty == TokenType.CONTROL]
        self._set_stop_ids(extra_eos, control, vocab)

    def _known_id(self, id: Any) -> int | None:
        return int(id) if isinstance(id, int) and 0 <= id < self.vocab_size else None

    @staticmethod
    def _piece_bytes(text: str, kind: int, byte_level: bool) -> bytes:
        """The bytes a token stands for in decoded text (llama.cpp's token_to_piece without specials)."""
        if kind == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        if kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind != TokenType.NORMAL:
            return b""
        if byte_level:
            try:
                return text.translate(_BYTE_CHARS).encode("latin-1")
            except UnicodeEncodeError:  # a char outside the byte alphabet stands for its UTF-8 bytes
                return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode() for c in text)
        return text.replace("\u2581", " ").encode()

    def _encode_text(self, text: str) -> list[int]:
        # llama.cpp puts a space before every text piece of an SPM vocabulary (each follows a special or the start)
        return self._backend.encode(" " + text if self._space_prefix else text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self._pieces[i] for i in ids if 0 <= i < self.vocab_size]
        if self._space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # the space the encoder added
        return b"".join(pieces).decode("utf-8", errors="replace")

    def token_text(self, id: int) -> str:
        _check_id(self, id)
        return self._names.get(id) or _bytes_text(self._pieces[id])

    def _piece(self, id: int) -> bytes:
        return self._pieces[id]


def tokenizer_from_gguf(meta: Mapping[str, Any], path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file carries, from its metadata (the model loader passes what it already parsed)."""
    path = Path(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or not meta.get("tokenizer.ggml.tokens"):
        raise ModelFileError(path, "holds no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens are missing)")
    if kind not in ("gpt2", "llama"):
        raise ModelFileError(path, f"tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE) and "
                                   "'llama' (SentencePiece)")
    return GGUFTokenizer(path, meta)


def _token_content(value: Any) -> str | None:
    """A token in tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else tokenizer_config's chat_template (a string or a list of named templates)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _as_ids(value: Any) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


class HFJsonTokenizer(TemplateTokenizer):
    """A Hugging Face tokenizer.json, run by the `tokenizers` library, with the folder's chat template."""

    def __init__(self, path: Path, backend: hf.Tokenizer, config: Mapping[str, Any], generation: Mapping[str, Any]):
        self.path = path
        self._backend = backend
        backend.encode_special_tokens = True  # text pieces stay plain; we cut special tokens out first
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self._index_specials(added)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # the decoration the file's post-processor adds, found by encoding one letter with and without it
        bare = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        start = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), 0)
        self._prefix, self._suffix = full[:start], full[start + len(bare):]
        vocab = backend.get_vocab(with_added_tokens=True)
        self.bos_id = vocab.get(_token_content(config.get("bos_token")) or "")
        self.eos_id = vocab.get(_token_content(config.get("eos_token")) or "")
        self.chat_template = _chat_template(path.parent, config)
        self._set_stop_ids(_as_ids(generation.get("eos_token_id")), added, vocab)
        # special tokens decode to nothing, except the tags of reasoning and tool calls, which replies are read by
        self._hidden = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                 if t.special and t.content not in MARKUP_TOKENS)

    def _encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self._hidden],
                                    skip_special_tokens=False)

    def token_text(self, id: int) -> str:
        _check_id(self, id)
        if id in self._names:
            return self._names[id]
        text = self._backend.decode([id], skip_special_tokens=False)
        return self._backend.id_to_token(id) if "\ufffd" in text else text

    def _piece(self, id: int) -> bytes:
        token = self._backend.id_to_token(id) or ""
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            return GGUFTokenizer._piece_bytes(token, TokenType.BYTE, False)
        byte_level = isinstance(self._backend.decoder, decoders.ByteLevel)
        return GGUFTokenizer._piece_bytes(token, TokenType.NORMAL, byte_level)


class SentencePieceTemplate(TemplateTokenizer):
    """A llama-family folder with only a SentencePiece tokenizer.model (Baichuan, InternLM)."""

    def __init__(self, path: Path, sp: spm.SentencePieceProcessor, config: Mapping[str, Any],
                 generation: Mapping[str, Any], model_type: str | None = None):
        self.path, self._sp = path, sp
        n = self.vocab_size = sp.get_piece_size()
        specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        for name in chat_format.BUILTIN_ROLE_TOKENS.get(model_type or "", ()):
            if sp.piece_to_id(name) != sp.unk_id():
                specials[name] = sp.piece_to_id(name)
        for id, token in (config.get("added_tokens_decoder") or {}).items():
            if str(id).isdigit() and int(id) < n and _token_content(token):
                specials[_token_content(token)] = int(id)
        self._index_specials(specials)
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        if config.get("add_bos_token", True) and self.bos_id is not None:
            self._prefix = [self.bos_id]
        if config.get("add_eos_token", False) and self.eos_id is not None:
            self._suffix = [self.eos_id]
        self.chat_template = _chat_template(path.parent, config) or chat_format.BUILTIN_TEMPLATES.get(model_type or "")
        self._set_stop_ids(_as_ids(generation.get("eos_token_id")), specials, {sp.id_to_piece(i): i for i in range(n)})

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self._names])

    def token_text(self, id: int) -> str:
        _check_id(self, id)
        piece = self._sp.id_to_piece(id)
        return piece if id in self._names or self._sp.is_byte(id) else piece.replace("\u2581", " ")

    def _piece(self, id: int) -> bytes:
        return _sp_piece_bytes(self._sp, id)


# ===== loading =====


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(path, f"is not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


class _Folder:
    """What a model folder's config files say about its tokenizer."""

    def __init__(self, folder: Path):
        self.config = _read_json(folder / "config.json")
        self.tokenizer_config = _read_json(folder / "tokenizer_config.json")
        self.generation = _read_json(folder / "generation_config.json")
        keys = ("model_type", "architectures", "_name_or_path", "name_or_path", "auto_map", "tokenizer_class")
        self.hints = json.dumps([c.get(k) for c in (self.config, self.tokenizer_config) for k in keys]).lower()
        model_type = self.config.get("model_type")
        if "glm" in self.hints or "codegeex" in self.hints:
            self.glm: bool | None = True
        else:  # False: the config names another kind of model; None: it says nothing
            self.glm = False if model_type else None


def _has_gmask(sp: spm.SentencePieceProcessor) -> bool:
    return sp.piece_to_id("[gMASK]") != sp.unk_id()


def _adds_dummy_prefix(sp: spm.SentencePieceProcessor) -> bool:
    return sp.encode("a", out_type=str)[0].startswith("\u2581")


def _guess_sp_family(sp: spm.SentencePieceProcessor, hints: str) -> str:
    """ChatGLM-6B's model has [gMASK] as a piece; CodeGeeX2's adds no dummy prefix; ChatGLM3 shares ChatGLM2's file."""
    if _has_gmask(sp):
        return "chatglm"
    if not _adds_dummy_prefix(sp):
        return "codegeex2"
    return "chatglm3" if "chatglm3" in hints else "chatglm2"


def _sentencepiece_glm(path: Path, sp: spm.SentencePieceProcessor, family: str) -> SentencePieceGLM:
    """A GLM SentencePiece tokenizer, after checking that the model fits the family."""
    if _has_gmask(sp) != (family == "chatglm"):
        expected = ("ChatGLM-6B's ice_text.model ([gMASK] among its 130344 pieces)" if family == "chatglm"
                    else "a ChatGLM2/3-style tokenizer.model (special ids after its pieces)")
        raise ModelFileError(path, f"does not fit family {family!r}: expected {expected}, "
                                   f"found {sp.get_piece_size()} pieces")
    return SentencePieceGLM(path, sp, family)


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ModelFileError(path, "is not a tokenizer file: expected a SentencePiece model (ice_text.model, "
                                   "tokenizer.model), a GLM-4 tiktoken ranks file, a tokenizer.json or a .gguf "
                                   f"({str(e).strip()})") from None


def _load_file(path: Path, family: str | None, info: _Folder) -> Tokenizer:
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:4] == b"GGUF":
        from .loaders.gguf import read_gguf

        return tokenizer_from_gguf(read_gguf(path).meta, path)
    if path.suffix == ".json":
        try:
            backend = hf.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception type
            raise ModelFileError(path, f"is not a Hugging Face tokenizer.json ({e})") from None
        return HFJsonTokenizer(path, backend, info.tokenizer_config, info.generation)
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
        if family not in (None, "glm4"):
            raise ModelFileError(path, f"is a GLM-4 tiktoken ranks file, not a {family} tokenizer")
        return TiktokenGLM4(path, read_tiktoken_ranks(path))
    sp = _load_sentencepiece(path)
    if family == "llama" or (family is None and info.glm is False):
        return SentencePieceTemplate(path, sp, info.tokenizer_config, info.generation, info.config.get("model_type"))
    if family == "glm4":
        raise ModelFileError(path, "is a SentencePiece model; GLM-4 needs its tiktoken ranks file (tokenizer.model)")
    return _sentencepiece_glm(path, sp, family or _guess_sp_family(sp, info.hints))


def _load_folder(folder: Path, family: str | None) -> Tokenizer:
    """A GLM file (ice_text.model / tokenizer.model) for GLM folders, else tokenizer.json, else tokenizer.model.

    A GLM folder in transformers' own format has only tokenizer.json; its chat template writes the GLM prompt.
    """
    info = _Folder(folder)
    model_file = next((f for f in (folder / "ice_text.model", folder / "tokenizer.model") if f.is_file()), None)
    hf_json = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else None
    # a GLM folder by its config, by holding ice_text.model, or by having no tokenizer.json to prefer instead
    glm_first = family in GLM_FAMILIES or (
        family is None and model_file is not None and info.glm is not False
        and (info.glm or hf_json is None or model_file.name == "ice_text.model"))
    for f in (model_file, hf_json) if glm_first else (hf_json, model_file):
        if f is not None:
            return _load_file(f, family if f is model_file else None, info)
    raise ModelFileError(folder, "holds no tokenizer: expected ice_text.model, tokenizer.model (SentencePiece or "
                                 "GLM-4 tiktoken ranks) or tokenizer.json")


def load_tokenizer(path: str | Path, family: str | None = None) -> Tokenizer:
    """Load a tokenizer file, a model folder holding one, or a .gguf file's own vocabulary.

    family picks the GLM family when one file serves several (ChatGLM2 and ChatGLM3 share theirs); without it
    the family is guessed from the folder's config files and the file itself.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(path, "no such file or folder (expected a tokenizer file, a model folder or a .gguf file)")
    if path.is_dir():
        return _load_folder(path, family)
    return _load_file(path, family, _Folder(path.parent))


def tokenizer_from_bytes(data: bytes, family: str, path: str | Path) -> Tokenizer:
    """A GLM tokenizer stored inside another file (chatglm.cpp's GGML files), named by that file's path.

    GLM-4 stores its tiktoken ranks text, the other families the bytes of their SentencePiece model.
    """
    if family not in GLM_FAMILIES:
        raise ValueError(f"no embedded tokenizer for family {family!r}; expected one of {', '.join(GLM_FAMILIES)}")
    path = Path(path)
    if family == "glm4":
        return TiktokenGLM4(path, read_tiktoken_ranks(path, data))
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise ModelFileError(path, f"its embedded tokenizer is not a SentencePiece model ({str(e).strip()})") from None
    if family == "chatglm2" and not _adds_dummy_prefix(sp):
        family = "codegeex2"  # chatglm.cpp stores CodeGeeX2 as a ChatGLM2 model with its own tokenizer
    return _sentencepiece_glm(path, sp, family)


class StreamDecoder:
    """Turns one sequence's generated ids into text deltas that are final.

    A delta never holds half a UTF-8 character (U+FFFD from a split character) nor text that a later id could
    still change (ChatGLM's punctuation and newline rules); that text comes with a later delta or flush().
    Only a short window of ids is decoded per step, so the cost per token stays constant.
    """

    WINDOW = 64   # ids decoded per step at most, before older ones are dropped
    CONTEXT = 8   # ids kept before the unsent text when dropping, so decoding the window stays exact

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._sent = 0  # chars of decode(self._ids) already returned

    def put(self, id: int) -> str:
        """Add one id; return the text that became final."""
        self._ids.append(int(id))
        text = self._tok.decode(self._ids)
        ready = len(text) - self._tok.unsettled(text)
        delta = text[self._sent:ready]
        self._sent = max(self._sent, ready)
        if len(self._ids) > self.WINDOW:
            self._drop_old(text)
        return delta

    def flush(self) -> str:
        """The rest of the text at the end of the sequence (the decoder starts afresh)."""
        rest = self._tok.decode(self._ids)[self._sent:]
        self._ids, self._sent = [], 0
        return rest

    def _drop_old(self, text: str) -> None:
        """Keep only the last CONTEXT ids once decoding them alone gives the same text, all sent before it."""
        tail = self._ids[-self.CONTEXT:]
        tail_text = self._tok.decode(tail)
        cut = len(text) - len(tail_text)
        if tail_text and text.endswith(tail_text) and cut <= self._sent:
            self._ids, self._sent = tail, self._sent - cut
