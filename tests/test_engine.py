"""Prefill/decode over the KV cache and sampling, on tiny random models."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.engine import ContextLengthError, Sampler, SamplingParams, budget, generate
from chatglm.pipeline import StopStrings

from checkpoints import tiny_glm, tiny_llama


@pytest.fixture(scope="module", params=["glm", "llama"])
def model(request, tmp_path_factory):
    ref = tiny_glm(layers=2) if request.param == "glm" else tiny_llama(layers=2)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return load_model(folder, dtype="f32")


PROMPT = [5, 9, 31, 2, 77]


def test_greedy_matches_full_prefill_argmax(model):
    out = list(generate(model, PROMPT, SamplingParams(do_sample=False, max_new_tokens=24)))
    assert len(out) == 24
    logits = model.logits(PROMPT + out)
    assert np.argmax(logits[len(PROMPT) - 1 : -1], axis=-1).tolist() == out


def test_stop_ids_end_generation(model):
    out = list(generate(model, PROMPT, SamplingParams(do_sample=False, max_new_tokens=24)))
    stop = out[5]
    first = out.index(stop)
    cut = list(generate(model, PROMPT, SamplingParams(do_sample=False, max_new_tokens=24), {stop}))
    assert cut == out[:first]


def test_seeded_sampling_is_reproducible(model):
    params = dict(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=16)
    a = list(generate(model, PROMPT, SamplingParams(seed=7, **params)))
    b = list(generate(model, PROMPT, SamplingParams(seed=7, **params)))
    c = list(generate(model, PROMPT, SamplingParams(seed=8, **params)))
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    greedy = list(generate(model, PROMPT, SamplingParams(do_sample=False, max_new_tokens=10)))
    top1 = list(generate(model, PROMPT, SamplingParams(do_sample=True, temperature=1.5, top_k=1, seed=3,
                                                       max_new_tokens=10)))
    assert top1 == greedy


def test_max_length_counts_the_prompt(model):
    out = list(generate(model, PROMPT, SamplingParams(do_sample=False, max_length=len(PROMPT) + 3)))
    assert len(out) == 3


def test_too_long_max_length_is_clamped_with_a_warning(model, caplog):
    context = model.config.max_position
    with caplog.at_level(logging.WARNING, logger="chatglm"):
        assert budget(10, SamplingParams(max_length=20000), context) == context - 10
    assert "clamped" in caplog.text


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ContextLengthError, match="context is 128"):
        list(generate(model, list(range(130)), SamplingParams()))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {Sampler(SamplingParams(top_p=0.7, temperature=1.0, seed=s))(logits, []) for s in range(200)}
    assert seen == {0, 1}


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    greedy = SamplingParams(do_sample=False)
    assert Sampler(greedy)(logits, [0]) == 0
    assert Sampler(SamplingParams(do_sample=False, repetition_penalty=1.2))(logits, [0]) == 1


def test_vocab_limit_never_samples_padding_rows():
    logits = torch.tensor([0.0, 0.0, 9.0, 9.0])
    assert Sampler(SamplingParams(do_sample=False), vocab_limit=2)(logits, []) in (0, 1)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_values_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_stop_strings_cut_and_hold_back():
    s = StopStrings(["</end>"])
    assert s.feed("hello </") == "hello "
    assert s.feed("en") == ""
    assert s.feed("d> tail") == ""
    assert s.stopped
    t = StopStrings(["STOP"])
    assert t.feed("ST") == "" and t.feed("ay") == "STay" and t.flush() == ""
