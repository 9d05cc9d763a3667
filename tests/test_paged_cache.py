"""The paged KV cache computes what a whole-sequence prefill computes, whatever blocks a sequence got.

Sequences here span many small blocks handed out in a scrambled order, decode one token at a time in a
batch at mixed positions, and are checked step by step against transformers' models (llama, GLM-4, GLM-4-0414,
GLM-4.5's experts, GLM-4.7-Flash's latent cache) or
against the one-pass prefill that test_models checks against the official code (P-Tuning v2 prefixes,
ALiBi, GLM v1's 2D positions).
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.kv_cache import BlockPool, KVMemoryError, parse_size

from checkpoints import tiny_glm, tiny_glm4, tiny_glm4_moe, tiny_glm4_moe_lite, tiny_llama, write_folder
from test_models import GLM3_CONFIG, GLM3_NAMES, GLM3_SIZES, GLM_CONFIG, GLM_NAMES, GLM_SIZES, baichuan_state

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [8, 30, 71], [12, 6, 90, 33, 1, 4, 4, 9, 10, 11]]
SLOTS = [3, 0, 2]
STEPS = 6


def scrambled_cache(model, block_size: int = 2, **kw):
    cache = model.new_cache(4, 40, block_size=block_size, **kw)
    random.Random(0).shuffle(cache.free)  # blocks out of order: a table is all that keeps a sequence together
    return cache


def paged_decode(model, prompts, follow, cache) -> list[list[np.ndarray]]:
    """Prefill each prompt alone in its slot, then decode `follow[k]` tokens in one batch per step:
    each step's last-token logits per sequence."""
    out = [[] for _ in prompts]
    for k, (slot, ids) in enumerate(zip(SLOTS, prompts)):
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([slot]))
        out[k].append(logits[0, -1].numpy())
    for step in range(len(follow[0])):
        ids = torch.tensor([[f[step]] for f in follow])
        pos = torch.tensor([[len(p) + step] for p in prompts])
        logits = model(ids, pos, cache, torch.tensor(SLOTS))[:, -1].numpy()
        for k in range(len(prompts)):
            out[k].append(logits[k])
    return out


def assert_close(mine, expected, tol=1e-4):
    assert np.abs(mine - expected).max() < tol * np.abs(expected).max()


def follow_ups(vocab: int) -> list[list[int]]:
    g = np.random.default_rng(1)
    return [g.integers(0, vocab, STEPS).tolist() for _ in PROMPTS]


@pytest.mark.parametrize("make", [tiny_llama, tiny_glm, tiny_glm4, tiny_glm4_moe, tiny_glm4_moe_lite],
                         ids=["llama", "glm4", "glm4-0414", "glm4.5-moe", "glm4.7-flash-latent"])
def test_blocks_in_any_order_match_transformers(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    follow = follow_ups(96)
    got = paged_decode(model, PROMPTS, follow, scrambled_cache(model))
    for k, (prompt, more) in enumerate(zip(PROMPTS, follow)):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt + more])).logits[0].numpy()
        for step, row in enumerate(got[k]):
            assert_close(row, expected[len(prompt) - 1 + step])


def check_against_prefill(model, prompts, follow, tol=1e-4, **cache_args):
    got = paged_decode(model, prompts, follow, scrambled_cache(model, **cache_args))
    for k, (prompt, more) in enumerate(zip(prompts, follow)):
        expected = model.logits(prompt + more)
        for step, row in enumerate(got[k]):
            assert_close(row, expected[len(prompt) - 1 + step], tol)


def random_state(names, sizes, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) * s[-1] ** -0.5 for n, s in zip(names, sizes)}


@pytest.mark.parametrize("pre_seq_len", [4, 5], ids=["whole-blocks", "partial-block"])
def test_ptuning_prefix_is_shared_or_copied_per_sequence(tmp_path, pre_seq_len):
    """ChatGLM3 with a P-Tuning v2 prefix of 4 rows (two whole shared blocks) or 5 (the last one copied)."""
    state = random_state(GLM3_NAMES, GLM3_SIZES, 2)
    state["transformer.output_layer.weight"] = torch.randn(5, 32)
    state["transformer.prefix_encoder.embedding.weight"] = torch.randn(pre_seq_len, 2 * 2 * 4)
    cfg = dict(GLM3_CONFIG, pre_seq_len=pre_seq_len, prefix_projection=False, seq_length=64)
    model = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    prompts = [[p % 5 for p in prompt] for prompt in PROMPTS]
    check_against_prefill(model, prompts, [[f % 5 for f in more] for more in follow_ups(5)])


def test_alibi_biases_follow_the_rows(tmp_path):
    state = baichuan_state(vocab=96, hidden=48, layers=2, ffn=64, seed=4)
    cfg = {"model_type": "baichuan", "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 6,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "vocab_size": 96, "model_max_length": 64,
           "torch_dtype": "float32"}
    model = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    assert model.config.extra["alibi"]
    check_against_prefill(model, PROMPTS, follow_ups(96))


def test_glm_v1_2d_positions_across_blocks(tmp_path):
    """GLM v1: each prompt ends with [gMASK] <sop> (ids 1, 2), so its context attends both ways over
    several blocks, and the replies' block positions count on from <sop>."""
    model = load_model(write_folder(tmp_path, dict(GLM_CONFIG, max_sequence_length=64),
                                    random_state(GLM_NAMES, GLM_SIZES, 3)), dtype="f32")
    prompts = [[0, 3, 4, 1, 2], [3, 1, 2], [4, 4, 3, 0, 0, 3, 1, 2]]
    check_against_prefill(model, prompts, [[f % 5 for f in more] for more in follow_ups(5)])


def test_float16_blocks_stay_close(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    check_against_prefill(model, PROMPTS, follow_ups(96), tol=1e-2, dtype=torch.float16)


def test_a_fresh_prompt_attends_causally_without_reading_the_cache(tmp_path, monkeypatch):
    """A whole prompt from row 0 takes torch's causal kernel over its own keys; a continuation (rows after a
    past) reads the pages the first one wrote, with a mask; both agree with the masked path's logits."""
    tiny_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    ids, slots = torch.tensor([PROMPTS[2]]), torch.tensor([0])
    cache = model.new_cache(1, 16, block_size=4)
    plans = []
    plan = model.step
    monkeypatch.setattr(model, "step", lambda *a: plans.append(plan(*a)) or plans[-1])
    fresh = model(ids, torch.arange(10)[None], cache, slots)
    again = model(ids[:, 6:], torch.arange(6, 10)[None], cache, slots)  # the last 4 again, after a past of 6
    assert [p.causal for p in plans] == [True, False]
    assert_close(again[0].numpy(), fresh[0, 6:].numpy(), 1e-5)
    monkeypatch.setattr(model, "step", lambda *a: dataclasses.replace(plan(*a), causal=False))
    masked = model(ids, torch.arange(10)[None], model.new_cache(1, 16, block_size=4), slots)
    assert_close(fresh.numpy(), masked.numpy(), 1e-5)


# --- the pool's bookkeeping ------------------------------------------------------------------
def test_full_blocks_are_shared_and_evicted_least_recently_used():
    pool = BlockPool(slots=2, max_tokens=64, blocks=7, block_size=4)  # 6 usable blocks
    a = list(range(100, 112))
    assert pool.start(0, a) == 0 and pool.grow(0, 12)
    pool.commit(0, a)
    pool.release(0)
    assert len(pool.idle) == 3 and pool.available() == 6  # cached, yet free to take
    assert pool.start(1, a + [7]) == 12  # all three blocks found; the new token is computed
    pool.release(1)
    b = list(range(200, 216))
    assert pool.start(0, b) == 0 and pool.grow(0, 16)  # 4 blocks: the 3 free, then the oldest cached one
    assert pool.stats["evicted_blocks"] == 1
    assert pool.start(1, a) == 8  # a chain's tail goes first: its first two blocks are still cached
    assert not pool.grow(1, 13)  # needs 2 more blocks, none is left: takes nothing
    assert pool.available() == 0 and len(pool.owned[1]) == 2
    pool.release(1)
    pool.release(0)
    assert pool.available() == 6 and set(pool.refs) == {0}


def test_a_budget_below_one_block_is_a_one_line_error(tmp_path):
    tiny_glm(layers=40).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    with pytest.raises(KVMemoryError, match=r"--kv-memory .* holds no KV block .* give at least"):
        model.new_cache(8, 1000, memory=parse_size("1K"))


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), ("2g", 2 << 30)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_size_without_a_number_names_the_flag():
    with pytest.raises(ValueError, match="--kv-memory 'lots'"):
        parse_size("lots")
