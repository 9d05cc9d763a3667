"""One server for every protocol: the app factory and what the protocol modules share.

``create_app`` loads nothing: it takes a loaded Pipeline, starts one BatchEngine over its model (so there is
never more than one model in memory) and mounts the protocols: openai.py, chatglm_api.py and glm_api.py.
Every refusal is OpenAI's error object ``{error: {message, type, param, code}}`` with a 4xx status.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..engine import BatchEngine, ContextLengthError, QueueFullError, SamplingParams
from ..errors import ChatFormatError
from ..grammar import GrammarError
from ..kv_cache import KV_TYPES, KVType, parse_size
from ..markup import MarkupParser, Reasoning, markup_parser
from ..messages import ChatMessage
from ..pipeline import reply_text, template_chat
from ..tools import TOOL_FAMILIES, ReplyParser, ToolCall
from .embeddings import Embedder, EmbeddingUnavailable

MIN_TEMPERATURE = 1e-4  # below this, logits / temperature can overflow float32: decode greedily instead


class APIError(Exception):
    """A refused request: its status, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def event_stream(gen: Generation | Sequence[Generation], events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """Server-sent events that cancel the generations however the response ends, even before it started."""
    gens = [gen] if isinstance(gen, Generation) else list(gen)

    def close() -> None:
        for g in gens:
            g.close()

    return EventSourceResponse(events, background=BackgroundTask(close))


def json_event(data: Any, event: str | None = None) -> ServerSentEvent:
    """One server-sent event carrying JSON (non-ASCII text kept as is, as the ChatGLM servers send it)."""
    return ServerSentEvent(data=json.dumps(data, ensure_ascii=False), event=event)


@dataclass
class KVSettings:
    """How the KV pool is sized: bytes of blocks (None: half the available memory, see kv_cache.default_budget),
    tokens per sequence at most (None: the model's context) and the storage dtype (None: the model's choice)."""

    memory: int | None = None
    ctx: int | None = None
    dtype: KVType | None = None

    @classmethod
    def from_flags(cls, kv_memory: str | None, ctx: int | None, kv_type: str | None) -> "KVSettings":
        """From `serve`'s --kv-memory, --ctx and --kv-type; a bad value is refused before the model loads."""
        if ctx is not None and ctx < 1:
            raise ValueError(f"--ctx must be a positive number of tokens, not {ctx}")
        if kv_type not in (None, "auto", *KV_TYPES):
            raise ValueError(f"--kv-type {kv_type!r} is not a cache type; expected one of auto, {', '.join(KV_TYPES)}")
        return cls(memory=parse_size(kv_memory) if kv_memory else None, ctx=ctx, dtype=KV_TYPES.get(kv_type))


class Server:
    """What every protocol shares: the pipeline, the batch engine, the embedder and the counters."""

    def __init__(self, pipeline, max_batch: int, max_queue: int, embedding_model: str | Path | None,
                 kv: KVSettings | None = None):
        self.pipeline = pipeline
        self.tokenizer = pipeline.tokenizer
        self.family = self.tokenizer.family
        kv = kv or KVSettings()
        self.engine = BatchEngine(pipeline.model, max_batch=max_batch, max_queue=max_queue, context=kv.ctx,
                                  kv_memory=kv.memory, kv_dtype=kv.dtype, drafter=pipeline.drafter)
        self.context = self.engine.context
        path = Path(pipeline.path)
        self.model_id = path.stem if path.suffix in (".gguf", ".bin") else path.name
        self.embedder = Embedder(embedding_model)
        self.created = int(time.time())
        self.limiter = anyio.CapacityLimiter(max_batch + max_queue)  # one waiting thread per reply at most
        self.cancelled = 0  # replies ended before the engine finished them (client gone, stop string)
        self.rejected = 0   # requests answered 503 because the queue was full

    def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, stop: Sequence[str] = (),
                 functions: Sequence[Mapping[str, Any]] = (), template_kwargs: Mapping[str, Any] = {}) -> Generation:
        """Start a chat reply; refusals (bad conversation, too long, queue full) raise now, before any reply.

        functions: the definitions the model may call (for ChatGLM3 / GLM-4 already in `messages` as their
        system message; a chat template that offers tools gets them itself, and template_kwargs)."""
        prompt, parser = self.chat_prompt(messages, functions, template_kwargs)
        return Generation(self, prompt, params, stop, parser())

    def chat_prompt(self, messages: Sequence[ChatMessage], functions: Sequence[Mapping[str, Any]] = (),
                    template_kwargs: Mapping[str, Any] = {}
                    ) -> tuple[list[int], Callable[[], ReplyParser | MarkupParser | None]]:
        """A conversation's prompt, and a maker of its reply's parser (one parser per reply: n > 1 takes several)."""
        if self.family in TOOL_FAMILIES:
            prompt = self.tokenizer.encode_chat(messages)
            names = [f["name"] for f in functions]
            return prompt, lambda: ReplyParser(self.family, names)
        prompt, _ = template_chat(self.tokenizer, messages, functions, template_kwargs)
        return prompt, lambda: markup_parser(self.tokenizer, prompt, functions)

    def parser(self, tool_names: Sequence[str] = ()) -> ReplyParser | None:
        """The reader of a chat reply's parts and tool calls (ChatGLM3 / GLM-4), one per reply."""
        return ReplyParser(self.family, tool_names) if self.family in TOOL_FAMILIES else None

    def submit(self, prompt: list[int], params: SamplingParams | Sequence[SamplingParams], grammar: str | None = None):
        """One engine request, or a list of them for a list of params (n > 1: one prefill), each with its own
        grammar state when `grammar` (already checked) constrains the reply."""
        group = [params] if isinstance(params, SamplingParams) else list(params)
        masks = [self.pipeline.token_mask(grammar) for _ in group] if grammar is not None else []
        try:
            requests = self.engine.submit_group(prompt, group, self.pipeline.stop_ids, self.tokenizer.vocab_size,
                                                masks)
            return requests[0] if isinstance(params, SamplingParams) else requests
        except QueueFullError as e:
            self.rejected += 1
            raise APIError(503, f"the server is busy ({e}); retry shortly", type="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def embed(self, texts: list[str]):
        """Vectors [len(texts), dims] as float32 and the tokens read, computed off the event loop."""
        try:
            return await anyio.to_thread.run_sync(self.embedder.encode, texts)
        except EmbeddingUnavailable as e:
            raise APIError(503, str(e), type="server_error", code="embedding_model_unavailable") from None

    def running(self) -> int:
        """Sequences in the running batch now (the engine's own counter keeps the last step's size)."""
        return sum(slot.request is not None for slot in self.engine.slots)


def sampling(temperature: float, top_p: float, *, max_new_tokens: int | None = None, max_length: int | None = None,
             seed: int | None = None, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0) -> SamplingParams:
    """Engine settings from a request's; a temperature or top_p of 0 means greedy decoding, as at OpenAI."""
    greedy = temperature < MIN_TEMPERATURE or top_p == 0
    return SamplingParams(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=not greedy,
                          temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed,
                          repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty)


class Generation:
    """One reply in the engine, as text for async code; usage, finish reason and tool calls once it ends."""

    def __init__(self, server: Server, prompt: list[int], params: SamplingParams, stop: Sequence[str] = (),
                 parser: ReplyParser | MarkupParser | None = None, request=None):
        self.server = server
        self.prompt_tokens = len(prompt)
        self.stop = [s for s in stop if s]
        self.parser = parser  # chat replies of ChatGLM3 / GLM-4: parts, metadata lines, tool calls
        self.request = request if request is not None else server.submit(prompt, params)
        self.read = 0  # tokens turned into text so far: the logprobs of a streamed delta are those up to here

    def _tokens(self):
        for token in self.request:
            self.read += 1
            yield token

    @property
    def completion_tokens(self) -> int:
        return len(self.request.generated)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.parser.calls if self.parser else []

    @property
    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        return "length" if self.request.finish_reason == "length" else "stop"

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas as they are generated; leaving early (a client gone) frees the engine slot at once."""
        texts = reply_text(self._tokens(), self.server.tokenizer, self.stop, self.parser)  # read in worker threads
        try:
            while (text := await anyio.to_thread.run_sync(next, texts, None, abandon_on_cancel=True,
                                                          limiter=self.server.limiter)) is not None:
                if text:
                    yield text
        except GrammarError as e:  # a grammar that reached a dead end while decoding: the request's fault
            raise APIError(400, str(e), param=e.param) from None
        finally:
            self.close()

    def close(self) -> None:
        """Free the engine slot if the reply is still being generated (client gone, stop string reached)."""
        if self.request.finish_reason is None and not self.request.cancelled.is_set():
            self.request.cancel()
            self.server.cancelled += 1

    async def answer_deltas(self) -> AsyncIterator[str]:
        """The reply's pieces without its reasoning, for the APIs that have no place for it."""
        async for delta in self.deltas():
            if not isinstance(delta, Reasoning):
                yield delta

    async def text(self) -> str:
        """The whole reply (its reasoning left out), for the endpoints that answer at once."""
        return "".join([delta async for delta in self.answer_deltas()])


class GLMSampling(BaseModel):
    """The fields the THUDM-style APIs share (ChatGLM-6B's api.py, GLM API, the ChatGLM2 SSE server)."""

    history: list[list[str]] = Field(default=[], description="[[question, answer], ...]")
    max_length: int | None = Field(default=None, ge=1, description="prompt + reply tokens; past the context: clamped")
    top_p: float = Field(default=0.7, ge=0, le=1)
    temperature: float = Field(default=0.95, ge=0, le=100)

    def params(self, server: Server) -> SamplingParams:
        max_length = None if self.max_length is None else min(self.max_length, server.context)
        return sampling(self.temperature, self.top_p, max_length=max_length)


def history_messages(history: Sequence[Sequence[str]], prompt: str) -> list[ChatMessage]:
    """THUDM's history [[question, answer], ...] and a new question as messages.

    A row may hold several pairs in a row ([q1, a1, q2, a2]), as GLM API's TypeScript client sends it.
    """
    messages = []
    for i, row in enumerate(history):
        if len(row) % 2:
            raise APIError(400, f"history[{i}] must hold [question, answer] pairs, not {len(row)} texts",
                           param="history")
        for question, answer in zip(row[0::2], row[1::2]):
            messages += [ChatMessage("user", question), ChatMessage("assistant", answer)]
    return messages + [ChatMessage("user", prompt)]


def get_server(request: Request) -> Server:
    """FastAPI dependency: the app's Server."""
    return request.app.state.server


class BearerAuth:
    """Every route but /health and the `public` ones needs ``Authorization: Bearer <key>`` (pure ASGI: streams
    pass untouched)."""

    def __init__(self, app, key: str, public: Callable[[dict], bool] = lambda scope: False):
        self.app, self.key, self.public = app, key.encode(), public

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not self.public(scope):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key):
                response = error_response(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ReplicaHeader:
    """Names the answering replica in every response (pure ASGI: streams pass untouched)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-chatglm-replica", replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


class EngineMetrics:
    """Prometheus collector reading the engine and server counters at scrape time; a replica labels its own."""

    def __init__(self, server: Server, replica: str | None):
        self.server = server
        self.labels = {"replica": replica} if replica else {}

    def _family(self, kind, name: str, documentation: str, value: float):
        family = kind(name, documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self):
        s, stats = self.server, self.server.engine.stats
        for name, documentation, value in (
                ("chatglm_requests", "Requests accepted by the batch engine", stats["requests"]),
                ("chatglm_generated_tokens", "Tokens generated", stats["tokens"]),
                ("chatglm_prefill_tokens", "Prompt tokens computed", stats["prefill_tokens"]),
                ("chatglm_reused_tokens", "Prompt tokens reused from a cached prefix", stats["reused_tokens"]),
                ("chatglm_cancelled_requests", "Replies cut short (client gone, stop string)", s.cancelled),
                ("chatglm_rejected_requests", "Requests refused because the queue was full", s.rejected)):
            yield self._family(CounterMetricFamily, name, documentation, value)
        yield self._family(GaugeMetricFamily, "chatglm_queue_depth", "Requests waiting for a batch slot",
                           s.engine.queue_depth)
        yield self._family(GaugeMetricFamily, "chatglm_batch_size", "Sequences in the running batch", s.running())
        pool = s.engine.cache
        for kind, name, documentation, value in (
                (GaugeMetricFamily, "chatglm_kv_blocks", "KV cache blocks in the pool", pool.blocks - 1),
                (GaugeMetricFamily, "chatglm_kv_blocks_used", "KV cache blocks held by running sequences",
                 pool.in_use()),
                (GaugeMetricFamily, "chatglm_kv_blocks_cached", "KV blocks kept for prefix sharing, held by nobody",
                 len(pool.idle)),
                (CounterMetricFamily, "chatglm_prefix_cache_hits", "Prompt blocks found in the KV cache (computed once)",
                 stats["prefix_hit_blocks"]),
                (CounterMetricFamily, "chatglm_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                 stats["prefix_lookups"]),
                (CounterMetricFamily, "chatglm_kv_evicted_blocks", "Cached KV blocks evicted, least recently used first",
                 pool.stats["evicted_blocks"]),
                (CounterMetricFamily, "chatglm_kv_pool_short", "Admissions deferred and replies ended for want of KV blocks",
                 stats["pool_short"])):
            yield self._family(kind, name, documentation, value)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(ChatFormatError)
    async def bad_conversation(request: Request, e: ChatFormatError) -> JSONResponse:
        return error_response(400, str(e), param="messages")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"type": "", "loc": (), "msg": "invalid request"}
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        where = [str(part) for part in first["loc"][1:]]  # after "body"; with union branches named in it
        message = f"{'.'.join(where)}: {first['msg']}" if where else first["msg"]
        return error_response(400, message, param=where[0] if where else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, "internal error: the request could not be completed", "server_error")


def create_app(pipeline, *, api_key: str | None = None, cors_origins: Sequence[str] = (), max_batch: int = 8,
               max_queue: int = 64, embedding_model: str | Path | None = None, kv: KVSettings | None = None,
               replica: str | None = None) -> FastAPI:
    """The FastAPI app serving `pipeline` over every protocol.

    api_key (or the CHATGLM_API_KEY variable) turns on Bearer auth for every route but /health and the web page's
    files; CORS stays off unless cors_origins are given. ``app.state.web_page`` is the hook for a browser page on
    ``GET /`` (web.py installs the chat page there). kv sizes the engine's KV pool (`KVSettings`). ``replica``
    (Ray Serve replicas) names this copy of the app in /health, in a header on every response and as a label on
    its metrics.
    """
    from . import chatglm_api, glm_api, openai, web

    server = Server(pipeline, max_batch, max_queue, embedding_model, kv)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.engine.close()

    app = FastAPI(title="chatglm", summary=f"Serving {server.model_id}", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    for module in (openai, chatglm_api, glm_api):
        app.include_router(module.router)
    web.install(app)

    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineMetrics(server, replica))
    where = {"replica": replica, "pid": os.getpid()} if replica else {}

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, str | int]:
        return {"status": "ok", "model": server.model_id, **where}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api_key = api_key if api_key is not None else os.environ.get("CHATGLM_API_KEY")
    if api_key:
        app.add_middleware(BearerAuth, key=api_key, public=web.is_public)
    if cors_origins:  # added after auth, so it runs first: preflight requests carry no key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    if replica:
        app.add_middleware(ReplicaHeader, replica=replica)
    return app
