"""The server in process (FastAPI's TestClient) over the real default model: refusals, auth, CORS, queue, metrics."""
from __future__ import annotations

import itertools
import json
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chatglm.engine import SamplingParams
from chatglm.pipeline import Pipeline
from chatglm.server import create_app

from patience import PATIENCE
from test_server_support import sse_events

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def pipeline(default_gguf):
    return Pipeline(default_gguf)


@pytest.fixture(scope="module")
def client(pipeline):
    with TestClient(create_app(pipeline, max_batch=2, max_queue=4)) as c:
        yield c


def metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def assert_error(r, status: int, param: str | None = None, code: str | None = None):
    """OpenAI's error object, never a traceback."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "temperature": -1}, "temperature"),
    ({"messages": HI, "top_p": 2}, "top_p"),
    ({"messages": HI, "max_tokens": -5}, "max_tokens"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": 10**12}, "max_tokens"),
    ({"messages": HI, "n": 0}, "n"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "stop": 7}, "stop"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({}, "messages"),
])
def test_bad_chat_requests_get_400_with_the_openai_error_object(client, body, param):
    assert_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_malformed_json_and_wrong_bodies(client):
    bad = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert_error(bad, 400)
    assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(client.post("/", json={"history": []}), 400, "prompt")
    assert_error(client.post("/", json={"prompt": "hi", "history": [["only a question"]]}), 400, "history")
    assert_error(client.post("/chat", json={"history": []}), 400, "prompt")
    assert_error(client.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    assert_error(client.post("/v1/embeddings", json={"input": []}), 400, "input")


def test_prompts_longer_than_the_context_are_refused(client):
    long = [{"role": "user", "content": "hello " * 9000}]
    assert_error(client.post("/v1/chat/completions", json={"messages": long}), 400, "messages",
                 "context_length_exceeded")
    assert_error(client.post("/", json={"prompt": "hello " * 9000}), 400, code="context_length_exceeded")


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_the_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        client.post("/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
        client.post("/v1/chat/completions", json={"messages": [{"role": "wizard"}]})
    r = client.post("/v1/chat/completions", json={"messages": HI, **GREEDY})
    assert r.status_code == 200
    reply = r.json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= usage["prompt_tokens"] + 8


def test_stop_strings_cut_the_reply(client):
    full = client.post("/v1/chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 12}).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:][:6]  # from the middle of the reply: longer than one token
    cut = client.post("/v1/chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 12, "stop": stop})
    choice = cut.json()["choices"][0]
    assert choice["message"]["content"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_chatglm_max_length_past_the_context_is_clamped(client):
    r = client.post("/", json={"prompt": "Hi", "history": [], "max_length": 20000, "temperature": 0.01})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == 200 and body["history"] == [["Hi", body["response"]]] and body["response"]
    assert time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")


def test_index_answers_api_clients_json_and_browsers_the_page(client):
    assert client.get("/").json() == {"message": "started", "success": True}
    assert client.get("/", headers={"Accept": "application/json"}).json()["success"] is True
    page = client.get("/", headers={"Accept": "text/html,*/*"})
    assert "text/html" in page.headers["content-type"] and "<html" in page.text.lower()


def test_tokenize_and_free_gc(client, pipeline):
    body = client.post("/tokenize", json={"prompt": "hello world", "max_length": 4096}).json()
    assert body["tokenIds"] == pipeline.tokenizer.encode("hello world", add_special_tokens=True)
    assert "".join(body["tokens"]) == "hello world"
    assert len(client.post("/tokenize", json={"prompt": "hello world " * 50, "max_length": 5}).json()["tokenIds"]) == 5
    assert client.get("/free_gc").json() == {"success": True}


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    before = metrics(client)
    client.post("/v1/completions", json={"prompt": "One, two,", **GREEDY})
    after = metrics(client)
    assert after["chatglm_requests_total"] == before["chatglm_requests_total"] + 1
    assert after["chatglm_generated_tokens_total"] > before["chatglm_generated_tokens_total"]
    assert after["chatglm_queue_depth"] == 0 and after["chatglm_batch_size"] == 0
    assert {"chatglm_prefill_tokens_total", "chatglm_reused_tokens_total", "chatglm_cancelled_requests_total",
            "chatglm_rejected_requests_total"} <= set(after)


def test_stream_on_post_root_sends_the_growing_response(client):
    with client.stream("POST", "/", json={"prompt": "Hi", "temperature": 0, "max_length": 60, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(data) for _, data in sse_events(r.iter_lines())]
    responses = [e["response"] for e in events]
    assert len(responses) > 1 and all(b.startswith(a) for a, b in itertools.pairwise(responses))
    assert events[-1]["history"] == [["Hi", responses[-1]]]


@pytest.fixture
def keyed(pipeline):
    with TestClient(create_app(pipeline, api_key="s3cret", max_batch=1)) as c:
        yield c


def test_api_key_guards_every_route_but_health(keyed):
    assert keyed.get("/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/", "/openapi.json"):
        assert_error(keyed.get(path), 401, code="invalid_api_key")
        assert_error(keyed.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert keyed.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert keyed.get("/v1/models").headers["www-authenticate"] == "Bearer"


def test_api_key_from_the_environment(pipeline, monkeypatch):
    monkeypatch.setenv("CHATGLM_API_KEY", "from-env")
    with TestClient(create_app(pipeline, max_batch=1)) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_cors_is_off_unless_origins_are_given(client, pipeline):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://app.example"}).headers
    with TestClient(create_app(pipeline, api_key="k", cors_origins=["http://app.example"], max_batch=1)) as c:
        r = c.options("/v1/chat/completions", headers=preflight)  # preflights carry no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert c.get("/v1/models", headers={"Origin": "http://app.example"}).status_code == 401


def test_a_full_queue_answers_503_with_retry_after(pipeline):
    app = create_app(pipeline, max_batch=1, max_queue=1)
    engine = app.state.server.engine
    endless = SamplingParams(max_new_tokens=8000, do_sample=False)  # no stop ids: runs until cancelled
    with TestClient(app) as c:
        running = engine.submit([1, 2, 3], endless)
        deadline = time.monotonic() + PATIENCE
        while engine.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = engine.submit([1, 2, 3], endless)
        try:
            r = c.post("/v1/chat/completions", json={"messages": HI, **GREEDY})
            assert_error(r, 503, code="queue_full")
            assert r.headers["retry-after"] == "1"
            assert_error(c.post("/", json={"prompt": "Hi"}), 503)
            assert metrics(c)["chatglm_rejected_requests_total"] == 2
        finally:
            waiting.cancel()  # first, so it cannot take the slot the running one frees
            running.cancel()
        assert list(waiting) == [] and waiting.finish_reason == "cancelled"
        assert c.post("/v1/chat/completions", json={"messages": HI, **GREEDY}).status_code == 200


def test_one_process_server_never_imports_ray(default_gguf):
    """`chatglm serve` without --replicas stays as it was: the app and the command line load no Ray."""
    import subprocess
    import sys

    code = ("import sys; from chatglm.cli import build_parser; from chatglm.server import create_app; "
            "from chatglm.pipeline import Pipeline; create_app(Pipeline('default'));"
            "build_parser().parse_args(['serve']); assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr[-2000:]
