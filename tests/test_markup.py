"""Tagged replies (GLM-4.5/4.6/4.7, GLM-Z1): reasoning apart as reasoning_content, <tool_call> parts as OpenAI calls.

The parser is fed every reply in pieces of every size. End to end, a Hugging Face tokenizer.json (trained here
with the `tokenizers` library, the tags added as special tokens as GLM folders add them) and a chat template
in GLM-4.5's layout drive a real Pipeline and the OpenAI server with a scripted model; the answers are read
with the official `openai` client.
"""
from __future__ import annotations

import json

import pytest

from chatglm.errors import ChatFormatError
from chatglm.markup import MarkupParser, Reasoning, parse_call, speaks_markup, takes_tools
from chatglm.pipeline import Pipeline
from chatglm.tokenizers import load_tokenizer

from checkpoints import write_glm_tokenizer
from reply_script import ReplyModel, ids
from test_server_support import scripted_pipeline

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                           "units": {"type": "object"}}}}
FUNCTIONS = {"get_weather": WEATHER}
CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n<arg_key>days</arg_key>\n"
        "<arg_value>3</arg_value>\n<arg_key>units</arg_key>\n<arg_value>{\"t\": \"C\"}</arg_value>\n</tool_call>")
ARGS = {"city": "42", "days": 3, "units": {"t": "C"}}  # "42" stays a string: the schema says so


def run(parser: MarkupParser, text: str, size: int) -> list[str]:
    out: list[str] = []
    for i in range(0, len(text), size):
        out += parser.feed(text[i : i + size])
    return out + parser.close()


def split(pieces: list[str]) -> tuple[str, str]:
    return ("".join(p for p in pieces if isinstance(p, Reasoning)),
            "".join(p for p in pieces if not isinstance(p, Reasoning)))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_reasoning_answer_and_call_in_pieces_of_any_size(size):
    parser = MarkupParser(FUNCTIONS)
    pieces = run(parser, f"<think>\nThe user wants weather.\n</think>\nLet me look.\n{CALL}\n", size)
    assert split(pieces) == ("The user wants weather.", "Let me look.")
    [call] = parser.calls
    assert call.name == "get_weather" and json.loads(call.arguments) == ARGS


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_reply_that_starts_inside_its_reasoning(size):
    """GLM-Z1's prompt ends with <think>: the reply opens with the thoughts and only closes the tag."""
    pieces = run(MarkupParser({}, reasoning=True), "Two and two.\n</think>\n\nFour.", size)
    assert split(pieces) == ("Two and two.", "Four.")


def test_text_that_only_looks_like_a_tag_is_shown():
    pieces = run(MarkupParser({}), "a <b> and <thin or <tool_c", 2)
    assert split(pieces) == ("", "a <b> and <thin or <tool_c")


def test_calls_to_unknown_functions_and_unfinished_calls_stay_text():
    parser = MarkupParser(FUNCTIONS)
    text = "<tool_call>rm_rf\n<arg_key>path</arg_key><arg_value>/</arg_value></tool_call> then <tool_call>get_weather"
    assert split(run(parser, text, 3))[1] == text
    assert parser.calls == []


def test_the_json_form_of_a_call_is_read_too():
    call = parse_call('{"name": "get_weather", "arguments": {"city": "Paris"}}', FUNCTIONS)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert parse_call('{"name": "other", "arguments": {}}', FUNCTIONS) is None


def test_several_calls_in_one_reply_without_newlines():
    parser = MarkupParser(FUNCTIONS)
    one = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
    two = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"
    assert run(parser, one + two, 4) == []
    assert [json.loads(c.arguments)["city"] for c in parser.calls] == ["Oslo", "Rome"]


# ----- end to end: tokenizer.json + chat template, Pipeline and server -----

# GLM-4.5's layout: tools as JSON lines in a system part, calls as tagged parts, results in <tool_response>
TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a function as <tool_call>{name}<arg_key>{key}</arg_key><arg_value>{value}</arg_value></tool_call>"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{% elif m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{% elif m.role == 'tool' %}<|observation|>\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% elif m.role == 'assistant' %}<|assistant|>\n<think>{{ m.reasoning_content }}</think>\n{{ m.content }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>{{ tc.function.name }}"
    "{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key>"
    "<arg_value>{{ v if v is string else v | tojson }}</arg_value>{% endfor %}</tool_call>{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ THINK }}{% endif %}"
)


@pytest.fixture(scope="module", params=["glm45", "z1"])
def tokenizer(request, tmp_path_factory):
    """A GLM-4.5-style folder (tools, optional thinking) or a GLM-Z1-style one (the prompt opens <think>)."""
    folder = tmp_path_factory.mktemp(request.param)
    think = "" if request.param == "glm45" else "\n<think>"
    template = TEMPLATE.replace("{{ THINK }}", think)
    if request.param == "z1":  # GLM-Z1 has no tool format
        template = template.split("{% if tools %}")[0] + template.split("{% endif %}", 1)[1]
    write_glm_tokenizer(folder, template)
    return load_tokenizer(folder)


def scripted(tokenizer, *replies: list[str]) -> Pipeline:
    model = ReplyModel(tokenizer.vocab_size, [ids(tokenizer, *r) for r in replies], tokenizer.specials["<|user|>"])
    return Pipeline.from_model(model, tokenizer, path="scripted-glm45", format="test")


def test_the_folder_speaks_tags_and_decodes_them(tokenizer):
    assert tokenizer.family == "llama" and speaks_markup(tokenizer.chat_template)
    reply = ids(tokenizer, "<think>", "Let me look.", "</think>", "<|user|>")
    assert tokenizer.decode(reply) == "<think>Let me look.</think>"  # the tags stay, other specials do not


def test_pipeline_returns_reasoning_and_answer_apart(tokenizer):
    z1 = not takes_tools(tokenizer.chat_template)  # its prompt opens <think>; GLM-4.5's reply does
    pipe = scripted(tokenizer, [*([] if z1 else ["<think>"]), "The user wants weather.", "</think>",
                                "\nIt is sunny in Oslo."])
    stream = pipe.chat([{"role": "user", "content": "Weather in Oslo?"}], stream=True)
    pieces = list(stream)
    assert isinstance(pieces[0], Reasoning) and not isinstance(pieces[-1], Reasoning)
    message = stream.message()
    assert message.reasoning_content == "The user wants weather."
    assert message.content == "It is sunny in Oslo."
    assert (pipe.model.prompts[0][-1] == tokenizer.specials["<think>"]) == z1


def test_pipeline_tool_loop_with_the_template(tokenizer):
    if not takes_tools(tokenizer.chat_template):
        with pytest.raises(ChatFormatError, match="template that offers tools"):
            scripted(tokenizer, ["hi"]).chat([{"role": "user", "content": "hi"}], tools=[WEATHER])
        return
    call = ["<tool_call>", "get_weather", "<arg_key>", "city", "</arg_key>", "<arg_value>", "Oslo", "</arg_value>",
            "</tool_call>"]
    pipe = scripted(tokenizer, call, ["It is sunny in Oslo."])
    history = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = pipe.chat(history, tools=[{"type": "function", "function": WEATHER}])
    assert reply.content == "" and len(reply.tool_calls) == 1
    assert json.loads(reply.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    prompt = tokenizer.decode(pipe.model.prompts[0])
    assert json.dumps({"type": "function", "function": WEATHER}) in prompt  # the template listed the tools
    history += [reply, {"role": "tool", "content": "sunny, 21 degrees"}]
    answer = pipe.chat(history, tools=[WEATHER])
    assert answer.content == "It is sunny in Oslo." and not answer.tool_calls
    second = tokenizer.decode(pipe.model.prompts[1])
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>" in second
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in second


def test_openai_client_reads_reasoning_content_and_tool_calls(tokenizer):
    """The official openai client over the server's routes (httpx in-process): reasoning_content in the message
    and in streamed deltas, calls as tool_calls."""
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from chatglm.server import create_app

    z1 = not takes_tools(tokenizer.chat_template)
    opening = [] if z1 else ["<think>"]
    script = [*opening, "The user wants weather.", "</think>", "Let me look."]
    if not z1:
        script += ["<tool_call>", "get_weather", "<arg_key>", "city", "</arg_key>", "<arg_value>", "Oslo",
                   "</arg_value>", "</tool_call>"]
    pipe = scripted_pipeline(tokenizer, [i for part in script for i in ids(tokenizer, part)])
    tools = None if z1 else [{"type": "function", "function": WEATHER}]
    with TestClient(create_app(pipe, max_batch=2, max_queue=4)) as test_client:
        client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=test_client)
        ask = [{"role": "user", "content": "Weather in Oslo?"}]
        kwargs = {"tools": tools} if tools else {}
        done = client.chat.completions.create(model="m", messages=ask, temperature=0, **kwargs)
        message = done.choices[0].message
        assert message.model_extra["reasoning_content"] == "The user wants weather."
        assert message.content == "Let me look."
        if not z1:
            assert done.choices[0].finish_reason == "tool_calls"
            assert message.tool_calls[0].function.name == "get_weather"
            assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo"}
        chunks = list(client.chat.completions.create(model="m", messages=ask, temperature=0, stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "The user wants weather."
        assert "".join(d.content or "" for d in deltas) == "Let me look."
        if not z1:  # the call streams as OpenAI's tool_calls deltas, and the stream ends for it
            calls = [c for d in deltas for c in d.tool_calls or []]
            assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
                [("get_weather", {"city": "Oslo"})]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tty", [True, False])
def test_the_terminal_dims_reasoning(tokenizer, tty):
    """Thoughts dimmed on a terminal (plain when piped), the answer on a line of its own after them."""
    import io

    from chatglm.agent import Agent
    from chatglm.terminal import DIM, UNDIM, Terminal

    class Screen(io.StringIO):
        def isatty(self) -> bool:
            return tty

    z1 = not takes_tools(tokenizer.chat_template)
    pipe = scripted(tokenizer, [*([] if z1 else ["<think>"]), "Hmm.", "</think>", "Sunny."])
    out = Screen()
    Terminal(Agent(pipe, [], None), out=out, err=io.StringIO()).turn("Weather?")
    assert out.getvalue() == (f"{DIM}Hmm.{UNDIM}\nSunny.\n" if tty else "Hmm.\nSunny.\n")


def test_a_gguf_written_from_the_folder_keeps_the_tags_and_the_template(tokenizer, tmp_path):
    """Converted to GGUF (where the tags are control tokens), the reply's tags still decode, and the chat
    template that writes them travels in the file."""
    import shutil

    from chatglm.convert import convert
    from chatglm.loaders import open_checkpoint

    from checkpoints import tiny_glm4

    folder = tmp_path / "model"
    shutil.copytree(tokenizer.path.parent, folder)
    tiny_glm4(vocab=tokenizer.vocab_size).save_pretrained(folder)
    shutil.copy(tokenizer.path.parent / "generation_config.json", folder)  # the folder's stops, not the tiny model's
    gguf_tok = open_checkpoint(convert(folder, tmp_path / "m.gguf", "f32", progress=False)).load_tokenizer()
    reply = ids(tokenizer, "<think>", "Let me look.", "</think>", "Sunny.", "<|user|>")
    assert gguf_tok.decode(reply) == "<think>Let me look.</think>Sunny."
    assert speaks_markup(gguf_tok.chat_template) and gguf_tok.family == tokenizer.family
    stops = {tokenizer.specials[name] for name in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert stops <= tokenizer.eos_ids and stops <= gguf_tok.eos_ids  # a reply still ends at a tool call's end


def test_template_kwargs_reach_the_template_and_decide_where_the_reply_starts(tokenizer):
    """chat_template_kwargs (vLLM's name; `template_kwargs` in Python) are template variables: here a switch that
    closes the thinking in the prompt, after which the reply is all answer. The standard variables stay ours."""
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from chatglm.server import create_app

    folder = tokenizer.path.parent
    switch = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    template = (folder / "chat_template.jinja").read_text() + switch
    (folder / "chat_template.jinja").write_text(template)
    try:
        tok = load_tokenizer(folder)
        off = tok.encode_chat([{"role": "user", "content": "hi"}], template_kwargs={"enable_thinking": False,
                                                                                   "messages": []})
        assert off == tok.encode_chat([{"role": "user", "content": "hi"}]) + ids(tok, "<think>", "</think>")
        pipe = scripted_pipeline(tok, ids(tok, "Sunny."))
        with TestClient(create_app(pipe, max_batch=2, max_queue=4)) as test_client:
            client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=test_client)
            done = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert done.choices[0].message.content == "Sunny."
        assert (done.choices[0].message.model_extra or {}).get("reasoning_content") is None
        assert pipe.model.prompt() == off
    finally:
        (folder / "chat_template.jinja").write_text(template[: -len(switch)])


# ----- constrained replies: forced calls and response_format after the reasoning -----

CALL_PARTS = ["<tool_call>", "get_weather", "\n", "<arg_key>", "city", "</arg_key>", "<arg_value>", "Oslo <N>",
              "</arg_value>", "<arg_key>", "days", "</arg_key>", "<arg_value>", "3", "</arg_value>", "<arg_key>",
              "units", "</arg_key>", "<arg_value>", '{"t": "C"}', "</arg_value>", "</tool_call>"]
OK = {"type": "json_schema", "json_schema": {"name": "ok", "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}

FORECAST = {"name": "forecast", "parameters": {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string", "enum": ["Oslo", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "hourly": {"type": "boolean"}}}}


def openai_client(pipe):
    """The official openai client over the server's routes, in-process (a context manager)."""
    from contextlib import contextmanager

    from fastapi.testclient import TestClient
    from openai import OpenAI

    from chatglm.server import create_app

    @contextmanager
    def client():
        with TestClient(create_app(pipe, max_batch=2, max_queue=4)) as test_client:
            yield OpenAI(base_url="http://testserver/v1", api_key="none", http_client=test_client)
    return client()


def sampled_constraints_hold(client, seeds: range) -> None:
    """With the thinking off, sampled at temperature 1: tool_choice "required" gives a call of FORECAST with its
    required arguments, which its schema accepts, and json_schema a reply OK's schema accepts (jsonschema checks)."""
    import jsonschema

    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    for seed in seeds:
        done = client.chat.completions.create(model="m", messages=ask, tool_choice="required", temperature=1.0,
                                              seed=seed, max_tokens=40, extra_body=off,
                                              tools=[{"type": "function", "function": FORECAST}])
        assert done.choices[0].finish_reason == "tool_calls", done.choices[0]
        [call] = done.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "forecast" and set(args) == {"city", "days"}
        jsonschema.validate(args, FORECAST["parameters"])
        done = client.chat.completions.create(model="m", messages=ask, response_format=OK, temperature=1.0,
                                              seed=seed, max_tokens=40, extra_body=off)
        assert (done.choices[0].message.model_extra or {}).get("reasoning_content") is None
        jsonschema.validate(json.loads(done.choices[0].message.content), OK["json_schema"]["schema"])


def test_forced_calls_and_json_come_after_the_reasoning(tokenizer):
    """tool_choice "required" writes GLM-4.5's tagged call, and response_format's JSON is the answer, not the
    thoughts: the grammar lets the model reason first (GLM-Z1's prompt opens <think>; GLM-4.5 may open it) and
    accepts each part as the model writes it (a model that left the grammar would be pulled off its script)."""
    z1 = not takes_tools(tokenizer.chat_template)
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    thoughts = [*([] if z1 else ["<think>"]), "The user wants weather.", "</think>", "\n"]
    with openai_client(scripted_pipeline(tokenizer, ids(tokenizer, *thoughts, '{"ok": true}'))) as client:
        done = client.chat.completions.create(model="m", messages=ask, response_format=OK)
        assert done.choices[0].message.content == '{"ok": true}'
        assert done.choices[0].message.model_extra["reasoning_content"] == "The user wants weather."
    if z1:
        return
    with openai_client(scripted_pipeline(tokenizer, ids(tokenizer, *thoughts, *CALL_PARTS))) as client:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            done = client.chat.completions.create(model="m", messages=ask, tool_choice=choice,
                                                  tools=[{"type": "function", "function": WEATHER}])
            assert done.choices[0].finish_reason == "tool_calls"
            assert done.choices[0].message.model_extra["reasoning_content"] == "The user wants weather."
            [call] = done.choices[0].message.tool_calls
            # a string argument is any text where the tags are tokens ('<' included)
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == ARGS | {"city": "Oslo <N>"}


def test_forced_calls_and_json_hold_their_schemas_when_sampled(tokenizer, tmp_path):
    """A random GLM-4-0414 over the folder's tokenizer, sampled at temperature 1: tool_choice "required" gives a
    tagged call whose arguments the function's JSON Schema accepts (checked by jsonschema), and json_schema a
    reply it accepts."""
    import shutil

    pytest.importorskip("jsonschema")
    from checkpoints import tiny_glm4

    if not takes_tools(tokenizer.chat_template):
        pytest.skip("GLM-Z1's template has no tool format; its JSON is checked after its reasoning above")
    folder = tmp_path / "model"
    shutil.copytree(tokenizer.path.parent, folder)
    # thinking off, as GLM-4.5's template turns it off (a random model's thoughts would run to max_tokens)
    switch = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    (folder / "chat_template.jinja").write_text((folder / "chat_template.jinja").read_text() + switch)
    model = tiny_glm4(vocab=tokenizer.vocab_size)
    model.config.max_position_embeddings = 512  # the prompt lists the tools
    model.config.eos_token_id = sorted(tokenizer.eos_ids)  # the folder's stops (the tiny model's are text here)
    model.save_pretrained(folder)
    shutil.copy(tokenizer.path.parent / "generation_config.json", folder)
    with openai_client(Pipeline(folder, dtype="f32")) as client:
        sampled_constraints_hold(client, range(3))


def test_constraints_where_the_tags_are_plain_text(tmp_path):
    """A vocabulary without the tags as tokens (the model spells them): the same grammars accept GLM-4.5's reply
    written in ordinary tokens, and refuse an answer outside them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatglm.grammar import Vocabulary, after_reasoning, json_grammar, markup_call_grammar

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Let me think. </think> <tool_call>get_weather</tool_call> <arg_key>city</arg_key>"],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    plain = load_tokenizer(tmp_path)
    vocab = Vocabulary(plain, [0])

    def accepts(grammar: str, text: str) -> bool:
        mask = vocab.mask(grammar)
        for i in plain.encode(text):
            if not mask.matcher.validate_tokens([i]):
                return False
            mask.accept(i)
        return mask.matcher.is_accepting()

    call = CALL.replace("42", "Oslo")
    assert accepts(after_reasoning(json_grammar("llama"), {}, opened=True), 'Let me think.</think>\n{"ok": true}')
    assert accepts(after_reasoning(json_grammar("llama"), {}, opened=False), '{"ok": true}')
    assert accepts(after_reasoning(markup_call_grammar({}, [WEATHER]), {}, opened=False), f"<think>Hmm.</think>\n{call}")
    assert not accepts(after_reasoning(json_grammar("llama"), {}, opened=True), "Let me think.</think>\nSunny.")
    assert not accepts(markup_call_grammar({}, [WEATHER]), call.replace("get_weather", "get_time"))


@pytest.mark.parametrize("template", ["GLM-4.6.jinja", "GLM-4.7-Flash.jinja"])
def test_the_real_glm_templates(llama_cpp_src, tmp_path, template):
    """The chat templates GLM-4.6 and GLM-4.7-Flash ship (as llama.cpp keeps them) with a GLM tokenizer.json: the
    reasoning and a call in the model's own layout come apart (GLM-4.7-Flash's prompt opens <think>, GLM-4.6's reply
    does), the call and its result go back through the template, and over the openai client tool_choice "required"
    and json_schema hold after the reasoning."""
    write_glm_tokenizer(tmp_path, (llama_cpp_src / "models" / "templates" / template).read_text())
    tok = load_tokenizer(tmp_path)
    flash = "Flash" in template
    assert (tok.encode_chat([{"role": "user", "content": "hi"}])[-1] == tok.specials["<think>"]) == flash
    thoughts = [*([] if flash else ["<think>"]), "The user wants weather.", "</think>", "\n"]
    newline = [] if flash else ["\n"]  # GLM-4.6 puts each part of a call on its own line
    call = ["<tool_call>", "get_weather", *newline, "<arg_key>", "city", "</arg_key>", *newline, "<arg_value>", "Oslo",
            "</arg_value>", *newline, "</tool_call>"]
    city = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    pipe = scripted(tok, [*thoughts, *call], [*thoughts, "It is sunny in Oslo."])
    history = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = pipe.chat(history, tools=[city])
    assert reply.reasoning_content == "The user wants weather." and reply.content == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls] == \
        [("get_weather", {"city": "Oslo"})]
    assert json.dumps({"type": "function", "function": city}) in tok.decode(pipe.model.prompts[0])  # tools listed
    history += [reply, {"role": "tool", "content": "sunny, 21 degrees"}]
    assert pipe.chat(history, tools=[city]).content == "It is sunny in Oslo."
    second = tok.decode(pipe.model.prompts[1])
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>" in \
        second.replace("\n", "")
    assert "<tool_response>" in second and "sunny, 21 degrees" in second
    with openai_client(scripted_pipeline(tok, ids(tok, *thoughts, *call))) as client:
        done = client.chat.completions.create(model="m", messages=history[:1], tool_choice="required",
                                              tools=[{"type": "function", "function": city}])
        assert done.choices[0].message.model_extra["reasoning_content"] == "The user wants weather."
        assert json.loads(done.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    with openai_client(scripted_pipeline(tok, ids(tok, *thoughts, '{"ok": true}'))) as client:
        done = client.chat.completions.create(model="m", messages=history[:1], response_format=OK)
        assert done.choices[0].message.content == '{"ok": true}'
        assert done.choices[0].message.model_extra["reasoning_content"] == "The user wants weather."


def test_cli_runs_the_tagged_tool_loop(tokenizer, tmp_path, monkeypatch, capsys):
    """`chatglm chat --tools ... --tool-module ...` with a template that offers tools: the call in GLM-4.5's tags
    runs and its result goes back (the thoughts shown before, plain when piped); GLM-Z1's template is refused by name."""
    from chatglm import cli

    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": WEATHER}]))
    (tmp_path / "weather.py").write_text("def get_weather(city, days=1, units=None):\n    return {'city': city}\n")
    call = ["<think>", "Look it up.", "</think>", "<tool_call>", "get_weather", "<arg_key>", "city", "</arg_key>",
            "<arg_value>", "Oslo", "</arg_value>", "</tool_call>"]
    monkeypatch.setattr("chatglm.pipeline.Pipeline",
                        lambda *args, **kwargs: scripted(tokenizer, call, ["<think>", "</think>", "Sunny."]))
    args = ["chat", "--tools", str(tmp_path / "tools.json"), "--tool-module", str(tmp_path / "weather.py"), "--temp",
            "0", "-p", "Weather in Oslo?"]
    if not takes_tools(tokenizer.chat_template):
        assert cli.main(args) != 0
        assert "a chat template that offers tools" in capsys.readouterr().err
        return
    assert cli.main(args) == 0
    assert capsys.readouterr().out == ("Look it up.\n[calling get_weather(city='Oslo')]\n[get_weather returned]\n"
                                       '{"city": "Oslo"}\nSunny.\n')


# GLM-4.7-Flash's generation prompt: the reply starts inside its reasoning unless enable_thinking is false
FLASH_OPENING = "{{ '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' }}"


@pytest.fixture(scope="module")
def flash_server(tmp_path_factory):
    """`chatglm serve -m` a q8_0 GGUF of a random GLM-4.7-Flash, converted from a folder with a GLM tokenizer.json and
    a template in GLM-4.7-Flash's layout (tools, <think> opened by the prompt)."""
    from chatglm.convert import convert

    from checkpoints import tiny_glm4_moe_lite
    from test_server_support import serving

    folder = tmp_path_factory.mktemp("flash")
    vocab = write_glm_tokenizer(folder, TEMPLATE.replace("{{ THINK }}", FLASH_OPENING))
    model = tiny_glm4_moe_lite(vocab_size=vocab, max_position_embeddings=1024,
                               eos_token_id=sorted(load_tokenizer(folder).eos_ids))
    model.save_pretrained(folder)
    gguf = convert(folder, folder / "flash.gguf", "q8_0", progress=False)
    with serving(["-m", str(gguf), "--max-batch", "2", "--log-level", "warning"], folder / "serve.log") as url:
        yield url


def test_serve_a_glm_4_7_flash_gguf_to_the_openai_client(flash_server):
    """As a user hits it: reasoning_content in the reply and in the stream; with thinking off, tool_choice "required"
    and json_schema give what the schemas accept (jsonschema), sampled at temperature 1."""
    pytest.importorskip("jsonschema")
    from openai import OpenAI

    from patience import PATIENCE

    client = OpenAI(base_url=f"{flash_server}/v1", api_key="unused", max_retries=0, timeout=PATIENCE)
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    done = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=8)
    thoughts = done.choices[0].message.model_extra["reasoning_content"]
    assert thoughts and not done.choices[0].message.content  # a random model does not close its thinking
    chunks = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=8, stream=True)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == thoughts
    sampled_constraints_hold(client, range(2))


def test_the_thudm_style_apis_answer_without_the_reasoning(tokenizer):
    """GLM API (/chat, /chat-stream), ChatGLM-6B's api.py (POST /, whole or streamed) and the ChatGLM2 SSE server
    (/stream) have no field for reasoning: streamed or whole, they carry the answer only, and so does their history."""
    from fastapi.testclient import TestClient

    from chatglm.server import create_app

    from test_server_support import sse_events

    z1 = not takes_tools(tokenizer.chat_template)
    pipe = scripted_pipeline(tokenizer, ids(tokenizer, *([] if z1 else ["<think>"]), "Hmm.", "</think>", "Sunny."))
    with TestClient(create_app(pipe, max_batch=2, max_queue=4)) as client:
        assert client.post("/chat", json={"prompt": "hi"}).json()["content"] == "Sunny."
        assert client.post("/", json={"prompt": "hi", "history": []}).json()["response"] == "Sunny."
        with client.stream("POST", "/chat-stream", json={"prompt": "hi"}) as r:
            events = [json.loads(d) for _, d in sse_events(r.iter_lines())]
        assert "".join(e["content"] for e in events) == "Sunny."
        with client.stream("POST", "/", json={"prompt": "hi", "history": [], "stream": True}) as r:
            assert [json.loads(d) for _, d in sse_events(r.iter_lines())][-1]["response"] == "Sunny."
        with client.stream("POST", "/stream", json={"query": "hi", "history": []}) as r:
            last = [json.loads(d) for _, d in sse_events(r.iter_lines())][-1]
        assert last["response"] == "Sunny." and last["history"] == [["hi", "Sunny."]]


def test_thudm_model_chat_answers_without_the_reasoning(tokenizer):
    """compat's model.chat / stream_chat (THUDM's API, which has no place for thoughts): the answer, in the history."""
    from pathlib import Path

    from chatglm.compat import ChatModel

    z1 = not takes_tools(tokenizer.chat_template)
    model = ChatModel(Path("unused"))
    model._pipeline = scripted(tokenizer, [*([] if z1 else ["<think>"]), "Hmm.", "</think>", "Sunny."])
    response, history = model.chat(None, "Weather?", history=[])
    assert response == "Sunny." and history == [("Weather?", "Sunny.")]
