"""The online ranking API: a FastAPI app factory over an exported serving directory.

    recsys serve artifacts/serve --host 127.0.0.1 --port 8000
    curl -s localhost:8000/v1/recommend -d '{"user_id": "1m_1", "k": 5}' -H 'content-type: application/json'

Endpoints: ``POST /v1/recommend`` (a user id or a raw history of item ids: retrieval, then the fusion
reranker when the deployment has one, else the window reranker; an optional ``time`` for the features that
read it), ``POST /v1/rerank`` (history + candidate ids, ordered by the same reranker; the fusion reranker
reads them in SASRec's order), ``POST /v1/generate`` (the generative recommender writes k items by
trie-constrained beam search; 501 when the deployment has none), ``GET /healthz`` (alive), ``GET /readyz`` (200 once the models are
loaded), ``GET /metrics`` (Prometheus text), ``GET /v1/models``; OpenAPI docs at ``/docs``.

Behaviour a client can rely on:
- unknown item ids in a *history* or *exclude* list are dropped and listed in ``unknown_items``;
  unknown *candidate* ids in ``/v1/rerank`` are a 422 naming them; an unknown user is a 404;
- a history that is empty (after dropping unknown ids) is a 422;
- concurrent ``/v1/recommend`` requests are micro-batched into one ONNX call (``max_batch``,
  ``max_wait_ms``) unless ``micro_batching`` is off;
- if the reranker fails or exceeds ``rerank_timeout_ms``, the retrieval order is returned with
  ``reranked: false`` and ``fallback`` saying why; a late reranker is stopped (ONNX Runtime's
  ``RunOptions.terminate``, checked between graph nodes) rather than left computing an answer nobody
  awaits, which under load would make every later request late too;
- what a client can cost the server before it is authenticated is bounded (:class:`Guard`): at most
  ``max_in_flight`` requests are inside the app at once (beyond that 503 with ``Retry-After``, nothing
  read); with ``api_key`` set, ``/v1/*`` without the right ``x-api-key`` get 401 before a byte of the body
  is read; a body is read up to ``max_body_bytes`` whatever its transfer encoding (chunked included) and
  within ``body_timeout_s``, else 413 / 408 and the connection is closed. Bodies in memory are therefore
  at most ``max_in_flight * max_body_bytes`` (64 x 64 KB = 4 MB by default);
- requests are strict: unknown fields, non-finite numbers (``NaN``, ``Infinity``, ``1e400``) and repeated
  candidates are a 422; every error, whoever raises it, has one shape,
  ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``, documented in the OpenAPI spec per status;
- ``/metrics`` is ``prometheus_client``'s exposition: route templates (never raw paths) as labels,
  latency in seconds; with ``PROMETHEUS_MULTIPROC_DIR`` set, it sums every uvicorn worker;
- ``/readyz`` turns 200 after one warm-up query has gone through retrieval and the reranker; its timings
  are in ``/v1/models`` (``warmup``), and a reranker slower than its deadline is logged at start-up
  (``reranker_will_fall_back``) rather than discovered in the answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hmac
import json
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.runtime import Recommender, RecommendQuery, run_options
from serving.schemas import (
    GenerateRequest,
    RecommendRequest,
    RequestError,
    RerankRequest,
    known_items,
    resolve_history,
)

log = logging.getLogger("recsys.serving")


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    """Micro-batching: most queries per ONNX call."""
    max_wait_ms: float = 2.0
    """Micro-batching: longest wait for more queries after the first of a batch."""
    micro_batching: bool = True
    """Group concurrent ``/v1/recommend`` queries into one model-thread hand-over and one ONNX call per
    graph: a batch takes every query waiting when the model thread frees up, then waits up to
    ``max_wait_ms`` for more. On a 2-core CPU, for known users (whose SASRec vectors are looked up, so
    nothing is padded), it cost up to 0.5 ms less CPU per request than one query per call and served 1.2-1.5x
    the requests, with a lower p99 at 32 and 64 connections; explicit histories (SASRec run in groups of
    similar length) cost 0.25 ms more at 8 connections and 0.4-0.65 ms less at 32 and 64 (BENCHMARKS.md, "The
    request path")."""
    rerank_timeout_ms: float = 1000.0
    """Counted from the start of a request's model work (retrieval, well under a millisecond, then reranking):
    past it the reranker's ONNX Runtime run is stopped at its next graph node and the retrieval order comes
    back with ``reranked: false`` and ``fallback: "timeout"``. With ``model_threads`` 0 it is checked before
    the reranker starts, and a run already going finishes."""
    max_body_bytes: int = 64_000
    """Largest request body read, counted on the bytes received (any transfer encoding); beyond it 413."""
    max_in_flight: int = 64
    """Most requests inside the app at once; more get 503 with ``Retry-After`` before anything is read."""
    body_timeout_s: float = 10.0
    """Longest time a client may take to send its body (a slow sender holds an in-flight slot); then 408."""
    api_key: str | None = None
    """Required as ``x-api-key`` on ``/v1/*``; checked before the body is read."""
    threads: int | None = None
    """ONNX Runtime intra-op threads per session. None = auto: 1 on CPU, where the model thread and the
    event loop already share the cores and an ONNX Runtime pool spinning beside them costs CPU for nothing;
    ORT's default with CUDA."""
    model_threads: int = 1
    """Threads that run the model work of requests (retrieval, reranking, generation), off the event loop so
    that it keeps reading requests and the reranker's deadline can stop a late run. More threads contend with
    the event loop for Python's interpreter lock (on a 2-core CPU two cost as much CPU per request or more). For
    more cores run more ``workers`` (processes), each with its own model thread: two on 2 cores served 1.3-1.4x
    the requests at the same CPU per request (BENCHMARKS.md, "The request path"). 0 = the model work runs on
    the event loop itself: no hand-over between threads per request (the least CPU per request for models that
    answer in a millisecond or two), but the loop reads nothing else meanwhile and a reranker run, once
    started, is not stopped at the deadline."""
    int8: bool = False
    """Serve the int8 graphs ``recsys export --quantize`` wrote beside the fp32 ones (faster on CPU, a measured quality cost)."""
    access_log: bool = False
    """One JSON line per request (method, route template, status, ms) on stderr through the
    ``recsys.serving`` logger at INFO; off by default (its cost is then one level check per request)."""

    def __post_init__(self):
        least_of = {"max_batch": 1, "max_body_bytes": 1, "max_in_flight": 1, "model_threads": 0}
        if self.threads is not None:
            least_of["threads"] = 1
        for name, least in least_of.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"serve settings: {name} must be a whole number >= {least}, got {value!r}")
        for name, zero_ok in (("max_wait_ms", True), ("rerank_timeout_ms", False), ("body_timeout_s", False)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and (0 <= value if zero_ok else 0 < value) and value < float("inf")):
                kind = "a number >= 0" if zero_ok else "a positive number"
                raise ValueError(f"serve settings: {name} must be {kind} of {name.rsplit('_', 1)[1]}, got {value!r}")

    def resolved(self, cuda: bool) -> ServeSettings:
        """The settings with every ``None`` (auto) decided for this machine."""
        threads = self.threads if self.threads is not None else (None if cuda else 1)
        return dataclasses.replace(self, threads=threads)


# ---------------------------------------------------------------- responses
class ScoredItemOut(BaseModel):
    item_id: str
    score: float
    title: str | None = Field(None, description="the catalogue's title (the id where the catalogue has none)")


class RecommendResponse(BaseModel):
    items: list[ScoredItemOut]
    reranked: bool
    fallback: str | None = None
    unknown_items: list[str] = []
    model_version: str
    latency_ms: float


class RerankResponse(BaseModel):
    items: list[ScoredItemOut]
    unknown_items: list[str] = []
    model_version: str
    latency_ms: float


class GenerateResponse(BaseModel):
    items: list[ScoredItemOut] = Field(description="scores are the items' log-probabilities under the model")
    unknown_items: list[str] = []
    model_version: str
    latency_ms: float


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where the problem is: header, body field path, path")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error the API returns, whatever raised it (the validation shape FastAPI uses for 422)."""

    detail: list[ErrorItem]


def error_body(msg: str, loc: tuple = ("body",), kind: str = "value_error") -> dict:
    return {"detail": [{"loc": list(loc), "msg": msg, "type": kind}]}


def api_error(status: int, msg: str, loc: tuple = ("body",), kind: str = "value_error") -> HTTPException:
    """An HTTPException whose body is :class:`ErrorResponse`."""
    return HTTPException(status, error_body(msg, loc, kind)["detail"])


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed request framing (content-length)", 401: "missing or wrong x-api-key",
    404: "unknown user_id", 408: "body not received within body_timeout_s", 413: "body above max_body_bytes",
    422: "invalid request", 501: "the deployment lacks this model",
    503: "models loading, or max_in_flight requests already in progress (Retry-After)"}.items()}


# ---------------------------------------------------------------- metrics
class Metrics:
    """The API's Prometheus metrics (``prometheus_client``), in a registry of this app's own so that several
    apps in one process stay apart. Paths become labels only as route templates: a request to any other
    path counts as ``unmatched``, so no client can add series or text to ``/metrics``.

    With ``PROMETHEUS_MULTIPROC_DIR`` set before start-up (several uvicorn workers), values live in that
    directory's files and :meth:`render` sums every worker's (``prometheus_client.multiprocess``)."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, routes=()):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.routes = frozenset(routes)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("recsys_requests", "HTTP requests by route template and status",
                                ["path", "status"], registry=r)
        self.errors = Counter("recsys_errors", "responses with status >= 500", registry=r)
        self.refused = Counter("recsys_refused", "requests answered before the app: overload (503), "
                               "unauthorised (401), too_large (413), bad_length (400), body_timeout (408)",
                               ["reason"], registry=r)
        self.latency = Histogram("recsys_request_duration_seconds", "time from the request's first byte "
                                 "handled to its response, by route template", ["path"],
                                 buckets=self.LATENCY_BUCKETS, registry=r)
        self.batches = Histogram("recsys_batch_size", "queries per ONNX call of /v1/recommend",
                                 buckets=self.BATCH_BUCKETS, registry=r)
        self.fallbacks = Counter("recsys_rerank_fallbacks", "answers in retrieval order because the reranker "
                                 "was late (timeout) or failed (error)", ["reason"], registry=r)
        self.in_flight = Gauge("recsys_in_flight_requests", "requests inside the app now", registry=r,
                               multiprocess_mode="livesum")

    def route(self, path: str) -> str:
        return path if path in self.routes else "unmatched"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route, str(status)).inc()
        if status >= 500:
            self.errors.inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batches.observe(size)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


# ---------------------------------------------------------------- micro-batching
async def in_model_thread(executor: Executor | None, fn, *args):
    """``fn(*args)`` in one of the app's model threads (``executor``: ``ServeSettings.model_threads`` of them),
    or right here on the event loop when there are none (``model_threads`` 0)."""
    if executor is None:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


class Batcher:
    """Collects concurrent queries into batches of at most ``max_batch``, waiting at most ``max_wait_ms``
    after the first, and runs each batch in a worker thread (ONNX Runtime releases the GIL)."""

    LOG_EVERY_S = 60.0
    """Fallbacks are logged once per this many seconds with the count since the last line (every one is in
    ``recsys_rerank_fallbacks_total``): a reranker late on every request must not write a line per request."""

    def __init__(self, recommender: Recommender, settings: ServeSettings, metrics: Metrics, executor: Executor):
        self.rec, self.settings, self.metrics, self.executor = recommender, settings, metrics, executor
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.unlogged, self.logged_at = 0, -float("inf")

    def _log_fallback(self, reason: str, batch: int) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now - self.logged_at >= self.LOG_EVERY_S:
            log.warning(json.dumps({"event": "rerank_fallback", "reason": reason, "batch": batch,
                                    "fallbacks_since_last_line": self.unlogged}))
            self.unlogged, self.logged_at = 0, now

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def submit(self, query: RecommendQuery) -> dict:
        if not self.settings.micro_batching:
            return (await self._run([query]))[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((query, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.settings.max_batch and not self.queue.empty():   # what queued meanwhile
                batch.append(self.queue.get_nowait())
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            try:
                results = await self._run([q for q, _ in batch])
                for (_, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
            except Exception as e:                                   # noqa: BLE001 - every waiter must hear
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)

    async def _run(self, queries: list[RecommendQuery]) -> list[dict]:
        """:meth:`_serve` in a model thread, under the reranker's deadline: ``rerank_timeout_ms`` after the
        work began, the reranker's run options are terminated, so its ONNX Runtime run stops at its next
        graph node and its queries keep the retrieval order (one thread hop per batch, not one per stage)."""
        self.metrics.observe_batch(len(queries))
        options = run_options()
        seconds = self.settings.rerank_timeout_ms / 1000
        timer = asyncio.get_running_loop().call_later(seconds, setattr, options, "terminate", True)
        try:
            results, failure = await in_model_thread(self.executor, self._serve, queries, options,
                                                     time.perf_counter() + seconds)
        finally:
            timer.cancel()
        if failure:
            self.metrics.fallbacks.labels(failure.split(":")[0]).inc()
            self._log_fallback(failure, sum(r["fallback"] == failure for r in results))
        return results

    def _serve(self, queries: list[RecommendQuery], options, deadline: float) -> tuple[list[dict], str | None]:
        """Retrieval, then reranking with ``options`` unless the ``deadline`` (``time.perf_counter``) has
        passed; a failed or terminated reranker leaves the retrieval order. Returns the results and the
        reranker's failure (``timeout`` or ``error: <type>``), if any."""
        retrieved = self.rec.retrieve(queries)
        results = [{"items": items[:q.k], "scores": scores[:q.k], "reranked": False, "fallback": None}
                   for q, (items, scores) in zip(queries, retrieved)]
        todo = [i for i, q in enumerate(queries) if q.rerank and retrieved[i][0]]
        if not todo:
            return results, None
        if not self.rec.reranks:
            for i in todo:
                results[i]["fallback"] = "no reranker loaded"
            return results, None
        try:
            if options.terminate or time.perf_counter() > deadline:    # past it before the reranker started
                options.terminate = True
                raise TimeoutError
            reranked = self.rec.rerank_retrieved([queries[i] for i in todo], [retrieved[i] for i in todo], options)
        except Exception as e:                                       # noqa: BLE001 - degrade, never fail
            reason = "timeout" if options.terminate else f"error: {type(e).__name__}"
            for i in todo:
                results[i]["fallback"] = reason
            return results, reason
        for i, (items, scores) in zip(todo, reranked):
            results[i] = {"items": items[:queries[i].k], "scores": scores[:queries[i].k], "reranked": True,
                          "fallback": None}
        return results, None


# ---------------------------------------------------------------- app
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and the scrape: never counted against ``max_in_flight`` (an overloaded server must still say so)."""


class Guard:
    """What every HTTP request meets before the app, cheapest check first, so that a client without a key
    costs the server a bounded amount of memory and CPU:

    1. ``max_in_flight``: beyond that many requests inside the app (probes excepted) the answer is 503 with
       ``Retry-After: 1``, sent before anything of the body is read;
    2. with an API key, ``/v1/*`` requests without the right ``x-api-key`` get 401, also before the body;
    3. the body is read here, counting the bytes received, whatever the transfer encoding
       (``content-length`` or chunked): past ``max_body_bytes`` 413, slower than ``body_timeout_s`` 408,
       a malformed ``content-length`` 400; each closes the connection, so the rest is never read. The app
       receives the body already read.

    Then the response status and latency go to :class:`Metrics` and one JSON log line is written. A plain
    ASGI middleware, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the endpoint in a
    separate task and streams its response through a memory channel, a cost paid on every request."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0

    async def _refuse(self, scope, send, status: int, reason: str, msg: str, loc: tuple, headers: dict | None = None):
        self.metrics.refused.labels(reason).inc()
        await JSONResponse(error_body(msg, loc, reason), status_code=status,
                           headers={"connection": "close", **(headers or {})})(scope, None, send)

    async def _read_body(self, receive) -> bytes | tuple[int, str, str] | None:
        """The whole body, or (status, reason, message) when it is too large or too slow, or None when the
        client went away."""
        limit, chunks, size = self.settings.max_body_bytes, [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):     # no task per message, unlike wait_for
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    size += len(message.get("body", b""))
                    if size > limit:
                        return 413, "too_large", f"request body exceeds {limit} bytes"
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return 408, "body_timeout", f"request body not received within {self.settings.body_timeout_s} s"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t, status, path = time.perf_counter(), 500, scope["path"]

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = path not in OPEN_PATHS
        try:
            if counted and self.in_flight >= self.settings.max_in_flight:
                await self._refuse(scope, send_status, 503, "overload", f"more than {self.settings.max_in_flight} requests "
                                   "in progress; retry later", ("server",), {"retry-after": "1"})
                return
            headers = dict(scope["headers"])
            key = self.settings.api_key
            if key and path.startswith("/v1/") and not hmac.compare_digest(
                    headers.get(b"x-api-key", b""), key.encode()):
                await self._refuse(scope, send_status, 401, "unauthorised", "missing or wrong x-api-key",
                                   ("header", "x-api-key"))
                return
            length = headers.get(b"content-length")
            if length is not None and not length.isdigit():
                await self._refuse(scope, send_status, 400, "bad_length", f"content-length "
                                   f"{length.decode(errors='replace')[:40]!r} is not a byte count",
                                   ("header", "content-length"))
                return
            if length is not None and int(length) > self.settings.max_body_bytes:
                await self._refuse(scope, send_status, 413, "too_large", f"request body of {int(length)} bytes exceeds "
                                   f"{self.settings.max_body_bytes}", ("header", "content-length"))
                return
            if counted:
                self.in_flight += 1
                self.metrics.in_flight.inc()
            try:
                body = await self._read_body(receive)
                if body is None:
                    return
                if isinstance(body, tuple):
                    await self._refuse(scope, send_status, body[0], body[1], body[2], ("body",))
                    return
                await self.app(scope, _replay(body, receive), send_status)
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
        finally:
            seconds = time.perf_counter() - t
            self.metrics.observe_request(path, status, seconds)
            if log.isEnabledFor(logging.INFO):       # the access log: no JSON built per request when it is off
                log.info(json.dumps({"method": scope["method"], "path": self.metrics.route(path),
                                     "status": status, "ms": round(1000 * seconds, 2)}))


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands the app the body read by :class:`Guard`, then the client's later
    messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def warm_up(rec: Recommender) -> dict:
    """One query through retrieval and the reranker before the server reports ready: an ONNX Runtime
    session's first run allocates its buffers (no user pays for that), and the timings say whether the
    reranker fits its deadline. Returns ``retrieve_ms`` and ``rerank_ms`` (or ``rerank_error``); a
    retrieval failure raises (nothing can be served), a reranker failure is recorded (answers will fall
    back to retrieval order, as they would per request)."""
    histories = rec.users.histories
    user = next(iter(histories), None)
    query = RecommendQuery(list(histories[user]) if user is not None else [1], k=10, user_id=user)
    t = time.perf_counter()
    retrieved = rec.retrieve([query])
    out = {"retrieve_ms": round(1000 * (time.perf_counter() - t), 2)}
    if rec.reranks and retrieved[0][0]:
        t = time.perf_counter()
        try:
            rec.rerank_retrieved([query], retrieved, run_options())
            out["rerank_ms"] = round(1000 * (time.perf_counter() - t), 2)
        except Exception as e:                                       # noqa: BLE001 - the API degrades
            out["rerank_error"] = f"{type(e).__name__}: {e}"
    return out


async def load_models(directory: Path, settings: ServeSettings, state: dict, metrics: Metrics,
                      freeze: bool = False) -> None:
    """Load the deployment into ``state`` (``rec``, ``warmup``, ``batcher``, then ``ready``), or
    record why it failed (``error``, for /readyz; the details go to the log).

    ``freeze``: then move every object alive to Python's permanent GC generation (``gc.freeze``), for a
    process that serves this app alone. The loaded deployment lives as long as the process, and the known
    users' histories are one Python list each: a full collection would traverse them all while holding the
    interpreter lock, a stall every request in flight waits out."""
    t = time.perf_counter()
    try:
        rec = await asyncio.to_thread(Recommender, directory, threads=settings.threads, int8=settings.int8)
        state["warmup"] = await asyncio.to_thread(warm_up, rec)
    except Exception as e:                                       # noqa: BLE001 - reported by /readyz
        state["error"] = type(e).__name__             # the message (paths, ...) goes to the log only
        log.error(json.dumps({"event": "load_failed", "directory": str(directory), "error": f"{type(e).__name__}: {e}"}))
        return
    warm = state["warmup"]
    if "rerank_error" in warm or warm.get("rerank_ms", 0.0) > settings.rerank_timeout_ms:
        log.warning(json.dumps({"event": "reranker_will_fall_back", **warm,
                                "rerank_timeout_ms": settings.rerank_timeout_ms,
                                "hint": "answers will come back in retrieval order; raise rerank_timeout_ms "
                                        "(recsys serve --rerank-timeout-ms) or serve a faster reranker"}))
    state["rec"], state["batcher"] = rec, Batcher(rec, settings, metrics, state["executor"])
    state["batcher"].start()
    if freeze:
        gc.collect()
        gc.freeze()
    state["ready"] = True
    log.info(json.dumps({"event": "loaded", "directory": str(directory), "version": rec.version,
                         "seconds": round(time.perf_counter() - t, 3), "warmup": warm}))


def add_error_handlers(app: FastAPI) -> None:
    """Every error, whoever raises it, in one shape: ``{"detail": [{"loc", "msg", "type"}]}``."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        # Only loc, msg and type: the offending input may be NaN or Infinity, which JSON cannot carry.
        return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                        for e in exc.errors()]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, list) else error_body(str(exc.detail), ("path",),
                                                                             "http_error")["detail"]
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def ready(state: dict) -> Recommender:
    """The loaded recommender, or 503 while loading."""
    if not state["ready"]:
        raise api_error(503, "models are still loading", ("server",), "loading")
    return state["rec"]


def items_out(rec: Recommender, idx: list[int], scores: list[float]) -> list[ScoredItemOut]:
    """Response items: catalogue ids, scores and titles."""
    return [ScoredItemOut(item_id=rec.item_ids[i], score=s, title=rec.titles.get(i)) for i, s in zip(idx, scores)]


def user_history(rec: Recommender, body) -> tuple[list[int], list[str]]:
    """The request's history in item idx (a ``user_id``'s stored one) and its unknown item ids; 4xx when
    unusable."""
    try:
        return resolve_history(body.user_id, body.history, rec.users.histories, rec.item_idx)
    except RequestError as e:
        raise api_error(e.status, str(e), e.loc, e.kind) from None


def add_probe_routes(app: FastAPI, state: dict, metrics: Metrics) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``: open to all, never counted against ``max_in_flight``."""

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "failed", "error": state["error"] + " (details in the server log)"}
                                if "error" in state else {"status": "loading"}, status_code=503)
        return {"status": "ready", "model_version": state["rec"].version}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


API_KEY_SCHEME = {"api_key": {"type": "apiKey", "in": "header", "name": "x-api-key",
                              "description": "required on /v1/* when the server has an API key; checked before "
                                             "the body is read"}}
KEYED = {"security": [{"api_key": []}]}
"""What a ``/v1`` route adds to its OpenAPI operation: the API key scheme (:data:`API_KEY_SCHEME`)."""


def declare_api_key(app: FastAPI) -> None:
    """Put :data:`API_KEY_SCHEME` into the app's OpenAPI components, where :data:`KEYED` routes refer to it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("securitySchemes", {}).update(API_KEY_SCHEME)
        return app.openapi_schema

    app.openapi = openapi


def add_v1_routes(app: FastAPI, settings: ServeSettings, state: dict) -> None:
    """The ranking endpoints under ``/v1``, behind the API key when the server has one: :class:`Guard` checks
    it before the body is read; each route declares it (:data:`KEYED`) for the OpenAPI spec. A per-route
    dependency would check it a second time, at a measured cost per request (BENCHMARKS.md, "The request path")."""
    auth_errors = {s: ERRORS[s] for s in (401, 408, 413, 503)}

    @app.get("/v1/models", openapi_extra=KEYED, responses=auth_errors)
    async def models():
        rec = ready(state)
        return {"model_version": rec.version, "dataset": rec.manifest.dataset, "models": rec.manifest.to_dict()["models"],
                "reranker": rec.reranks, "generative": rec.generative is not None,
                "items": rec.n_items, "warmup": state["warmup"], "rerank_timeout_ms": settings.rerank_timeout_ms}

    user_errors = {s: ERRORS[s] for s in (400, 401, 404, 408, 413, 422, 503)}

    @app.post("/v1/recommend", response_model=RecommendResponse, openapi_extra=KEYED,
              responses=user_errors)
    async def recommend(body: RecommendRequest):
        t = time.perf_counter()
        rec = ready(state)
        history, unknown = user_history(rec, body)
        exclude, unknown_ex = known_items(body.exclude, rec.item_idx)
        query = RecommendQuery(history, body.k, exclude, max(body.candidates, body.k), body.rerank, body.user_id, body.time)
        result = await state["batcher"].submit(query)
        return RecommendResponse(items=items_out(rec, result["items"], result["scores"]), reranked=result["reranked"],
                                 fallback=result["fallback"], unknown_items=unknown + unknown_ex,
                                 model_version=rec.version, latency_ms=round((time.perf_counter() - t) * 1000, 3))

    @app.post("/v1/generate", response_model=GenerateResponse, openapi_extra=KEYED,
              responses=user_errors | {501: ERRORS[501]})
    async def generate(body: GenerateRequest):
        """The generative recommender writes the top k items itself (trie-constrained beam search);
        scores are the items' log-probabilities under the model, history and ``exclude`` banned."""
        t = time.perf_counter()
        rec = ready(state)
        if rec.generative is None:
            raise api_error(501, "this deployment has no generative model (recsys export --generative)",
                            ("path",), "not_deployed")
        history, unknown = user_history(rec, body)
        exclude, unknown_ex = known_items(body.exclude, rec.item_idx)
        items, scores = await in_model_thread(state["executor"], rec.generative.recommend, [history], body.k,
                                              body.beam, [history + exclude])
        keep = [(int(i), float(s)) for i, s in zip(items[0], scores[0]) if i > 0]
        return GenerateResponse(items=items_out(rec, [i for i, _ in keep], [s for _, s in keep]),
                                unknown_items=unknown + unknown_ex, model_version=rec.version,
                                latency_ms=round((time.perf_counter() - t) * 1000, 3))

    @app.post("/v1/rerank", response_model=RerankResponse, openapi_extra=KEYED,
              responses=user_errors | {501: ERRORS[501]})
    async def rerank(body: RerankRequest):
        """The given candidates in the order ``/v1/recommend`` would serve them: for a ``user_id``, with that
        user's features (the fusion reranker's demographics and interaction times)."""
        t = time.perf_counter()
        rec = ready(state)
        if rec.reranks is None:
            raise api_error(501, "this deployment has no reranker", ("path",), "not_deployed")
        cands, unknown_c = known_items(body.candidates, rec.item_idx)
        if unknown_c:
            raise api_error(422, f"unknown candidate item ids {unknown_c}", ("body", "candidates"), "unknown_item")
        history, unknown = user_history(rec, body)
        query = RecommendQuery(history, user_id=body.user_id, time=body.time)
        out = (await in_model_thread(state["executor"], rec.rerank_batch, [query], [cands], body.k))[0]
        return RerankResponse(items=items_out(rec, out["items"], out["scores"]), unknown_items=unknown,
                              model_version=rec.version, latency_ms=round((time.perf_counter() - t) * 1000, 3))


def create_app(directory, settings: ServeSettings = ServeSettings(), freeze_gc: bool = False) -> FastAPI:
    """The API over ``directory`` (written by ``recsys export``); models load in the lifespan. ``freeze_gc``:
    for a process that serves this app alone (``recsys serve``): see :func:`load_models`."""
    from serving.runtime import providers

    directory = Path(directory)
    settings = settings.resolved(cuda="CUDAExecutionProvider" in providers())
    if settings.access_log and log.getEffectiveLevel() > logging.INFO:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    state: dict = {"ready": False}
    metrics = Metrics()                                     # its route templates are filled in below
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: the server answers /healthz at once and /readyz turns 200 when ready.
        state["executor"] = ThreadPoolExecutor(settings.model_threads, thread_name_prefix="recsys-model") \
            if settings.model_threads else None
        task = asyncio.create_task(load_models(directory, settings, state, metrics, freeze_gc))
        yield
        task.cancel()
        if state.get("batcher"):
            await state["batcher"].stop()
        if state["executor"]:
            state["executor"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="recsys ranking API", version="1", lifespan=lifespan,
                  description="SASRec + FAISS retrieval and an LLM reranker served with ONNX Runtime.")

    app.add_middleware(Guard, settings=settings, metrics=metrics)

    add_error_handlers(app)
    add_probe_routes(app, state, metrics)
    add_v1_routes(app, settings, state)
    declare_api_key(app)
    metrics.routes = frozenset(route.path for route in app.routes)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory serving.app:app_from_env`` (several workers): reads
    ``RECSYS_SERVE_DIR`` and ``RECSYS_SERVE_SETTINGS`` (JSON)."""
    settings = json.loads(os.environ.get("RECSYS_SERVE_SETTINGS", "{}"))
    return create_app(os.environ["RECSYS_SERVE_DIR"], ServeSettings(**settings), freeze_gc=True)
