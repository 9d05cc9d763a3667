"""THUDM's own APIs: ChatGLM-6B's ``POST /`` (api.py; LangChain's ChatGLM LLM and chatglm.cpp's LangChain API
speak it) and the ChatGLM2 server-sent-events deployment's ``/stream`` and ``/free_gc``.
"""
from __future__ import annotations

import gc
import time
from typing import Any, AsyncIterator

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import Headers

from .app import Generation, GLMSampling, Server, event_stream, get_server, history_messages, json_event

router = APIRouter(tags=["chatglm"])


class PromptRequest(GLMSampling):
    prompt: str
    stream: bool = Field(default=False, description="answer with server-sent events of the growing response")


class QueryRequest(GLMSampling):
    query: str


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def wants_html(headers: Headers) -> bool:
    """A browser asking for a page (API clients send */* or application/json)."""
    return "text/html" in headers.get("accept", "")


@router.get("/", response_model=None)
async def index(request: Request):
    """API clients get the ChatGLM2 server's greeting; browsers get the web page once one is installed."""
    page = request.app.state.web_page
    if page is not None and wants_html(request.headers):
        return page(request)
    return {"message": "started", "success": True}


@router.post("/", response_model=None)
async def chat(body: PromptRequest, server: Server = Depends(get_server)):
    """ChatGLM-6B's API: {prompt, history, max_length, top_p, temperature} -> {response, history, status, time}."""
    gen = server.generate(history_messages(body.history, body.prompt), body.params(server))
    if body.stream:
        return event_stream(gen, _growing(gen, body))
    response = await gen.text()
    return {"response": response, "history": [*body.history, [body.prompt, response]], "status": 200,
            "time": _now()}


async def _growing(gen: Generation, body: PromptRequest) -> AsyncIterator[ServerSentEvent]:
    """The reply so far in each event, as THUDM's stream_chat yields it."""
    response = ""
    async for delta in gen.answer_deltas():
        response += delta
        yield json_event({"response": response, "history": [*body.history, [body.prompt, response]],
                          "status": 200, "time": _now()})


@router.post("/stream")
async def stream(body: QueryRequest, server: Server = Depends(get_server)) -> EventSourceResponse:
    """The ChatGLM2 SSE server: `delta` events {delta, response, finished}, the last with delta "[EOS]"."""
    gen = server.generate(history_messages(body.history, body.query), body.params(server))

    async def events() -> AsyncIterator[ServerSentEvent]:
        response = ""
        async for delta in gen.answer_deltas():
            response += delta
            yield json_event({"delta": delta, "response": response, "finished": False}, event="delta")
        final: dict[str, Any] = {"query": body.query, "delta": "[EOS]", "response": response,
                                 "history": [*body.history, [body.query, response]], "finished": True}
        yield json_event(final, event="delta")

    return event_stream(gen, events())


@router.get("/free_gc")
async def free_gc() -> dict[str, bool]:
    """Return cached allocator memory to the system (the KV cache itself stays: it is the engine's)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"success": True}
