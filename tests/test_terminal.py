"""The terminal chat: prompt keys through prompt_toolkit's pipe input, turns over scripted GLM replies, and the
`chatglm chat` command with piped stdin (the real default model) and a real Ctrl-C (SIGINT) mid-reply."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from chatglm import cli
from chatglm.agent import Agent
from chatglm.messages import ChatMessage
from chatglm.terminal import Terminal, prompt_session, read_messages

from reply_script import scripted
from test_server_support import glm_tokenizer

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALLING = ["\n", "<|assistant|>", 'get_weather\n{"city": "Paris"}', "<|observation|>"]
GREEDY = {"do_sample": False}


def typed(keys: str) -> list[str]:
    """The messages read from these keystrokes at the prompt."""
    with create_pipe_input() as keyboard:
        keyboard.send_text(keys)
        return list(read_messages(prompt_session(input=keyboard, output=DummyOutput())))


def test_enter_sends_and_alt_enter_starts_a_new_line():
    assert typed("hello\rfirst line\x1b\rsecond line\r\x04") == ["hello", "first line\nsecond line"]


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_ends():
    assert typed("never sent\x03kept\r\x04after the end\r") == ["kept"]


@pytest.mark.parametrize("word", ["stop", "exit", "quit", "STOP"])
def test_exit_words_end_the_chat(word):
    assert typed(f"one\r{word}\rtwo\r") == ["one"]


def test_piped_lines_are_messages(capsys):
    assert list(read_messages(stdin=io.StringIO("hi\n\n  there \nstop\nlater\n"))) == ["hi", "there"]
    assert capsys.readouterr().out == "> " * 4


@pytest.fixture(scope="module")
def glm4(shared_dir):
    return glm_tokenizer(shared_dir, "glm4")


def terminal(pipe, *tools, functions=None, system=None) -> tuple[Terminal, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Terminal(Agent(pipe, list(tools), functions), system=system, sampling=GREEDY, out=out, err=err), out, err


def test_clear_empties_the_conversation_but_keeps_the_system_prompt(glm4):
    pipe = scripted(glm4, ["\n", "Hello there."])
    term, out, _ = terminal(pipe, system="Be brief.")
    term.run(["hi", "clear", "again"])
    assert out.getvalue() == "Hello there.\n(new conversation)\nHello there.\n"
    system = ChatMessage("system", "Be brief.")
    assert pipe.model.prompts[0] == glm4.encode_chat([system, ChatMessage("user", "hi")])
    assert pipe.model.prompts[1] == glm4.encode_chat([system, ChatMessage("user", "again")])
    assert [m.role for m in term.history] == ["system", "user", "assistant"]


def test_ctrl_c_mid_reply_stops_generating_and_keeps_the_conversation(glm4):
    pipe = scripted(glm4, ["\n" + "word " * 40], interrupt_at=6)
    term, out, _ = terminal(pipe)
    term.turn("tell me a long story")
    shown, stopped = out.getvalue().rsplit(" [stopped]", 1)
    assert stopped == "\n" and shown.startswith("word")
    assert pipe.model.forwards == 6  # nothing was computed after the interrupt
    assert [(m.role, m.content) for m in term.history] == [("user", "tell me a long story"), ("assistant", shown)]
    term.turn("go on")  # the conversation goes on, with the partial reply in it
    assert pipe.model.prompts[1] == glm4.encode_chat(term.history[:3])


def test_an_error_is_one_line_and_the_turn_is_forgotten(glm4):
    pipe = scripted(glm4, ["\n", "ok"], context=16)
    term, out, err = terminal(pipe)
    term.turn("a message far too long for a sixteen token context " * 3)
    assert err.getvalue().startswith("error: the prompt is ") and err.getvalue().count("\n") == 1
    assert term.history == []
    term.turn("hi")
    assert out.getvalue() == "ok\n"


def test_tool_calls_and_results_are_shown(glm4):
    pipe = scripted(glm4, CALLING, ["\n", "Sunny."])
    term, out, _ = terminal(pipe, WEATHER, functions={"get_weather": lambda city: f"sun in {city}"})
    term.turn("Weather in Paris?")
    assert out.getvalue() == "[calling get_weather(city='Paris')]\n[get_weather returned]\nsun in Paris\nSunny.\n"


def test_banner_is_one_line_with_model_format_arch_device_and_keys(glm4):
    term, _, _ = terminal(scripted(glm4, ["hi"]), WEATHER, functions={"get_weather": print})
    banner = term.banner(interactive=True)
    assert "\n" not in banner
    for part in ("scripted-glm4", "test", "scripted", "cpu", "tools: get_weather", "Alt+Enter", "Ctrl-C", "Ctrl-D"):
        assert part in banner


def test_cli_runs_the_tool_loop(glm4, tmp_path, monkeypatch, capsys):
    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": WEATHER}]))
    (tmp_path / "weather.py").write_text("def get_weather(city):\n    return {'city': city, 'sky': 'clear'}\n")
    monkeypatch.setattr("chatglm.pipeline.Pipeline", lambda *args, **kwargs: scripted(glm4, CALLING, ["\n", "Clear."]))
    rc = cli.main(["chat", "--tools", str(tmp_path / "tools.json"), "--tool-module", str(tmp_path / "weather.py"),
                   "--temp", "0", "-p", "Weather in Paris?"])
    assert rc == 0
    assert capsys.readouterr().out == ("[calling get_weather(city='Paris')]\n[get_weather returned]\n"
                                       '{"city": "Paris", "sky": "clear"}\nClear.\n')


def test_cli_code_interpreter_runs_in_the_sandbox(shared_dir, monkeypatch, capsys):
    pytest.importorskip("chatglm.sandbox", reason="chatglm.sandbox is not written yet")
    chatglm3 = glm_tokenizer(shared_dir, "chatglm3")
    code = ["\n", "<|assistant|>", "interpreter\n```python\nprint(sum(range(10)))\n```", "<|observation|>"]
    monkeypatch.setattr("chatglm.pipeline.Pipeline", lambda *args, **kwargs: scripted(chatglm3, code, ["\n", "45."]))
    assert cli.main(["chat", "--code-interpreter", "--unsafe-code-interpreter", "--temp", "0", "-p", "Sum 0..9"]) == 0
    shown = capsys.readouterr()
    assert shown.out == ("[running code:\nprint(sum(range(10)))]\n[interpreter returned]\n"
                         "```result\n45\n```\n45.\n")
    assert shown.err.startswith("[code interpreter: ") and "sandbox (" in shown.err and "writing only in" in shown.err


def test_the_chat_banner_names_the_sandbox_protection(shared_dir, monkeypatch, capsys):
    sandbox = pytest.importorskip("chatglm.sandbox", reason="chatglm.sandbox is not written yet")
    chatglm3 = glm_tokenizer(shared_dir, "chatglm3")
    monkeypatch.setattr("chatglm.pipeline.Pipeline", lambda *args, **kwargs: scripted(chatglm3, ["hi"]))
    monkeypatch.setattr("sys.stdin", io.StringIO("stop\n"))
    assert cli.main(["chat", "--code-interpreter", "--unsafe-code-interpreter"]) == 0
    banner = capsys.readouterr().out.splitlines()[0]
    protection = sandbox.strongest_protection() or "audit-hook"
    assert banner.startswith("chatglm: ") and "; code interpreter: " in banner
    assert sandbox.DESCRIPTIONS[protection].split(" (")[0] in banner and "writing only in /" in banner


@pytest.mark.parametrize("argv, message", [
    (["--tools", "tools.json"], "--tools needs --tool-module"),
    (["--tool-module", "json"], "--tool-module needs --tools"),
    (["--tools", "absent.json", "--tool-module", "json"], "cannot read the tools file"),
    (["--mode", "generate", "--code-interpreter"], "need --mode chat"),
])
def test_cli_option_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    assert cli.main(["chat", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_piped_chat_with_the_default_model_survives_a_real_ctrl_c(default_gguf):
    """One process (loading the model is the slow part): a reply stopped by SIGINT, clear, a whole reply, stop."""
    proc = subprocess.Popen([sys.executable, "-m", "chatglm.cli", "chat", "--temp", "0", "--max-new-tokens", "300"],
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.stdin.write("Write a very long story about a dragon.\n")
    proc.stdin.flush()
    banner = proc.stdout.readline()
    assert banner.startswith("chatglm: SmolLM2") and "(gguf, llama, cpu)" in banner
    proc.stdout.read(8)  # the reply has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("clear\nWhat is 2+2?\nstop\nnever read\n", timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    _, after = out.split(" [stopped]\n")
    assert after.startswith("> (new conversation)\n> ") and "4" in after
