"""OpenAI's API: /v1/chat/completions (with tools for ChatGLM3 and GLM-4), /v1/completions, /v1/models,
/v1/embeddings. Shapes follow OpenAI's reference, so the official client and LangChain's ChatOpenAI work as is.
"""
from __future__ import annotations

import base64
import secrets
import time
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sse_starlette import ServerSentEvent

from ..markup import Reasoning, takes_tools
from ..messages import ChatMessage
from ..tools import TOOL_FAMILIES, model_messages, tools_message
from .app import APIError, Generation, Server, event_stream, get_server, json_event, sampling

router = APIRouter(prefix="/v1", tags=["openai"])


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


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model: str | None = Field(default=None, description="ignored: the server serves one model")
    max_tokens: int | None = Field(default=None, ge=1, description="at most the model's context")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128, description="only 1 is supported")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, description="off the logit of tokens in the reply, once")
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, description="off a token's logit per use in the reply")
    repetition_penalty: float = Field(default=1.0, ge=0.1, le=10, description="ChatGLM's penalty (extension)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def checked(self, server: Server, max_tokens: int | None = None):
        """Sampling parameters and stop strings, after the checks the schema cannot express."""
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        limit = max_tokens if max_tokens is not None else self.max_tokens
        if limit is not None and limit > server.context:
            raise APIError(400, f"max_tokens is {limit}, but the model's context is {server.context} tokens",
                           param="max_tokens")
        params = sampling(self.temperature, self.top_p, max_new_tokens=limit, seed=self.seed,
                          repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return params, stop


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description='more variables for the chat template, as vLLM takes them: {"enable_thinking": false}')


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1, description="at most the model's context")
    parse_special: bool | None = Field(default=None, description="read special-token text in the prompt as control "
                                       "tokens (default: the model family's own rule; GLM keeps it as text)")


class EmbeddingRequest(BaseModel):
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def _active_tools(body: ChatRequest, server: Server) -> list[FunctionDef]:
    """The functions the model may call, after tool_choice; refused for models without a tool format."""
    if not body.tools or body.tool_choice == "none":
        return []
    if server.family not in TOOL_FAMILIES and not takes_tools(server.tokenizer.chat_template):
        raise APIError(400, "tool calls need a ChatGLM3 or GLM-4 model, or a chat template that offers tools "
                            f"(GLM-4.5/4.6/4.7); this one is of family {server.family!r}", param="tools")
    functions = [tool.function for tool in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice):
        functions = [f for f in functions if f.name == body.tool_choice.function.name]
        if not functions:
            raise APIError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    return functions


def _messages(body: ChatRequest, family: str, functions: list[FunctionDef]) -> list[ChatMessage]:
    """OpenAI messages as the model's own: tools in a system message, calls and results in its format."""
    own = family in TOOL_FAMILIES  # tools as the model's own system message; else the chat template takes them
    out = [tools_message(family, [f.spec() for f in functions])] if functions and own else []
    for m in body.messages:
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
        out.append(ChatMessage(role, m.text(), tool_calls=calls, reasoning_content=m.reasoning_content or ""))
    return model_messages(family, out)


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@router.get("/models")
async def models(server: Server = Depends(get_server)) -> dict[str, Any]:
    cards = [server.model_id, server.embedder.name]
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": server.created, "owned_by": "chatglm"}
                     for name in cards]}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, server: Server = Depends(get_server)):
    params, stop = body.checked(server, body.max_completion_tokens or body.max_tokens)
    functions = _active_tools(body, server)
    gen = server.generate(_messages(body, server.family, functions), params, stop, [f.spec() for f in functions],
                          body.chat_template_kwargs or {})
    head = {"id": _id("chatcmpl"), "created": int(time.time()), "model": server.model_id}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(gen, _chat_chunks(gen, head, usage))
    pieces = [delta async for delta in gen.deltas()]
    content = "".join(p for p in pieces if not isinstance(p, Reasoning))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning := "".join(p for p in pieces if isinstance(p, Reasoning)):
        message["reasoning_content"] = reasoning  # as vLLM and DeepSeek's API return a model's thinking
    if gen.tool_calls:
        message["content"] = content or None  # OpenAI sends null content beside tool calls
        message["tool_calls"] = [call.to_openai() for call in gen.tool_calls]
    return {**head, "object": "chat.completion", "usage": gen.usage,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}]}


async def _chat_chunks(gen: Generation, head: dict[str, Any], usage: bool) -> AsyncIterator[ServerSentEvent]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> ServerSentEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return json_event({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for text in gen.deltas():
        yield chunk({"reasoning_content": text} if isinstance(text, Reasoning) else {"content": text})
    if gen.tool_calls:
        yield chunk({"tool_calls": [call.to_openai(index=i) for i, call in enumerate(gen.tool_calls)]})
    yield chunk({}, gen.finish_reason)
    if usage:
        yield json_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": gen.usage})
    yield ServerSentEvent(data="[DONE]")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, server: Server = Depends(get_server)):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "give one prompt: batches of prompts are not supported", param="prompt")
    params, stop = body.checked(server)
    ids = server.tokenizer.encode(prompts[0], add_special_tokens=True, parse_special=body.parse_special)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    gen = Generation(server, ids, params, stop)
    head = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": server.model_id}

    def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if body.stream:
        async def chunks() -> AsyncIterator[ServerSentEvent]:
            async for text in gen.deltas():
                yield json_event({**head, "choices": [choice(text, None)]})
            yield json_event({**head, "choices": [choice("", gen.finish_reason)]})
            yield ServerSentEvent(data="[DONE]")

        return event_stream(gen, chunks())
    text = await gen.text()
    return {**head, "choices": [choice(text, gen.finish_reason)], "usage": gen.usage}


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, server: Server = Depends(get_server)) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await server.embed(texts)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise APIError(400, f"this embedding model gives {vectors.shape[1]} dimensions, not {body.dimensions}",
                       param="dimensions")
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": server.embedder.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
