"""Baichuan (W_pack) and InternLM (qkv and o biases) folders written as llama GGUFs: read back
by us, and loaded by llama.cpp with the same logits."""
from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch

from chatglm import load_model
from chatglm.convert import convert

from checkpoints import write_folder
from test_models import IDS, baichuan_state, rel_err

CORPUS = "Hello world, this is a tiny corpus for testing tokenizers and models. 你好世界 quick brown fox jumps\n" * 50


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    (folder / "c.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(folder / "c.txt"), model_prefix=str(folder / "m"), vocab_size=80,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return folder / "m.model"


def internlm_state(state: dict, hidden: int, layers: int) -> dict:
    """The same weights with InternLM's separate q/k/v projections and its four biases."""
    g = torch.Generator().manual_seed(4)
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        for name, part in zip("qkv", state.pop(p + "W_pack.weight").split(hidden)):
            state[p + f"{name}_proj.weight"] = part.contiguous()
            state[p + f"{name}_proj.bias"] = torch.randn(hidden, generator=g)
        state[p + "o_proj.bias"] = torch.randn(hidden, generator=g)
    return state


@pytest.mark.parametrize("kind", ["baichuan", "internlm"])
def test_llama_family_folder_to_gguf(tmp_path, sp_model, llama_cpp, kind):
    state = baichuan_state(vocab=96, hidden=32, layers=2, ffn=64, seed=1)
    cfg = {"model_type": kind, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "vocab_size": 96, "max_position_embeddings": 64}
    if kind == "internlm":
        state, cfg = internlm_state(state, 32, 2), dict(cfg, bias=True)
    folder = write_folder(tmp_path / kind, cfg, state)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    out = convert(folder, tmp_path / f"{kind}.gguf", "f32", progress=False)
    source = load_model(folder, dtype="f32").logits(IDS[:6])
    assert rel_err(load_model(out, dtype="f32").logits(IDS[:6]), source) < 1e-5
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=32)
    llm.eval(IDS[:6])
    assert rel_err(np.asarray(llm.scores[:6]), source) < 1e-3
