"""The official openai client against `chatglm serve` (default model): `.parse` with a pydantic model, a strict nested
json_schema at temperature 1 over several seeds (checked by jsonschema), logprobs, n=3; and tool_choice "required"
against a tiny random GLM-4 with the real tokenizer, served in process."""
from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from patience import PATIENCE
from test_openai_extras import OTHER, WEATHER, tool_client  # noqa: F401 - the tiny GLM-4 / ChatGLM3 servers
from test_server_live import base_url, openai_client  # noqa: F401 - the live server fixtures

ASK = [{"role": "user", "content": "Invent a person with two pets."}]


class Pet(BaseModel):
    kind: str
    legs: int


class Person(BaseModel):
    name: str
    age: int
    pets: list[Pet] = Field(min_length=2, max_length=2)  # "two pets": unbounded, a 135M model's sampled list can run on


NESTED = {"type": "object", "additionalProperties": False, "required": ["title", "authors", "year"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                         "authors": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                             "type": "object", "additionalProperties": False, "required": ["name", "role"],
                             "properties": {"name": {"type": "string", "maxLength": 20},
                                            "role": {"enum": ["writer", "editor"]}}}}}}


def test_parse_with_a_pydantic_model(openai_client):
    r = openai_client.chat.completions.parse(model="default", messages=ASK, response_format=Person, max_tokens=200,
                                             temperature=0.7, seed=1)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and len(person.pets) == 2 and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_strict_nested_schema_at_temperature_one(openai_client, seed):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": NESTED, "strict": True}}
    r = openai_client.chat.completions.create(model="default", messages=[{"role": "user", "content": "A book?"}],
                                              response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)
    jsonschema.validate(json.loads(r.choices[0].message.content), NESTED)


def test_logprobs_and_n(openai_client):
    r = openai_client.chat.completions.create(model="default", messages=ASK, max_tokens=6, temperature=1.0, seed=3,
                                              n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        content = c.logprobs.content
        assert content and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    again = openai_client.chat.completions.create(model="default", messages=ASK, max_tokens=6, temperature=1.0,
                                                  seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    text = openai_client.completions.create(model="default", prompt="Hello", max_tokens=3, logprobs=2, echo=True)
    assert text.choices[0].logprobs.token_logprobs[0] is None and text.choices[0].text.startswith("Hello")


def test_tool_choice_required_through_the_official_client(tool_client):  # noqa: F811
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=tool_client,
                    max_retries=0, timeout=PATIENCE)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=[WEATHER, OTHER], tool_choice="required", temperature=1.0, seed=5,
                                       max_tokens=120)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "add")
    assert isinstance(json.loads(call.function.arguments), dict)
