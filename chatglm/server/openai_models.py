"""The request bodies of OpenAI's API (openai.py serves them): messages, tools, response_format, sampling fields,
and the checks a schema cannot express, turning a body into the engine's parameters (one per choice).
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, Field

from ..grammar import GrammarError, response_grammar
from .app import APIError, Server, sampling


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: ToolName


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self, server: Server) -> str | None:
        """The reply's grammar (None: free text), checked against the vocabulary; a bad schema is a 400."""
        fmt = self.model_dump(by_alias=True, exclude_none=True)
        where = "response_format.json_schema.schema" if self.type == "json_schema" else "response_format"
        return checked(server, lambda: response_grammar(server.family, fmt), where)


def checked(server: Server, build: Callable[[], str | None], param: str) -> str | None:
    """The grammar `build` gives, checked against the served vocabulary; a GrammarError becomes a 400."""
    try:
        grammar = build()
        if grammar is not None:
            server.pipeline.vocabulary.check(grammar, param)
        return grammar
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model: str | None = Field(default=None, description="ignored: the server serves one model")
    max_tokens: int | None = Field(default=None, ge=1, description="at most the model's context")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16, description="choices, sampled independently from one prefill")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, description="off the logit of tokens in the reply, once")
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, description="off a token's logit per use in the reply")
    repetition_penalty: float = Field(default=1.0, ge=0.1, le=10, description="ChatGLM's penalty (extension)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = Field(default=None, description="accepted and ignored")

    def checked(self, server: Server, max_tokens: int | None = None, logprobs: int | None = None,
                echo: bool = False):
        """Sampling parameters (one per choice) and stop strings, after the checks the schema cannot express.

        Choice k is seeded with seed + k, so a seeded request with n > 1 is reproducible.
        """
        limit = max_tokens if max_tokens is not None else self.max_tokens
        if limit is not None and limit > server.context:
            raise APIError(400, f"max_tokens is {limit}, but the model's context is {server.context} tokens",
                           param="max_tokens")
        if limit == 0 and not echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        params = [sampling(self.temperature, self.top_p, max_new_tokens=limit,
                           seed=None if self.seed is None else (self.seed + k) % 2**64,
                           repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                           frequency_penalty=self.frequency_penalty) for k in range(self.n)]
        for p in params:
            p.logprobs, p.prompt_logprobs = logprobs, echo
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return params, stop


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description='more variables for the chat template, as vLLM takes them: {"enable_thinking": false}')


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=0, description="at most the model's context; 0 only with echo")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = Field(default=False, description="the prompt before the completion, with its tokens' logprobs")
    parse_special: bool | None = Field(default=None, description="read special-token text in the prompt as control "
                                       "tokens (default: the model family's own rule; GLM keeps it as text)")


class EmbeddingRequest(BaseModel):
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
