"""The ranking API against a real uvicorn server on 127.0.0.1, driven with an HTTP client."""

import json
import socket
import threading
import time

import httpx
import pytest

from pipelines.benchmarks.abuse import send_chunked


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
    """/v1/rerank returns the given candidates, reordered; for a known user's id, as for their stored history
    sent explicitly; neither or both of user_id and history is a 422, an unknown user a 404."""
    import polars as pl

    client, out = served
    known = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    r = client.post("/v1/rerank", json={"history": known[:4], "candidates": known[10:16], "k": 6})
    assert r.status_code == 200, r.text
    assert sorted(i["item_id"] for i in r.json()["items"]) == sorted(known[10:16])
    catalog, user = pl.read_parquet(out / "catalog.parquet"), pl.read_parquet(out / "histories.parquet")
    item_id = dict(zip(catalog["idx"].to_list(), catalog["item_id"].to_list()))
    uid, stored = user["user_id"][0], [item_id[i] for i in user["history"][0]]
    by_id = client.post("/v1/rerank", json={"user_id": uid, "candidates": known[10:16]}).json()
    by_history = client.post("/v1/rerank", json={"history": stored, "candidates": known[10:16]}).json()
    assert by_id["items"] == by_history["items"] and by_id["unknown_items"] == []
    for body, status, fragment in (({"user_id": "nobody", "candidates": known[:2]}, 404, "unknown user_id"),
                                   ({"candidates": known[:2]}, 422, "exactly one of user_id or history"),
                                   ({"user_id": uid, "history": known[:2], "candidates": known[:2]}, 422, "exactly one")):
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == status and fragment in r.text, r.text


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
    assert "recsys_request_duration_seconds_bucket" in text and "recsys_batch_size_count" in text
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
    count = float(next(l for l in text.splitlines() if l.startswith("recsys_batch_size_count")).split()[-1])
    assert count < 64                                                           # some requests shared a batch


def test_settings_batch_by_default_with_one_onnx_thread_per_call_on_cpu():
    """Micro-batching is on unless turned off; ONNX threads default by machine: 1 per call on CPU, ORT's
    default with CUDA; explicit values are kept."""
    from serving.app import ServeSettings

    cpu, cuda = ServeSettings().resolved(cuda=False), ServeSettings().resolved(cuda=True)
    assert (cpu.micro_batching, cpu.threads) == (True, 1) and (cuda.micro_batching, cuda.threads) == (True, None)
    assert ServeSettings(micro_batching=False).resolved(cuda=False).micro_batching is False
    assert ServeSettings(threads=2).resolved(cuda=False).threads == 2


def test_a_batch_takes_every_query_waiting_when_the_model_thread_frees_up():
    """With ``max_wait_ms`` 0 a batch waits for nobody, yet the queries that queued while the model thread
    was busy go together: first batch 1 (the model thread was free), then the 5 that came meanwhile."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from serving.app import Batcher, Metrics, ServeSettings
    from serving.runtime import RecommendQuery

    class SlowRetriever:
        reranks, sizes = None, []

        def retrieve(self, queries):
            self.sizes.append(len(queries))
            time.sleep(0.2)
            return [([1, 2], [1.0, 0.5]) for _ in queries]

    async def main():
        rec = SlowRetriever()
        batcher = Batcher(rec, ServeSettings(max_wait_ms=0.0), Metrics(), ThreadPoolExecutor(1))
        batcher.start()
        first = asyncio.create_task(batcher.submit(RecommendQuery([1], k=1, rerank=False)))
        await asyncio.sleep(0.05)                                    # the first batch is running
        rest = [asyncio.create_task(batcher.submit(RecommendQuery([1], k=1, rerank=False))) for _ in range(5)]
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return rec.sizes, results

    sizes, results = asyncio.run(main())
    assert sizes == [1, 5] and all(r["items"] == [1] for r in results)


@pytest.mark.parametrize("field, value", [("model_threads", -1), ("max_in_flight", 0), ("threads", 0),
                                          ("max_body_bytes", 1.5), ("rerank_timeout_ms", float("nan")),
                                          ("body_timeout_s", -1.0), ("max_wait_ms", float("inf"))])
def test_settings_that_cannot_serve_are_refused_naming_the_field(field, value):
    from serving.app import ServeSettings

    with pytest.raises(ValueError, match=field):
        ServeSettings(**{field: value})
    assert ServeSettings(max_wait_ms=0.0).max_wait_ms == 0.0                 # no wait for more queries: allowed


def test_model_work_runs_in_the_model_threads_only(exported, monkeypatch):
    """Retrieval, reranking and generation of every endpoint run in the ``model_threads`` pool (named
    ``recsys-model``), never on the event loop nor in asyncio's default pool: with one model thread, no two
    requests' model work overlaps (one request per call: micro-batching is off here)."""
    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender

    seen, running, overlaps = [], [0], []
    original = Recommender.rerank_windows

    def recorded(self, *args, **kw):
        seen.append(threading.current_thread().name)
        running[0] += 1
        overlaps.append(running[0])
        time.sleep(0.01)
        try:
            return original(self, *args, **kw)
        finally:
            running[0] -= 1

    monkeypatch.setattr(Recommender, "rerank_windows", recorded)
    with Server(create_app(exported[0], ServeSettings(model_threads=1, micro_batching=False))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        known = ["m1", "m2", "m3", "m4"]
        seen.clear()                                                       # the start-up warm-up query

        def one(i):
            path, body = (("/v1/rerank", {"history": known[:2], "candidates": known[2:]}) if i % 2 else
                          ("/v1/recommend", {"history": known[:2], "k": 3}))
            with httpx.Client(base_url=server.url, timeout=30) as c:
                assert c.post(path, json=body).status_code == 200

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(seen) == 8 and all(name.startswith("recsys-model") for name in seen), seen
    assert max(overlaps) == 1


def test_model_threads_0_runs_model_work_on_the_event_loop_and_checks_the_deadline_first(exported, monkeypatch):
    """``model_threads=0``: every endpoint's model work runs on the event loop's own thread (no pool); the
    reranker deadline is checked before the reranker starts: past it, the retrieval order comes back."""
    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender

    seen, loop_threads = [], []
    original_windows, original_batch = Recommender.rerank_windows, Recommender.rerank_batch

    def on(original):
        def recorded(self, *args, **kw):
            seen.append(threading.current_thread().name)
            return original(self, *args, **kw)
        return recorded

    monkeypatch.setattr(Recommender, "rerank_windows", on(original_windows))
    monkeypatch.setattr(Recommender, "rerank_batch", on(original_batch))
    app = create_app(exported[0], ServeSettings(model_threads=0))

    @app.get("/loop-thread")
    async def loop_thread():
        loop_threads.append(threading.current_thread().name)
        return {}

    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        client.get("/loop-thread")
        seen.clear()
        r = client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 3})
        assert r.status_code == 200 and r.json()["reranked"] and len(r.json()["items"]) == 3
        assert client.post("/v1/rerank", json={"history": ["m1", "m2"], "candidates": ["m3", "m4"]}).status_code == 200
    assert len(seen) >= 2 and set(seen) == set(loop_threads) and not any(n.startswith("recsys-model") for n in seen)

    with Server(create_app(exported[0], ServeSettings(model_threads=0, rerank_timeout_ms=1e-6))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        seen.clear()
        r = client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 3})
        assert r.status_code == 200 and r.json()["fallback"] == "timeout" and not r.json()["reranked"]
        assert seen == []                                       # the reranker never started
        assert 'recsys_rerank_fallbacks_total{reason="timeout"} 1.0' in client.get("/metrics").text


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
        assert 'recsys_rerank_fallbacks_total{reason="timeout"} 1.0' in client.get("/metrics").text


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


def test_guard_answers_before_the_app_and_records_every_status():
    """The ASGI guard on its own: an oversized or malformed content-length never reaches the app (413 / 400),
    nor a chunked body that grows past the limit (413 after reading just past it, the rest never asked for);
    an allowed request passes through with its body; each status lands in the metrics under its route."""
    import asyncio

    from serving.app import Guard, Metrics, ServeSettings

    reached = []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(headers, chunks=(b"",)) -> tuple[int, int]:
        sent, asked = [], 0

        async def receive():
            nonlocal asked
            asked += 1
            return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": headers}
        await Guard(app, ServeSettings(max_body_bytes=10), metrics)(scope, receive, send)
        return sent[0]["status"], asked

    metrics = Metrics(["/v1/rerank"])
    assert asyncio.run(call([(b"content-length", b"11")]))[0] == 413
    assert asyncio.run(call([(b"content-length", b"ten")]))[0] == 400 and not reached
    chunked = [(b"transfer-encoding", b"chunked")]
    assert asyncio.run(call(chunked, [b"abcd"] * 1000)) == (413, 3) and not reached    # 12 bytes > 10: stop
    assert asyncio.run(call(chunked, [b"abcd", b"efghij"]))[0] == 204 and reached == [b"abcdefghij"]
    text = metrics.render().decode()
    assert all(f'recsys_requests_total{{path="/v1/rerank",status="{s}"}}' in text for s in (413, 400, 204))


def test_a_chunked_body_is_cut_at_the_limit_and_an_unkeyed_one_is_never_read(exported):
    """The body limit holds on the bytes received, not on content-length: a 50 MB chunked body gets 413
    after little more than the limit was sent; with an API key, a request without it gets 401 before its
    body is read at all. The client may see the connection reset instead of the answer (status 0: the
    server closed with the client's bytes still arriving), so the answer is also read from the metrics."""
    from serving.app import ServeSettings, create_app

    for settings, status, reason in ((ServeSettings(max_body_bytes=4000), 413, "too_large"),
                                     (ServeSettings(api_key="s3cret"), 401, "unauthorised")):
        with Server(create_app(exported[0], settings)) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            server.wait_ready(client)
            got, sent = send_chunked(server.port, "/v1/recommend", 50_000_000)
            assert got in (status, 0) and sent < 10_000_000, (got, sent)       # the server stopped reading
            assert f'recsys_refused_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text
            headers = {"x-api-key": "s3cret"} if settings.api_key else {}
            assert client.post("/v1/recommend", json={"history": ["m1"], "k": 2}, headers=headers).status_code == 200


def test_metrics_take_route_templates_only_so_no_client_can_write_into_them(served):
    client, _ = served
    assert client.get("/%22%7D%201%0Arecsys_errors_total%20999999%0A%23").status_code == 404
    client.get("/metrics")                                                      # its own series exists
    before = client.get("/metrics").text
    for i in range(200):
        client.get(f"/random-{i}")
    after = client.get("/metrics").text
    assert "999999" not in after and "random-" not in after
    assert 'recsys_requests_total{path="unmatched",status="404"} 201.0' in after
    assert len(after.splitlines()) == len(before.splitlines())               # no new series per path
    assert "# HELP recsys_request_duration_seconds" in after and "# TYPE recsys_requests_total counter" in after


@pytest.mark.parametrize("path", ["/v1/recommend", "/v1/rerank", "/v1/generate"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_a_422_not_a_server_error(served, path, number):
    client, _ = served
    body = f'{{"history": ["m1"], "candidates": ["m2"], "k": {number}}}'
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "k"]


def test_strict_requests_and_one_error_shape(served):
    """Unknown fields and repeated candidates are 422s; every error, from validation, the endpoints, the
    guard or the router, is {"detail": [{"loc", "msg", "type"}]}; the spec declares the key and each status."""
    import polars as pl

    client, out = served
    known = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    answers = [client.post("/v1/recommend", json={"history": ["m1"], "top_k": 3}),
               client.post("/v1/rerank", json={"history": known[:2], "candidates": [known[3], known[4], known[3]]}),
               client.post("/v1/recommend", json={"user_id": "nobody"}),
               client.post("/v1/recommend", json={"history": ["m1"] * 2000}),
               client.get("/no/such/path")]
    assert [r.status_code for r in answers] == [422, 422, 404, 413, 404]
    for r in answers:
        assert set(r.json()) == {"detail"}, r.text
        assert all(set(e) == {"loc", "msg", "type"} and isinstance(e["loc"], list) for e in r.json()["detail"])
    assert answers[0].json()["detail"][0]["loc"] == ["body", "top_k"]
    assert answers[1].json()["detail"][0]["loc"] == ["body", "candidates"] and "position 2 is repeated" in answers[1].text
    spec = client.get("/openapi.json").json()
    assert "x-api-key" in json.dumps(spec["components"]["securitySchemes"])
    assert set(spec["paths"]["/v1/recommend"]["post"]["responses"]) >= {"200", "401", "404", "413", "422", "503"}
    generate = spec["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert generate["$ref"].endswith("/GenerateResponse")


def test_requests_beyond_max_in_flight_get_503_with_retry_after(exported, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender

    original, armed = Recommender.rerank_windows, threading.Event()

    def slow(self, *a, **kw):
        if armed.is_set():
            time.sleep(1.0)
        return original(self, *a, **kw)

    monkeypatch.setattr(Recommender, "rerank_windows", slow)
    with Server(create_app(exported[0], ServeSettings(max_in_flight=2))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        armed.set()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/recommend", json={"history": ["m1"], "k": 2}),
                                    range(6)))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        refused = next(r for r in answers if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and refused.json()["detail"][0]["type"] == "overload"
        assert client.get("/readyz").status_code == 200                        # probes are never refused


def test_readyz_names_no_paths_when_loading_failed(tmp_path):
    from serving.app import ServeSettings, create_app

    missing = tmp_path / "secret-location" / "serve"
    with Server(create_app(missing, ServeSettings())) as server, httpx.Client(base_url=server.url) as client:
        deadline = time.time() + 30
        while client.get("/readyz").json()["status"] == "loading":
            assert time.time() < deadline
            time.sleep(0.05)
        r = client.get("/readyz")
        assert r.status_code == 503 and "secret-location" not in r.text and r.json()["status"] == "failed"


def test_a_deployment_whose_weights_changed_never_turns_ready(exported, caplog):
    import logging

    from serving.app import ServeSettings, create_app

    out = exported[0]
    data = out / "sasrec.onnx.data"
    data.write_bytes(data.read_bytes()[:-8] + bytes(8))
    caplog.set_level(logging.ERROR, logger="recsys.serving")
    with Server(create_app(out, ServeSettings())) as server, httpx.Client(base_url=server.url) as client:
        deadline = time.time() + 30
        while client.get("/readyz").json()["status"] == "loading":
            assert time.time() < deadline
            time.sleep(0.05)
        assert client.get("/readyz").json() == {"status": "failed", "error": "RecsysError (details in the server log)"}
    assert any("sasrec.onnx.data: SHA-256" in r.getMessage() for r in caplog.records)


def test_the_access_log_writes_one_json_line_per_request_when_asked(exported, caplog):
    import logging

    from serving.app import ServeSettings, create_app

    caplog.set_level(logging.INFO, logger="recsys.serving")
    with Server(create_app(exported[0], ServeSettings(access_log=True))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        client.post("/v1/recommend", json={"history": ["m1"], "k": 2})
        client.get("/no-such-path-123")
    lines = [json.loads(r.getMessage()) for r in caplog.records if '"method"' in r.getMessage()]
    assert {"method": "POST", "path": "/v1/recommend", "status": 200} in [
        {k: x[k] for k in ("method", "path", "status")} for x in lines]
    assert any(x["path"] == "unmatched" and x["status"] == 404 for x in lines)
    assert all("no-such-path" not in r.getMessage() for r in caplog.records)


def test_recsys_serve_with_two_workers_counts_every_request_once_in_metrics(exported, tmp_path):
    """`recsys serve --workers 2` (two uvicorn processes): /metrics, whichever worker answers it, sums both
    workers' counters (the CLI gives them a shared prometheus_client multiprocess directory)."""
    import os
    import re
    import subprocess
    import sys

    out, _, _ = exported
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(out), "--port", str(port),
                               "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert "(2 workers)" in server.stdout.readline()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.time() + 120
            ready = 0
            while ready < 10:                       # /readyz answered by both workers, most likely, by then
                try:
                    ready += client.get("/readyz", headers={"connection": "close"}).status_code == 200
                except httpx.TransportError:
                    pass
                assert time.time() < deadline and server.poll() is None, "server did not become ready"
                time.sleep(0.1)
            for _ in range(40):                     # new connections: the kernel spreads them over the workers
                got = client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 2},
                                  headers={"connection": "close"})
                assert got.status_code == 200, got.text
            counts = set()
            for _ in range(6):
                text = client.get("/metrics", headers={"connection": "close"}).text
                counts.add(re.search(r'recsys_requests_total\{path="/v1/recommend",status="200"\} (\S+)', text)[1])
        assert counts == {"40.0"}
    finally:
        server.terminate()
        server.wait(30)


def test_a_server_process_freezes_its_loaded_deployment_out_of_the_garbage_collector(exported):
    """``recsys serve``'s app (``freeze_gc``) moves what loading left alive to the permanent generation, so
    that no full collection walks the known users' histories while requests wait; a test's app does not."""
    import gc

    from serving.app import create_app

    gc.unfreeze()
    try:
        for freeze, frozen in ((False, False), (True, True)):
            with Server(create_app(exported[0], freeze_gc=freeze)) as server, \
                    httpx.Client(base_url=server.url, timeout=30) as client:
                server.wait_ready(client)
                assert (gc.get_freeze_count() > 0) is frozen
                assert client.post("/v1/recommend", json={"history": ["m1", "m2"], "k": 3}).status_code == 200
    finally:
        gc.unfreeze()
