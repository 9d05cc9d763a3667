"""Pipeline end to end: the default model, and a tiny ChatGLM3 folder with the real tokenizer file."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import chatglm
from chatglm import ChatMessage, Pipeline
from chatglm.engine import SamplingParams, generate

from checkpoints import thudm_config, thudm_state_dict, tiny_glm, write_folder

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def pipe(default_gguf):
    return Pipeline("default")


def test_default_model_answers(pipe):
    reply = pipe.chat(QUESTION, do_sample=False, max_new_tokens=24)
    assert isinstance(reply, ChatMessage) and reply.role == "assistant"
    assert "Berlin" in reply.content


def test_stream_equals_whole_reply(pipe):
    whole = pipe.chat(QUESTION, do_sample=False, max_new_tokens=24).content
    deltas = list(pipe.chat([ChatMessage("user", "What is the capital of Germany?")], stream=True, do_sample=False,
                            max_new_tokens=24))
    assert len(deltas) > 3 and "".join(deltas) == whole


def test_reply_is_the_greedy_token_sequence(pipe):
    ids = pipe.tokenizer.encode_chat(QUESTION)
    tokens = list(generate(pipe.model, ids, SamplingParams(do_sample=False, max_new_tokens=24), pipe.stop_ids))
    assert pipe.chat(QUESTION, do_sample=False, max_new_tokens=24).content == pipe.tokenizer.decode(tokens)


def test_stop_strings_cut_the_reply(pipe):
    whole = pipe.chat(QUESTION, do_sample=False, max_new_tokens=24).content
    cut = pipe.chat(QUESTION, do_sample=False, max_new_tokens=24, stop=["Berlin"]).content
    assert cut == whole[: whole.index("Berlin")]


def test_seeded_sampling_repeats(pipe):
    a = pipe.chat(QUESTION, temperature=0.9, top_p=0.9, seed=11, max_new_tokens=16).content
    b = pipe.chat(QUESTION, temperature=0.9, top_p=0.9, seed=11, max_new_tokens=16).content
    assert a == b


def test_generate_completes_text(pipe):
    text = pipe.generate("The capital of France is", do_sample=False, max_new_tokens=8)
    assert isinstance(text, str) and text.strip()
    assert "".join(pipe.generate("The capital of France is", do_sample=False, max_new_tokens=8, stream=True)) == text


def test_bad_messages_are_clear_errors(pipe):
    with pytest.raises(chatglm.ChatFormatError, match="unknown role"):
        pipe.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="top_p"):
        pipe.chat(QUESTION, top_p=0)


def test_cli_one_prompt(default_gguf):
    proc = subprocess.run([sys.executable, "-m", "chatglm", "chat", "-p", "What is the capital of Germany?",
                           "--temp", "0", "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Berlin" in proc.stdout


def test_cli_interactive_clear_and_stop(default_gguf):
    lines = "What is the capital of Germany?\nclear\nstop\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "chatglm", "chat", "-i", "--temp", "0", "--max-new-tokens", "16"],
                          input=lines, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Berlin" in proc.stdout and proc.stdout.count("> ") == 3


@pytest.fixture(scope="module")
def chatglm3_folder(shared_dir, tmp_path_factory):
    """A tiny random ChatGLM3 with the real tokenizer file beside it (copied into a temporary folder)."""
    glm = tiny_glm(layers=2, vocab=65024)
    folder = write_folder(tmp_path_factory.mktemp("chatglm3"), thudm_config(glm), thudm_state_dict(glm))
    shutil.copy(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_chatglm3_folder_pipeline(chatglm3_folder):
    pipe = Pipeline(chatglm3_folder, dtype="f32")
    assert pipe.tokenizer.family == "chatglm3" and pipe.config.family == "chatglm3"
    assert {64795, 64797, 2} <= pipe.stop_ids  # <|user|>, <|observation|>, </s>
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    ids = pipe.tokenizer.encode_chat(messages)
    assert ids[:3] == [64790, 64792, 64794] and ids[-1] == 64796
    reply = pipe.chat(messages, do_sample=False, max_new_tokens=6)
    tokens = list(generate(pipe.model, ids, SamplingParams(do_sample=False, max_new_tokens=6), pipe.stop_ids,
                           pipe.tokenizer.vocab_size))
    assert reply.content == pipe.tokenizer.decode(tokens).lstrip()


def test_cli_generate_mode_continues_text(pipe):
    expected = pipe.generate("The capital of France is", do_sample=False, max_new_tokens=8)
    proc = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--mode", "generate", "-p",
                           "The capital of France is", "--temp", "0", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == expected.rstrip("\n")


def test_codegeex2_generate_prompt(shared_dir, tmp_path):
    """CodeGeeX2 completes code after [gMASK] <sop>, its tokenizer adding no dummy prefix."""
    glm = tiny_glm(layers=1, vocab=65024)
    cfg = thudm_config(glm, _name_or_path="THUDM/codegeex2-6b")
    folder = write_folder(tmp_path, cfg, thudm_state_dict(glm))
    shutil.copy(shared_dir / "tokenizers" / "codegeex2-6b" / "tokenizer.model", folder / "tokenizer.model")
    pipe = Pipeline(folder, dtype="f32")
    assert pipe.config.family == "codegeex2" and pipe.tokenizer.family == "codegeex2"
    prompt = "# language: Python\n# write a bubble sort function\n"
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=True)
    assert ids[:3] == [64790, 64792, 31010]  # [gMASK] <sop> '#', not '▁#'
    tokens = list(generate(pipe.model, ids, SamplingParams(do_sample=False, max_new_tokens=5), pipe.stop_ids,
                           pipe.tokenizer.vocab_size))
    assert pipe.generate(prompt, do_sample=False, max_new_tokens=5) == pipe.tokenizer.decode(tokens)
