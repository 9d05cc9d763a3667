"""`chatglm serve --replicas 2` on a real local Ray instance, with the default model.

One server for the module (Ray and two replicas take a while to start on two cores); the last test stops it
with SIGTERM while a reply is streaming.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from patience import PATIENCE, free_port
from test_server_support import sse_events

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (a test dependency: make install)")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}



@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("replicas") / "server.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatglm", "serve", "--replicas", "2", "--threads", "1",
                                 "--port", str(port), "--api-key", KEY, "--max-batch", "2", "--max-queue", "2"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    proc.log = log
    try:
        deadline = time.monotonic() + PATIENCE
        while not _healthy(url):
            assert proc.poll() is None, f"the server exited:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def chat(url: str, messages: list[dict], max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=PATIENCE)


def replicas_seen(url: str, tries: int = 40) -> dict[str, int]:
    """Replica id -> pid, from /health answered by whichever replica the router picks."""
    seen = {}
    for _ in range(tries):
        health = httpx.get(f"{url}/health", timeout=PATIENCE).json()
        seen[health["replica"]] = health["pid"]
    return seen


def test_conversation_text_grows_with_the_conversation():
    from chatglm.server.replicas import conversation_text

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    text1, text2 = (conversation_text(json.dumps({"messages": m}).encode()) for m in (turn1, turn2))
    assert text2.startswith(text1) and "Be brief." in text1
    glm = conversation_text(json.dumps({"query": "q2", "history": [["q1", "a1"]]}).encode())
    assert glm.startswith(conversation_text(json.dumps({"prompt": "q1"}).encode())) and glm.endswith("q2")
    assert conversation_text(b"{not json") == conversation_text(b"[1, 2]") == ""


def test_replica_counts_are_checked():
    from chatglm.server.replicas import parse_replicas

    assert parse_replicas("3") == 3 and parse_replicas("auto:1-4") == (1, 4)
    for bad in ("0", "two", "auto:4-1", "auto:", "auto:0-2"):
        with pytest.raises(ValueError, match="--replicas"):
            parse_replicas(bad)


def test_plans_come_from_command_line_or_config_options():
    from ray.serve import Application

    from chatglm.server.replicas import ReplicaPlan, build_app

    plan = ReplicaPlan.from_options({"model": "/m.gguf", "replicas": "auto:1-3", "threads": "2", "max_batch": 4,
                                     "api_key": "k", "routing": "balanced"})
    assert (plan.replicas, plan.threads, plan.max_ongoing, plan.routing) == ((1, 3), 2, 4 + 64, "balanced")
    assert plan.options == {"dtype": "auto", "device": "cpu", "threads": 2, "draft": None, "lookup": 0,
                            "use_mmap": True} and plan.app_options["api_key"] == "k"  # shared pages
    assert plan.app_options["max_queue"] == 64 + 4  # room for slots being freed: Ray's backpressure answers first
    assert isinstance(build_app({"model": "/m.gguf", "replicas": 2}), Application)
    assert ReplicaPlan.from_options({"model": "/m.gguf", "use_mmap": False}).options["use_mmap"] is False
    assert ReplicaPlan.from_options({"model": "/m.gguf", "use_mmap": None}).options["use_mmap"] is True  # not given
    with pytest.raises(ValueError, match=r"use_mmap \(--mmap/--no-mmap\) is 'no'; expected true"):
        ReplicaPlan.from_options({"model": "/m.gguf", "use_mmap": "no"})  # refused before any replica starts


def test_health_names_the_replica_and_every_response_carries_it(server):
    _, url = server
    r = httpx.get(f"{url}/health", timeout=PATIENCE)
    body = r.json()
    assert set(body) == {"status", "model", "replica", "pid"} and body["status"] == "ok"
    assert r.headers["x-chatglm-replica"] == body["replica"]
    reply = chat(url, [{"role": "user", "content": "Hi"}])
    assert reply.status_code == 200 and reply.headers["x-chatglm-replica"]


def test_replies_come_from_both_replicas(server):
    _, url = server
    questions = [f"Write a story about the number {k}." for k in range(8)]
    with ThreadPoolExecutor(8) as pool:  # more than one replica takes at once (2 running + 2 queued)
        replies = list(pool.map(lambda q: chat(url, [{"role": "user", "content": q}], max_tokens=64), questions))
    assert all(r.status_code == 200 for r in replies)
    assert len({r.headers["x-chatglm-replica"] for r in replies}) == 2
    assert len(replicas_seen(url)) == 2


def test_turns_of_a_conversation_stay_on_one_replica(server):
    _, url = server
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in one short sentence."}]
    where = []
    for turn in ("What is the capital of Germany?", "And of France?", "And of Italy?", "And of Spain?",
                 "Which of them is largest?"):
        messages.append({"role": "user", "content": turn})
        r = chat(url, messages, max_tokens=16)
        assert r.status_code == 200
        where.append(r.headers["x-chatglm-replica"])
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        chat(url, [{"role": "user", "content": f"Unrelated question {len(where)}: what is 2+2?"}])  # other traffic
    assert len(set(where)) == 1, where


def test_auth_and_bad_input_behave_as_in_one_process(server):
    _, url = server
    no_key = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=PATIENCE)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    bad_json = httpx.post(f"{url}/v1/chat/completions", content=b"{oops", timeout=PATIENCE,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    bad_role = chat(url, [{"role": "wizard", "content": "x"}])
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages"
    assert httpx.get(f"{url}/no/such/route", headers=AUTH, timeout=PATIENCE).status_code == 404
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=PATIENCE).text
    assert 'chatglm_requests_total{replica="' in metrics


def test_ray_metrics_carry_every_replicas_counters_beside_ray_serves(server):
    proc, url = server
    metrics_url = re.search(r"counters with Ray Serve's own: (http://\S+/metrics)", proc.log.read_text()).group(1)
    replicas = set(replicas_seen(url))
    assert len(replicas) == 2
    deadline = time.monotonic() + PATIENCE
    while True:
        text = httpx.get(metrics_url, timeout=PATIENCE).text
        labelled = set(re.findall(r'^ray_chatglm_requests_total\{[^}]*replica="(\w+)"', text, re.M))
        if replicas <= labelled and "ray_serve_" in text:
            break
        assert time.monotonic() < deadline, f"replicas in Ray's metrics: {labelled}, expected {replicas}"
        time.sleep(1)


def test_openai_client_streams_through_the_replicas(server):
    from openai import OpenAI

    _, url = server
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=PATIENCE)
    stream = client.chat.completions.create(model="default", stream=True, temperature=0, max_tokens=12,
                                            messages=[{"role": "user", "content": "What is the capital of Germany?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Berlin" in text and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_full_service_answers_503_with_retry_after(server):
    """Two replicas x (2 running + 2 queued) and 8 waiting in Ray: 24 requests at once overflow it."""
    _, url = server
    body = {"temperature": 0, "max_tokens": 160}
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda k: httpx.post(
            f"{url}/v1/chat/completions", headers=AUTH, timeout=PATIENCE,
            json={**body, "messages": [{"role": "user", "content": f"Write a poem about the number {k}."}]}),
            range(24)))
    busy = [r for r in replies if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full" for r in busy)
    assert {r.status_code for r in replies} == {200, 503}


def _outcome(url: str, k: int) -> str:
    """'ok', or how a request on a replica that died ended: a 503 error object or an SSE error event."""
    body = {"messages": [{"role": "user", "content": f"Write a long story about the number {k}."}],
            "temperature": 0, "max_tokens": 200, "stream": k % 2 == 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=PATIENCE) as r:
        if r.status_code != 200:
            r.read()
            assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable", r.text
            return "503"
        if not body["stream"]:
            return "ok" if json.loads(r.read())["choices"][0]["finish_reason"] else "bad"
        events = sse_events(r.iter_lines())
    if events[-1] == ("message", "[DONE]"):
        return "ok"
    name, data = events[-1]
    assert name == "error" and json.loads(data)["error"]["code"] == "replica_unavailable", events[-3:]
    return "sse-error"


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(server):
    _, url = server
    before = replicas_seen(url)
    assert len(before) == 2
    victim, victim_pid = next(iter(before.items()))
    with ThreadPoolExecutor(4) as pool:  # what one replica can hold (2 running, 2 queued): retries fit
        running = [pool.submit(_outcome, url, k) for k in range(4)]
        time.sleep(2)  # let the replies start on both replicas
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = [f.result() for f in running]
    assert set(outcomes) <= {"ok", "503", "sse-error"}
    after = [chat(url, [{"role": "user", "content": f"Question {k} after the failure."}]) for k in range(6)]
    assert [r.status_code for r in after] == [200] * 6
    deadline = time.monotonic() + PATIENCE
    while True:
        live = replicas_seen(url, tries=10)
        if len(live) == 2 and victim not in live:
            break
        assert time.monotonic() < deadline, f"replicas after the kill: {live}"
        time.sleep(1)
    print(f"replica replaced {time.monotonic() - killed_at:.1f} s after SIGKILL; outcomes {outcomes}")


def test_sigterm_drains_the_reply_in_flight(server):
    proc, url = server
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0,
            "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=PATIENCE) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        proc.send_signal(signal.SIGTERM)
        events = sse_events([first, "", *lines])
    assert events[-1] == ("message", "[DONE]")
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] in ("stop", "length")
    assert proc.wait(timeout=PATIENCE) == 0
