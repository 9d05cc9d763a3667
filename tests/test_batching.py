"""The continuous-batching engine: same tokens as one-at-a-time, slots freed, prefixes reused."""
from __future__ import annotations

import threading

import pytest

from chatglm import load_model
from chatglm.engine import BatchEngine, QueueFullError, SamplingParams, generate

from checkpoints import tiny_llama
from patience import PATIENCE

GREEDY = dict(do_sample=False, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(layers=2).save_pretrained(folder)
    return load_model(folder, dtype="f32")


@pytest.fixture
def engine(model):
    e = BatchEngine(model, max_batch=4, max_queue=3, block_size=4)
    yield e
    e.close()


def assert_greedy(model, prompt, out, tol=1e-4):
    """Each token is the argmax of a full prefill (up to rounding: batch shapes change the sums' order)."""
    assert len(out) == GREEDY["max_new_tokens"]
    logits = model.logits(prompt + out)[len(prompt) - 1 : -1]
    for k, (row, token) in enumerate(zip(logits, out)):
        assert row[token] >= row.max() - tol * abs(row).max(), f"step {k}: {token} is not the argmax"


PROMPTS = [[5, 9, 31], [7, 7, 7, 7, 60], [1, 2, 3, 4, 5, 6, 7, 8], [90], [44, 12], [3, 3, 50, 51, 52, 53]]


def test_concurrent_requests_match_sequential_generation(model):
    engine = BatchEngine(model, max_batch=4, max_queue=16)
    try:
        results: dict[int, list[int]] = {}

        def run(k):
            results[k] = list(engine.submit(PROMPTS[k], SamplingParams(**GREEDY)))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=PATIENCE)
        for k, prompt in enumerate(PROMPTS):
            assert_greedy(model, prompt, results[k])
    finally:
        engine.close()


def test_finish_reasons_and_stop_ids(engine, model):
    full = list(generate(model, PROMPTS[0], SamplingParams(**GREEDY)))
    r = engine.submit(PROMPTS[0], SamplingParams(**GREEDY))
    assert list(r) == full and r.finish_reason == "length"
    r = engine.submit(PROMPTS[0], SamplingParams(**GREEDY), stop_ids=frozenset({full[3]}))
    assert list(r) == full[: full.index(full[3])] and r.finish_reason == "stop"


def test_next_turn_reuses_the_cached_prefix(engine, model):
    first = engine.submit(PROMPTS[2], SamplingParams(**GREEDY))
    reply = list(first)
    before = dict(engine.stats)
    follow_up = PROMPTS[2] + reply + [11, 12]
    second = list(engine.submit(follow_up, SamplingParams(**GREEDY)))
    reused = engine.stats["reused_tokens"] - before["reused_tokens"]
    assert reused == (len(PROMPTS[2]) + len(reply) - 1) // 4 * 4  # the full blocks it wrote (block_size 4)
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == len(follow_up) - reused
    assert_greedy(model, follow_up, second)


def test_cancel_frees_the_slot(engine):
    r = engine.submit(PROMPTS[1], SamplingParams(do_sample=False, max_new_tokens=100))
    next(iter(r))
    r.cancel()
    rest = list(r)
    assert r.finish_reason == "cancelled" and len(rest) < 99
    assert all(s.request is None for s in engine.slots)


def test_full_queue_is_refused(model):
    engine = BatchEngine(model, max_batch=1, max_queue=1)
    try:
        long = engine.submit(PROMPTS[0], SamplingParams(do_sample=False, max_new_tokens=100))
        next(iter(long))  # the slot is busy now
        engine.submit(PROMPTS[1], SamplingParams(**GREEDY))
        with pytest.raises(QueueFullError):
            engine.submit(PROMPTS[2], SamplingParams(**GREEDY))
        long.cancel()
    finally:
        engine.close()
