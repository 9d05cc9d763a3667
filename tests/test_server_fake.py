"""The server over a scripted ChatGLM3 / GLM-4 model: tool calls end to end, and the schema fuzzed for 5xx.

The model is fake (it always writes the same reply) but everything else is real: the GLM tokenizers from
../shared/tokenizers, the chat format, the batch engine, the detokenizer, the routes.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from chatglm.messages import ChatMessage
from chatglm.server import create_app
from chatglm.tools import call_message, tools_message

from test_server_support import glm_tokenizer, scripted_pipeline, sse_json

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
ASK = [{"role": "user", "content": "What's the weather in Beijing today?"}]
CALLS = {
    "chatglm3": 'get_current_weather\n```python\ntool_call(location="Beijing")\n```',
    "glm4": 'get_current_weather\n{"location": "Beijing"}',
}


@pytest.fixture(scope="module")
def tokenizers(shared_dir):
    return {family: glm_tokenizer(shared_dir, family) for family in CALLS}


def serve(pipeline):
    return TestClient(create_app(pipeline, max_batch=2, max_queue=4))


@pytest.mark.parametrize("family", list(CALLS))
def test_a_native_tool_call_becomes_openai_tool_calls(tokenizers, family):
    tok = tokenizers[family]
    pipe = scripted_pipeline(tok, CALLS[family], end_name="<|observation|>")
    with serve(pipe) as client:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_current_weather"
        assert json.loads(call["function"]["arguments"]) == {"location": "Beijing"}
    # the model was shown the tools in its own format
    expected = tok.encode_chat([tools_message(family, [WEATHER["function"]]), ChatMessage("user", ASK[0]["content"])])
    assert pipe.model.prompt() == expected


@pytest.mark.parametrize("family", list(CALLS))
def test_tool_calls_when_streaming(tokenizers, family):
    pipe = scripted_pipeline(tokenizers[family], CALLS[family], end_name="<|observation|>")
    with serve(pipe) as client, client.stream(
            "POST", "/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "stream": True}) as r:
        assert r.status_code == 200
        chunks = sse_json(r.iter_lines())
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == ""  # the call is never shown as text
    [calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_current_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"location": "Beijing"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_then_a_call_in_a_second_part(tokenizers):
    tok = tokenizers["chatglm3"]
    reply = ["\nLet me look that up.", tok.specials["<|assistant|>"], CALLS["chatglm3"]]
    with serve(scripted_pipeline(tok, reply, end_name="<|observation|>")) as client:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "Let me look that up."
    assert message["tool_calls"][0]["function"]["name"] == "get_current_weather"


def test_calls_and_results_go_back_to_the_model_in_its_format(tokenizers):
    tok = tokenizers["chatglm3"]
    pipe = scripted_pipeline(tok, "\nIt is 22 degrees in Beijing.")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "Beijing"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]
    with serve(pipe) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER]})
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("It is 22 degrees in Beijing.", "stop")
    assert "tool_calls" not in choice["message"]
    expected = tok.encode_chat([
        tools_message("chatglm3", [WEATHER["function"]]), ChatMessage("user", ASK[0]["content"]),
        call_message("chatglm3", "get_current_weather", '{"location": "Beijing"}'),
        ChatMessage("observation", '{"temperature": 22}')])
    assert pipe.model.prompt() == expected


@pytest.mark.parametrize("family", list(CALLS))
def test_completion_prompts_keep_typed_specials_as_text_unless_asked(tokenizers, family):
    tok = tokenizers[family]
    prompt = "<|user|>\nHi<|assistant|>"
    with serve(scripted_pipeline(tok, "Hello")) as client:
        for parse, expected in ((None, tok.encode(prompt, add_special_tokens=True)),
                                (True, [*tok.encode("", add_special_tokens=True), tok.specials["<|user|>"],
                                        *tok.encode("\nHi"), tok.specials["<|assistant|>"]])):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "parse_special": parse})
            assert r.status_code == 200, r.text
            assert client.app.state.server.pipeline.model.prompt() == expected
    assert not set(tok.encode(prompt)) & set(tok.specials.values())


def test_tool_choice_none_leaves_the_tools_out(tokenizers):
    tok = tokenizers["glm4"]
    pipe = scripted_pipeline(tok, CALLS["glm4"], end_name="<|observation|>")
    with serve(pipe) as client:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == CALLS["glm4"]
    assert pipe.model.prompt() == tok.encode_chat(ASK)


def test_glm_replies_drop_their_metadata_line_on_every_protocol(tokenizers):
    with serve(scripted_pipeline(tokenizers["chatglm3"], "\nHello, I am ChatGLM3.")) as client:
        assert client.post("/", json={"prompt": "hi"}).json()["response"] == "Hello, I am ChatGLM3."
        assert client.post("/chat", json={"prompt": "hi"}).json()["content"] == "Hello, I am ChatGLM3."
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == "Hello, I am ChatGLM3."


def test_no_request_gets_a_server_error(tokenizers):
    """Schemathesis requests for every operation of the OpenAPI schema; none may answer 5xx."""
    app = create_app(scripted_pipeline(tokenizers["chatglm3"], "\nHello there."), max_batch=2, max_queue=8)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=[not_a_server_error])

    with TestClient(app):  # the lifespan closes the engine afterwards
        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            if "embedding" in operation.path:  # the real embedding model is tested live; here only slow
                continue
            # valid bodies, and (where there is a body) bodies that break the schema
            modes = list(GenerationMode) if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]
            for mode in modes:
                given(case=operation.as_strategy(generation_mode=mode))(check)()
    assert len(operations) >= 14
