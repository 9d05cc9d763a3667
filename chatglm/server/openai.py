"""OpenAI's API: /v1/chat/completions (with tools for ChatGLM3 and GLM-4), /v1/completions, /v1/models,
/v1/embeddings. Shapes follow OpenAI's reference, so the official client and LangChain's ChatOpenAI work as is:
structured outputs and tool_choice (grammar.py), logprobs (logprobs.py), echo and token-id prompts, n choices.
The request bodies are in openai_models.py.
"""
from __future__ import annotations

import base64
import secrets
import time
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends
from sse_starlette import ServerSentEvent

from ..grammar import for_prompt, markup_call_grammar, tool_call_grammar
from ..markup import Reasoning, takes_tools
from ..messages import ChatMessage
from ..tools import TOOL_FAMILIES, model_messages, tools_message
from .app import APIError, Generation, Server, event_stream, get_server, json_event
from .logprobs import chat_logprobs, completion_logprobs
from .openai_models import ChatRequest, CompletionRequest, EmbeddingRequest, FunctionDef, NamedToolChoice, \
    checked

router = APIRouter(prefix="/v1", tags=["openai"])


def _active_tools(body: ChatRequest, server: Server) -> list[FunctionDef]:
    """The functions the model may call, after tool_choice; refused for models without a tool format."""
    if body.tool_choice in ("required",) or isinstance(body.tool_choice, NamedToolChoice):
        if not body.tools:
            raise APIError(400, "tool_choice asks for a call, but tools is empty", param="tool_choice")
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


def _chat_grammar(body: ChatRequest, server: Server, functions: list[FunctionDef], prompt: list[int]) -> str | None:
    """tool_choice "required" or a named function: one call, its arguments valid for the function's parameters
    (in the model's own call format: ChatGLM3's, GLM-4's, or the tagged one of GLM-4.5's template); otherwise
    response_format's grammar, if any. A reply that starts inside its reasoning is constrained after it."""
    grammar = None
    if functions and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)):
        specs = [f.spec() for f in functions]
        grammar = checked(server, lambda: tool_call_grammar(server.family, specs) if server.family in TOOL_FAMILIES
                          else markup_call_grammar(server.tokenizer.specials, specs), "tools")
    elif body.response_format:
        grammar = body.response_format.grammar(server)
    return for_prompt(grammar, server.tokenizer, prompt)


async def _off_loop(function, *args):
    """Run a step that may compile grammars (the vocabulary's first read takes up to a second; a schema, ms) in a
    worker thread: llguidance releases the GIL, so other requests go on meanwhile."""
    return await anyio.to_thread.run_sync(function, *args)


def _usage(gens: list[Generation]) -> dict[str, int]:
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": gens[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": gens[0].prompt_tokens + completion}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, server: Server = Depends(get_server)):
    top = (body.top_logprobs or 0) if body.logprobs else None
    params, stop = body.checked(server, body.max_completion_tokens or body.max_tokens, logprobs=top)
    functions = _active_tools(body, server)
    prompt, parser = server.chat_prompt(_messages(body, server.family, functions), [f.spec() for f in functions],
                                        body.chat_template_kwargs or {})
    grammar = await _off_loop(_chat_grammar, body, server, functions, prompt)
    gens = [Generation(server, prompt, p, stop, parser(), request)
            for p, request in zip(params, await _off_loop(server.submit, prompt, params, grammar))]
    head = {"id": _id("chatcmpl"), "created": int(time.time()), "model": server.model_id}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(gens, _chat_chunks(gens, head, usage, server.tokenizer))
    choices = []
    for index, gen in enumerate(gens):
        pieces = [delta async for delta in gen.deltas()]
        content = "".join(p for p in pieces if not isinstance(p, Reasoning))
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning := "".join(p for p in pieces if isinstance(p, Reasoning)):
            message["reasoning_content"] = reasoning  # as vLLM and DeepSeek's API return a model's thinking
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
            delta = {"reasoning_content": text} if isinstance(text, Reasoning) else {"content": text}
            yield chunk(delta, logprobs=chat_logprobs(tokenizer, entries) if wanted else None)
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
    grammar = await _off_loop(body.response_format.grammar, server) if body.response_format else None
    requests = await _off_loop(server.submit, ids, params, grammar)
    gens = [Generation(server, ids, p, stop, request=r) for p, r in zip(params, requests)]
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
        def echo_event(index: int, gen: Generation) -> ServerSentEvent:
            return json_event({**head, "choices": [choice(index, echoed, None, scores(gen, 0, 0, True))]})

        async def chunks() -> AsyncIterator[ServerSentEvent]:
            for index, gen in enumerate(gens):
                shown, echo = 0, body.echo  # the echo goes first, once the prefill has scored the prompt
                async for text in gen.deltas():
                    if echo:
                        yield echo_event(index, gen)
                        echo = False
                    logprobs = scores(gen, shown, gen.read, False)
                    yield json_event({**head, "choices": [choice(index, text, None, logprobs)]})
                    shown = gen.read
                if echo:
                    yield echo_event(index, gen)
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
