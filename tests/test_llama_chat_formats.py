"""Baichuan's and InternLM's chat prompts (chatglm.cpp's rules) for folders that carry no template."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from chatglm import load_tokenizer

ROLE_PIECES = ["<reserved_106>", "<reserved_107>", "<|User|>", "<|Bot|>", "<eoh>", "<eoa>"]
TEXT = ("Hello world, this is a tiny corpus for a tiny tokenizer. 你好世界 Users ask and bots answer.\n" * 40)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=ROLE_PIECES,
                                   character_coverage=1.0, minloglevel=2)
    return folder / "m.model"


def folder_with(tmp_path, sp_model, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return load_tokenizer(tmp_path)


MESSAGES = [{"role": "system", "content": "dropped"}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "world"}, {"role": "user", "content": "你好 <eoa> bots"}]


def test_baichuan_role_tokens_around_separately_encoded_contents(tmp_path, sp_model):
    tok = folder_with(tmp_path, sp_model, "baichuan")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    user, bot = sp.piece_to_id("<reserved_106>"), sp.piece_to_id("<reserved_107>")
    expected = [user] + sp.encode("Hello") + [bot] + sp.encode("world") + [user] + sp.encode("你好 <eoa> bots") + [bot]
    assert tok.encode_chat(MESSAGES) == expected


def test_internlm_prompt_text_after_bos(tmp_path, sp_model):
    tok = folder_with(tmp_path, sp_model, "internlm")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = "<|User|>:Hello<eoh>\n<|Bot|>:world<eoa>\n<|User|>:你好 <eoa> bots<eoh>\n<|Bot|>:"
    assert tok.encode_chat(MESSAGES) == [sp.bos_id()] + sp.encode(text)
    assert sp.piece_to_id("<eoa>") in tok.eos_ids
