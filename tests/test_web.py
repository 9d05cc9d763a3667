"""The web chat page: its routes in process (TestClient), then the page itself in headless Chromium (playwright).

The browser tests serve the real app with uvicorn on a loopback port. Most use the scripted model of
test_server_support (it answers every prompt with a given text) under the default model's real tokenizer, so a
reply can hold Markdown, a Python code block and CJK text; one runs the real default model end to end.
"""
from __future__ import annotations

import copy
import html
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import uvicorn
from fastapi.testclient import TestClient

from chatglm.messages import ChatMessage
from chatglm.pipeline import Pipeline
from chatglm.server import create_app
from chatglm.tokenizers import load_tokenizer

from patience import PATIENCE
from test_server_support import ScriptedModel, scripted_pipeline

CODE = 'def greet(name):\n    print(f"你好，{name}！")  # 问候\n'
REPLY = f"Here is **bold** text and a function:\n\n```python\n{CODE}```\n\n中文回答：这是一个很长的句子，用来测试换行。\n"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # what Chromium sends
END = "<|im_end|>"  # SmolLM2's end of turn: one of the default model's stop ids


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return load_tokenizer(default_gguf)


@pytest.fixture(scope="module")
def client(tokenizer):
    with TestClient(create_app(scripted_pipeline(tokenizer, REPLY, END), max_batch=1)) as c:
        yield c


def code_text(block: str) -> str:
    """The text a <pre><code> block shows: its markup stripped and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", block))


def test_a_browser_gets_the_page_and_api_clients_keep_json(client):
    page = client.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta charset="utf-8">' in page.text and 'id="composer"' in page.text
    assert client.get("/").json() == {"message": "started", "success": True}
    assert client.get("/", headers={"Accept": "application/json"}).json() == {"message": "started", "success": True}


def test_the_page_files_are_served_with_their_types(client):
    page = client.get("/", headers=HTML).text
    assets = re.findall(r'(?:src|href)="(/web/static/[^"]+)"', page)
    types = {client.get(a).headers["content-type"].split(";")[0] for a in assets}
    assert types == {"text/css", "text/javascript"} or types == {"text/css", "application/javascript"}
    assert all(client.get(a).headers["content-type"].endswith("charset=utf-8") for a in assets)
    assert client.get("/web/static/missing.js").status_code == 404


def test_markdown_renders_highlighted_code_and_escapes_html(client):
    text = f"# Title\n\n<script>alert(1)</script> <b>bold?</b>\n\n[link](javascript:alert(1))\n\n```python\n{CODE}```\n"
    r = client.post("/web/markdown", json={"text": text})
    assert r.status_code == 200
    out = r.json()["html"]
    assert "<h1>Title</h1>" in out
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "<b>" not in out
    assert 'href="javascript' not in out
    [block] = re.findall(r'<pre><code class="language-python">(.*?)</code></pre>', out, re.DOTALL)
    assert "<span" in block and code_text(block) == CODE  # highlighted, and the code (CJK included) intact


def test_markdown_of_an_unknown_language_is_plain_escaped_code(client):
    out = client.post("/web/markdown", json={"text": "```nosuchlang\na < b && 你\n```"}).json()["html"]
    assert out == '<pre><code class="language-nosuchlang">a &lt; b &amp;&amp; 你\n</code></pre>\n'


def test_markdown_refuses_a_bad_body_in_one_line(client):
    r = client.post("/web/markdown", json={"txt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"


def test_with_an_api_key_the_page_loads_but_the_api_needs_the_key(tokenizer):
    with TestClient(create_app(scripted_pipeline(tokenizer, REPLY, END), api_key="k", max_batch=1)) as c:
        assert c.get("/", headers=HTML).status_code == 200
        assert c.get("/web/static/chat.js").status_code == 200
        assert c.get("/").status_code == 401  # the JSON greeting stays behind the key, as before
        assert c.post("/web/markdown", json={"text": "x"}).status_code == 401
        assert c.post("/web/markdown", json={"text": "x"}, headers={"Authorization": "Bearer k"}).status_code == 200


# --- the page in a real browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: make install")
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no Chromium on PATH for the browser tests: run `make browser` (installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@contextmanager
def serving(app) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=PATIENCE)
        sock.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def chat_page(browser, url: str):
    """A fresh page (its own localStorage) on the chat; no script error may happen on it."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


def send(page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def last_reply(page):
    """The newest assistant reply, once it has finished streaming and its final Markdown is rendered."""
    reply = page.locator(".msg.assistant").last
    reply.and_(page.locator(":not([aria-busy])")).wait_for(timeout=PATIENCE * 1000)
    return reply


def fed_prompt(model: ScriptedModel, expected: list[int]) -> list[int]:
    """What the model was last fed where `expected` should be, and the reply's first id after it.

    (ScriptedModel.prompt cuts at the first run of the script, which a conversation's earlier replies also hold.)
    """
    return [model.seen[0].get(p) for p in range(len(expected) + 1)]


class SlowModel(ScriptedModel):
    """The scripted model at a human pace, so a reply can be watched while it streams and stopped."""

    def __call__(self, *args, **kwargs):
        time.sleep(0.05)
        return super().__call__(*args, **kwargs)


def test_enter_sends_shift_enter_breaks_and_the_reply_renders(browser, tokenizer):
    pipe = scripted_pipeline(tokenizer, REPLY, END)
    app = create_app(pipe, max_batch=1)
    with serving(app) as url, chat_page(browser, url) as page:
        page.wait_for_function("document.querySelector('#model').innerText !== ''", timeout=PATIENCE * 1000)  # from /health
        assert page.locator("#model").inner_text() == app.state.server.model_id
        box = page.locator("#input")
        box.press_sequentially("Hello")
        box.press("Shift+Enter")
        box.press_sequentially("second line")
        assert box.input_value() == "Hello\nsecond line" and page.locator(".msg").count() == 0
        box.press("Enter")
        assert page.locator(".msg.user").inner_text() == "Hello\nsecond line" and box.input_value() == ""
        reply = last_reply(page)
        assert reply.locator("strong").inner_text() == "bold"
        assert reply.locator("pre code").inner_text() == CODE
        assert reply.locator("pre code span").count() > 0  # highlighted
        assert "中文回答：这是一个很长的句子，用来测试换行。" in reply.inner_text()
        assert reply.locator(".tail").inner_text() == ""  # all of it rendered, no raw text left

        send(page, "再来一次")  # the whole conversation goes with the next question
        last_reply(page)
        history = [ChatMessage("user", "Hello\nsecond line"), ChatMessage("assistant", REPLY),
                   ChatMessage("user", "再来一次")]
        expected = tokenizer.encode_chat(history)
        assert fed_prompt(pipe.model, expected) == expected + pipe.model.script[:1]

        page.locator("#clear").click()
        assert page.locator(".msg").count() == 0
        send(page, "fresh start")
        last_reply(page)
        expected = tokenizer.encode_chat([ChatMessage("user", "fresh start")])
        assert fed_prompt(pipe.model, expected) == expected + pipe.model.script[:1]


def test_enter_while_an_ime_composes_does_not_send(browser, tokenizer):
    with serving(create_app(scripted_pipeline(tokenizer, REPLY, END), max_batch=1)) as url, \
            chat_page(browser, url) as page:
        box = page.locator("#input")
        box.fill("ni hao")
        for init in ("{key: 'Enter', isComposing: true}", "{key: 'Enter', keyCode: 229}"):
            page.evaluate(f"""() => {{
                const e = new KeyboardEvent('keydown', {{...{init}, bubbles: true, cancelable: true}});
                if ({init}.keyCode) Object.defineProperty(e, 'keyCode', {{value: {init}.keyCode}});
                document.getElementById('input').dispatchEvent(e);
            }}""")
        assert page.locator(".msg").count() == 0 and box.input_value() == "ni hao"
        box.fill("")
        box.focus()
        page.keyboard.insert_text("你好")  # what an IME commits
        box.press("Enter")
        assert page.locator(".msg.user").inner_text() == "你好"
        last_reply(page)


def test_stop_ends_a_long_reply_and_the_server_stops_generating(browser, tokenizer):
    words = "one two three four five six seven eight nine ten".split() * 40  # tokens that end in no space
    pipe = scripted_pipeline(tokenizer, "Counting: " + " ".join(words), END)
    pipe.model = SlowModel(pipe.model.vocab_size, pipe.model.script, pipe.model.end)
    app = create_app(pipe, max_batch=1)
    server = app.state.server
    with serving(app) as url, chat_page(browser, url) as page:
        send(page, "count")
        streaming = page.locator(".msg.assistant[aria-busy]")
        streaming.filter(has_text="Counting: one two three").wait_for(timeout=PATIENCE * 1000)  # text shows while it streams
        page.locator("#stop").click()
        page.locator("#send").wait_for(timeout=PATIENCE * 1000)
        wait_until(lambda: server.cancelled == 1 and server.running() == 0, "the server to cancel the reply")
        assert server.engine.stats["tokens"] < len(pipe.model.script)
        shown = last_reply(page).inner_text()
        assert shown.startswith("Counting: one two three") and page.locator("#error").is_hidden()
        send(page, "again")  # the stopped reply stays in the conversation
        streaming.filter(has_text="Counting: one").wait_for(timeout=PATIENCE * 1000)
        page.locator("#stop").click()
        page.locator("#send").wait_for(timeout=PATIENCE * 1000)
        expected = tokenizer.encode_chat([ChatMessage("user", "count"), ChatMessage("assistant", shown),
                                          ChatMessage("user", "again")])
        assert fed_prompt(pipe.model, expected) == expected + pipe.model.script[:1]


def test_a_refusal_is_a_line_on_the_page(browser, tokenizer):
    with serving(create_app(scripted_pipeline(tokenizer, REPLY, END), max_batch=1)) as url, \
            chat_page(browser, url) as page:
        page.locator("#max_tokens").fill("100000000")
        send(page, "too long")
        error = page.locator("#error")
        error.wait_for(timeout=PATIENCE * 1000)
        assert "max_tokens" in error.inner_text() and "context" in error.inner_text()
        assert page.locator(".msg").count() == 0 and page.locator("#input").input_value() == "too long"


def test_reasoning_shows_apart_and_folds_when_the_answer_starts(browser, tokenizer):
    """A model that thinks first (its template opens <think>, as GLM-Z1's does): the reasoning arrives as
    reasoning_content and shows above the answer, folded once the answer starts; the next request carries only the
    answer."""
    thinking = copy.copy(tokenizer)
    thinking.chat_template = tokenizer.chat_template.replace("'<|im_start|>assistant\n'",
                                                             "'<|im_start|>assistant\n<think>'")
    assert thinking.chat_template != tokenizer.chat_template
    pipe = scripted_pipeline(thinking, "The user greets me.</think>\nHello **there**.", END)
    with serving(create_app(pipe, max_batch=1)) as url, chat_page(browser, url) as page:
        send(page, "Hi")
        reply = last_reply(page)
        reasoning = reply.locator("details.reasoning")
        assert reasoning.is_visible() and reasoning.get_attribute("open") is None
        assert reasoning.locator("div").text_content() == "The user greets me."
        assert reply.locator(".md strong").inner_text() == "there"
        assert "The user greets me." not in reply.locator(".md").inner_text()
        reasoning.locator("summary").click()
        assert reasoning.get_attribute("open") is not None and reasoning.locator("div").is_visible()

        send(page, "Again")
        last_reply(page)
        history = [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello **there**."), ChatMessage("user", "Again")]
        expected = thinking.encode_chat(history)
        assert fed_prompt(pipe.model, expected) == expected + pipe.model.script[:1]


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it(browser, tokenizer):
    with serving(create_app(scripted_pipeline(tokenizer, REPLY, END), api_key="s3cret", max_batch=1)) as url, \
            chat_page(browser, url) as page:
        send(page, "hi")
        page.locator("#key").wait_for(timeout=PATIENCE * 1000)
        page.wait_for_function("document.querySelector('#error').innerText.includes('API key')",
                               timeout=PATIENCE * 1000)  # the field shows before the error line is written
        page.locator("#key").fill("s3cret")
        page.locator("#key").press("Enter")
        page.locator("#key-form").wait_for(state="hidden", timeout=PATIENCE * 1000)
        page.locator("#input").press("Enter")  # the question came back into the box
        assert last_reply(page).locator("pre code").inner_text() == CODE
        assert page.evaluate("localStorage.getItem('chatglm.apiKey')") == "s3cret"


def test_the_default_model_end_to_end(browser, default_gguf):
    pipe = Pipeline(default_gguf)
    question = "What is the capital of France?"
    with serving(create_app(pipe, max_batch=1)) as url, chat_page(browser, url) as page:
        page.locator("#temperature").fill("0")
        page.locator("#max_tokens").fill("12")
        send(page, question)
        shown = last_reply(page).inner_text()
    expected = pipe.chat([ChatMessage("user", question)], do_sample=False, max_new_tokens=12).content
    assert shown.split() == expected.split()
