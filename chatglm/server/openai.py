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

from ..messages import ChatMessage
from ..tools import TOOL_FAMILIES, model_messages, tools_message
from ..grammar import GrammarError, response_grammar, tool_call_grammar
from .app import APIError, Generation, Server, event_stream, get_server, json_event, sampling
from .logprobs import chat_logprobs, completion_logprobs

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
        return _checked(server, lambda: response_grammar(server.family, fmt), "response_format")


def _checked(server: Server, build, param: str) -> str | None:
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


def _active_tools(body: ChatRequest, family: str) -> list[FunctionDef]:
    """The functions the model may call, after tool_choice; refused for models without a tool format."""
    if body.tool_choice in ("required",) or isinstance(body.tool_choice, NamedToolChoice):
        if not body.tools:
            raise APIError(400, "tool_choice asks for a call, but tools is empty", param="tool_choice")
    if not body.tools or body.tool_choice == "none":
        return []
    if family not in TOOL_FAMILIES:
        raise APIError(400, f"tool calls need a ChatGLM3 or GLM-4 model; this one is of family {family!r}",
                       param="tools")
    functions = [tool.function for tool in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice):
        functions = [f for f in functions if f.name == body.tool_choice.function.name]
        if not functions:
            raise APIError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    return functions


def _messages(body: ChatRequest, family: str, functions: list[FunctionDef]) -> list[ChatMessage]:
    """OpenAI messages as the model's own: tools in a system message, calls and results in its format."""
    out = [tools_message(family, [f.spec() for f in functions])] if functions else []
    for m in body.messages:
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls and family in TOOL_FAMILIES else None
        out.append(ChatMessage(role, m.text(), tool_calls=calls))
    return model_messages(family, out)


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@router.get("/models")
async def models(server: Server = Depends(get_server)) -> dict[str, Any]:
    cards = [server.model_id, server.embedder.name]
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": server.created, "owned_by": "chatglm"}
                     for name in cards]}


def _chat_grammar(body: ChatRequest, server: Server, functions: list[FunctionDef]) -> str | None:
    """tool_choice "required" or a named function: one call, its arguments valid for the function's parameters;
    otherwise response_format's grammar, if any."""
    if functions and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)):
        return _checked(server, lambda: tool_call_grammar(server.family, [f.spec() for f in functions]), "tools")
    return body.response_format.grammar(server) if body.response_format else None


def _usage(gens: list[Generation]) -> dict[str, int]:
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": gens[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": gens[0].prompt_tokens + completion}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, server: Server = Depends(get_server)):
    top = (body.top_logprobs or 0) if body.logprobs else None
    params, stop = body.checked(server, body.max_completion_tokens or body.max_tokens, logprobs=top)
    functions = _active_tools(body, server.family)
    grammar = _chat_grammar(body, server, functions)
    prompt = server.tokenizer.encode_chat(_messages(body, server.family, functions))
    names = [f.name for f in functions]
    gens = [Generation(server, prompt, p, stop, server.parser(names), request)
            for p, request in zip(params, server.submit(prompt, params, grammar))]
    head = {"id": _id("chatcmpl"), "created": int(time.time()), "model": server.model_id}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(gens, _chat_chunks(gens, head, usage, server.tokenizer))
    choices = []
    for index, gen in enumerate(gens):
        content = await gen.text()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if gen.tool_calls:
            message["content"] = content or None  # OpenAI sends null content beside tool calls
            message["tool_calls"] = [call.to_openai() for call in gen.tool_calls]
        entries = gen.request.logprobs[: gen.completion_tokens]  # chat leaves the stop token out
        logprobs = chat_logprobs(server.tokenizer, entries) if top is not None else None
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": gen.finish_reason})
    return {**head, "object": "chat.completion", "usage": _usage(gens), "choices": choices}


async def _chat_chunks(gens: list[Generation], head: dict[str, Any], usage: bool,
                       tokenizer) -> AsyncIterator[ServerSentEvent]:
    """Each choice's chunks in turn (their index tells them apart); all choices are generated at once meanwhile."""
    for index, gen in enumerate(gens):
        def chunk(delta: dict[str, Any], finish_reason: str | None = None, logprobs=None) -> ServerSentEvent:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return json_event({**head, "object": "chat.completion.chunk", "choices": [choice]})

        wanted = gen.request.params.logprobs is not None
        yield chunk({"role": "assistant", "content": ""})
        shown = 0
        async for text in gen.deltas():
            entries, shown = gen.request.logprobs[shown:gen.read], gen.read
            yield chunk({"content": text}, logprobs=chat_logprobs(tokenizer, entries) if wanted else None)
        if gen.tool_calls:
            yield chunk({"tool_calls": [call.to_openai(index=i) for i, call in enumerate(gen.tool_calls)]})
        yield chunk({}, gen.finish_reason)
    if usage:
        yield json_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(gens)})
    yield ServerSentEvent(data="[DONE]")


def _prompt_ids(body: CompletionRequest, server: Server) -> list[int]:
    """One prompt's ids: text (tokenized with the family's decoration) or token ids as given (lm-evaluation-harness)."""
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "give one prompt: batches of prompts are not supported", param="prompt")
    if isinstance(prompts[0], str):
        ids = server.tokenizer.encode(prompts[0], add_special_tokens=True, parse_special=body.parse_special)
    else:
        ids = list(prompts[0])
        bad = next((i for i in ids if not 0 <= i < server.tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt holds token id {bad}, outside the vocabulary "
                                f"(0..{server.tokenizer.vocab_size - 1})", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, server: Server = Depends(get_server)):
    params, stop = body.checked(server, logprobs=body.logprobs, echo=body.echo)
    ids = _prompt_ids(body, server)
    grammar = body.response_format.grammar(server) if body.response_format else None
    gens = [Generation(server, ids, p, stop, request=r) for p, r in zip(params, server.submit(ids, params, grammar))]
    head = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": server.model_id}
    echoed = server.tokenizer.decode(ids) if body.echo else ""

    def choice(index: int, text: str, finish_reason: str | None, logprobs=None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def scores(gen: Generation, start: int, end: int, echo: bool) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        request, tokenizer = gen.request, server.tokenizer
        entries = request.logprobs[start:end]
        out = completion_logprobs(tokenizer, entries, [e[0] for e in entries])
        if echo:
            head_part = completion_logprobs(tokenizer, request.prompt_logprobs or [], ids)
            offset = len("".join(head_part["tokens"]))
            out["text_offset"] = [offset + o for o in out["text_offset"]]
            out = {k: head_part[k] + out[k] for k in out}
        return out

    if body.stream:
        async def chunks() -> AsyncIterator[ServerSentEvent]:
            for index, gen in enumerate(gens):
                shown = 0
                if body.echo:
                    yield json_event({**head, "choices": [choice(index, echoed, None, scores(gen, 0, 0, True))]})
                async for text in gen.deltas():
                    logprobs = scores(gen, shown, gen.read, False)
                    yield json_event({**head, "choices": [choice(index, text, None, logprobs)]})
                    shown = gen.read
                yield json_event({**head, "choices": [choice(index, "", gen.finish_reason)]})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield json_event({**head, "choices": [], "usage": _usage(gens)})
            yield ServerSentEvent(data="[DONE]")

        return event_stream(gens, chunks())
    choices = []
    for index, gen in enumerate(gens):
        text = await gen.text()
        end = len(gen.request.logprobs)  # the stop token's too, as vLLM and lm-evaluation-harness expect
        choices.append(choice(index, echoed + text, gen.finish_reason, scores(gen, 0, end, body.echo)))
    return {**head, "choices": choices, "usage": _usage(gens)}


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
