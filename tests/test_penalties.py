"""OpenAI's presence and frequency penalties: on the reply's tokens only, in both engine paths and the route.

The formula is OpenAI's documented one (as vLLM applies it): logit[j] -= frequency * count[j] +
presence * (count[j] > 0), where count[j] is how often token j is already in the reply.
"""
from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from chatglm.kv_cache import BlockPool
from fastapi.testclient import TestClient

from chatglm.engine import BatchEngine, Sampler, SamplingParams, generate
from chatglm.server import create_app

from test_server_support import glm_tokenizer, scripted_pipeline


class FixedLogits:
    """A model that gives every position the same logits, so greedy decoding alone repeats one token forever."""

    prefix_reusable = True

    def __init__(self, row: torch.Tensor, context: int = 256):
        self.row = row
        self.config = SimpleNamespace(max_position=context)
        self.device = torch.device("cpu")

    def new_cache(self, slots: int, max_len: int, **sizing) -> BlockPool:
        return BlockPool(slots, max_len)  # bookkeeping only: this model keeps no keys

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache, slots: torch.Tensor, last_only: bool = False,
                 take: torch.Tensor | None = None) -> torch.Tensor:
        width = 1 if last_only or take is not None else ids.shape[1]
        return self.row.expand(ids.shape[0], width, -1).clone()


ROW = torch.tensor([0.0, 1.0, 2.0, 3.0, 2.5, 1.5])  # token 3 wins every step unless penalized
PENALTIES = ["presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("presence, frequency", [(0.0, 0.5), (0.7, 0.0), (0.7, 0.5), (-0.4, -0.3)])
def test_a_reply_token_drops_by_the_formula_and_prompt_tokens_are_untouched(presence, frequency):
    logits = torch.tensor([0.0, 1.0, 2.0, 10.0, 3.0])
    prompt = [1, 2, 3, 3]  # token 3 in the prompt counts for nothing
    sampler = Sampler(SamplingParams(do_sample=False, presence_penalty=presence, frequency_penalty=frequency))
    reply: list[int] = []
    for k in range(1, 4):
        reply.append(sampler(logits, prompt + reply))
        assert reply == [3] * k
        expected = logits.clone()
        expected[3] -= frequency * k + presence
        torch.testing.assert_close(sampler.penalized(logits, prompt + reply), expected)


def test_penalties_apply_after_the_repetition_penalty():
    logits = torch.tensor([0.0, 1.0, 2.0, 10.0, 3.0])
    sampler = Sampler(SamplingParams(do_sample=False, repetition_penalty=2.0, frequency_penalty=1.0,
                                     presence_penalty=0.5))
    assert sampler(logits, [1, 2]) == 3
    # ChatGLM's penalty divides the positive logits of prompt and reply tokens; then OpenAI's subtract
    expected = torch.tensor([0.0, 1.0 / 2, 2.0 / 2, 10.0 / 2 - 1.0 - 0.5, 3.0])
    torch.testing.assert_close(sampler.penalized(logits, [1, 2, 3]), expected)


@pytest.mark.parametrize("name", PENALTIES)
def test_greedy_generation_stops_repeating_in_both_engine_paths(name):
    model, prompt = FixedLogits(ROW), [0, 1]
    plain = list(generate(model, prompt, SamplingParams(do_sample=False, max_new_tokens=6)))
    assert plain == [3] * 6
    params = SamplingParams(do_sample=False, max_new_tokens=6, **{name: 2.0})
    penalized = list(generate(model, prompt, params))
    assert len(penalized) == 6 and all(a != b for a, b in pairwise(penalized))
    engine = BatchEngine(model, max_batch=2)
    try:  # side by side in the batch engine, each request with its own counts
        both = [engine.submit(prompt, SamplingParams(do_sample=False, max_new_tokens=6)),
                engine.submit(prompt, SamplingParams(do_sample=False, max_new_tokens=6, **{name: 2.0}))]
        assert [list(r) for r in both] == [plain, penalized]
    finally:
        engine.close()


@pytest.mark.parametrize("name", PENALTIES)
def test_out_of_range_penalties_are_a_clear_error(name):
    with pytest.raises(ValueError, match=f"{name} must be between -2 and 2, not 3.0"):
        SamplingParams(**{name: 3.0}).validate()


@pytest.fixture(scope="module")
def colour_server(shared_dir):
    """The OpenAI routes over a ChatGLM3 tokenizer and a model that always prefers 'red', then green, blue, gold."""
    tok = glm_tokenizer(shared_dir, "chatglm3")
    row = torch.full((tok.vocab_size,), -1e4)
    for score, word in zip([3.0, 2.5, 2.0, 1.5], ["red", "green", "blue", "gold"]):
        [token] = tok.encode(word)
        row[token] = score
    pipe = scripted_pipeline(tok, "")
    pipe.model = FixedLogits(row)
    pipe.config = pipe.model.config
    with TestClient(create_app(pipe, max_batch=2, max_queue=4)) as client:
        yield client


@pytest.mark.parametrize("name", PENALTIES)
def test_the_openai_route_applies_the_penalties(colour_server, name):
    body = {"prompt": "Name a colour.", "max_tokens": 4, "temperature": 0}
    plain = colour_server.post("/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["text"].split() == ["red"] * 4
    penalized = colour_server.post("/v1/completions", json={**body, name: 2.0})
    assert penalized.status_code == 200, penalized.text
    assert penalized.json()["choices"][0]["text"].split() == ["red", "green", "blue", "gold"]


@pytest.mark.parametrize("name", PENALTIES)
def test_the_openai_route_rejects_a_penalty_out_of_range(colour_server, name):
    r = colour_server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], name: 3.0})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == name
