"""The engine's token-selection extras: logprobs of the raw logits, the prompt's own logprobs (echo), n
continuations from one prefill, and a grammar's token mask (llguidance over the default model's vocabulary)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatglm.engine import SamplingParams, generate

from test_batching import engine, model  # noqa: F401 - a tiny random llama and a batch engine of 4 slots

SAMPLE = dict(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=10)




def log_softmax(rows: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(rows).double(), dim=-1).numpy()


def test_logprobs_are_the_log_softmax_of_the_raw_logits_whatever_the_temperature(engine, model):
    prompt = [5, 9, 31, 7]
    params = SamplingParams(**{**SAMPLE, "temperature": 1.7}, presence_penalty=1.5, logprobs=3, seed=4)
    request = engine.submit(prompt, params)
    out = list(request)
    table = log_softmax(model.logits(prompt + out)[len(prompt) - 1 : -1])
    assert len(request.logprobs) == len(out)
    for row, (token, value, top), step in zip(table, request.logprobs, range(len(out))):
        assert token == out[step]
        assert value == pytest.approx(row[token], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-row)[:3])
        assert [v for _, v in top] == pytest.approx(sorted(row)[::-1][:3], abs=1e-4)


def test_echo_scores_every_prompt_token_against_a_full_prefill(engine, model):
    prompt = [3, 3, 50, 51, 52, 53, 8, 1]
    engine.submit(prompt[:5], SamplingParams(do_sample=False, max_new_tokens=2)).tokens.get()  # a cached prefix
    request = engine.submit(prompt, SamplingParams(do_sample=False, max_new_tokens=0, prompt_logprobs=True,
                                                   logprobs=1))
    assert list(request) == [] and request.finish_reason == "length"
    table = log_softmax(model.logits(prompt))
    assert request.prompt_logprobs[0] is None
    for k, (token, value, top) in enumerate(request.prompt_logprobs[1:], 1):
        assert token == prompt[k]
        assert value == pytest.approx(table[k - 1, token], abs=1e-4)
        assert top[0][0] == int(np.argmax(table[k - 1]))


def test_n_continuations_share_one_prefill_and_repeat_with_their_seeds(engine, model):
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    before = dict(engine.stats)
    group = engine.submit_group(prompt, [SamplingParams(**SAMPLE, seed=100 + k) for k in range(3)])
    replies = [list(r) for r in group]
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == len(prompt)
    assert engine.stats["reused_tokens"] - before["reused_tokens"] == 2 * len(prompt)
    assert len({tuple(r) for r in replies}) > 1, "three seeds drew the same reply"
    for k, reply in enumerate(replies):  # each as drawn alone with its seed
        assert reply == list(generate(model, prompt, SamplingParams(**SAMPLE, seed=100 + k)))


@pytest.fixture(scope="module")
def pipeline(default_gguf):
    from chatglm.pipeline import Pipeline

    return Pipeline(default_gguf)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                         "pets": {"type": "array", "maxItems": 2,
                                  "items": {"type": "object", "required": ["kind"], "additionalProperties": False,
                                            "properties": {"kind": {"enum": ["cat", "dog"]}}}}}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_holds_at_temperature_one(pipeline, seed):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = pipeline.chat([{"role": "user", "content": "Describe a person."}], response_format=fmt, temperature=1.0,
                          top_p=1.0, max_new_tokens=120, seed=seed)
    jsonschema.validate(json.loads(reply.content), PERSON)


def test_json_object_and_refusals(pipeline):
    from chatglm.grammar import GrammarError

    for seed in range(3):
        reply = pipeline.chat([{"role": "user", "content": "Give a JSON object with a name and an age."}],
                              response_format={"type": "json_object"}, temperature=0.7, max_new_tokens=200, seed=seed)
        assert isinstance(json.loads(reply.content), dict)
    with pytest.raises(GrammarError, match=r"properties\.a") as e:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": 7}}}}}
        pipeline.chat([{"role": "user", "content": "hi"}], response_format=bad)
    assert e.value.param == "response_format"


def test_cli_json_schema(default_gguf, tmp_path):
    import subprocess
    import sys

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text('{"type": 5}')
    run = [sys.executable, "-m", "chatglm", "chat", "-m", str(default_gguf), "-p", "Pick a colour.", "--temp", "0.8",
           "--seed", "1", "--json-schema"]
    good = subprocess.run(run + [str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout.strip().splitlines()[-1])["colour"] in ("red", "green", "blue")
    bad = subprocess.run(run + [str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "bad.json: schema.type is not a valid JSON Schema" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm3-6b", "codegeex2-6b", "glm-4-9b", "default"])
def test_a_schema_mask_admits_a_valid_reply_token_by_token_in_each_real_vocabulary(name, shared_dir, default_gguf):
    """token_bytes spells each vocabulary's text as decode() does, so a valid reply is never masked away (where the
    grammar forces bytes, llguidance allows its own spelling of them, not every one)."""
    from chatglm.grammar import Vocabulary, json_grammar
    from chatglm.loaders import open_checkpoint
    from chatglm.tokenizers import load_tokenizer

    tokenizer = (open_checkpoint(default_gguf) if name == "default" else None)
    tokenizer = tokenizer.load_tokenizer() if tokenizer else load_tokenizer(shared_dir / "tokenizers" / name)
    vocab = Vocabulary(tokenizer, tokenizer.eos_ids)
    reply = '{"name": "Ann", "age": 31, "pets": [{"kind": "cat"}]}'
    ids = tokenizer.encode(reply)
    assert b"".join(tokenizer.token_bytes(i) for i in ids).decode().strip() == reply
    mask = vocab.mask(json_grammar("llama", PERSON))
    logits = torch.zeros(tokenizer.vocab_size)
    assert mask.apply(logits)[ids[0]] == 0
    rest = reply.encode()
    while rest:  # the reply can be written: some allowed token always spells its next bytes
        allowed = torch.isfinite(mask.apply(logits)).nonzero().flatten().tolist()
        fits = [i for i in allowed if tokenizer.token_bytes(i) and rest.startswith(tokenizer.token_bytes(i))]
        assert fits, rest
        token = max(fits, key=lambda i: len(tokenizer.token_bytes(i)))
        mask.accept(token)
        rest = rest[len(tokenizer.token_bytes(token)):]
    allowed = torch.isfinite(mask.apply(logits)).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= set(tokenizer.eos_ids)  # the reply is complete: only a stop token is left
