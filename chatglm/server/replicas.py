"""`chatglm serve --replicas N`: the one-process app on N Ray Serve replicas.

Ray Serve's HTTP proxy hands each request to a small ingress deployment, which reads the body, pulls out the
conversation's text and passes the raw request on to a model replica. Each model replica runs the same app
as `chatglm serve` in one process (create_app: every protocol, the web page, auth, CORS, errors). The model
deployment's request router sends a request to the replica that served the longest prefix of its text, where
the prompt's cached prefix is likely still held, or else to the least loaded replica. Ray replaces a replica
that dies; a request that was on it ends with a clean 503 (or a final SSE error event once streaming), and one
that had not started yet is tried once more on another replica.

This module is imported only with --replicas: the one-process server never imports Ray.
"""

import asyncio
import json
import logging
import os
import random
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from ..loaders.huge_pages import mmap_option
from .app import EngineMetrics, KVSettings, error_response

log = logging.getLogger("chatglm")
APP_NAME = "chatglm"
REPLICA_HEADER = "x-chatglm-replica"
HELD_TEXTS = 256  # conversation texts remembered per replica for affinity


@dataclass
class Routed:
    """One HTTP request as the ingress passes it to a model replica; ``prompt`` is what the router matches."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str = ""
    client: tuple[str, int] | None = None
    scheme: str = "http"


def conversation_text(body: bytes) -> str:
    """The text a request's prompt is built from, in order, so that a later turn's text extends an earlier one's.

    Covers every protocol's shape: OpenAI's messages or prompt, THUDM's prompt/query with history.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    for message in data.get("messages") or []:
        if isinstance(message, dict):
            parts.append(f"{message.get('role', '')}\x1f{_content_text(message.get('content'))}\x1e")
    for row in data.get("history") or []:
        if isinstance(row, (list, tuple)):
            parts += [f"{text}\x1e" for text in row if isinstance(text, str)]
    for key in ("prompt", "query"):
        value = data.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            parts.append(value[0])
    return "".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class PrefixAffinityRouter(RequestRouter):
    """Prefers the replica that served the longest earlier prompt this request extends (a conversation's next turn:
    that replica holds its prefix in its cache); otherwise the less loaded of two.

    Only a whole earlier prompt counts: requests that merely share a chat template's opening or a common system
    prompt are spread by load, or every request would follow the first one to a single replica.

    Ranks are [[best match], [all others]]: Ray Serve takes the first rank whose replica has room (its queue is
    below max_ongoing_requests) and, within a rank, the replica with the shortest queue.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._held: dict[ReplicaID, OrderedDict[str, None]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        text = _request_text(pending_request)
        best, best_length = None, 0
        for replica in candidate_replicas if text else ():
            for held in self._held.get(replica.replica_id, ()):
                if len(held) > best_length and text.startswith(held):
                    best, best_length = replica, len(held)
        if best is None:  # a new conversation: the less loaded of two at random (power of two choices)
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas))), candidate_replicas]
        return [[best], [r for r in candidate_replicas if r is not best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        text = _request_text(pending_request)
        if not text:
            return
        held = self._held.setdefault(replica_id, OrderedDict())
        held.pop(text, None)
        held[text] = None
        while len(held) > HELD_TEXTS:
            held.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._held.pop(replica_id, None)


def _request_text(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    # by attribute: Ray pickles the ingress class by value, so its Routed is a copy of this module's class
    return next((a.prompt for a in pending_request.args if isinstance(getattr(a, "prompt", None), str)), "")


class ModelReplica:
    """One replica: the model and the whole one-process app, driven as ASGI with the requests the ingress sends."""

    def __init__(self, model: str, options: dict[str, Any], app_options: dict[str, Any]):
        from ..pipeline import Pipeline
        from .app import create_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(Pipeline(model, **options), replica=self.replica_id, **app_options)
        self.stopped = threading.Event()
        threading.Thread(target=_mirror_metrics, daemon=True, name="chatglm-metrics",
                         args=(EngineMetrics(self.app.state.server, self.replica_id), self.stopped)).start()

    async def __call__(self, request: Routed) -> AsyncIterator[dict[str, Any] | bytes]:
        """The response as it is written: first {"status", "headers"}, then body chunks."""
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": request.scheme, "path": request.path, "raw_path": request.path.encode(),
                 "query_string": request.query_string, "root_path": "", "headers": request.headers,
                 "client": request.client, "server": None, "state": {}}
        task = asyncio.create_task(self.app(scope, receive, sent.put))
        try:
            while True:
                message = await _next_message(sent, task)
                if message is None:
                    return
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": list(message.get("headers", []))}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:  # the client left (Ray cancelled us) or the response ended: let the app free its engine slot
            gone.set()
            await asyncio.wait({task}, timeout=30)

    def __del__(self) -> None:  # Ray Serve drains the requests in flight first, then drops the replica
        if hasattr(self, "app"):
            self.stopped.set()
            self.app.state.server.engine.close()


def _mirror_metrics(collector: EngineMetrics, stop: threading.Event, every_s: float = 2.0) -> None:
    """Copy a replica's counters into Ray's metrics (exported as ray_chatglm_*{replica=...} by every node's Ray
    metrics port, beside Ray Serve's own ray_serve_*), so that one scrape sees every replica."""
    from ray.util.metrics import Gauge

    gauges: dict[str, Gauge] = {}
    while not stop.wait(every_s):
        for family in collector.collect():
            for sample in family.samples:
                if sample.name not in gauges:
                    gauges[sample.name] = Gauge(sample.name, family.documentation, tag_keys=tuple(sample.labels))
                gauges[sample.name].set(sample.value, tags=sample.labels)


async def _next_message(sent: asyncio.Queue, task: asyncio.Task) -> dict[str, Any] | None:
    """The app's next ASGI message, or None once the app returned without more."""
    if sent.empty() and task.done():
        task.result()  # an exception in the app surfaces here
        return None
    getter = asyncio.ensure_future(sent.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return await _next_message(sent, task)


async def _relay_body(stream, sse: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except RayError:  # the replica died mid-answer: streams end with an error event, other bodies just end
        if sse:
            error = {"error": {"message": "the replica serving this reply stopped; retry the request",
                               "type": "server_error", "param": None, "code": "replica_unavailable"}}
            yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()


def _replica_lost() -> Response:
    return error_response(503, "the replica serving this request stopped; retry the request", "server_error",
                          code="replica_unavailable", headers={"Retry-After": "1"})


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(ingress_app)
class Ingress:
    """Reads each request once, names its conversation text for the router, and relays the replica's answer."""

    def __init__(self, model):
        self.model = model.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def relay(self, path: str, request: Request) -> Response:
        body = await request.body()
        routed = Routed(request.method, request.url.path, request.url.query.encode(), request.headers.raw, body,
                        conversation_text(body) if request.method == "POST" else "",
                        (request.client.host, request.client.port) if request.client else None, request.url.scheme)
        for attempt in (1, 2):  # nothing has reached the client yet: a replica that died is replaced by another
            try:
                stream = self.model.remote(routed)
                start = await stream.__anext__()
                break
            except BackPressureError:
                return error_response(503, "every replica is busy; retry shortly", "server_error",
                                      code="queue_full", headers={"Retry-After": "1"})
            except (RayError, StopAsyncIteration) as e:
                log.warning("replica failed before answering (attempt %d): %s", attempt, type(e).__name__)
        else:
            return _replica_lost()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")}
        sse = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_relay_body(stream, sse), status_code=start["status"], headers=headers)


@dataclass
class ReplicaPlan:
    """How many replicas, how each one loads the model, and where Ray runs."""

    model: str
    options: dict[str, Any]
    app_options: dict[str, Any]
    replicas: int | tuple[int, int]  # a count, or (min, max) for autoscaling
    threads: int
    max_ongoing: int
    ray_address: str | None = None
    routing: str = "prefix"  # or "balanced": Ray Serve's own router (power of two choices)

    @classmethod
    def from_options(cls, o: Mapping[str, Any]) -> "ReplicaPlan":
        """From `chatglm serve`'s options by name (the command line's, or a Ray Serve config's args)."""
        replicas = parse_replicas(str(o.get("replicas") or 1))
        fewest = replicas if isinstance(replicas, int) else replicas[0]
        threads = int(o.get("threads") or max(1, (os.cpu_count() or 1) // fewest))
        max_batch, max_queue = int(o.get("max_batch") or 8), int(o.get("max_queue") or 64)
        # Ray sends a replica at most max_batch + max_queue requests; the replica's own queue keeps max_batch
        # more room, for slots still being freed when Ray already counts their requests done: Ray's backpressure
        # (max_queued_requests) is then the one source of 503s
        app_options = dict(api_key=o.get("api_key") or os.environ.get("CHATGLM_API_KEY"), max_batch=max_batch,
                           max_queue=max_queue + max_batch, cors_origins=o.get("cors_origins") or [],
                           embedding_model=o.get("embedding_model"),
                           kv=KVSettings.from_flags(o.get("kv_memory"), o.get("ctx"), o.get("kv_type")))
        return cls(model=str(o.get("model") or "default"), app_options=app_options, replicas=replicas,
                   options=dict(dtype=o.get("dtype") or "auto", device=o.get("device") or "cpu", threads=threads,
                                draft=o.get("draft"), lookup=int(o.get("lookup") or 0),
                                # mapped unless asked: replicas on one machine then share the file's pages
                                use_mmap=mmap_option(True if o.get("use_mmap") is None else o["use_mmap"])),
                   threads=threads, max_ongoing=max_batch + max_queue, ray_address=o.get("ray_address"),
                   routing=o.get("routing") or "prefix")


def parse_replicas(text: str) -> int | tuple[int, int]:
    """'N' or 'auto:MIN-MAX'."""
    if text.startswith("auto:"):
        low, _, high = text[5:].partition("-")
        if low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high):
            return int(low), int(high)
        raise ValueError(f"--replicas {text}: expected auto:MIN-MAX with 1 <= MIN <= MAX, e.g. auto:1-4")
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--replicas {text}: expected a count of at least 1, or auto:MIN-MAX")


def application(plan: ReplicaPlan) -> Application:
    """The ingress and the model replicas, bound and ready for serve.run."""
    options: dict[str, Any] = ({"num_replicas": plan.replicas} if isinstance(plan.replicas, int) else
                               {"autoscaling_config": {"min_replicas": plan.replicas[0],
                                                       "max_replicas": plan.replicas[1],
                                                       "target_ongoing_requests": max(1, plan.max_ongoing // 2)}})
    if plan.routing == "prefix":
        options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    # each replica takes what its own batch and queue hold; past as many again for every replica waiting in Ray,
    # 503 + Retry-After. Requests wait there briefly even when replicas have room (while the router picks one), so
    # a burst the replicas can take must fit: one replica's worth would refuse part of it.
    most = plan.replicas if isinstance(plan.replicas, int) else plan.replicas[1]
    model = serve.deployment(ModelReplica, name="model", ray_actor_options={"num_cpus": plan.threads},
                             max_ongoing_requests=plan.max_ongoing, max_queued_requests=plan.max_ongoing * most,
                             health_check_period_s=2,
                             graceful_shutdown_timeout_s=300, **options)
    ingress = serve.deployment(Ingress, name="ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=10_000, graceful_shutdown_timeout_s=300)
    return ingress.bind(model.bind(plan.model, plan.options, plan.app_options))


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder (`serve run`, KubeRay's serveConfigV2 with import_path
    chatglm.server.replicas:build_app): args are `chatglm serve`'s options by name."""
    return application(ReplicaPlan.from_options(args))


def deploy(plan: ReplicaPlan, host: str, port: int) -> None:
    """Start (or join) Ray, run the ingress and the model replicas, and serve until SIGINT or SIGTERM."""
    fewest = plan.replicas if isinstance(plan.replicas, int) else plan.replicas[0]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
    ray.init(address=plan.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             **({} if plan.ray_address else {"num_cpus": max(os.cpu_count() or 1, fewest * plan.threads)}))
    cpus = ray.cluster_resources().get("CPU", 0)
    if fewest * plan.threads > cpus:
        raise ValueError(f"{fewest} replicas x {plan.threads} threads need {fewest * plan.threads} CPUs; the Ray "
                         f"cluster has {cpus:g}: lower --replicas or --threads")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(plan), name=APP_NAME, route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    here = next((n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ray.util.get_node_ip_address()),
                {})
    print(f"chatglm: serving {plan.model} on http://{host}:{port} from {plan.replicas} Ray Serve replicas "
          f"({plan.threads} threads each); Ctrl-C stops", flush=True)
    print(f"chatglm: every replica's counters with Ray Serve's own: http://{here.get('NodeManagerAddress')}:"
          f"{here.get('MetricsExportPort')}/metrics (ray_chatglm_*, ray_serve_*)", flush=True)
    stop.wait()
    serve.delete(APP_NAME)  # waits for the replies in flight (graceful_shutdown_timeout_s), then stops them
    serve.shutdown()
