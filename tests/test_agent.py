"""Pipeline.chat(tools=...) and the tool loop, with scripted ChatGLM3 / GLM-4 replies in their real token formats.

The prompts the model is shown are checked against ids built straight from sentencepiece / tiktoken on the real
tokenizer files, following ChatGLM3's PROMPT.md and the ids in ../shared/tokenizers/README.md, not through our
own chat format.
"""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from chatglm.agent import Agent, Call, Notice, Observation, Text, load_tool_module, load_tool_specs
from chatglm.errors import ChatFormatError, ChatGLMError
from chatglm.messages import ChatMessage
from chatglm.pipeline import ChatStream, Pipeline
from chatglm.tokenizers import load_tokenizer

from reply_script import scripted
from test_server_support import glm_tokenizer

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_WEATHER = {"type": "function", "function": WEATHER}
QUESTION = "What's the weather in Paris?"
ASK = [ChatMessage("user", QUESTION)]
CALL = {"chatglm3": 'get_weather\n```python\ntool_call(city="Paris")\n```', "glm4": 'get_weather\n{"city": "Paris"}'}
CALL_BODY = {"chatglm3": '```python\ntool_call(city="Paris")\n```', "glm4": '{"city": "Paris"}'}
ANSWER = "It is 22 degrees in Paris."
# the reply that calls: a sentence, then the call in its own part, then <|observation|> (the model waits)
CALLING = {f: ["\n", "Let me check.", "<|assistant|>", CALL[f], "<|observation|>"] for f in CALL}
ANSWERING = ["\n", ANSWER]
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:\n"
CI_PROMPT = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。"
             "在使用Python解决任务时，你可以运行代码并得到结果，"
             "如果运行结果有错误，你需要尽可能对代码进行改进。你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")
GLM4_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n" + json.dumps(WEATHER, ensure_ascii=False, indent=4)
               + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
ROLE_IDS = {"chatglm3": {"gmask": 64790, "sop": 64792, "system": 64794, "user": 64795, "assistant": 64796,
                         "observation": 64797},
            "glm4": {"gmask": 151331, "sop": 151333, "system": 151335, "user": 151336, "assistant": 151337,
                     "observation": 151338}}
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def tokenizers(shared_dir):
    return {family: glm_tokenizer(shared_dir, family) for family in CALL}


@pytest.fixture(scope="module")
def reference(shared_dir):
    """prompt(family, [(role, metadata, content), ...]): the ids the official format gives, built by hand."""
    sp = spm.SentencePieceProcessor(model_file=str(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model"))
    ranks = load_tiktoken_bpe(str(shared_dir / "tokenizers" / "glm-4-9b" / "tokenizer.model"))
    glm4 = tiktoken.Encoding("glm4-reference", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    encode = {"chatglm3": sp.encode, "glm4": glm4.encode_ordinary}

    def prompt(family: str, turns: list[tuple[str, str, str]]) -> list[int]:
        role = ROLE_IDS[family]
        out = [role["gmask"], role["sop"]]
        for name, metadata, content in turns:
            out += [role[name], *encode[family](f"{metadata}\n"), *encode[family](content)]
        return out + [role["assistant"]]

    return prompt


def system_turn(family: str) -> tuple[str, str, str]:
    if family == "chatglm3":
        return ("system", "", TOOLS_PROMPT + json.dumps([WEATHER], ensure_ascii=False, indent=4))
    return ("system", "", GLM4_SYSTEM)


@pytest.mark.parametrize("family", list(CALL))
def test_chat_returns_the_call_in_openai_shape(tokenizers, reference, family):
    pipe = scripted(tokenizers[family], CALLING[family])
    reply = pipe.chat(ASK, tools=[OPENAI_WEATHER], do_sample=False)
    assert (reply.role, reply.content) == ("assistant", "Let me check.")
    [call] = reply.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert pipe.model.prompts[0] == reference(family, [system_turn(family), ("user", "", QUESTION)])


@pytest.mark.parametrize("family", list(CALL))
def test_bare_function_dicts_give_the_same_prompt_as_openai_tools(tokenizers, family):
    openai_pipe = scripted(tokenizers[family], CALLING[family])
    bare_pipe = scripted(tokenizers[family], CALLING[family])
    openai_pipe.chat(ASK, tools=[OPENAI_WEATHER], do_sample=False)
    assert bare_pipe.chat(ASK, tools=[WEATHER], do_sample=False).tool_calls
    assert bare_pipe.model.prompts == openai_pipe.model.prompts


def test_streaming_shows_text_and_hands_the_calls_over_at_the_end(tokenizers):
    pipe = scripted(tokenizers["chatglm3"], CALLING["chatglm3"])
    stream = pipe.chat(ASK, tools=[WEATHER], stream=True, do_sample=False)
    assert isinstance(stream, ChatStream)
    assert "".join(stream) == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in stream.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert stream.message().tool_calls[0]["function"]["name"] == "get_weather"


def test_closing_a_stream_stops_generating(tokenizers):
    pipe = scripted(tokenizers["glm4"], ["\n" + "word " * 50])
    stream = pipe.chat(ASK, stream=True, do_sample=False)
    next(stream)
    stream.close()
    done = pipe.model.forwards
    assert list(stream) == [] and pipe.model.forwards == done
    assert done < 10  # far fewer than the 50 words scripted


def test_tools_need_a_family_with_a_tool_format(shared_dir, tokenizers):
    chatglm2 = load_tokenizer(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model", family="chatglm2")
    pipe = Pipeline.from_model(scripted(tokenizers["chatglm3"], ["hi"]).model, chatglm2)
    with pytest.raises(ChatFormatError, match="ChatGLM3 or GLM-4"):
        pipe.chat(ASK, tools=[WEATHER], do_sample=False)
    with pytest.raises(ChatFormatError, match="code interpreter needs a ChatGLM3"):
        scripted(tokenizers["glm4"], ["hi"]).chat(ASK, tools=[{"type": "code_interpreter"}])


@pytest.mark.parametrize("tools, message", [([{"description": "no name"}], "no function name"),
                                            ([{"type": "retrieval"}], "expected 'function'"),
                                            (["get_weather"], "object")])
def test_malformed_tools_are_refused(tokenizers, tools, message):
    with pytest.raises(ChatFormatError, match=message):
        scripted(tokenizers["chatglm3"], ["hi"]).chat(ASK, tools=tools)


@pytest.mark.parametrize("family", list(CALL))
def test_the_loop_runs_the_function_and_feeds_the_result_back(tokenizers, reference, family):
    pipe = scripted(tokenizers[family], CALLING[family], ANSWERING)
    seen = []

    def get_weather(city: str) -> dict:
        seen.append(city)
        return {"temperature": 22}

    history = list(ASK)
    events = list(Agent(pipe, [OPENAI_WEATHER], {"get_weather": get_weather}).run(history, do_sample=False))
    assert seen == ["Paris"]
    calls = [e for e in events if isinstance(e, Call)]
    assert [str(c) for c in calls] == ["calling get_weather(city='Paris')"]
    assert [e for e in events if isinstance(e, Observation)] == [Observation("get_weather", '{"temperature": 22}')]
    assert "".join(e.text for e in events if isinstance(e, Text)) == "Let me check." + ANSWER
    assert [(m.role, m.content) for m in history] == [
        ("user", QUESTION), ("assistant", "Let me check."), ("observation", '{"temperature": 22}'),
        ("assistant", ANSWER)]
    # the second prompt holds the call as the model wrote it and the result as an observation
    assert pipe.model.prompts[1] == reference(family, [
        system_turn(family), ("user", "", QUESTION), ("assistant", "", "Let me check."),
        ("assistant", "get_weather", CALL_BODY[family]), ("observation", "", '{"temperature": 22}')])


def test_a_module_supplies_the_functions(tokenizers, tmp_path):
    (tmp_path / "my_tools.py").write_text("calls = []\n\ndef get_weather(city):\n    calls.append(city)\n"
                                          "    return f'sunny in {city}'\n")
    module = load_tool_module(str(tmp_path / "my_tools.py"))
    pipe = scripted(tokenizers["chatglm3"], CALLING["chatglm3"], ANSWERING)
    history = list(ASK)
    events = list(Agent(pipe, [WEATHER], module).run(history, do_sample=False))
    assert module.calls == ["Paris"]
    assert Observation("get_weather", "sunny in Paris") in events
    assert history[-1].content == ANSWER


def no_such_city(city: str) -> str:
    raise ValueError(f"no such city: {city}")


def broken(city: str) -> str:
    return {}[city]


@pytest.mark.parametrize("function, observation", [(no_such_city, "ValueError: no such city: Paris"),
                                                   (broken, "KeyError: 'Paris'")])
def test_a_failing_function_becomes_the_observation(tokenizers, function, observation):
    pipe = scripted(tokenizers["glm4"], CALLING["glm4"], ANSWERING)
    history = list(ASK)
    events = list(Agent(pipe, [WEATHER], {"get_weather": function}).run(history, do_sample=False))
    assert Observation("get_weather", observation) in events
    assert history[-1].content == ANSWER  # the conversation went on


def test_wrong_arguments_become_the_observation(tokenizers):
    pipe = scripted(tokenizers["glm4"], CALLING["glm4"], ANSWERING)
    events = list(Agent(pipe, [WEATHER], {"get_weather": lambda town: town}).run(list(ASK), do_sample=False))
    [observation] = [e for e in events if isinstance(e, Observation)]
    assert observation.content.startswith("TypeError:") and "city" in observation.content


def test_long_results_are_cut(tokenizers):
    pipe = scripted(tokenizers["glm4"], CALLING["glm4"], ANSWERING)
    history = list(ASK)
    list(Agent(pipe, [WEATHER], {"get_weather": lambda city: "x" * 5000}).run(history, do_sample=False))
    assert history[2].content == "x" * 1024 + " [TRUNCATED]"


def test_a_model_that_keeps_calling_is_stopped(tokenizers):
    pipe = scripted(tokenizers["glm4"], CALLING["glm4"])
    agent = Agent(pipe, [WEATHER], {"get_weather": lambda city: "ok"}, max_rounds=3)
    events = list(agent.run(list(ASK), do_sample=False))
    assert sum(isinstance(e, Call) for e in events) == 3
    assert isinstance(events[-1], Notice)


def test_every_tool_needs_a_function(tokenizers):
    with pytest.raises(ChatGLMError, match="get_weather"):
        Agent(scripted(tokenizers["glm4"], ["hi"]), [WEATHER], {"other": print})


def test_stopping_the_loop_keeps_the_partial_reply(tokenizers):
    pipe = scripted(tokenizers["glm4"], ["\n" + "word " * 50])
    history = list(ASK)
    events = Agent(pipe).run(history, do_sample=False)
    first = next(events)
    events.close()
    assert [m.role for m in history] == ["user", "assistant"]
    assert history[1].content == first.text


class FakeSandbox:
    """Runs nothing: records the code and answers a fixed output."""

    def __init__(self, output: str):
        self.output, self.cells = output, []

    def run(self, code: str):
        self.cells.append(code)
        return type("Cell", (), {"output": self.output, "ok": True, "timed_out": False})()


CODE_CALL = ["\n", "Let me compute it.", "<|assistant|>", "interpreter\n```python\nprint(6 * 7)\n```",
             "<|observation|>"]


def test_the_code_interpreter_runs_the_models_code_and_returns_a_result_block(tokenizers, reference):
    pipe = scripted(tokenizers["chatglm3"], CODE_CALL, ["\n", "The answer is 42."])
    box = FakeSandbox("42\n")
    history = [ChatMessage("user", "What is 6 times 7?")]
    events = list(Agent(pipe, interpreter=box).run(history, do_sample=False))
    assert box.cells == ["print(6 * 7)"]
    assert str(next(e for e in events if isinstance(e, Call))) == "running code:\nprint(6 * 7)"
    assert pipe.model.prompts[1] == reference("chatglm3", [
        ("system", "", CI_PROMPT), ("user", "", "What is 6 times 7?"), ("assistant", "", "Let me compute it."),
        ("assistant", "interpreter", "```python\nprint(6 * 7)\n```"), ("observation", "", "```result\n42\n```")])
    assert history[-1].content == "The answer is 42."


def test_without_the_interpreter_code_is_shown_never_run(tokenizers):
    pipe = scripted(tokenizers["chatglm3"], CODE_CALL)
    events = list(Agent(pipe).run([ChatMessage("user", "What is 6 times 7?")], do_sample=False))
    assert not any(isinstance(e, Call) for e in events)
    assert "print(6 * 7)" in "".join(e.text for e in events if isinstance(e, Text))


def test_the_real_sandbox_keeps_state_between_cells(tokenizers):
    sandbox = pytest.importorskip("chatglm.sandbox", reason="chatglm.sandbox is not written yet")
    first = ["\n", "<|assistant|>", "interpreter\n```python\nx = 6 * 7\nprint(x)\n```", "<|observation|>"]
    second = ["\n", "<|assistant|>", "interpreter\n```python\nprint(x + 1)\n```", "<|observation|>"]
    pipe = scripted(tokenizers["chatglm3"], first, second, ["\n", "Done."])
    history = [ChatMessage("user", "Compute.")]
    with sandbox.Sandbox(timeout=30.0, memory_mb=1024, unsafe=True) as box:  # unsafe: only where no other holds
        events = list(Agent(pipe, interpreter=box).run(history, do_sample=False))
    assert [e.content for e in events if isinstance(e, Observation)] == ["```result\n42\n```", "```result\n43\n```"]


def test_tools_files_and_modules_are_checked(tmp_path):
    good = tmp_path / "tools.json"
    good.write_text(json.dumps([OPENAI_WEATHER, WEATHER]))
    assert load_tool_specs(good) == [OPENAI_WEATHER, WEATHER]
    for text, message in [("{", "not JSON"), ('{"name": "f"}', "JSON list"), ('[{"type": "x"}]', "expected")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ChatGLMError, match=message):
            load_tool_specs(tmp_path / "bad.json")
    with pytest.raises(ChatGLMError, match="cannot read"):
        load_tool_specs(tmp_path / "missing.json")
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ChatGLMError, match="failed to load: SyntaxError"):
        load_tool_module(str(tmp_path / "broken.py"))
    with pytest.raises(ChatGLMError, match="no such file"):
        load_tool_module(str(tmp_path / "absent.py"))
    with pytest.raises(ChatGLMError, match="cannot import"):
        load_tool_module("no_such_module_here")
    assert load_tool_module("json").dumps is json.dumps
