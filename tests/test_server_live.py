"""`chatglm serve` in a subprocess with the default model, driven by real clients: the official openai client,
LangChain (ChatOpenAI, and the ChatGLM LLM on POST /), plain SSE readers, seed 002's and 003's request shapes.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from patience import PATIENCE
from test_server_support import serving, sse_events




@pytest.fixture(scope="module")
def base_url(default_gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(["--max-batch", "8", "--log-level", "warning"], log) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=PATIENCE)


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


HI = [{"role": "user", "content": "Say hello."}]


def test_openai_chat(openai_client):
    r = openai_client.chat.completions.create(model="anything", messages=HI, max_tokens=16, temperature=0, seed=1,
                                              presence_penalty=0.5, frequency_penalty=0.5)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 0


def test_openai_chat_streaming(openai_client):
    stream = openai_client.chat.completions.create(model="anything", messages=HI, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens <= 16
    whole = openai_client.chat.completions.create(model="anything", messages=HI, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == text


def test_openai_completions_and_models(openai_client):
    r = openai_client.completions.create(model="anything", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 6
    streamed = openai_client.completions.create(model="anything", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    ids = [m.id for m in openai_client.models.list()]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1", "all-MiniLM-L6-v2"]


def test_openai_embeddings(openai_client):
    texts = ["A dog runs in the park.", "A puppy plays on the grass.", "Quarterly revenue grew by ten percent."]
    r = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384) and r.usage.prompt_tokens > 0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    floats = openai_client.embeddings.create(model="x", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, r.data[0].embedding, rtol=1e-5, atol=1e-6)


def test_langchain_chat_openai(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model="anything", temperature=0, max_tokens=16,
                     max_retries=0)
    answer = llm.invoke("Say hello.")
    assert isinstance(answer.content, str) and answer.content
    assert "".join(chunk.content for chunk in llm.stream("Say hello."))


def test_langchain_chatglm_llm_on_post_root(base_url):
    from langchain_community.llms import ChatGLM

    llm = ChatGLM(endpoint_url=f"{base_url}/", with_history=True)  # sends max_length 20000: clamped
    assert isinstance(llm.invoke("Say hello."), str)
    assert llm.history and llm.history[0][0] == "Say hello."


def test_chatglm2_sse_stream(base_url):
    body = {"query": "Say hello.", "history": [["Hi", "Hello!"]], "max_length": 120}
    with httpx.stream("POST", f"{base_url}/stream", json=body, timeout=PATIENCE) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert {name for name, _ in events} == {"delta"}
    data = [json.loads(d) for _, d in events]
    *deltas, last = data
    assert all(not d["finished"] for d in deltas) and "".join(d["delta"] for d in deltas) == last["response"]
    assert last == {"query": "Say hello.", "delta": "[EOS]", "response": last["response"], "finished": True,
                    "history": [["Hi", "Hello!"], ["Say hello.", last["response"]]]}


def test_chatglm2_chat_body_on_chat(base_url):
    r = httpx.post(f"{base_url}/chat", json={"query": "Say hello.", "history": [], "max_length": 100}, timeout=PATIENCE)
    body = r.json()
    assert body == {"query": "Say hello.", "response": body["response"], "success": True,
                    "history": [["Say hello.", body["response"]]]}


def glm_api_params(messages: list[dict]) -> dict:
    """Seed 002's TypeScript client, line for line: earlier turns become one flat history row."""
    prompt, history = "", []
    for item in messages:
        if item["role"] == "assistant":
            history += [prompt, item["content"]]
            prompt = ""
        else:
            prompt += f"{item['content']}\n"
    params = {"prompt": prompt}
    if history:
        params["history"] = [history]
    return params


def test_glm_api_client_logic(base_url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Say hello again."}]
    params = {**glm_api_params(messages), "max_length": 200, "top_p": 0.7, "temperature": 0.01}
    body = httpx.post(f"{base_url}/chat", json=params, timeout=PATIENCE).json()
    assert set(body) == {"content", "prompt_tokens", "completion_tokens", "total_tokens", "model", "object"}
    assert body["total_tokens"] == body["prompt_tokens"] + body["completion_tokens"] and body["content"]
    with httpx.stream("POST", f"{base_url}/chat-stream", json=params, timeout=PATIENCE) as r:
        pieces = [json.loads(d) for _, d in sse_events(r.iter_lines())]
    assert pieces and all(p["object"] == "chat.completion" for p in pieces)
    assert "".join(p["content"] for p in pieces)  # the client appends each piece with +=


def test_glm_api_embedding(base_url):
    body = httpx.post(f"{base_url}/embedding", json={"prompt": ["hello world", "hello GPT"]}, timeout=PATIENCE).json()
    assert body["object"] == "embedding" and body["model"] == "all-MiniLM-L6-v2"
    assert np.array(body["data"]).shape == (2, 384)


def test_eight_concurrent_streams_all_complete(openai_client, base_url):
    before = metrics(base_url)["chatglm_requests_total"]
    prompts = [f"Name a color, then count to {k + 2}." for k in range(8)]

    def run(prompt: str):
        stream = openai_client.chat.completions.create(model="anything", temperature=0, max_tokens=24, stream=True,
                                                       messages=[{"role": "user", "content": prompt}])
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, prompts, timeout=PATIENCE))
    assert all(text and finish in ("stop", "length") for text, finish in results)
    assert metrics(base_url)["chatglm_requests_total"] == before + 8


def test_a_client_that_disconnects_frees_its_slot(base_url):
    before = metrics(base_url)
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=PATIENCE) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6))]
    assert any(line.startswith("data:") for line in received)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        m = metrics(base_url)
        if m["chatglm_cancelled_requests_total"] == before["chatglm_cancelled_requests_total"] + 1 \
                and m["chatglm_batch_size"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the slot was not freed: {m}")
    assert m["chatglm_generated_tokens_total"] - before["chatglm_generated_tokens_total"] < 4000  # not run to the end


def test_a_follow_up_turn_reuses_the_conversation_prefix(openai_client, base_url):
    turn = [{"role": "user", "content": "Tell me one fact about the sea."}]
    first = openai_client.chat.completions.create(model="anything", messages=turn, max_tokens=20, temperature=0)
    before = metrics(base_url)["chatglm_reused_tokens_total"]
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And one about rivers."}]
    openai_client.chat.completions.create(model="anything", messages=turn, max_tokens=8, temperature=0)
    assert metrics(base_url)["chatglm_reused_tokens_total"] - before >= first.usage.prompt_tokens
