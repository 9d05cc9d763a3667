"""GLM-family tokenizers against the real tokenizer files and chatglm.cpp's ids (../shared/tokenizers)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from chatglm.errors import ModelFileError
from chatglm.tokenizers import StreamDecoder, load_tokenizer, tokenizer_from_bytes

DATA = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
FILES = {
    "chatglm": "chatglm-6b/ice_text.model",
    "chatglm2": "chatglm3-6b/tokenizer.model",
    "chatglm3": "chatglm3-6b/tokenizer.model",
    "codegeex2": "codegeex2-6b/tokenizer.model",
    "glm4": "glm-4-9b/tokenizer.model",
}


def case_params(*kinds: str) -> list:
    """One test id per case of cases.json of these kinds; one skipped param when the data is absent."""
    path = DATA / "cases.json"
    if not path.is_file():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"{path} is absent (reference data beside "
                                                                        "the checkout)"))]
    data = json.loads(path.read_text(encoding="utf-8"))
    return [pytest.param(family, case, id=case["id"])
            for family, by_kind in data.items() for kind in kinds for case in by_kind.get(kind, [])]


def load_glm(shared_dir: Path) -> dict:
    """Every GLM family's tokenizer, with the family named explicitly."""
    return {family: load_tokenizer(shared_dir / "tokenizers" / file, family=family) for family, file in FILES.items()}


@pytest.fixture(scope="module")
def glm(shared_dir):
    return load_glm(shared_dir)


@pytest.mark.parametrize("family,case", case_params("encode", "encode_extra"))
def test_encode_case(glm, family, case):
    tok = glm[family]
    assert tok.encode(case["text"], add_special_tokens=case.get("add_special_prefix", True)) == case["ids"]
    if "decoded" in case:
        assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("family,case", case_params("decode"))
def test_decode_case(glm, family, case):
    assert glm[family].decode(case["ids"]) == case["text"]


def test_bare_encode_has_no_decoration(glm):
    assert glm["chatglm"].encode("你好") == [5, 74874]
    assert glm["chatglm2"].encode("你好") == [36474, 54591]
    assert glm["glm4"].encode("你好") == [109377]


TYPED = "<|user|> and <|assistant|> as plain text [gMASK] sop <sop> [MASK]"


def test_typed_special_tokens_stay_text_as_in_the_official_tokenizers(glm):
    """THUDM's tokenizers keep special-token text typed in text as ordinary pieces (the ids below are the
    official ChatGLM3 tokenizer's, with its [gMASK] sop prefix)."""
    official = [64790, 64792, 906, 31007, 4865, 31007, 30994, 293, 906, 31007, 530, 18971, 31007, 30994, 362, 9462,
                2254]
    assert glm["chatglm3"].encode("<|user|> and <|assistant|> as plain text", add_special_tokens=True) == official


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "codegeex2"])
def test_sentencepiece_families_encode_typed_specials_as_sentencepiece_does(glm, shared_dir, family):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shared_dir / "tokenizers" / FILES[family]))
    tok = glm[family]
    assert tok.encode(TYPED) == sp.encode(TYPED)  # the official encode: no special-token parsing before it
    assert not set(tok.encode(TYPED)) & set(tok.specials.values())


@pytest.mark.parametrize("family", list(FILES))
def test_typed_specials_round_trip_as_text(glm, family):
    tok = glm[family]
    ids = tok.encode(TYPED, add_special_tokens=True)
    assert [i for i in ids if i in tok.specials.values()] == tok.encode("", add_special_tokens=True)
    assert tok.decode(ids) == TYPED


def test_parse_special_reads_control_tokens_when_asked(glm):
    """Hand-built prompts (completions, generate) ask for control tokens explicitly."""
    c3 = glm["chatglm3"]
    assert c3.encode("<|user|>\n你好", parse_special=True) == [64795, *c3.encode("\n你好")]
    assert glm["chatglm2"].encode("[gMASK]<sop>你好", parse_special=True) == [64790, 64792, 36474, 54591]
    assert glm["chatglm"].encode("你好[gMASK]<sop>", parse_special=True) == [5, 74874, 130001, 130004]
    assert max(glm["chatglm2"].encode("<|user|>", parse_special=True)) < 64789  # ChatGLM2 has no role tokens
    glm4 = glm["glm4"]
    assert glm4.encode("<|user|>\n你好<|assistant|>", parse_special=True) == [151336, 198, 109377, 151337]
    assert glm4.encode("<|user|>", parse_special=False) == glm4.encode("<|user|>")


@pytest.mark.parametrize("family,vocab,bos,stops", [
    ("chatglm", 130344, 130004, {130005, 2}),
    ("chatglm2", 64794, 64792, {2}),
    ("codegeex2", 64794, 64792, {2}),
    ("chatglm3", 64798, 64792, {2, 64795, 64797}),
    ("glm4", 151343, 151333, {151329, 151336, 151338}),
])
def test_family_ids(glm, family, vocab, bos, stops):
    tok = glm[family]
    assert (tok.family, tok.vocab_size, tok.bos_id, tok.eos_ids) == (family, vocab, bos, stops)


def test_special_ids_follow_the_readme(glm):
    assert {k: glm["chatglm"].specials[k] for k in ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")} == {
        "[MASK]": 130000, "[gMASK]": 130001, "[sMASK]": 130002, "<sop>": 130004, "<eop>": 130005}
    names = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
             "<|observation|>"]
    assert [glm["chatglm3"].specials[n] for n in names] == list(range(64789, 64798))
    assert "<|user|>" not in glm["chatglm2"].specials
    glm4_names = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>"]
    assert [glm["glm4"].specials[n] for n in glm4_names] == list(range(151329, 151343))


def test_chatglm_whitespace_tokens(glm):
    tok = glm["chatglm"]
    assert tok.encode("a" + " " * 81 + "b") == tok.encode("a<|blank_80|> b")
    assert 130087 in tok.encode(" " * 100) and 130027 in tok.encode(" " * 100)  # <|blank_80|> <|blank_20|>
    for text in ("x\n\ny", "\tindented\n", "a" + " " * 100 + "b", "中,文!"):
        assert tok.decode(tok.encode(text)) == text.replace(",", "，").replace("!", "！")


def test_cjk_punctuation_rule(glm):
    text = "你好,世界!a,b"
    assert glm["chatglm2"].decode(glm["chatglm2"].encode(text)) == "你好，世界！a,b"
    assert glm["codegeex2"].decode(glm["codegeex2"].encode(text)) == "你好，世界！a,b"
    assert glm["chatglm3"].decode(glm["chatglm3"].encode(text)) == text  # chatglm.cpp has no such rule for ChatGLM3


def test_decode_skips_special_and_padding_ids(glm):
    tok = glm["chatglm3"]
    assert tok.decode([64795, 36474, 54591, 64796, 65000, -1]) == "你好"  # 65000: a padded embedding row
    assert glm["glm4"].decode([151336, 109377, 151337, 151500]) == "你好"


def test_token_text(glm):
    assert glm["chatglm3"].token_text(64795) == "<|user|>"
    assert glm["chatglm3"].token_text(36474) == " 你"
    assert glm["chatglm3"].token_text(13) == "<0x0A>"
    assert glm["chatglm"].token_text(4) == "<n>"
    assert glm["glm4"].token_text(151336) == "<|user|>"
    assert glm["glm4"].token_text(109377) == "你好"
    emoji_ids = glm["glm4"].encode("🦙")
    assert "".join(glm["glm4"].token_text(i) for i in emoji_ids).startswith("<0xF0>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        glm["glm4"].token_text(151343)


def test_same_file_is_loaded_once_per_family(shared_dir):
    """ChatGLM2 and ChatGLM3 share a file: the family decides the special ids and the chat format."""
    path = shared_dir / "tokenizers" / FILES["chatglm3"]
    assert load_tokenizer(path, family="chatglm3").vocab_size == 64798
    assert load_tokenizer(path, family="chatglm2").vocab_size == 64794


@pytest.mark.parametrize("stored,file,family", [
    ("chatglm", "chatglm", "chatglm"),
    ("chatglm3", "chatglm3", "chatglm3"),
    ("chatglm2", "codegeex2", "codegeex2"),  # chatglm.cpp stores CodeGeeX2 as ChatGLM2 with its own model
    ("glm4", "glm4", "glm4"),
])
def test_tokenizer_from_bytes(glm, shared_dir, stored, file, family):
    """chatglm.cpp's GGML files embed the tokenizer file's bytes."""
    data = (shared_dir / "tokenizers" / FILES[file]).read_bytes()
    tok = tokenizer_from_bytes(data, stored, "model-ggml.bin")
    assert tok.family == family and str(tok.path) == "model-ggml.bin"
    text = "你好, world!\n  def f(): pass"
    assert tok.encode(text, add_special_tokens=True) == glm[family].encode(text, add_special_tokens=True)


def test_tokenizer_from_damaged_bytes():
    with pytest.raises(ModelFileError, match="model-ggml.bin: its embedded tokenizer is not a SentencePiece model"):
        tokenizer_from_bytes(b"\x00garbage", "chatglm3", "model-ggml.bin")


# ----- family guessing from folders -----


def _folder(tmp_path: Path, source: Path, name: str, config: dict | None) -> Path:
    (tmp_path / name).symlink_to(source)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("family,name,config,expected", [
    ("chatglm", "ice_text.model", {"model_type": "chatglm", "_name_or_path": "THUDM/chatglm-6b"}, "chatglm"),
    ("chatglm3", "tokenizer.model", {"model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b"}, "chatglm3"),
    ("chatglm2", "tokenizer.model", {"model_type": "chatglm", "_name_or_path": "THUDM/chatglm2-6b"}, "chatglm2"),
    ("chatglm2", "tokenizer.model", None, "chatglm2"),
    ("codegeex2", "tokenizer.model", {"model_type": "chatglm"}, "codegeex2"),
    ("glm4", "tokenizer.model", {"model_type": "chatglm", "padded_vocab_size": 151552}, "glm4"),
    ("glm4", "tokenizer.model", None, "glm4"),
])
def test_family_is_guessed(shared_dir, tmp_path, family, name, config, expected):
    folder = _folder(tmp_path, shared_dir / "tokenizers" / FILES[family], name, config)
    assert load_tokenizer(folder).family == expected
    assert load_tokenizer(folder / name).family == expected


def test_tokenizer_config_hint(shared_dir, tmp_path):
    folder = _folder(tmp_path, shared_dir / "tokenizers" / FILES["chatglm3"], "tokenizer.model", None)
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b"}))
    assert load_tokenizer(folder).family == "chatglm3"


# ----- errors -----


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder") as e:
        load_tokenizer(tmp_path / "nope.model")
    assert "nope.model" in str(e.value)


def test_not_a_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(os.urandom(512))
    with pytest.raises(ModelFileError, match="not a tokenizer file") as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_broken_config_json(shared_dir, tmp_path):
    folder = _folder(tmp_path, shared_dir / "tokenizers" / FILES["chatglm2"], "tokenizer.model", None)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json: is not readable JSON"):
        load_tokenizer(folder)


def test_unknown_family(shared_dir):
    with pytest.raises(ValueError, match="unknown tokenizer family 'glm5'"):
        load_tokenizer(shared_dir / "tokenizers" / FILES["glm4"], family="glm5")


@pytest.mark.parametrize("family,file,message", [
    ("glm4", "chatglm3", "GLM-4 needs its tiktoken ranks file"),
    ("chatglm3", "glm4", "is a GLM-4 tiktoken ranks file, not a chatglm3 tokenizer"),
    ("chatglm", "chatglm3", "expected ChatGLM-6B's ice_text.model"),
    ("chatglm2", "chatglm", "expected a ChatGLM2/3-style tokenizer.model"),
])
def test_file_of_another_family(shared_dir, family, file, message):
    with pytest.raises(ModelFileError, match=message):
        load_tokenizer(shared_dir / "tokenizers" / FILES[file], family=family)


def test_damaged_tiktoken_file(shared_dir, tmp_path):
    lines = (shared_dir / "tokenizers" / FILES["glm4"]).read_bytes().splitlines(keepends=True)[:100]
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"".join(lines) + b"@@@ 100\n")
    with pytest.raises(ModelFileError, match="line 101 is not 'base64 rank'"):
        load_tokenizer(bad, family="glm4")


# ----- streaming -----

STREAM_TEXT = "你好,世界!我是人工智能助手:很高兴见到你;好吗?🚀🦙😶\u200d🌫️ emoji 𠀀\n\tcode  x" + " " * 90 + "end,中"


def _stream(tok, ids):
    decoder = StreamDecoder(tok)
    deltas = [decoder.put(i) for i in ids]
    return deltas + [decoder.flush()]


def _check_stream(tok, ids):
    deltas = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("family", list(FILES))
def test_stream_random_splits(glm, family):
    """Any slice of a CJK/emoji text's ids streams to exactly decode(slice), never showing a split char."""
    tok = glm[family]
    ids = tok.encode(STREAM_TEXT * 3)
    rng = random.Random(family)
    _check_stream(tok, ids)
    for _ in range(20):
        start = rng.randrange(len(ids))
        _check_stream(tok, ids[start:start + rng.randint(1, 150)])


@pytest.mark.parametrize("family", list(FILES))
def test_stream_random_ids(glm, family):
    tok = glm[family]
    rng = random.Random(family)
    for _ in range(10):
        _check_stream(tok, [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 200))])


def test_stream_emits_whole_characters(glm):
    tok = glm["chatglm3"]
    ids = tok.encode("好🦙")  # the emoji is four byte tokens
    deltas = _stream(tok, ids)
    assert "好" in deltas and "🦙" in deltas and deltas.count("") >= 3


def test_stream_holds_punctuation_until_the_next_char(glm):
    tok = glm["chatglm2"]
    deltas = _stream(tok, tok.encode("你好,世界"))
    assert "".join(deltas) == "你好，世界" and not any("," in d for d in deltas)


def test_stream_holds_a_forming_newline_marker(glm):
    tok = glm["chatglm"]
    ids = tok.encode("a") + [60, 151, 33] + tok.encode("b")  # the pieces "<", "n", ">" spell ChatGLM-6B's newline
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "a\n b"
    assert not any("<" in d for d in deltas)


def test_stream_window_stays_short(glm):
    tok = glm["glm4"]
    decoder = StreamDecoder(tok)
    ids = tok.encode(STREAM_TEXT * 40)
    text = "".join(decoder.put(i) for i in ids)
    assert len(decoder._ids) <= StreamDecoder.WINDOW
    assert text + decoder.flush() == tok.decode(ids)
