"""GLM API (a FastAPI wrapper many apps were written against): /chat, /chat-stream, /tokenize, /embedding.

``/chat`` also takes the ChatGLM2 SSE deployment's body {query, history} and then answers in its shape,
{query, response, history, success}, so clients of either server work unchanged.
"""
from __future__ import annotations

from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from .app import APIError, Generation, GLMSampling, Server, event_stream, get_server, history_messages, json_event

router = APIRouter(tags=["glm-api"])


class GLMChatRequest(GLMSampling):
    prompt: str | None = Field(default=None, description="GLM API's question")
    query: str | None = Field(default=None,
                              description="the ChatGLM2 SSE server's question; the reply then takes its shape")

    def question(self) -> str:
        if self.prompt is None and self.query is None:
            raise APIError(400, "give the question as 'prompt' (or 'query')", param="prompt")
        return self.prompt if self.prompt is not None else self.query


class TokenizeRequest(BaseModel):
    prompt: str
    max_length: int | None = Field(default=None, ge=1, description="keep at most this many ids")


class GLMEmbeddingRequest(BaseModel):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=2048)]


def _start(body: GLMChatRequest, server: Server) -> Generation:
    return server.generate(history_messages(body.history, body.question()), body.params(server))


def _counts(gen: Generation, server: Server) -> dict[str, Any]:
    return {**gen.usage, "model": server.model_id, "object": "chat.completion"}


@router.post("/chat")
async def chat(body: GLMChatRequest, server: Server = Depends(get_server)) -> dict[str, Any]:
    gen = _start(body, server)
    response = await gen.text()
    if body.prompt is None:  # the ChatGLM2 SSE server's body and reply
        return {"query": body.query, "response": response, "history": [*body.history, [body.query, response]],
                "success": True}
    return {"content": response, **_counts(gen, server)}


@router.post("/chat-stream")
async def chat_stream(body: GLMChatRequest, server: Server = Depends(get_server)) -> EventSourceResponse:
    """Server-sent events, each with the next piece of the reply in `content` (clients append with +=)."""
    gen = _start(body, server)

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for delta in gen.answer_deltas():
            yield json_event({"content": delta, **_counts(gen, server)})

    return event_stream(gen, events())


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, server: Server = Depends(get_server)) -> dict[str, list]:
    """Ids as the model reads the text (with the family's prefix or suffix); tokens of the text itself."""
    ids = server.tokenizer.encode(body.prompt, add_special_tokens=True)[: body.max_length]
    text_ids = server.tokenizer.encode(body.prompt)[: body.max_length]
    return {"tokenIds": ids, "tokens": [server.tokenizer.token_text(i) for i in text_ids]}


@router.post("/embedding")
async def embedding(body: GLMEmbeddingRequest, server: Server = Depends(get_server)) -> dict[str, Any]:
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    vectors, _ = await server.embed(texts)
    return {"data": vectors.tolist(), "model": server.embedder.name, "object": "embedding"}
