"""OpenAI's protocol beyond the basics, in process over the default model: structured outputs, logprobs, echo with
token-id prompts, n > 1, stream_options; and tool_choice on tiny random ChatGLM3 / GLM-4 models with real tokenizers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from chatglm.pipeline import Pipeline
from chatglm.server import create_app

from checkpoints import thudm_config, thudm_state_dict, tiny_glm, write_folder
from test_server import assert_error, client, pipeline  # noqa: F401 - the default model in process
from test_server_support import sse_events

HI = [{"role": "user", "content": "Name a colour."}]




def log_softmax(rows: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(rows).double(), dim=-1).numpy()


def test_echo_with_token_ids_gives_the_prompts_own_logprobs(client, pipeline):
    ids = pipeline.tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == pipeline.tokenizer.decode(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    table = log_softmax(pipeline.model.logits(ids))
    expected = [table[k - 1, ids[k]] for k in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(table[k].max(), abs=1e-4)
               for k, top in enumerate(lp["top_logprobs"][1:]))
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]


def test_echo_then_one_token_as_lm_eval_asks(client, pipeline):
    ids = pipeline.tokenizer.encode("One, two, three,")
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    greedy = int(np.argmax(pipeline.model.logits(ids)[-1]))
    assert lp["tokens"][-1] == pipeline.tokenizer.token_bytes(greedy).decode("utf-8", "replace")


def test_chat_logprobs_streamed_and_whole_agree_with_the_logits(client, pipeline):
    body = {"messages": HI, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert "".join(e["token"] for e in content).strip() == whole["message"]["content"].strip()
    prompt = pipeline.tokenizer.encode_chat(HI)
    first = log_softmax(pipeline.model.logits(prompt)[-1:])[0]  # greedy: the first token is the likeliest
    assert content[0]["logprob"] == pytest.approx(first.max(), abs=1e-4)
    assert [e["logprob"] for e in content[0]["top_logprobs"]] == pytest.approx(sorted(first)[::-1][:3], abs=1e-4)
    assert [e["bytes"] for e in content] == [list(e["token"].encode()) for e in content]
    assert all(len(e["top_logprobs"]) == 3 for e in content)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert "".join(e["token"] for e in streamed).strip() == text.strip() and len(streamed) == len(content)


def test_n_choices_are_seeded_and_reproducible(client):
    body = {"messages": HI, "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    first, again = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1
    one = client.post("/v1/chat/completions", json={**body, "n": 1, "seed": 8}).json()
    assert one["choices"][0]["message"]["content"] == texts[1]  # choice k is seeded with seed + k
    assert first["usage"]["completion_tokens"] >= 3


def test_stream_options_usage_and_max_completion_tokens(client):
    body = {"prompt": "Once upon a time", "max_tokens": 5, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}, "metadata": {"k": "v"}, "user": "u"}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
    assert events[-1]["usage"]["completion_tokens"] == 10 and events[-1]["choices"] == []
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}
    chat = client.post("/v1/chat/completions", json={"messages": HI, "max_completion_tokens": 3, "temperature": 0})
    assert chat.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                     "properties": {"a": {"type": "strin"}}}}},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "response_format"),
    ({"type": "yaml"}, "response_format"),
])
def test_bad_schemas_get_400_naming_the_part(client, fmt, param):
    r = client.post("/v1/chat/completions", json={"messages": HI, "response_format": fmt})
    assert_error(r, 400, param)


def test_bad_schema_message_names_the_schema_path(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": "strin"}}}}}
    r = client.post("/v1/chat/completions", json={"messages": HI, "response_format": fmt})
    assert "schema.properties.a.type" in r.json()["error"]["message"]
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}
    message = client.post("/v1/chat/completions", json={"messages": HI, "response_format": unsupported}).json()
    assert message["error"]["message"] == ('response_format.json_schema.schema is not supported by the grammar engine: '
                                           'Unimplemented keys: ["not"]')


def test_completions_follow_a_schema_and_bad_token_ids_are_refused(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    body = {"prompt": "A number as JSON:", "max_tokens": 40, "temperature": 1.0, "seed": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert isinstance(json.loads(text)["n"], int)
    assert_error(client.post("/v1/completions", json={"prompt": [1, 10**9]}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}), 400, "max_tokens")
    assert_error(client.post("/v1/chat/completions", json={"messages": HI, "tool_choice": "required"}), 400,
                 "tool_choice")


# ----- tool_choice on the tool families -----

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days", "metric"],
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                  "metric": {"type": "boolean"}}}}}
OTHER = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"]}}}


def tool_pipeline(shared_dir, tmp_path_factory, name: str, tokenizer: str, vocab: int) -> Pipeline:
    glm = tiny_glm(layers=1, vocab=vocab)
    config = thudm_config(glm, _name_or_path=name, seq_length=1024)
    folder = write_folder(tmp_path_factory.mktemp(name.split("/")[1]), config, thudm_state_dict(glm))
    shutil.copy(shared_dir / "tokenizers" / tokenizer, folder / "tokenizer.model")
    return Pipeline(folder, dtype="f32")


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def tool_client(request, shared_dir, tmp_path_factory):
    if request.param == "glm4":
        pipe = tool_pipeline(shared_dir, tmp_path_factory, "THUDM/glm-4-9b-chat", "glm-4-9b/tokenizer.model", 151552)
    else:
        pipe = tool_pipeline(shared_dir, tmp_path_factory, "THUDM/chatglm3-6b", "chatglm3-6b/tokenizer.model", 65024)
    with TestClient(create_app(pipe, max_batch=2)) as c:
        yield c


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_call_with_valid_arguments(tool_client, choice):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(3):
        body = {"messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}], "tools": [WEATHER, OTHER],
                "tool_choice": choice, "temperature": 1.0, "seed": seed, "max_tokens": 120}
        r = tool_client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice0 = r.json()["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", choice0
        call = choice0["message"]["tool_calls"][0]["function"]
        if isinstance(choice, dict) or call["name"] == "get_weather":
            assert call["name"] == "get_weather"
            jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
        else:
            assert call["name"] == "add" and isinstance(json.loads(call["arguments"])["a"], (int, float))


def test_tool_choice_none_and_auto_leave_the_reply_free(tool_client):
    for choice in ("none", "auto"):
        body = {"messages": HI, "tools": [WEATHER], "tool_choice": choice, "temperature": 0, "max_tokens": 4}
        assert tool_client.post("/v1/chat/completions", json=body).status_code == 200


def test_json_schema_on_the_tool_families_writes_the_metadata_line_first(tool_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
    for seed in range(2):
        body = {"messages": HI, "response_format": fmt, "temperature": 1.0, "seed": seed, "max_tokens": 30}
        message = tool_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert isinstance(json.loads(message["content"])["ok"], bool)


def test_streamed_completions_carry_echo_and_logprobs(client, pipeline):
    ids = pipeline.tokenizer.encode("Count: one, two,")
    body = {"prompt": ids, "max_tokens": 4, "echo": True, "logprobs": 1, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
    choices = [c for e in events for c in e["choices"]]
    assert choices[0]["text"] == pipeline.tokenizer.decode(ids)
    assert len(choices[0]["logprobs"]["tokens"]) == len(ids) and choices[0]["logprobs"]["token_logprobs"][0] is None
    streamed = [t for c in choices[1:] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert "".join(streamed) == "".join(c["text"] for c in choices[1:])
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert whole["text"] == "".join(c["text"] for c in choices)
