"""The batch engine over a KV pool sized by a budget: a GLM-4-9B-shaped model starts, requests wait for
blocks, a reply the pool cannot grow ends with "length", shared prompts are prefilled once, nothing leaks."""
from __future__ import annotations

import json
import random
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from chatglm import load_model
from chatglm.engine import BatchEngine, SamplingParams, generate
from chatglm.kv_cache import KVCache, parse_size
from chatglm.server import create_app

from checkpoints import tiny_glm, tiny_glm4, tiny_glm4_moe, tiny_glm4_moe_lite, tiny_llama
from patience import PATIENCE
from test_server import metrics
from test_server_support import glm_tokenizer, scripted_pipeline

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(layers=2).save_pretrained(folder)
    return load_model(folder, dtype="f32")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(do_sample=False, max_new_tokens=n)


def engine_with_blocks(model, blocks: int, **kw) -> BatchEngine:
    """An engine whose pool holds `blocks` usable blocks of BLOCK tokens."""
    per_block = KVCache.block_bytes(model.config, model.kv_dtype, BLOCK)
    return BatchEngine(model, kv_memory=(blocks + 1) * per_block, block_size=BLOCK, **kw)


def run_all(engine, prompts, params) -> list:
    """Submit every prompt at once from its own thread; the finished requests, in order."""
    requests = [None] * len(prompts)

    def one(k):
        requests[k] = engine.submit(prompts[k], params)
        list(requests[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=PATIENCE)
    return requests


def test_a_glm4_9b_shaped_model_serves_within_its_budget(tmp_path):
    """40 layers, 2 key heads, a 131,072-token context, 8 slots: the slots-x-context cache asked 85.9 GB
    at GLM-4-9B's width; a 64 MiB pool starts and serves 8 concurrent requests, token for token."""
    tiny_glm(layers=40, heads=4, kv_heads=2, head_dim=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=131072)))
    model = load_model(tmp_path, dtype="f32")
    assert model.config.max_position == 131072 and model.config.num_layers == 40
    engine = BatchEngine(model, max_batch=8, kv_memory=parse_size("64M"))
    try:
        assert engine.context == 131072
        assert engine.cache.kv.numel() * engine.cache.kv.itemsize <= 64 << 20
        prompts = [[(7 * k + j) % 90 + 3 for j in range(20 + k)] for k in range(8)]
        done = run_all(engine, prompts, greedy(6))
        for prompt, request in zip(prompts, done):
            assert request.generated == list(generate(model, prompt, greedy(6)))
    finally:
        engine.close()


def test_a_request_waits_for_blocks_then_runs(model):
    engine = engine_with_blocks(model, 6, max_batch=2)  # 24 tokens
    try:
        first = engine.submit(list(range(3, 11)), greedy(12))     # 8 + 12 tokens: 5 blocks in the end
        next(iter(first))                                        # running, holding 3 blocks
        second = engine.submit(list(range(20, 36)), greedy(4))   # 16 + 1 tokens need 5 blocks: it waits
        rest = list(first)
        assert first.finish_reason == "length" and len(first.generated) == 12
        assert list(second) == list(generate(model, list(range(20, 36)), greedy(4)))
        assert engine.stats["pool_short"] >= 1
    finally:
        engine.close()


def test_a_reply_the_pool_cannot_grow_ends_with_length(model):
    engine = engine_with_blocks(model, 6, max_batch=2)
    try:
        prompts = [list(range(3, 11)), list(range(40, 48))]  # both fit at admission (3 blocks each)
        done = run_all(engine, prompts, greedy(12))           # ... but 5 blocks each to finish
        assert all(r.finish_reason == "length" and r.error is None for r in done)
        assert sorted(len(r.generated) for r in done)[0] < 12 and max(len(r.generated) for r in done) == 12
        for prompt, request in zip(prompts, done):  # a cut reply is still the right reply, only shorter
            full = list(generate(model, prompt, greedy(12)))
            assert request.generated == full[: len(request.generated)]
    finally:
        engine.close()


def test_a_shared_system_prompt_is_prefilled_once(model):
    engine = engine_with_blocks(model, 64, max_batch=4)
    try:
        system = [(5 * j) % 80 + 10 for j in range(40)]  # ten whole blocks
        prompts = [system + [k + 1, k + 2, k + 3] for k in range(4)]
        done = run_all(engine, prompts, greedy(5))
        assert engine.stats["prefill_tokens"] == 43 + 3 * 3
        assert engine.stats["reused_tokens"] == 3 * 40
        assert engine.stats["prefix_hit_blocks"] == 30 and engine.stats["prefix_lookups"] == 4
        for prompt, request in zip(prompts, done):
            assert request.generated == list(generate(model, prompt, greedy(5)))
    finally:
        engine.close()


@pytest.mark.parametrize("make", [tiny_glm4, tiny_glm4_moe, tiny_glm4_moe_lite],
                         ids=["glm4-0414", "glm4.5-moe", "glm4.7-flash-latent"])
def test_the_new_glm_families_prefill_a_shared_system_prompt_once(tmp_path, make):
    """GLM-4-0414, GLM-4.5's experts and GLM-4.7-Flash's latent cache share whole prompt blocks as the others do,
    and the replies are transformers' greedy ones."""
    hf = make()
    hf.save_pretrained(tmp_path)
    engine = BatchEngine(load_model(tmp_path, dtype="f32"), max_batch=4, block_size=BLOCK)
    try:
        system = [(5 * j) % 80 + 10 for j in range(40)]  # ten whole blocks
        prompts = [system + [k + 1, k + 2, k + 3] for k in range(4)]
        done = run_all(engine, prompts, greedy(5))
        assert engine.stats["reused_tokens"] == 3 * 40 and engine.stats["prefill_tokens"] == 43 + 3 * 3
        with torch.no_grad():
            for prompt, request in zip(prompts, done):
                expected = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, min_new_tokens=5,
                                       eos_token_id=None)[0, len(prompt):].tolist()
                assert request.generated == expected
    finally:
        engine.close()


def test_no_block_leaks_after_a_thousand_requests(model):
    """Shared and private prompts, replies cut by the budget or cancelled, eviction under pressure."""
    engine = engine_with_blocks(model, 24, max_batch=4, max_queue=1000)
    rng = random.Random(0)
    heads = [[rng.randrange(3, 90) for _ in range(rng.choice([4, 8, 13]))] for _ in range(6)]
    try:
        requests = []
        for k in range(1000):
            prompt = rng.choice(heads) + [rng.randrange(3, 90) for _ in range(rng.randrange(1, 6))]
            requests.append(engine.submit(prompt, greedy(rng.randrange(1, 5))))
            if k % 7 == 0:
                requests[-1].cancel()
        for request in requests:
            list(request)
        assert {r.finish_reason for r in requests} <= {"length", "stop", "cancelled"}
        pool = engine.cache
        assert pool.in_use() == 0 and pool.available() == pool.blocks - 1
        assert not any(pool.owned) and set(pool.refs) == {0} | ({1} if pool.prefix else set())
        assert set(pool.idle) <= set(pool.hash_of) and sorted(pool.index.values()) == sorted(pool.hash_of)
        assert pool.stats["evicted_blocks"] > 0 and engine.stats["prefix_hit_blocks"] > 0
    finally:
        engine.close()


def test_metrics_report_prefix_hits(shared_dir):
    pipe = scripted_pipeline(glm_tokenizer(shared_dir, "glm4"), "Hello there.")
    long_question = [{"role": "user", "content": "Tell me about the weather in Beijing " * 6}]
    with TestClient(create_app(pipe, max_batch=1)) as client:
        for _ in range(2):
            r = client.post("/v1/chat/completions", json={"model": "m", "messages": long_question})
            assert r.status_code == 200, r.text
        m = metrics(client)
    assert m["chatglm_prefix_cache_hits_total"] >= 2
    assert m["chatglm_kv_blocks"] > m["chatglm_kv_blocks_used"] == 0
    assert m["chatglm_kv_blocks_cached"] >= m["chatglm_prefix_cache_hits_total"]


@pytest.mark.parametrize("size, message", [
    ("1K", "error: --kv-memory 1.0 KiB holds no KV block for a sequence: a block of 16 tokens takes"),
    ("lots", "error: --kv-memory 'lots' is not a size"),
])
def test_serve_refuses_a_bad_budget_in_one_line(default_gguf, capsys, size, message):
    from chatglm.cli import main

    assert main(["serve", "-m", str(default_gguf), "--kv-memory", size]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_long_prompts_prefill_in_chunks(model):
    """Three prompts of different lengths through forwards of 3 columns each (9 tokens): the same replies."""
    engine = BatchEngine(model, max_batch=3, block_size=BLOCK, prefill_chunk=9)
    try:
        prompts = [list(range(3, 20)), list(range(30, 37)), list(range(50, 61))]
        done = run_all(engine, prompts, greedy(5))
        for prompt, request in zip(prompts, done):
            assert request.generated == list(generate(model, prompt, greedy(5)))
    finally:
        engine.close()


def test_glm_v1_prompts_go_whole_and_unshared(tmp_path):
    """GLM v1's context attends both ways up to <sop>: its prompts are neither chunked nor shared."""
    from checkpoints import write_folder
    from test_models import GLM_CONFIG, GLM_NAMES, GLM_SIZES

    g = torch.Generator().manual_seed(5)
    shapes = dict(zip(GLM_NAMES, GLM_SIZES), **{GLM_NAMES[0]: (64, 32)})  # 64 ids: replies tell more apart
    shapes.update({n.replace(".0.", ".1."): s for n, s in shapes.items() if ".layers.0." in n})  # two layers:
    state = {n: torch.randn(*s, generator=g) * s[-1] ** -0.5 for n, s in shapes.items()}  # keys see the context
    cfg = dict(GLM_CONFIG, max_sequence_length=64, num_layers=2, vocab_size=64)
    glm = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    engine = BatchEngine(glm, max_batch=2, block_size=BLOCK, prefill_chunk=2)
    try:
        prompts = [[9, 30, 4, 50, 3, 4, 1, 2], [9, 30, 4, 50, 33, 7, 1, 2]]  # one block in common
        done = run_all(engine, prompts, greedy(8))
        for prompt, request in zip(prompts, done):
            assert request.generated == list(generate(glm, prompt, greedy(8)))
        assert engine.stats["reused_tokens"] == 0 and engine.stats["prefix_lookups"] == 0
    finally:
        engine.close()
