"""chatglm.tools against the official formats (THUDM/ChatGLM3 PROMPT.md and tokenizer; glm-4-9b-chat's template)."""
from __future__ import annotations

import json

import pytest

from chatglm.errors import ChatFormatError
from chatglm.tools import ReplyParser, call_message, parse_call, tools_message

WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "城市"}, "unit": {"type": "string"}},
        "required": ["location"],
    },
}

WEATHER_JSON = """{
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "城市"
            },
            "unit": {
                "type": "string"
            }
        },
        "required": [
            "location"
        ]
    }
}"""


def test_chatglm3_tools_go_in_the_system_message_as_an_indented_json_list():
    msg = tools_message("chatglm3", [WEATHER])
    assert msg.role == "system" and msg.metadata == ""
    indented = "\n".join("    " + line for line in WEATHER_JSON.splitlines())
    assert msg.content == ("Answer the following questions as best as you can. You have access to the following "
                           f"tools:\n[\n{indented}\n]")


def test_glm4_tools_go_in_the_system_message_one_section_each():
    other = {"name": "add", "parameters": {}}
    msg = tools_message("glm4", [WEATHER, other])
    note = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    assert msg.content == (
        "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。"
        f"\n\n# 可用工具\n\n## get_current_weather\n\n{WEATHER_JSON}\n{note}"
        f'\n\n## add\n\n{{\n    "name": "add",\n    "parameters": {{}}\n}}\n{note}'
    )


def test_tools_need_a_glm_family_with_a_tool_format():
    with pytest.raises(ChatFormatError):
        tools_message("llama", [WEATHER])


def test_earlier_calls_are_written_as_the_model_writes_them():
    chatglm3 = call_message("chatglm3", "get_current_weather", '{"location": "beijing", "unit": "celsius"}')
    assert (chatglm3.role, chatglm3.metadata) == ("assistant", "get_current_weather")
    assert chatglm3.content == '```python\ntool_call(location="beijing", unit="celsius")\n```'
    nested = call_message("chatglm3", "f", '{"n": 3, "flags": [true, null], "opts": {"a": 1.5}}')
    assert nested.content == '```python\ntool_call(n=3, flags=[True, None], opts={"a": 1.5})\n```'
    glm4 = call_message("glm4", "get_current_weather", '{"location": "北京"}')
    assert (glm4.metadata, glm4.content) == ("get_current_weather", '{"location": "北京"}')


@pytest.mark.parametrize("family, arguments", [("glm4", "not json"), ("glm4", "[1, 2]"),
                                               ("chatglm3", '{"not a name": 1}')])
def test_earlier_calls_with_bad_arguments_are_refused(family, arguments):
    with pytest.raises(ChatFormatError):
        call_message(family, "f", arguments)


def test_chatglm3_calls_parse_from_the_python_block():
    call = parse_call("chatglm3", "get_current_weather",
                      '```python\ntool_call(location="beijing", unit="celsius")\n```')
    assert call.name == "get_current_weather"
    assert json.loads(call.arguments) == {"location": "beijing", "unit": "celsius"}
    assert call.id.startswith("call_")
    nested = parse_call("chatglm3", "f", "```python\ntool_call(n=3, flags=[True, None], opts={'a': 1.5})\n```")
    assert json.loads(nested.arguments) == {"n": 3, "flags": [True, None], "opts": {"a": 1.5}}


@pytest.mark.parametrize("body", [
    "```python\ntool_call(x=__import__('os').system('echo hacked'))\n```",  # never evaluated
    "```python\nprint(1)\n```",
    "```python\ntool_call(1, 2)\n```",
    "```python\ntool_call(**kwargs)\n```",
    "```python\ntool_call(s={1, 2})\n```",  # a set has no JSON form
    "I will look it up.",
])
def test_chatglm3_bodies_that_are_not_calls(body):
    assert parse_call("chatglm3", "f", body) is None


def test_glm4_calls_parse_from_json_arguments():
    assert json.loads(parse_call("glm4", "f", '{"location": "北京", "days": 3}').arguments) == {
        "location": "北京", "days": 3}
    assert json.loads(parse_call("glm4", "f", "{'location': 'Paris', 'ok': True}").arguments) == {
        "location": "Paris", "ok": True}
    assert parse_call("glm4", "f", "[1, 2]") is None
    assert parse_call("glm4", "f", "the weather is nice") is None


def test_written_calls_parse_back():
    for family in ("chatglm3", "glm4"):
        msg = call_message(family, "f", '{"city": "Ürümqi", "n": [1, 2.5, null]}')
        call = parse_call(family, msg.metadata, msg.content)
        assert json.loads(call.arguments) == {"city": "Ürümqi", "n": [1, 2.5, None]}


def feed_in_pieces(parser: ReplyParser, parts: list[str], size: int = 3) -> str:
    """Stream each part in small pieces, closing parts as <|assistant|> would; return the text shown."""
    shown = []
    for part in parts:
        shown += [parser.feed(part[i:i + size]) for i in range(0, len(part), size)]
        shown.append(parser.end_part())
    return "".join(shown)


def test_reply_parser_shows_plain_text_without_the_empty_metadata_line():
    parser = ReplyParser("chatglm3", ["get_current_weather"])
    reply = "Hello, I'm ChatGLM3.\nHow can I help?"
    assert feed_in_pieces(parser, ["\n" + reply]) == reply
    assert parser.calls == []


def test_reply_parser_streams_text_before_the_reply_ends():
    parser = ReplyParser("glm4", ["f"])
    assert parser.feed("\nHel") == "Hel"
    assert parser.feed("lo") == "lo"


def test_reply_parser_holds_a_call_back_and_parses_it_at_the_end_of_its_part():
    parser = ReplyParser("chatglm3", ["get_current_weather"])
    text = feed_in_pieces(parser, [
        "\nOkay, let's look up the weather in Beijing today.",
        'get_current_weather\n```python\ntool_call(location="beijing", unit="celsius")\n```',
    ])
    assert text == "Okay, let's look up the weather in Beijing today."
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        ("get_current_weather", {"location": "beijing", "unit": "celsius"})]


def test_reply_parser_glm4_call():
    parser = ReplyParser("glm4", ["get_weather"])
    assert feed_in_pieces(parser, ['get_weather\n{"location": "北京"}']) == ""
    assert json.loads(parser.calls[0].arguments) == {"location": "北京"}


def test_reply_parser_keeps_what_is_not_a_call_as_text():
    parser = ReplyParser("chatglm3", ["get_current_weather"])
    code = "interpreter\n```python\nprint(1)\n```"
    assert feed_in_pieces(parser, [code]) == code
    broken = "get_current_weather\n```python\ntool_call(location=\n```"
    assert feed_in_pieces(ReplyParser("chatglm3", ["get_current_weather"]), [broken]) == broken
    assert feed_in_pieces(ReplyParser("chatglm3"), ["no metadata line"]) == "no metadata line"


def test_chatglm3_call_reads_json_literals_as_python():
    call = parse_call("chatglm3", "f", '```python\ntool_call(a=true, b=null, c=[false, 1], d="true")\n```')
    assert json.loads(call.arguments) == {"a": True, "b": None, "c": [False, 1], "d": "true"}
    assert parse_call("chatglm3", "f", "```python\ntool_call(a=os.system)\n```") is None
