"""The fused one-token step (kernels/csrc/decode_step.cpp) against the torch blocks it replaces, with the
same ggml-block weights: llama with biases and half-split rotary, GLM-4 with partial interleaved rotary and
grouped keys, a P-Tuning prefix; a batch at mixed positions in scattered cache slots. And on the default
model, the steps really are fused and agree with llama.cpp."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.kernels import ggml
from chatglm.kernels.ggml import GGMLLinear, fused_decoder
from chatglm.quant import QTensor, QType, quantize

from checkpoints import tiny_glm, tiny_llama

pytestmark = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [8, 30, 71], [12, 6, 90, 33, 1]]


def blocks_of(w: torch.Tensor, qtype: QType) -> QTensor:
    return QTensor(torch.from_numpy(quantize(w.numpy(), qtype)), qtype, tuple(w.shape))


def to_blocks(model, qtype: QType) -> None:
    """Every block linear of a float model as ggml blocks, and the fused step built over them."""
    for block in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            dense = getattr(block, name)
            setattr(block, name, GGMLLinear(blocks_of(dense.weight, qtype), dense.bias, torch.float32))
    model.fused = fused_decoder(model.layers, model.config)
    assert model.fused is not None


def batched_step(model, **cache_args) -> torch.Tensor:
    """Each prompt but its last token alone in a slot, then one step for all three: [3, vocab]."""
    cache = model.new_cache(4, 16, **cache_args)
    random.Random(0).shuffle(cache.free)  # each sequence's blocks out of order
    slots = [3, 0, 2]
    for slot, ids in zip(slots, PROMPTS):
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
    last = torch.tensor([[ids[-1]] for ids in PROMPTS])
    pos = torch.tensor([[len(ids) - 1] for ids in PROMPTS])
    return model(last, pos, cache, torch.tensor(slots))[:, -1]


def without_fused(model, fn):
    fused, model.fused = model.fused, None
    try:
        return fn(model)
    finally:
        model.fused = fused


@pytest.mark.parametrize("make,qtype", [(lambda: tiny_llama(bias=True), QType.Q8_0), (tiny_glm, QType.Q4_0),
                                         (tiny_glm, QType.Q5_1)], ids=["llama-bias-q8_0", "glm4-q4_0", "glm4-q5_1"])
def test_fused_step_matches_the_torch_blocks(tmp_path, make, qtype):
    make().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, qtype)
    fused = batched_step(model)
    reference = without_fused(model, batched_step)
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_step_reads_small_blocks_through_the_table(tmp_path, dtype):
    """Blocks of 2 rows handed out in a scrambled order, stored as float32 or float16 (llama.cpp's cache)."""
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)  # (with q8_0 this model puts an activation on an 8-bit rounding edge)
    fused = batched_step(model, block_size=2, dtype=dtype)
    reference = without_fused(model, lambda m: batched_step(m, block_size=2, dtype=dtype))
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()
    if dtype == torch.float16:  # the rounding of keys and values shows (8-bit activations amplify it), but stays small
        exact = without_fused(model, lambda m: batched_step(m, block_size=2))
        assert 0 < torch.abs(fused - exact).max() < 5e-2 * torch.abs(exact).max()


def test_bfloat16_blocks_take_the_torch_step(tmp_path):
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)
    bf16 = batched_step(model, dtype=torch.bfloat16)  # the C++ step reads f32 and f16 only
    exact = batched_step(model)
    assert 0 < torch.abs(bf16 - exact).max() < 5e-2 * torch.abs(exact).max()


def test_fused_step_reads_the_ptuning_prefix(tmp_path):
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    torch.manual_seed(1)
    model.prefix = torch.randn(cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)  # 4 virtual tokens
    to_blocks(model, QType.Q8_0)
    for size in (16, 3):  # the prefix in one shared block; in one shared block and a partial one copied
        fused = batched_step(model, block_size=size)
        reference = without_fused(model, lambda m: batched_step(m, block_size=size))
        assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


def test_default_model_decode_steps_agree_with_llama_cpp(default_gguf, llama_cpp):
    """The fused steps on the real model against llama.cpp's logits for the same tokens. (Against our torch
    blocks a step agrees only to the 8-bit activation rounding: this model's outlier activations put some
    codes on a rounding edge that a different summation order flips, as llama.cpp's own threads can.)"""
    text = Path("/usr/share/common-licenses/GPL-3")
    if not text.is_file():
        pytest.skip(f"{text} is absent")
    model = load_model(default_gguf)
    assert model.fused is not None, "the default model's ggml blocks should take the fused step"
    llama = llama_cpp.Llama(model_path=str(default_gguf), n_ctx=600, logits_all=True, verbose=False, n_threads=2)
    tokens = llama.tokenize(text.read_text()[:8000].encode(), add_bos=False, special=False)[:512]
    llama.eval(tokens)
    theirs = np.asarray(llama.scores[16:512], np.float32)
    cache, slot = model.new_cache(1, 512), torch.zeros(1, dtype=torch.long)
    model(torch.tensor([tokens[:16]]), torch.arange(16)[None], cache, slot)
    mine = np.stack([model(torch.tensor([[t]]), torch.tensor([[i]]), cache, slot)[0, -1].numpy()
                     for i, t in enumerate(tokens[16:], start=16)])
    assert np.mean(mine.argmax(-1) == theirs.argmax(-1)) >= 0.95
    targets = torch.tensor(tokens[17:512])
    nll = [float(torch.nn.functional.cross_entropy(torch.from_numpy(x[:-1]).double(), targets)) for x in (mine, theirs)]
    assert abs(np.exp(nll[0]) / np.exp(nll[1]) - 1) < 0.02, f"perplexity {np.exp(nll[0]):.3f} vs llama.cpp {np.exp(nll[1]):.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_contexts_split_into_chunks_match_the_torch_step(tmp_path, dtype):
    """Contexts of several 256-row attention chunks (one ending a row into its last chunk), full 16-row tiles and
    a partial last one, in one batch: the chunks' partial softmaxes merge into torch's attention over the cache."""
    hf = tiny_llama(heads=8, kv_heads=2, head_dim=32)
    hf.config.max_position_embeddings = 1024
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q8_0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (700, 257, 40)]

    def step(m) -> torch.Tensor:
        cache = m.new_cache(3, 720, dtype=dtype)
        random.Random(0).shuffle(cache.free)
        for slot, ids in enumerate(prompts):
            m(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
        last = torch.tensor([[ids[-1]] for ids in prompts])
        return m(last, torch.tensor([[len(ids) - 1] for ids in prompts]), cache, torch.arange(3))[:, -1]

    fused = step(model)
    reference = without_fused(model, step)
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()
