"""The ranking API against a real uvicorn server on 127.0.0.1, driven with an HTTP client."""

import socket
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread; stopped at the end of the test."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60      # generous: a loaded 2-core machine starts slowly
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def wait_ready(self, client):
        deadline = time.time() + 90
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, client.get("/readyz").json()
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served(exported):
    from serving.app import ServeSettings, create_app

    out, _, _ = exported
    with Server(create_app(out, ServeSettings(max_body_bytes=4000, api_key=None))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        yield client, out


def test_readiness_turns_green_only_after_loading(exported, monkeypatch):
    import serving.app as app_module
    from serving.runtime import Recommender

    class SlowRecommender(Recommender):
        def __init__(self, *a, **kw):
            time.sleep(1.0)
            super().__init__(*a, **kw)

    monkeypatch.setattr(app_module, "Recommender", SlowRecommender)
    with Server(app_module.create_app(exported[0])) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/recommend", json={"history": ["1"]}).status_code == 503
        server.wait_ready(client)
        assert client.get("/readyz").json()["status"] == "ready"


def test_recommend_happy_paths(served):
    import polars as pl

    client, out = served
    user = pl.read_parquet(out / "histories.parquet")["user_id"][0]
    r = client.post("/v1/recommend", json={"user_id": user, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and body["reranked"] and body["model_version"] and body["latency_ms"] > 0
    catalog = pl.read_parquet(out / "catalog.parquet")
    known = catalog["item_id"].to_list()
    r = client.post("/v1/recommend", json={"history": known[:3], "k": 4, "exclude": known[3:6], "rerank": False})
    items = [i["item_id"] for i in r.json()["items"]]
    assert r.status_code == 200 and not r.json()["reranked"] and len(items) == 4
    assert not set(items) & set(known[:6])                              # history and exclusions never come back
    r = client.post("/v1/recommend", json={"history": known[:3] + ["no-such-item"], "k": 3})
    assert r.status_code == 200 and r.json()["unknown_items"] == ["no-such-item"]


def test_rerank_endpoint_orders_the_given_candidates(served):
    import polars as pl

    client, out = served
    known = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    r = client.post("/v1/rerank", json={"history": known[:4], "candidates": known[10:16], "k": 6})
    assert r.status_code == 200, r.text
    assert sorted(i["item_id"] for i in r.json()["items"]) == sorted(known[10:16])


@pytest.mark.parametrize("payload, status, fragment", [
    ("{not json", 422, "JSON"),
    ({"history": "abc"}, 422, "list"),
    ({"history": ["1"], "k": "many"}, 422, "integer"),
    ({"history": [], "k": 3}, 422, "empty history"),
    ({"history": ["1"], "k": 0}, 422, "greater than or equal"),
    ({"history": ["1"], "k": 1000}, 422, "less than or equal"),
    ({"user_id": "nobody"}, 404, "unknown user_id 'nobody' (ids of this model look like"),
    ({"k": 3}, 422, "exactly one of user_id or history"),
    ({"history": ["zzz-unknown"]}, 422, "zzz-unknown"),
])
def test_recommend_bad_requests(served, payload, status, fragment):
    client, _ = served
    r = (client.post("/v1/recommend", content=payload, headers={"content-type": "application/json"})
         if isinstance(payload, str) else client.post("/v1/recommend", json=payload))
    assert r.status_code == status and fragment in r.text, r.text


def test_rerank_bad_requests_and_limits(served):
    import polars as pl

    client, out = served
    known = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    r = client.post("/v1/rerank", json={"history": known[:2], "candidates": [known[3], "nope-1", "nope-2"]})
    assert r.status_code == 422 and "nope-1" in r.text and "nope-2" in r.text
    r = client.post("/v1/rerank", json={"history": known[:2], "candidates": known[:1] * 101})
    assert r.status_code == 422 and "at most 100" in r.text                    # too many candidates
    r = client.post("/v1/recommend", json={"history": ["m1"] * 2000})
    assert r.status_code == 413                                                # oversized body (limit 4000 bytes)


def test_metrics_and_models(served):
    client, _ = served
    client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 2})
    assert client.post("/v1/recommend", json={"user_id": "nobody"}).status_code == 404
    text = client.get("/metrics").text
    assert 'recsys_requests_total{path="/v1/recommend",status="200"}' in text
    assert 'recsys_requests_total{path="/v1/recommend",status="404"}' in text     # the status the endpoint sent
    assert "recsys_request_latency_ms_bucket" in text and "recsys_batch_size_count" in text
    models = client.get("/v1/models").json()
    assert models["reranker"] == "first" and models["warmup"]["retrieve_ms"] > 0 and models["warmup"]["rerank_ms"] > 0


def test_a_reranker_slower_than_its_deadline_is_reported_at_start_up(exported, caplog):
    """The warm-up query times the reranker before /readyz turns green; slower than ``rerank_timeout_ms``
    is a start-up warning naming both figures, not a surprise in every answer."""
    import json
    import logging

    from serving.app import ServeSettings, create_app

    caplog.set_level(logging.WARNING, logger="recsys.serving")
    with Server(create_app(exported[0], ServeSettings(rerank_timeout_ms=1e-6))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        warm = client.get("/v1/models").json()["warmup"]
    events = [json.loads(r.getMessage()) for r in caplog.records if "reranker_will_fall_back" in r.getMessage()]
    assert len(events) == 1 and events[0]["rerank_ms"] == warm["rerank_ms"] > 1e-6
    assert events[0]["rerank_timeout_ms"] == 1e-6


def test_concurrent_requests_are_micro_batched(exported):
    from concurrent.futures import ThreadPoolExecutor

    from serving.app import ServeSettings, create_app

    with Server(create_app(exported[0], ServeSettings(micro_batching=True))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: client.post("/v1/recommend", json={"history": [f"m{i % 20 + 1}"], "k": 3})
                                  .status_code, range(64)))
        assert codes == [200] * 64
        text = client.get("/metrics").text
    count = int(next(l for l in text.splitlines() if l.startswith("recsys_batch_size_count")).split()[-1])
    assert count < 64                                                           # some requests shared a batch


def test_auto_settings_batch_on_cuda_only():
    """Micro-batching and ONNX threads default by machine: off / 1 thread per call on CPU, on / ORT's
    default with CUDA; explicit values are kept."""
    from serving.app import ServeSettings

    cpu, cuda = ServeSettings().resolved(cuda=False), ServeSettings().resolved(cuda=True)
    assert (cpu.micro_batching, cpu.threads) == (False, 1) and (cuda.micro_batching, cuda.threads) == (True, None)
    forced = ServeSettings(micro_batching=True).resolved(cuda=False)
    assert (forced.micro_batching, forced.threads) == (True, None)
    assert ServeSettings(threads=2).resolved(cuda=False).threads == 2


def test_api_key_and_reranker_fallback(exported, monkeypatch):
    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender

    def broken(self, *a, **kw):
        raise RuntimeError("reranker exploded")

    monkeypatch.setattr(Recommender, "rerank_windows", broken)
    with Server(create_app(exported[0], ServeSettings(api_key="s3cret"))) as server, \
            httpx.Client(base_url=server.url) as client:
        server.wait_ready(client)
        assert client.post("/v1/recommend", json={"history": ["1"]}).status_code == 401
        r = client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 3}, headers={"x-api-key": "s3cret"})
        assert r.status_code == 200 and not r.json()["reranked"] and "RuntimeError" in r.json()["fallback"]
        assert len(r.json()["items"]) == 3                                      # the retrieval order, not an error


def test_a_late_reranker_is_answered_around_and_told_to_stop(exported, monkeypatch):
    """Past ``rerank_timeout_ms`` the retrieval order comes back flagged ``timeout`` without waiting for
    the reranker, and the reranker's run options are terminated, so it stops instead of holding a core."""
    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender

    stopped, armed = threading.Event(), threading.Event()

    def slow(self, histories, candidate_lists, run_options=None):
        if not armed.is_set():                                             # the start-up warm-up query
            raise RuntimeError("not armed yet")
        deadline = time.time() + 20
        while not run_options.terminate and time.time() < deadline:      # an ONNX run checks between nodes
            time.sleep(0.005)
        if run_options.terminate:
            stopped.set()
        raise RuntimeError("terminated")

    monkeypatch.setattr(Recommender, "rerank_windows", slow)
    with Server(create_app(exported[0], ServeSettings(rerank_timeout_ms=50))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        armed.set()
        t = time.perf_counter()
        r = client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 3})
        took = time.perf_counter() - t
        assert r.status_code == 200 and r.json()["fallback"] == "timeout" and not r.json()["reranked"]
        assert took < 10 and stopped.wait(10)
        assert 'recsys_rerank_fallbacks_total{reason="timeout"} 1' in client.get("/metrics").text


def test_generate_endpoint_writes_catalog_items_and_501_without_a_model(exported, tiny_dataset, tmp_path):
    """POST /v1/generate over a deployment exported with a generative model: k distinct catalog items,
    none from the history or ``exclude``, scores log-probs in decreasing order, unknown ids listed; the
    numpy beam search behind it equals torch's (tests/test_serving_export.py). Without the model: 501."""
    import numpy as np

    from recsys.generative.model import GenerativeConfig, GenerativeRecommender
    from serving.app import ServeSettings, create_app
    from serving.export import export

    n = tiny_dataset.n_items
    codes = np.stack([np.arange(n) // 16, np.arange(n) // 4 % 4, np.arange(n) % 4], 1)
    config = GenerativeConfig(hidden_size=32, num_layers=1, num_heads=2, max_items=6, value_layers=0)
    GenerativeRecommender.build(codes, np.arange(1, n + 1), config).save_pretrained(tmp_path / "gen")
    out = export(tiny_dataset, tmp_path / "sas", tmp_path / "serve-gen", generative_dir=tmp_path / "gen")
    ids = tiny_dataset.catalog.sort("idx")["item_id"].to_list()
    with Server(create_app(out, ServeSettings())) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        assert client.get("/v1/models").json()["generative"] is True
        r = client.post("/v1/generate", json={"history": ids[:3] + ["nope"], "exclude": ids[3:5], "k": 6})
        assert r.status_code == 200, r.text
        body = r.json()
        got = [i["item_id"] for i in body["items"]]
        scores = [i["score"] for i in body["items"]]
        assert len(set(got)) == 6 and set(got) <= set(ids) and not set(got) & set(ids[:5])
        assert scores == sorted(scores, reverse=True) and max(scores) < 0 and body["unknown_items"] == ["nope"]
        assert client.post("/v1/generate", json={"history": ["nope"]}).status_code == 422
        assert client.post("/v1/generate", json={"history": ids[:2], "k": 0}).status_code == 422
    with Server(create_app(exported[0], ServeSettings())) as server, httpx.Client(base_url=server.url) as client:
        server.wait_ready(client)
        assert client.post("/v1/generate", json={"history": ids[:2]}).status_code == 501


def test_limits_middleware_answers_before_the_app_and_records_every_status():
    """The ASGI middleware on its own: an oversized or malformed content-length never reaches the app
    (413 / 400), an allowed request passes through, and each status lands in the metrics."""
    import asyncio

    from serving.app import LimitsAndLogs, Metrics

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(length: bytes) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": [(b"content-length", length)]}
        await LimitsAndLogs(app, 10, metrics)(scope, None, send)
        return sent[0]["status"]

    metrics = Metrics()
    assert asyncio.run(call(b"11")) == 413 and asyncio.run(call(b"ten")) == 400 and not reached
    assert asyncio.run(call(b"10")) == 204 and reached == ["/v1/rerank"]
    text = metrics.render()
    assert all(f'path="/v1/rerank",status="{s}"' in text for s in (413, 400, 204))
