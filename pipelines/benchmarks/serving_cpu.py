"""The request path's cost: server CPU per ``POST /v1/recommend`` and latency under load, beside another
revision's serving code on the same deployment in the same run.

    recsys quickstart                                   # the README's main job: writes artifacts/
    python -m pipelines.benchmarks.serving_cpu --quickstart artifacts --baseline a2dbd20 --export --histories \
        --variant nobatch='--micro-batching off'

The deployment is the quickstart's ``runs/default-seed0/serve`` (SASRec + FAISS retrieval of 50 candidates,
reranked by what the quickstart exported: the fusion reranker); with ``--export``, the quickstart's SASRec and
tiny FIRST reranker (over the first 20), exported without the fusion reranker, as recorded. ``--baseline REV``
checks that revision out into a git worktree under ``--out`` and serves the same directory with its code (with
``--export``, each revision serves the quickstart's models as its own ``recsys export`` writes them, so the
exporter's share counts too); ``--variant NAME=OPTIONS`` serves this revision once more with other ``recsys
serve`` options (``nobatch='--micro-batching off'``). All servers run at once, each with its revision's
defaults unless a variant says otherwise; for every connection level they take turns, ``--repeats``
load-generator runs each (``pipelines.benchmarks.loadgen``: random known users, ``k`` 10; with
``--histories`` also explicit histories, rows ``<variant>-history-c<N>``), so that the drift of a shared
machine falls on all alike. Per row: requests per second, p50 / p99 latency and ``server_cpu_ms_per_request``
(the server process's user + system CPU over the timed requests); ``ratios``: baseline / current CPU per
request at each level and workload. The ``model-path-in-process`` row is the model work alone for known users
(:func:`model_path`; ``model-path-history`` for the same histories sent explicitly): what the HTTP rows spend
beyond it is the web stack's; with ``--export`` and a baseline, ``model-path-baseline-export`` is the same on
the baseline's graphs (the exporter's share alone). Run it on an otherwise idle machine: latency is what it
measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import (
    Provenance,
    process_cpu_seconds,
    serve_process,
    write_result,
)


def load(url: str, pid: int, users: list[str], connections: int, requests: int, histories: Path | None = None) -> dict:
    """One load-generator run: known users' ids, or with ``histories`` (a JSON file) explicit histories."""
    config = {"url": url, "users": users, "connections": connections, "requests": requests, "endpoint": "recommend",
              "candidates": 50, "warmup": 20, "server_pid": pid} | ({"histories_file": str(histories)} if histories else {})
    return json.loads(subprocess.run([sys.executable, "-m", "pipelines.benchmarks.loadgen", json.dumps(config)],
                                     capture_output=True, text=True, check=True).stdout)


def row(name: str, connections: int, runs: list[dict]) -> dict:
    """One variant at one level: the runs' latencies pooled, their CPU summed over their requests."""
    lat = np.concatenate([r["lat"] for r in runs])
    return {"name": f"{name}-c{connections}", "variant": name, "connections": connections, "metrics": {
        "server_cpu_ms_per_request": round(1000 * sum(r["server_cpu_s"] for r in runs) / len(lat), 3),
        "rps": round(len(lat) / sum(r["seconds"] for r in runs), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "repeats_p99_ms": [round(float(np.percentile(r["lat"], 99)), 2) for r in runs],
        "requests": len(lat), "errors": sum(r["errors"] for r in runs), "fallbacks": sum(r["fallbacks"] for r in runs)}}


def model_path(serve_dir: Path, users: list[str], requests: int, known: bool = True) -> dict:
    """The model work alone, in this process, one query per call (1 ONNX Runtime thread): CPU and wall
    milliseconds per request of ``Recommender.recommend_batch`` (user vector, FAISS, the reranker), without
    HTTP, JSON or threads. ``known``: queries for known users, whose vectors are looked up (what a ``user_id``
    request is); else the same histories without their user (SASRec runs, as for an explicit history)."""
    from serving.runtime import Recommender, RecommendQuery

    rec = Recommender(serve_dir, threads=1)
    histories = rec.users.histories
    who = [users[i % len(users)] for i in range(requests)]
    queries = [RecommendQuery(list(histories[u]), 10, candidates=50, user_id=u if known else None) for u in who]
    for q in queries[:50]:                                                  # warm-up
        rec.recommend_batch([q])

    wall, start = time.perf_counter(), process_cpu_seconds()
    for q in queries:
        rec.recommend_batch([q])
    return {"name": "model-path-in-process" if known else "model-path-history", "metrics": {
        "server_cpu_ms_per_request": round(1000 * (process_cpu_seconds() - start) / requests, 3),
        "wall_ms_per_request": round(1000 * (time.perf_counter() - wall) / requests, 3), "requests": requests}}


def history_file(serve_dir: Path, path: Path) -> Path:
    """Each known user's stored history without its last item (the last 200 item ids), as a JSON list of lists
    for the load generator: histories no precomputed vector matches, the size of a real client's request."""
    import polars as pl

    catalog = pl.read_parquet(serve_dir / "catalog.parquet")
    ids = dict(zip(catalog["idx"].to_list(), catalog["item_id"].to_list()))
    histories = pl.read_parquet(serve_dir / "histories.parquet")["history"].to_list()
    path.write_text(json.dumps([[str(ids[i]) for i in h[:-1][-200:]] for h in histories if len(h) > 1]))
    return path


def worktree(rev: str, out: Path) -> Path:
    """A checkout of ``rev`` (made once) whose serving code the baseline server runs."""
    path = (out / f"baseline-{rev}").resolve()
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return path


def export_with(code: Path | None, quickstart: Path, out: Path) -> Path:
    """The quickstart's trained models exported by ``code``'s own ``recsys export`` (None: this checkout) into
    ``out`` (once), so that a revision's row includes what its exporter does to the graphs, not only its server."""
    if (out / "manifest.json").exists():
        return out
    runs = quickstart / "runs" / "default-seed0"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "export", "--data", str((quickstart / "data" / "ml-1m").resolve()),
                    "--sasrec", str((runs / "sasrec").resolve()), "--reranker", str((runs / "reranker-rank-grpo").resolve()),
                    "--generative", str((runs / "generative-sft").resolve()), "--out", str(out.resolve())],
                   cwd=code, env={**os.environ, **({"PYTHONPATH": str(code)} if code else {})}, check=True,
                   capture_output=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", default="artifacts", help="a `recsys quickstart` --out directory")
    p.add_argument("--serve-dir", help="a deployment to serve instead of the quickstart's")
    p.add_argument("--baseline", help="a git revision whose serving code is measured beside this one's")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="also serve this revision with these `recsys serve` options, e.g. "
                        "model-threads-2='--model-threads 2' (repeatable)")
    p.add_argument("--export", action="store_true",
                   help="export the quickstart's models with each revision's own code and serve each revision its "
                        "own export (default: every server serves the quickstart's deployment)")
    p.add_argument("--levels", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--histories", action="store_true",
                   help="also load every server with explicit histories (each known user's without its last "
                        "item, so no precomputed user vector applies): rows <variant>-history-c<N>")
    p.add_argument("--requests", type=int, default=3000, help="timed requests per load-generator run")
    p.add_argument("--repeats", type=int, default=3, help="load-generator runs per variant and level")
    p.add_argument("--out", default="artifacts/serving-cpu")
    p.add_argument("--result", default="serving_cpu", help="results/<name>.json (serving_cpu or serving_cpu_<name>)")
    a = p.parse_args()
    if a.result != "serving_cpu" and not a.result.startswith("serving_cpu_"):
        raise SystemExit(f"--result {a.result!r}: expected serving_cpu or serving_cpu_<name>")
    provenance = Provenance("pipelines.benchmarks.serving_cpu")
    import polars as pl

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_dir = Path(a.serve_dir or Path(a.quickstart) / "runs" / "default-seed0" / "serve")
    if not (serve_dir / "manifest.json").exists():
        raise SystemExit(f"{serve_dir}: no deployment; run `recsys quickstart --out {a.quickstart}` first")
    users = pl.read_parquet(serve_dir / "histories.parquet")["user_id"].to_list()
    variants = {"current": (None, [])} | {name: (None, options.split()) for name, options in
                                          (v.split("=", 1) for v in a.variant)}
    if a.baseline:
        variants[f"baseline-{a.baseline}"] = (worktree(a.baseline, out), [])
    dirs = {name: serve_dir for name in variants}
    if a.export:
        exported = {"current": export_with(None, Path(a.quickstart), out / "serve-current")}
        if a.baseline:
            code = variants[f"baseline-{a.baseline}"][0]
            exported[f"baseline-{a.baseline}"] = export_with(code, Path(a.quickstart), out / f"serve-baseline-{a.baseline}")
        dirs = {name: exported.get(name, exported["current"]) for name in variants}
    workloads = {"": None} | ({"-history": history_file(serve_dir, out / "histories.json")} if a.histories else {})
    runs = {(name + w, c): [] for name in variants for w in workloads for c in a.levels}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(serve_process(dirs[name], *options, code=code))
                   for name, (code, options) in variants.items()}
        for c in a.levels:
            for _ in range(a.repeats):
                for name, (url, process) in servers.items():
                    for w, histories in workloads.items():
                        runs[name + w, c].append(load(url, process.pid, users, c, a.requests, histories))
                        print(f"{name}{w} c{c}: {len(runs[name + w, c])} runs", flush=True)
    rows = [row(name, c, runs[name, c]) for name, c in runs]
    rows.append(model_path(dirs["current"], users, a.requests))
    if a.histories:
        rows.append(model_path(dirs["current"], users, a.requests, known=False))
    if a.export and a.baseline:             # this runtime on the baseline's graphs: the exporter's share alone
        rows.append(model_path(dirs[f"baseline-{a.baseline}"], users, a.requests) | {"name": "model-path-baseline-export"})
    cpu = {(r["variant"], r["connections"]): r["metrics"]["server_cpu_ms_per_request"] for r in rows if "variant" in r}
    ratios = {f"cpu_baseline_over_current{w.replace('-', '_')}_c{c}":
              round(cpu[f"baseline-{a.baseline}{w}", c] / cpu[f"current{w}", c], 3)
              for w in workloads for c in a.levels} if a.baseline else {}
    write_result(a.result, provenance, {
        "deployment": str(serve_dir), "exported_per_revision": {name: str(d) for name, d in dirs.items()} if a.export
        else None, "models": sorted(json.loads((serve_dir / "manifest.json").read_text())["models"]),
        "server": "recsys serve defaults (each revision's own): 1 uvicorn worker (uvloop, httptools), 1 model thread, "
                  "1 ONNX Runtime thread per call; POST /v1/recommend, k 10, 50 candidates",
        "workloads": {"": "known users' ids (user_id)"} | ({"-history": "explicit histories: each known user's "
                                                           "stored history without its last item, up to 200 items"}
                                                          if a.histories else {}),
        "baseline": a.baseline, "variants": {name: " ".join(options) for name, (_, options) in variants.items()},
        "rows": rows, "ratios": ratios})
    for r in rows:
        m = r["metrics"]
        print(f"{r['name']:>26} " + ("in process" if "rps" not in m else f"{m['rps']:7.1f} req/s  p50 {m['p50_ms']:6.1f} "
              f"ms  p99 {m['p99_ms']:6.1f} ms") + f"  cpu {m['server_cpu_ms_per_request']:.3f} ms/req")

if __name__ == "__main__":
    main()
