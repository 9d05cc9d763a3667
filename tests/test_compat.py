"""The THUDM drop-in: the seeds' own model.chat code and seed 003's whole server, import line swapped."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from chatglm.compat import AutoModel, AutoTokenizer

from checkpoints import thudm_config, thudm_state_dict, tiny_glm, write_folder
from patience import PATIENCE, free_port


@pytest.fixture(scope="module")
def model(default_gguf):
    return AutoModel.from_pretrained("default", trust_remote_code=True).half().cuda().eval()


def test_seed_004_chat_session(model, caplog):
    tokenizer = AutoTokenizer.from_pretrained("default", trust_remote_code=True)
    response, history = model.chat(tokenizer, "What is the capital of Germany?", history=[], do_sample=False,
                                   max_length=256)
    assert "Berlin" in response and history == [("What is the capital of Germany?", response)]
    response2, history = model.chat(tokenizer, "And of Italy?", history=history, do_sample=False, max_length=512)
    assert response2 and len(history) == 2 and history[1][1] == response2


def test_stream_chat_grows_to_the_chat_reply(model):
    steps = list(model.stream_chat(None, "Name three colors.", history=[], do_sample=False, max_length=200))
    assert len(steps) > 2
    assert all(a[0] == b[0][: len(a[0])] for a, b in zip(steps, steps[1:]))  # each response extends the last
    final, history = steps[-1]
    assert (final, history) == model.chat(None, "Name three colors.", history=[], do_sample=False, max_length=200)


def test_cuda_without_gpu_warns_and_stays_on_cpu(default_gguf, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with caplog.at_level("WARNING", logger="chatglm"):
        m = AutoModel.from_pretrained("default").quantize(8).cuda()
    assert "no CUDA GPU" in caplog.text and m.pipeline.model.device.type == "cpu"


def test_chatglm3_history_is_role_dicts(shared_dir, tmp_path):
    glm = tiny_glm(layers=1, vocab=65024)
    folder = write_folder(tmp_path, thudm_config(glm), thudm_state_dict(glm))
    shutil.copy(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model", folder / "tokenizer.model")
    m = AutoModel.from_pretrained(folder, trust_remote_code=True).float()
    response, history = m.chat(AutoTokenizer.from_pretrained(folder), "你好", history=[], max_length=24)
    assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": response}]
    _, history = m.chat(None, "再见", history=history, max_length=40)
    assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]


def test_drop_in_tokenizer_encodes_as_the_official_one(shared_dir, tmp_path):
    """THUDM scripts call tokenizer.encode(text): the [gMASK] sop prefix by default, typed specials as text."""
    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model")
    ids = tokenizer.encode("<|user|> and <|assistant|> as plain text")
    assert ids == [64790, 64792, 906, 31007, 4865, 31007, 30994, 293, 906, 31007, 530, 18971, 31007, 30994, 362,
                   9462, 2254]
    assert tokenizer.decode(ids) == "<|user|> and <|assistant|> as plain text"
    assert tokenizer.encode("你好", add_special_tokens=False) == [36474, 54591]
    assert tokenizer.specials["[gMASK]"] == 64790  # our tokenizer's attributes pass through


def seed_003_script(shared_dir) -> str:
    """Seed 003's FastAPI SSE server, with only the import line and the model path changed."""
    text = (shared_dir / "seeds" / "003_f0653ef6d312db40.txt").read_text(encoding="utf-8")
    script = re.search(r"```python\n(# -\*-coding:utf-8-\*-.*?)```", text, re.S).group(1)
    script = script.replace("from transformers import AutoTokenizer, AutoModel",
                            "from chatglm.compat import AutoTokenizer, AutoModel")
    script, paths = re.subn(r'"/home/[^"]+"', '"default"', script)
    assert paths == 2
    return script



def post(url: str, body: dict, timeout: float = PATIENCE):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def test_seed_003_server_runs_unchanged(shared_dir, default_gguf, tmp_path):
    pytest.importorskip("sse_starlette", reason="the server extra (sse-starlette) is not installed")
    (tmp_path / "server.py").write_text(seed_003_script(shared_dir), encoding="utf-8")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "server.py", "-H", "127.0.0.1", "-P", str(port), "-d", "-1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + PATIENCE
        while True:
            try:
                assert json.load(urllib.request.urlopen(base + "/", timeout=PATIENCE)) == {"message": "started", "success": True}
                break
            except (OSError, urllib.error.URLError):
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode() if proc.poll() is not None else "no start")
                time.sleep(1)
        answer = json.load(post(base + "/chat", {"query": "What is the capital of Germany?", "history": []}))
        assert answer["success"] and answer["response"] and answer["history"][0][0] == "What is the capital of Germany?"
        events = []
        with post(base + "/stream", {"query": "Say hello.", "history": [["Hi", "Hello!"]]}) as r:
            for line in r:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1]["delta"] == "[EOS]" and events[-1]["finished"] is True
        assert "".join(e["delta"] for e in events[:-1]) == events[-1]["response"]
        assert events[-1]["history"][-1] == ["Say hello.", events[-1]["response"]]
        assert json.load(urllib.request.urlopen(base + "/free_gc", timeout=PATIENCE)) == {"success": True}
    finally:  # a reply still generating can hold uvicorn past SIGTERM: never leave the server running
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
