"""The online ranking API: a FastAPI app factory over an exported serving directory.

    recsys serve artifacts/serve --host 127.0.0.1 --port 8000
    curl -s localhost:8000/v1/recommend -d '{"user_id": "1m_1", "k": 5}' -H 'content-type: application/json'

Endpoints: ``POST /v1/recommend`` (a user id or a raw history of item ids), ``POST /v1/rerank``
(history + candidate ids), ``POST /v1/generate`` (the generative recommender writes k items by
trie-constrained beam search; 501 when the deployment has none), ``GET /healthz`` (alive), ``GET /readyz`` (200 once the models are
loaded), ``GET /metrics`` (Prometheus text), ``GET /v1/models``; OpenAPI docs at ``/docs``.

Behaviour a client can rely on:
- unknown item ids in a *history* or *exclude* list are dropped and listed in ``unknown_items``;
  unknown *candidate* ids in ``/v1/rerank`` are a 422 naming them; an unknown user is a 404;
- a history that is empty (after dropping unknown ids) is a 422;
- concurrent ``/v1/recommend`` requests are micro-batched into one ONNX call (``max_batch``,
  ``max_wait_ms``) when ``micro_batching`` is on (default: on with CUDA, off on CPU, where each
  request is served on its own, side by side);
- if the reranker fails or exceeds ``rerank_timeout_ms``, the retrieval order is returned with
  ``reranked: false`` and ``fallback`` saying why; a late reranker is told to stop (ONNX Runtime's
  ``RunOptions.terminate``, checked between graph nodes) rather than left computing an answer nobody
  awaits, which under load would make every later request late too;
- bodies above ``max_body_bytes`` get 413; with ``api_key`` set, ``/v1/*`` need ``x-api-key``;
- ``/readyz`` turns 200 after one warm-up query has gone through retrieval and the reranker; its timings
  are in ``/v1/models`` (``warmup``), and a reranker slower than its deadline is logged at start-up
  (``reranker_will_fall_back``) rather than discovered in the answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from serving.runtime import Recommender, RecommendQuery, run_options

log = logging.getLogger("recsys.serving")


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    """Micro-batching: most queries per ONNX call."""
    max_wait_ms: float = 2.0
    """Micro-batching: longest wait for more queries after the first of a batch."""
    micro_batching: bool | None = None
    """Group concurrent ``/v1/recommend`` queries into one ONNX call. None = auto: on with the CUDA
    provider, off on CPU, where a batch pads every history and prompt to its longest member and runs
    one batch at a time, while separate requests run side by side on the cores (2-core CPU, 8
    connections: p99 74 ms batched vs 39 ms unbatched, BENCHMARKS.md "Serving")."""
    rerank_timeout_ms: float = 1000.0
    """Past this the reranker's answer is not awaited: the retrieval order comes back with ``reranked: false``
    and ``fallback: "timeout"``."""
    max_body_bytes: int = 64_000
    api_key: str | None = None
    threads: int | None = None
    """ONNX Runtime intra-op threads per session. None = auto: 1 on CPU without micro-batching
    (concurrent requests already fill the cores; more threads per call only contend), else ORT's default."""
    int8: bool = False

    def resolved(self, cuda: bool) -> ServeSettings:
        """The settings with every ``None`` (auto) decided for this machine."""
        batching = cuda if self.micro_batching is None else self.micro_batching
        threads = self.threads if self.threads is not None else (None if cuda or batching else 1)
        return dataclasses.replace(self, micro_batching=batching, threads=threads)


# ---------------------------------------------------------------- schemas
class RecommendRequest(BaseModel):
    user_id: str | None = Field(None, description="a known user: their whole history is used")
    history: list[str] | None = Field(None, max_length=1000, description="item ids, oldest first")
    k: int = Field(10, ge=1, le=100)
    exclude: list[str] = Field(default_factory=list, max_length=1000)
    candidates: int = Field(50, ge=1, le=500, description="retrieved before reranking")
    rerank: bool = True


class GenerateRequest(BaseModel):
    user_id: str | None = Field(None, description="a known user: their whole history is used")
    history: list[str] | None = Field(None, max_length=1000, description="item ids, oldest first")
    k: int = Field(10, ge=1, le=100)
    exclude: list[str] = Field(default_factory=list, max_length=1000, description="never returned (nor is the history)")
    beam: int = Field(20, ge=1, le=100, description="beam width (at least k is used)")


class RerankRequest(BaseModel):
    history: list[str] = Field(..., max_length=1000)
    candidates: list[str] = Field(..., min_length=1, max_length=100)
    k: int | None = Field(None, ge=1, le=100)


class ScoredItemOut(BaseModel):
    item_id: str
    score: float


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


# ---------------------------------------------------------------- metrics
class Metrics:
    """Counters and histograms in the Prometheus text format (no client library needed)."""

    BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = {path: [0] * (len(self.BUCKETS) + 1) for path in ("/v1/recommend", "/v1/rerank", "/v1/generate")}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.batches = [0] * (len(self.BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.errors = 0
        self.fallbacks: dict[str, int] = defaultdict(int)

    @staticmethod
    def _observe(counts: list[int], buckets, value: float) -> None:
        counts[next((i for i, b in enumerate(buckets) if value <= b), len(buckets))] += 1

    def observe_request(self, path: str, status: int, ms: float) -> None:
        self.requests[(path, status)] += 1
        if status >= 500:
            self.errors += 1
        if path in self.latency:
            self._observe(self.latency[path], self.BUCKETS, ms)
            self.latency_sum[path] += ms

    def observe_batch(self, size: int) -> None:
        self._observe(self.batches, self.BATCH_BUCKETS, size)
        self.batch_sum += size

    @staticmethod
    def _histogram(name: str, labels: str, counts, buckets, total: float) -> list[str]:
        lines, cum = [], 0
        for b, c in zip([*buckets, "+Inf"], counts):
            cum += c
            lines.append(f'{name}_bucket{{{labels}le="{b}"}} {cum}')
        return lines + [f"{name}_sum{{{labels.rstrip(',')}}} {total}", f"{name}_count{{{labels.rstrip(',')}}} {cum}"]

    def render(self) -> str:
        out = ["# TYPE recsys_requests_total counter"]
        out += [f'recsys_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
        out += ["# TYPE recsys_errors_total counter", f"recsys_errors_total {self.errors}",
                "# TYPE recsys_rerank_fallbacks_total counter"]
        out += [f'recsys_rerank_fallbacks_total{{reason="{r}"}} {n}' for r, n in sorted(self.fallbacks.items())]
        out += ["# TYPE recsys_request_latency_ms histogram"]
        for path, counts in self.latency.items():
            out += self._histogram("recsys_request_latency_ms", f'path="{path}",', counts, self.BUCKETS,
                                   self.latency_sum[path])
        out += ["# TYPE recsys_batch_size histogram"]
        out += self._histogram("recsys_batch_size", "", self.batches, self.BATCH_BUCKETS, self.batch_sum)
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- micro-batching
class Batcher:
    """Collects concurrent queries into batches of at most ``max_batch``, waiting at most ``max_wait_ms``
    after the first, and runs each batch in a worker thread (ONNX Runtime releases the GIL)."""

    def __init__(self, recommender: Recommender, settings: ServeSettings, metrics: Metrics):
        self.rec, self.settings, self.metrics = recommender, settings, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

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
        """Retrieval, then reranking under a timeout; a failed or late reranker leaves the retrieval order."""
        self.metrics.observe_batch(len(queries))
        retrieved = await asyncio.to_thread(self.rec.retrieve, queries)
        results = [{"items": items[:q.k], "scores": scores[:q.k], "reranked": False, "fallback": None}
                   for q, (items, scores) in zip(queries, retrieved)]
        todo = [i for i, q in enumerate(queries) if q.rerank and retrieved[i][0]]
        if not todo:
            return results
        if self.rec.reranker is None:
            for i in todo:
                results[i]["fallback"] = "no reranker loaded"
            return results
        options = run_options()
        try:
            reranked = await asyncio.wait_for(asyncio.to_thread(
                self.rec.rerank_windows, [queries[i].history for i in todo], [retrieved[i][0] for i in todo],
                options), self.settings.rerank_timeout_ms / 1000)
        except Exception as e:                                       # noqa: BLE001 - degrade, never fail
            options.terminate = True       # a late reranker stops at its next ONNX node instead of holding a core
            reason = "timeout" if isinstance(e, TimeoutError) else f"error: {type(e).__name__}"
            self.metrics.fallbacks[reason.split(":")[0]] += 1
            log.warning(json.dumps({"event": "rerank_fallback", "reason": reason, "batch": len(todo)}))
            for i in todo:
                results[i]["fallback"] = reason
            return results
        for i, (items, scores) in zip(todo, reranked):
            results[i] = {"items": items[:queries[i].k], "scores": scores[:queries[i].k], "reranked": True,
                          "fallback": None}
        return results


# ---------------------------------------------------------------- app
class LimitsAndLogs:
    """Body-size limit (413 from ``content-length``), request metrics and one structured log line per request.

    A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the
    endpoint in a separate task and streams its response through a memory channel, a cost paid on every
    request of a hot path that takes a few milliseconds."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                detail = (f"request body of {length.decode(errors='replace')} bytes exceeds {self.max_body_bytes}"
                          if length.isdigit() else f"content-length {length.decode(errors='replace')!r} is not a byte count")
                await JSONResponse({"detail": detail}, status_code=413 if length.isdigit() else 400)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - t) * 1000
            self.metrics.observe_request(scope["path"], status, ms)
            log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status, "ms": round(ms, 2)}))


def warm_up(rec: Recommender, histories: dict | None) -> dict:
    """One query through retrieval and the reranker before the server reports ready: an ONNX Runtime
    session's first run allocates its buffers (no user pays for that), and the timings say whether the
    reranker fits its deadline. Returns ``retrieve_ms`` and ``rerank_ms`` (or ``rerank_error``); a
    retrieval failure raises (nothing can be served), a reranker failure is recorded (answers will fall
    back to retrieval order, as they would per request)."""
    history = list(next(iter(histories.values()))) if histories else [1]
    query = RecommendQuery(history, k=10)
    t = time.perf_counter()
    candidates = rec.retrieve([query])[0][0]
    out = {"retrieve_ms": round(1000 * (time.perf_counter() - t), 2)}
    if rec.reranker is not None and candidates:
        t = time.perf_counter()
        try:
            rec.rerank_windows([history], [candidates], run_options())
            out["rerank_ms"] = round(1000 * (time.perf_counter() - t), 2)
        except Exception as e:                                       # noqa: BLE001 - the API degrades
            out["rerank_error"] = f"{type(e).__name__}: {e}"
    return out


def create_app(directory, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The API over ``directory`` (written by ``recsys export``); models load in the lifespan."""
    from serving.runtime import providers

    directory = Path(directory)
    settings = settings.resolved(cuda="CUDAExecutionProvider" in providers())
    state: dict = {"ready": False}
    metrics = Metrics()

    async def load() -> None:
        t = time.perf_counter()
        try:
            rec = await asyncio.to_thread(Recommender, directory, threads=settings.threads, int8=settings.int8)
            histories = directory / "histories.parquet"
            if histories.exists():
                import polars as pl

                df = await asyncio.to_thread(pl.read_parquet, histories)
                state["users"] = dict(zip(df["user_id"].to_list(), df["history"].to_list()))
            state["warmup"] = await asyncio.to_thread(warm_up, rec, state.get("users"))
        except Exception as e:                                       # noqa: BLE001 - reported by /readyz
            state["error"] = f"{type(e).__name__}: {e}"
            log.error(json.dumps({"event": "load_failed", "directory": str(directory), "error": state["error"]}))
            return
        warm = state["warmup"]
        if "rerank_error" in warm or warm.get("rerank_ms", 0.0) > settings.rerank_timeout_ms:
            log.warning(json.dumps({"event": "reranker_will_fall_back", **warm,
                                    "rerank_timeout_ms": settings.rerank_timeout_ms,
                                    "hint": "answers will come back in retrieval order; raise rerank_timeout_ms "
                                            "(recsys serve --rerank-timeout-ms) or serve a faster reranker"}))
        state["rec"], state["batcher"] = rec, Batcher(rec, settings, metrics)
        state["batcher"].start()
        state["ready"] = True
        log.info(json.dumps({"event": "loaded", "directory": str(directory), "version": rec.version,
                             "seconds": round(time.perf_counter() - t, 3), "warmup": warm}))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: the server answers /healthz at once and /readyz turns 200 when ready.
        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.get("batcher"):
            await state["batcher"].stop()

    app = FastAPI(title="recsys ranking API", version="1", lifespan=lifespan,
                  description="SASRec + FAISS retrieval and an LLM reranker served with ONNX Runtime.")

    app.add_middleware(LimitsAndLogs, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    def authorised(request: Request) -> None:
        if settings.api_key and request.headers.get("x-api-key") != settings.api_key:
            raise HTTPException(401, "missing or wrong x-api-key")

    def ready() -> Recommender:
        if not state["ready"]:
            raise HTTPException(503, "models are still loading")
        return state["rec"]

    def to_idx(rec: Recommender, ids: list[str]) -> tuple[list[int], list[str]]:
        known = [rec.item_idx[i] for i in ids if i in rec.item_idx]
        return known, [i for i in ids if i not in rec.item_idx]

    def items_out(rec: Recommender, idx: list[int], scores: list[float]) -> list[ScoredItemOut]:
        return [ScoredItemOut(item_id=rec.item_ids[i], score=s) for i, s in zip(idx, scores)]

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "failed", "error": state["error"]} if "error" in state
                                else {"status": "loading"}, status_code=503)
        return {"status": "ready", "model_version": state["rec"].version}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return metrics.render()

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        rec = ready()
        return {"model_version": rec.version, "dataset": rec.manifest["dataset"], "models": rec.manifest["models"],
                "reranker": rec.reranker.name if rec.reranker else None, "generative": rec.generative is not None,
                "items": rec.n_items, "warmup": state["warmup"], "rerank_timeout_ms": settings.rerank_timeout_ms}

    def user_history(rec: Recommender, body) -> tuple[list[int], list[str]]:
        """The request's history in item idx and its unknown item ids (exclude included); 4xx when unusable."""
        if (body.user_id is None) == (body.history is None):
            raise HTTPException(422, "give exactly one of user_id or history")
        unknown: list[str] = []
        if body.user_id is not None:
            if body.user_id not in state.get("users", {}):
                example = next(iter(state.get("users", {})), None)
                raise HTTPException(404, f"unknown user_id {body.user_id!r}"
                                         + (f" (ids of this model look like {example!r})" if example else ""))
            history = list(state["users"][body.user_id])
        else:
            history, unknown = to_idx(rec, body.history)
        if not history:
            raise HTTPException(422, "empty history" + (f" (unknown item ids {unknown})" if unknown else ""))
        return history, unknown

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=[Depends(authorised)])
    async def recommend(body: RecommendRequest):
        t = time.perf_counter()
        rec = ready()
        history, unknown = user_history(rec, body)
        exclude, unknown_ex = to_idx(rec, body.exclude)
        query = RecommendQuery(history, body.k, exclude, max(body.candidates, body.k), body.rerank)
        result = await state["batcher"].submit(query)
        return RecommendResponse(items=items_out(rec, result["items"], result["scores"]), reranked=result["reranked"],
                                 fallback=result["fallback"], unknown_items=unknown + unknown_ex,
                                 model_version=rec.version, latency_ms=round((time.perf_counter() - t) * 1000, 3))

    @app.post("/v1/generate", response_model=RerankResponse, dependencies=[Depends(authorised)])
    async def generate(body: GenerateRequest):
        """The generative recommender writes the top k items itself (trie-constrained beam search);
        scores are the items' log-probabilities under the model, history and ``exclude`` banned."""
        t = time.perf_counter()
        rec = ready()
        if rec.generative is None:
            raise HTTPException(501, "this deployment has no generative model (recsys export --generative)")
        history, unknown = user_history(rec, body)
        exclude, unknown_ex = to_idx(rec, body.exclude)
        items, scores = await asyncio.to_thread(rec.generative.recommend, [history], body.k, body.beam,
                                                [history + exclude])
        keep = [(int(i), float(s)) for i, s in zip(items[0], scores[0]) if i > 0]
        return RerankResponse(items=items_out(rec, [i for i, _ in keep], [s for _, s in keep]),
                              unknown_items=unknown + unknown_ex, model_version=rec.version,
                              latency_ms=round((time.perf_counter() - t) * 1000, 3))

    @app.post("/v1/rerank", response_model=RerankResponse, dependencies=[Depends(authorised)])
    async def rerank(body: RerankRequest):
        t = time.perf_counter()
        rec = ready()
        if rec.reranker is None:
            raise HTTPException(501, "this deployment has no reranker")
        history, unknown = to_idx(rec, body.history)
        cands, unknown_c = to_idx(rec, body.candidates)
        if unknown_c:
            raise HTTPException(422, f"unknown candidate item ids {unknown_c}")
        if not history:
            raise HTTPException(422, "empty history" + (f" (unknown item ids {unknown})" if unknown else ""))
        out = (await asyncio.to_thread(rec.rerank_batch, [history], [cands], body.k))[0]
        return RerankResponse(items=items_out(rec, out["items"], out["scores"]), unknown_items=unknown,
                              model_version=rec.version, latency_ms=round((time.perf_counter() - t) * 1000, 3))

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory serving.app:app_from_env`` (several workers): reads
    ``RECSYS_SERVE_DIR`` and ``RECSYS_SERVE_SETTINGS`` (JSON)."""
    settings = json.loads(os.environ.get("RECSYS_SERVE_SETTINGS", "{}"))
    return create_app(os.environ["RECSYS_SERVE_DIR"], ServeSettings(**settings))
