"""The README's "Your own data" walk-through, command for command: a CSV of orders with its own column names
and a products file become a dataset, a retriever, an exported deployment, a served recommendation with
titles (real HTTP server) and a batch re-scoring of a CSV of requests."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import polars as pl

from pipelines.cli import main
from tests.test_serving_api import free_port


def test_from_a_raw_csv_to_served_and_rescored_recommendations(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):                       # each customer walks a ring of 30 products from a random start
        start = int(rng.integers(30))
        rows += [(f"cust-{u}", f"SKU{(start + j) % 30:03d}", f"2024-03-{1 + j:02d}T{u % 24:02d}:00:00Z", "web")
                 for j in range(12)]
    pl.DataFrame(rows, schema=["customer", "sku", "ordered_at", "channel"], orient="row").write_csv(
        tmp_path / "orders.csv")
    pl.DataFrame({"sku": [f"SKU{i:03d}" for i in range(30)], "name": [f"Widget {i}" for i in range(30)],
                  "category": ["Tools|Garden" if i % 2 else "Kitchen" for i in range(30)]}).write_csv(
        tmp_path / "products.csv")

    def run(*argv) -> str:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run("data", "prepare", tmp_path / "orders.csv", "--out", tmp_path / "data", "--user-col", "customer",
        "--item-col", "sku", "--time-col", "ordered_at", "--items", tmp_path / "products.csv", "--item-id-col", "sku",
        "--title-col", "name", "--category-col", "category")
    run("train", "retriever", "--data", tmp_path / "data", "--out", tmp_path / "sasrec", "--max-epochs", "3",
        "--set", "model.hidden_size=16", "--set", "model.max_len=12", "--set", "precision=32-true")
    out = run("evaluate", "--data", tmp_path / "data", "--model", tmp_path / "sasrec", "--split", "test")
    assert "ndcg@10" in out and "40 users" in out
    out = run("recommend", "--data", tmp_path / "data", "--model", tmp_path / "sasrec", "--users", "cust-1", "--k", "3")
    items = json.loads(out)["items"]
    assert len(items) == 3 and all(i["title"] == f"Widget {int(i['item_id'][3:])}" for i in items)
    run("export", "--data", tmp_path / "data", "--sasrec", tmp_path / "sasrec", "--out", tmp_path / "serve")  # a run dir

    port = free_port()                                   # the README's `recsys serve`, as a process
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(tmp_path / "serve"), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout.readline().startswith(f"recsys serve: listening on http://127.0.0.1:{port} (1 worker)")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.time() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline and server.poll() is None, "server did not become ready"
                time.sleep(0.2)
            got = client.post("/v1/recommend", json={"user_id": "cust-1", "k": 3})
        assert got.status_code == 200, got.text
        items = got.json()["items"]
        assert len(items) == 3 and all(i["title"] == f"Widget {int(i['item_id'][3:])}" for i in items)
    finally:
        server.terminate()
        server.wait(30)

    (tmp_path / "requests.csv").write_text("request_id,user_id,history,k\n"
                                           "r1,cust-1,,5\n"
                                           "r2,,SKU001|SKU002|SKU003,2\n"
                                           "r3,cust-2,,\n"
                                           "r4,nobody,,\n")
    out = run("rescore", "--serve-dir", tmp_path / "serve", "--input", tmp_path / "requests.csv",
              "--output", tmp_path / "scored")
    assert "3 rows scored, 1 rejected" in out
    scored = pl.read_parquet(tmp_path / "scored" / "part-00000.parquet").sort("request_id")
    assert scored["request_id"].to_list() == ["r1", "r2", "r3"]
    assert [len(x) for x in scored["items"].to_list()] == [5, 2, 10]          # k defaults to 10
    rejects = pl.read_parquet(tmp_path / "scored" / "rejects" / "part-00000.parquet")
    assert rejects["request_id"].to_list() == ["r4"] and "nobody" in rejects["reason"][0]
