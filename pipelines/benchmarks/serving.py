"""Serving on ML-1M: ONNX Runtime vs eager torch, an HTTP load test, batch re-scoring vs a per-row loop.

    python -m pipelines.benchmarks.serving --sasrec artifacts/bench/runs/sasrec-seed0 \\
        --reranker artifacts/rerankers/listwise-sft-tiny/model

1. Export SASRec and the ``tiny`` listwise reranker (``recsys export``).
2. Same scorer, same inputs (the first 64 test users), in one run: eager torch (fp32, the same
   threads) vs ONNX Runtime (fused graph, fp32; int8 dynamic quantisation beside it), one user per
   call (what the CPU server runs) and 32 per call (a batch job):
   ``ratios["onnx_speedup_<model>"]`` (batch 1) and ``..._b32`` = torch seconds / ONNX fp32 seconds
   (``onnx_int8_speedup_...``: the same against the int8 graph). What int8 costs: NDCG@10 / HR@10
   of the fp32 and int8 graphs on ``--int8-users`` test users (``int8_quality``; SASRec full ranking,
   and FIRST reordering SASRec's top 20).
3. ``recsys serve`` in a subprocess on 127.0.0.1; a separate load-generating process (aiohttp) keeps C
   connections busy with ``POST /v1/recommend`` (random ML-1M users, k 10, ``--candidates`` retrieved,
   the reranker ordering the first 20) for ``--requests`` requests per level; rows
   ``recommend-tiny-c8`` / ``-c32`` with the server's defaults (micro-batching on; on CPU 1 ONNX
   Runtime thread per call) and ``...-nobatch`` with micro-batching off.
4. ``recsys rescore`` on ``--rescore-rows`` requests vs a loop that scores one row per call.
5. With ``--smollm2 RUN/model``: its FIRST scorer ONNX vs torch on 8 users, one per call, and the fp32
   roofline of that comparison (``fp32_roofline_first_smollm2``: the prompts' FLOPs at the best large-GEMM
   rate measured in the same run, so ``ratios["onnx_speedup_bound_first_smollm2"]`` is the most any fp32
   runtime could gain over torch here); then the same server with the ``smollm2-135m`` listwise reranker,
   ``--smollm2-requests`` requests per level (``--smollm2-levels``, 8 and 32 connections; micro-batching
   on and off), under a reranker deadline long enough that every answer is reranked (each row counts its
   ``fallbacks``: answers in retrieval order, which would time the fallback, not the reranker).
6. With ``--generative RUN/model``: the generative recommender exported beside SASRec and served by its
   numpy beam search (width 20, top 10), ``--generative-requests`` ``POST /v1/generate`` requests at 8
   connections per repeat (row ``generate-generative-c8``).
Run it on an otherwise idle machine: latency is what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import (
    Provenance,
    fp32_gemm_gflop_per_s,
    llama_gflop,
    serve_process,
    write_result,
)


def _time(fn, repeats: int) -> float:
    fn()                                                               # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def per_user_ms(fns: dict, inputs: tuple[list, ...], repeats: int, batches=(1, 32)) -> dict:
    """``{"b1": {"<engine>_ms_per_user": ...}, ...}``: each engine over the same inputs, ``batch`` rows per call.

    The engines take turns on every slice of the inputs (the order rotating from slice to slice) rather
    than one engine timing all its slices before the next starts: on a shared machine whose speed
    drifts by a third within minutes, a ratio of back-to-back blocks measures the drift as much as the
    engines (one such run put smollm2's ONNX / torch at 1.00x, another at 1.63x)."""
    users, out, names = len(inputs[0]), {}, list(fns)
    for batch in batches:
        total = dict.fromkeys(names, 0.0)
        for i, s in enumerate(range(0, users, batch)):
            for engine in names[i % len(names):] + names[:i % len(names)]:
                total[engine] += _time(lambda f=fns[engine], s=s, b=batch: f(*(x[s:s + b] for x in inputs)), repeats)
        out[f"b{batch}"] = {f"{engine}_ms_per_user": 1000 / users * t for engine, t in total.items()}
    return out


def first_engines(ds, reranker_dir, serve_dir) -> dict:
    """The listwise reranker's FIRST scores three ways: eager torch (fp32), ONNX Runtime, ONNX int8."""
    from recsys.llm.backbone import load_backbone
    from recsys.portable.prompts import item_titles
    from recsys.rerank.listwise import ListwiseReranker
    from serving.runtime import FirstRuntime

    first = FirstRuntime(serve_dir)
    bb = load_backbone(reranker_dir)                                 # a tiny reranker keeps its prompt format
    eager = ListwiseReranker(bb, None if bb.name == "tiny" else item_titles(ds), first.window,
                             max_history=first.max_history, bf16=False)
    fns = {"torch": eager.first_scores, "onnx": first.scores}
    if "int8" in first.meta:
        fns["onnx_int8"] = FirstRuntime(serve_dir, int8=True).scores
    return fns


def onnx_vs_torch(ds, sasrec_dir, reranker_dir, serve_dir, repeats: int, users: int = 64) -> dict:
    """Milliseconds per user of the same scorer over the first ``users`` test users, fed one at a time
    (batch 1: one request at a time) and in batches of 32 (a batch job)."""
    import torch

    from recsys.models.sasrec import SASRec
    from serving.runtime import SASRecRuntime

    hists = ds.eval_examples("test").histories[:users]
    windows = [list(range(1 + 20 * (i % 100), 21 + 20 * (i % 100))) for i in range(users)]
    sas = SASRec.from_pretrained(sasrec_dir).eval()
    rt, rt8 = SASRecRuntime(serve_dir), SASRecRuntime(serve_dir, int8=True)

    def sasrec_torch(h):
        with torch.no_grad():
            sas.user_embeddings(torch.from_numpy(rt.pad(h)))

    out = {"threads": torch.get_num_threads(), "users": users}
    sasrec = {"torch": sasrec_torch, "onnx": rt.user_vectors, "onnx_int8": rt8.user_vectors}
    for key, row in per_user_ms(sasrec, (hists,), repeats).items():
        out[f"sasrec_{key}"] = row
    for key, row in per_user_ms(first_engines(ds, reranker_dir, serve_dir), (hists, windows), repeats).items():
        out[f"first_tiny_{key}"] = row
    return out


def fp32_roofline(model_dir, serve_dir, hists, windows, row: dict, threads: int) -> dict:
    """How much faster than eager torch any fp32 runtime could score these prompts on this machine.

    The floor: each prompt's dense FLOPs (:func:`llama_gflop`, causal attention, the least any kernel must
    do) at the best large-GEMM rate of torch or ONNX Runtime measured now with ``threads`` threads, a rate
    no whole model reaches. ``row``: the :func:`per_user_ms` row of the same prompts (batch 1);
    ``onnx_speedup_bound`` = torch's measured time / the floor."""
    from serving.runtime import FirstRuntime

    first = FirstRuntime(serve_dir)
    tokens = [first.encode([h], [w])["input_ids"].shape[1] for h, w in zip(hists, windows)]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    gflop = float(np.mean([llama_gflop(config, t, causal=True) for t in tokens]))
    gemm = fp32_gemm_gflop_per_s(threads)
    floor_ms = 1000 * gflop / max(gemm["torch"], gemm["onnx"])
    return {"prompt_tokens": float(np.mean(tokens)), "gflop_per_prompt": gflop, "gemm_gflop_per_s": gemm,
            "torch_gflop_per_s": gflop / row["torch_ms_per_user"] * 1000,
            "onnx_gflop_per_s": gflop / row["onnx_ms_per_user"] * 1000,
            "floor_ms_per_user": floor_ms, "onnx_speedup_bound": row["torch_ms_per_user"] / floor_ms}


def int8_quality(ds, serve_dir, users: int, first_batch: int = 32) -> dict:
    """What int8 costs in ranking quality, fp32 vs int8 graphs on the first ``users`` test users:
    SASRec's full ranking (history excluded), and SASRec's fp32 top window (20) reordered by FIRST (a
    target outside it is a miss); NDCG@10 and HR@10 for each."""
    from recsys.metrics import compute_metrics
    from serving.runtime import FirstRuntime, SASRecRuntime

    test = ds.eval_examples("test")
    hists, targets = test.histories[:users], np.array([int(t[0]) for t in test.targets[:users]])

    def quality(order: np.ndarray) -> dict:
        hit = order == targets[:, None]
        ranks = np.where(hit.any(1), hit.argmax(1), np.inf)[:, None]
        m = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10", "hr@10"])
        return {k: m[k] for k in ("ndcg@10", "hr@10")}

    def top(rt: SASRecRuntime, k: int) -> np.ndarray:
        out = []
        for start in range(0, len(hists), 256):
            chunk = hists[start:start + 256]
            s = rt.user_vectors(chunk) @ rt.items.T
            for row, (h, t) in enumerate(zip(chunk, targets[start:start + 256])):
                h = np.asarray(h, dtype=np.int64)
                s[row, h[h != t]] = -np.inf               # history excluded, never the target (the library's rule)
            s[:, 0] = -np.inf
            out.append(np.argsort(-s, 1, kind="stable")[:, :k])
        return np.concatenate(out)

    sas32, sas8 = SASRecRuntime(serve_dir), SASRecRuntime(serve_dir, int8=True)
    result = {"users": len(hists), "sasrec": {"fp32": quality(top(sas32, 10)), "int8": quality(top(sas8, 10))}}
    first = json.loads((Path(serve_dir) / "manifest.json").read_text())["models"].get("first", {})
    if "int8" in first:
        windows = top(sas32, first["window"])
        result["first"] = {}
        for name, rt in (("fp32", FirstRuntime(serve_dir)), ("int8", FirstRuntime(serve_dir, int8=True))):
            scores = np.concatenate([rt.scores(hists[i:i + first_batch], windows[i:i + first_batch])
                                     for i in range(0, len(hists), first_batch)])
            result["first"][name] = quality(np.take_along_axis(windows, np.argsort(-scores, 1, kind="stable"), 1))
    return result


def load_test(serve_dir, users: list[str], levels: list[int], requests: int, micro_batching: bool | None,
              candidates: int = 50, threads: int | None = None, model: str = "tiny", workers: int = 1,
              repeats: int = 1, endpoint: str = "recommend", warmup: int = 20, rerank_timeout_ms: float = 1000.0,
              client_timeout_s: float = 30.0) -> list[dict]:
    """``recsys serve`` in a subprocess (``workers`` uvicorn processes); per level, ``repeats`` runs of a
    load generator process with that many connections, ``requests`` each after ``warmup`` per connection.
    A row pools the latencies of its repeats (percentiles over all of them) and lists each repeat's p99 and
    throughput: on a shared 2-core machine throughput drifts by a third from one minute to the next, and a
    single run's p99 follows it. ``fallbacks``: answers that came back in retrieval order because the
    reranker missed ``rerank_timeout_ms`` (or failed): a row with fallbacks measured the fallback, not the
    reranker. ``server_cpu_ms_per_request``: the server process's CPU time over the timed requests (one
    worker only; Linux). ``micro_batching`` None = the server's default; row names say when it is forced. ``endpoint="generate"`` sends ``POST /v1/generate`` (the generative recommender's
    beam search, width 20, k 10) instead."""
    options = ["--workers", str(workers), "--rerank-timeout-ms", str(rerank_timeout_ms)] + \
        (["--micro-batching", "on" if micro_batching else "off"] if micro_batching is not None else []) + \
        (["--threads", str(threads)] if threads else [])
    rows = []
    with serve_process(serve_dir, *options) as (url, server):
        for c in levels:
            config = {"url": url, "users": users, "connections": c, "requests": requests,
                      "endpoint": endpoint, "candidates": candidates, "warmup": warmup, "timeout_s": client_timeout_s,
                      "server_pid": server.pid if workers == 1 else None}
            runs = [json.loads(subprocess.run([sys.executable, "-m", "pipelines.benchmarks.loadgen", json.dumps(config)],
                                              capture_output=True, text=True, check=True).stdout) for _ in range(repeats)]
            lat = np.concatenate([r["lat"] for r in runs])
            cpu = [r["server_cpu_s"] for r in runs]
            suffix = {None: "", True: "-batched", False: "-nobatch"}[micro_batching]
            rows.append({"name": f"{endpoint}-{model}-c{c}{suffix}", "connections": c,
                         "micro_batching": {None: "default", True: "on", False: "off"}[micro_batching],
                         "candidates": candidates if endpoint == "recommend" else None,
                         "ort_threads": threads or "auto", "workers": workers,
                         "rerank_timeout_ms": rerank_timeout_ms if endpoint == "recommend" else None,
                         "requests": len(lat), "repeats": repeats,
                         "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                         "p99_ms": float(np.percentile(lat, 99)), "rps": len(lat) / sum(r["seconds"] for r in runs),
                         "repeats_p99_ms": [round(float(np.percentile(r["lat"], 99)), 2) for r in runs],
                         "repeats_rps": [round(len(r["lat"]) / r["seconds"], 1) for r in runs],
                         "server_cpu_ms_per_request": None if None in cpu else round(1000 * sum(cpu) / len(lat), 3),
                         "errors": sum(r["errors"] for r in runs), "fallbacks": sum(r["fallbacks"] for r in runs),
                         "warmup_errors": sum(r["warmup_errors"] for r in runs),
                         "warmup_fallbacks": sum(r["warmup_fallbacks"] for r in runs)})
    return rows


def rescore_vs_loop(serve_dir, users: list[str], rows: int, tmp: Path) -> dict:
    import polars as pl

    from serving.rescore import rescore
    from serving.runtime import Recommender, RecommendQuery

    rng = np.random.default_rng(0)
    req = pl.DataFrame({"request_id": [f"r{i}" for i in range(rows)],
                        "user_id": [users[i] for i in rng.integers(0, len(users), rows)]})
    req.write_parquet(tmp / "requests.parquet")
    shutil.rmtree(tmp / "rescored", ignore_errors=True)          # else a finished job "resumes" in no time
    t = time.perf_counter()
    rescore(serve_dir, tmp / "requests.parquet", tmp / "rescored", chunk_size=1000, progress=False)
    t_job = time.perf_counter() - t
    scored = sum(c["scored"] + c["rejected"] for c in json.loads((tmp / "rescored" / "manifest.json").read_text())
                 ["chunks"].values())
    if scored != rows:
        raise RuntimeError(f"the re-scoring job accounted for {scored} of {rows} rows")
    rec = Recommender(serve_dir)
    hist = pl.read_parquet(Path(serve_dir) / "histories.parquet")
    table = dict(zip(hist["user_id"].to_list(), hist["history"].to_list()))
    n_loop = min(rows, 500)
    t = time.perf_counter()
    for u in req["user_id"].to_list()[:n_loop]:
        rec.recommend_batch([RecommendQuery(list(table[u]), 10, candidates=50)])
    t_loop = time.perf_counter() - t
    return {"rows": rows, "job_rows_per_s": rows / t_job, "loop_rows": n_loop, "loop_rows_per_s": n_loop / t_loop}


def zero_shot_smollm2(ds, out: Path) -> Path:
    """SmolLM2-135M-Instruct as :func:`recsys.llm.backbone.smollm2_dir` converts it, not fine-tuned, as a listwise reranker directory:
    enough to measure serving latency with a real 135M backbone."""
    from pipelines.rerank import zero_shot_reranker

    return zero_shot_reranker(ds, out / "smollm2-zero-shot")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m")
    p.add_argument("--sasrec", default="artifacts/bench/runs/sasrec-seed0")
    p.add_argument("--reranker", default="artifacts/rerankers/listwise-sft-tiny/model")
    p.add_argument("--out", default="artifacts/serve-bench")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--candidates", type=int, default=50, help="retrieved candidates per request (the reranker "
                                                                   "orders the first 20)")
    p.add_argument("--levels", type=int, nargs="+", default=[8, 32])
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the tiny server")
    p.add_argument("--load-repeats", type=int, default=3, help="load-generator runs per level (pooled in the row)")
    p.add_argument("--rescore-rows", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smollm2", help="a listwise smollm2-135m reranker directory (RUN/model), or `zero-shot` "
                                     "for the converted model as is: also export and load-test it (--smollm2-levels "
                                     "connections, micro-batching on and off, --smollm2-requests requests each)")
    p.add_argument("--smollm2-requests", type=int, default=128, help="per level and micro-batching setting")
    p.add_argument("--smollm2-levels", type=int, nargs="+", default=[8, 32])
    p.add_argument("--smollm2-rerank-timeout-ms", type=float, default=600_000.0,
                   help="the smollm2 server's reranker deadline: long enough that every answer is reranked")
    p.add_argument("--generative", help="a generative recommender (RUN/model, item or token layout): exported beside "
                                        "SASRec and load-tested on POST /v1/generate at 8 connections")
    p.add_argument("--generative-requests", type=int, default=3000)
    p.add_argument("--int8-users", type=int, default=6040, help="test users of the int8 quality rows (tiny)")
    p.add_argument("--smollm2-int8-users", type=int, default=100, help="the same for smollm2 (~1 s per user)")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.serving")

    from recsys.data import PreparedDataset
    from serving.export import export

    ds = PreparedDataset.load(a.data)
    out = Path(a.out)
    serve_dir = export(ds, Path(a.sasrec) / "model", out / "serve", a.reranker, quantize=True)
    manifest = json.loads((serve_dir / "manifest.json").read_text())
    speed = onnx_vs_torch(ds, Path(a.sasrec) / "model", a.reranker, serve_dir, a.repeats)
    users = ds.users["user_id"].to_list()
    rows = load_test(serve_dir, users, a.levels, a.requests, None, a.candidates, workers=a.workers,  # server defaults
                     repeats=a.load_repeats)
    rows += load_test(serve_dir, users, a.levels, a.requests, False, a.candidates, workers=a.workers,  # one per call
                      repeats=a.load_repeats)
    job = rescore_vs_loop(serve_dir, users, a.rescore_rows, out)
    int8, roofline = {"tiny": int8_quality(ds, serve_dir, a.int8_users)}, None
    if a.smollm2:                           # a ~1.7 s forward per request on this CPU: few requests, batch 1 only
        a.smollm2 = zero_shot_smollm2(ds, out) if a.smollm2 == "zero-shot" else a.smollm2
        smol_dir = export(ds, Path(a.sasrec) / "model", out / "serve-smollm2", a.smollm2, quantize=True)
        manifest["models"]["first_smollm2"] = json.loads((smol_dir / "manifest.json").read_text())["models"]["first"]
        hists = ds.eval_examples("test").histories[:8]
        windows = [list(range(1 + 20 * i, 21 + 20 * i)) for i in range(8)]
        for key, row in per_user_ms(first_engines(ds, a.smollm2, smol_dir), (hists, windows), 1, (1,)).items():
            speed[f"first_smollm2_{key}"] = row
        roofline = fp32_roofline(a.smollm2, smol_dir, hists, windows, speed["first_smollm2_b1"], speed["threads"])
        slow = {"model": "smollm2", "warmup": 1, "rerank_timeout_ms": a.smollm2_rerank_timeout_ms,
                "client_timeout_s": 900.0}           # the reranker measured, not the retrieval-order fallback
        for batching in (None, False):
            rows += load_test(smol_dir, users, a.smollm2_levels, a.smollm2_requests, batching, a.candidates, **slow)
        int8["smollm2"] = {"first": int8_quality(ds, smol_dir, a.smollm2_int8_users, first_batch=4)["first"],
                           "users": a.smollm2_int8_users}
    if a.generative:                        # the trie-constrained beam search (width 20) behind /v1/generate
        gen_dir = export(ds, Path(a.sasrec) / "model", out / "serve-generative", generative_dir=a.generative)
        manifest["models"]["generative"] = json.loads((gen_dir / "manifest.json").read_text())["models"]["generative"]
        rows += load_test(gen_dir, users, [8], a.generative_requests, None, model="generative", endpoint="generate",
                          repeats=a.load_repeats)
    write_result("serving", provenance, {
        "dataset": "ml-1m", "device": "cpu", "server": f"{a.workers} uvicorn worker(s) (uvloop, httptools) for tiny, 1 for "
                                                      "smollm2, ONNX Runtime CPU provider; "
                                                      "defaults (micro-batching on, max 32 / 2 ms; 1 ORT thread per "
                                                      "call) unless -nobatch; aiohttp load generator in its own process",
        "parity_max_abs": {k: v["parity_max_abs"] for k, v in manifest["models"].items()},
        "int8_max_abs_change": {k: v["int8"]["max_abs_change"] for k, v in manifest["models"].items() if "int8" in v},
        "ort_fusions": {k: v.get("ort_fusions", {}) for k, v in manifest["models"].items()},
        "int8_quality": int8,
        "onnx_vs_torch": speed, "fp32_roofline_first_smollm2": roofline, "rows": rows, "rescore": job,
        "smollm2_reranker": str(a.smollm2 or "-"),
        "generative": str(a.generative or "-"),
        "ratios": {**{"onnx_speedup_" + key.removesuffix("_b1"): x["torch_ms_per_user"] / x["onnx_ms_per_user"]
                      for key, x in speed.items() if isinstance(x, dict)},
                   **{"onnx_int8_speedup_" + key.removesuffix("_b1"): x["torch_ms_per_user"] / x["onnx_int8_ms_per_user"]
                      for key, x in speed.items() if isinstance(x, dict) and "onnx_int8_ms_per_user" in x},
                   **({"onnx_speedup_bound_first_smollm2": roofline["onnx_speedup_bound"]} if roofline else {}),
                   "rescore_job/loop rows_per_s": job["job_rows_per_s"] / job["loop_rows_per_s"]},
    })


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
