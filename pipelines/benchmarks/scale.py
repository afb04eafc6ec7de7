"""Beyond one process: batch re-scoring on a real Ray cluster (and the local engine beside it), a 10M-item
index, data-parallel SASRec training with one and two processes, and what 1M items / 100M users would cost.

    recsys quickstart                                          # the README's main job: writes artifacts/
    python -m pipelines.benchmarks.scale --parts ray ddp plan --quickstart artifacts
    python -m pipelines.benchmarks.scale --parts index --quickstart artifacts      # 10M vectors: ~12 GB of RAM

Each part replaces its own rows of ``results/scale.json`` and keeps the others'.

``ray``: ``--rows`` requests (known users of the quickstart deployment, ``k`` 10, a unique ``request_id``
each) re-scored in chunks of ``--chunk-size`` by the serving stack (SASRec + FAISS + the FIRST reranker).
``rescore-local``: the local engine in this process. ``rescore-ray-cluster``: a cluster started here with
``ray start --head`` (no CPUs) and two worker nodes of one CPU each (separate raylets, token authentication),
``recsys rescore --engine ray --workers 2`` run against it through ``RAY_ADDRESS``; first a clean run (its
rows/s over the whole command, and after its first chunk, i.e. without joining the cluster and loading the
models), then a second job in which one worker node's raylet is SIGKILLed once ``--kill-after`` chunks are in
the manifest; whatever that run does, a node is added back and the command is run again, and
:func:`serving.rescore.audit` counts the input rows without an answer (``lost``) and those answered twice
(``duplicated``). The cluster is stopped at the end, every process of it.

``index``: a catalogue of ``--index-vectors`` (10M) item vectors shaped like a real one: each is one of the
SASRec item vectors of the quickstart (``runs/default-seed0/sasrec``) plus Gaussian noise of ``--index-noise``
times their mean norm, the items drawn with Zipf(1.1) popularity (heavy-tailed cluster sizes, nothing like
the separated clusters IVF partitions exactly); 1,000 queries drawn the same way. Flat (exact inner product)
gives the true top-100; each row: recall@100 against it, queries per second (one batched call, all cores),
build seconds and ``memory_mb`` (the serialised index). Rows ``<factory>[-mips]-10m``: HNSW, IVF-Flat, IVF-PQ
with exact re-ranking of 4x the candidates (``RFlat``), IVF-PQ alone (codes only: the smallest), IVF-PQ
re-ranked by 8-bit scalar-quantised vectors (``Refine(SQ8)``), IVF over 8-bit scalar-quantised vectors
(``SQ8``), and the IVF-Flat index split into 2 shards (``IndexShards``: what spreading a catalogue over
machines looks like); ``--index-factories`` measures some of them beside Flat and keeps the others' rows;
``-mips``: built in L2 on the vectors augmented by :func:`recsys.retrieval.index.augment_items` (what
``ItemIndex.build(..., mips=True)`` does), the others in inner product.

``plan``: what 1M items and 100M users would cost, per stage, computed from per-unit costs measured on this
machine and recorded in ``results/``: memory per indexed vector from this file's ``index`` rows (the
largest catalogue recorded), SASRec training samples/s (``sasrec_throughput``), retrieval queries/s at 1M
vectors (``retrieval``), re-scored rows/s per process (this file's ``rescore-local``) and server CPU per
online request (``serving_cpu``). Each ``plan-*`` row names its inputs; nothing in it is measured at that
scale.

``ddp``: the ML-1M SASRec recipe (``sasrec_ml1m.yaml``) for ``--ddp-epochs`` epochs on the quickstart's
prepared data, once with one process and once with two (``--devices 2 --strategy ddp``, gloo, one thread
each), the same seed: validation NDCG@10 (gathered over both processes' users) and samples per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import RESULTS, Provenance, ray_cluster, write_result


def request_file(serve_dir: Path, rows: int, path: Path) -> Path:
    """``rows`` requests of the deployment's known users, in turn, ``k`` 10, ids ``q0``, ``q1``, ..."""
    import polars as pl

    users = pl.read_parquet(serve_dir / "histories.parquet")["user_id"].to_list()
    pl.DataFrame({"request_id": [f"q{i}" for i in range(rows)], "user_id": [users[i % len(users)] for i in range(rows)],
                  "k": [10] * rows}).write_parquet(path)
    return path


def rescore_command(serve_dir: Path, requests: Path, output: Path, chunk_size: int) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "rescore", "--serve-dir", str(serve_dir), "--input",
            str(requests), "--output", str(output), "--chunk-size", str(chunk_size), "--engine", "ray", "--workers", "2"]


def chunks_done(output: Path) -> int:
    try:
        return len(json.loads((output / "manifest.json").read_text())["chunks"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def ray_rows(serve_dir: Path, out: Path, rows: int, chunk_size: int, kill_after: int) -> list[dict]:
    import shutil

    from serving.rescore import audit, rescore

    shutil.rmtree(out / "rescore", ignore_errors=True)
    (out / "rescore").mkdir(parents=True)
    requests = request_file(serve_dir, rows, (out / "rescore").joinpath("requests.parquet"))
    start = time.perf_counter()
    rescore(serve_dir, requests, out / "rescore" / "local", chunk_size, progress=False)
    local_s = time.perf_counter() - start
    result = [{"name": "rescore-local", "metrics": {**audit(requests, out / "rescore" / "local"),
                                                    "rows_per_s": round(rows / local_s, 1)},
               "seconds": round(local_s, 1), "engine": "local, this process"}]
    with ray_cluster(workers=2, cpus=1) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        clean = out / "rescore" / "cluster"
        start = time.perf_counter()
        job = subprocess.Popen(rescore_command(serve_dir, requests, clean, chunk_size), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while chunks_done(clean) < 1 and job.poll() is None:           # joining, actors loading their models
            time.sleep(0.05)
        first_chunk_s = time.perf_counter() - start
        if job.wait(timeout=1800):
            raise RuntimeError(f"the cluster rescore exited with {job.returncode}")
        cluster_s = time.perf_counter() - start
        killed = out / "rescore" / "cluster-killed"
        job = subprocess.Popen(rescore_command(serve_dir, requests, killed, chunk_size), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while chunks_done(killed) < kill_after and job.poll() is None:
            time.sleep(0.2)
        at_kill = chunks_done(killed)
        cluster.kill_node(cluster.worker_raylets[0])
        try:
            _, err = job.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            job.kill()
            _, err = job.communicate()
        first_exit, after_first = job.returncode, chunks_done(killed)
        cluster.add_node(1)                                          # a replacement machine joins
        subprocess.run(rescore_command(serve_dir, requests, killed, chunk_size), env=env, check=True,
                       capture_output=True, timeout=1800)
        checked = audit(requests, killed)
    n_chunks = -(-rows // chunk_size)
    result.append({"name": "rescore-ray-cluster", "metrics": {
        **checked, "rows_per_s": round(rows / cluster_s, 1),
        "rows_per_s_after_first_chunk": round((rows - chunk_size) / (cluster_s - first_chunk_s), 1),
        "seconds_to_first_chunk": round(first_chunk_s, 1), "clean_run_lost": audit(requests, clean)["lost"],
        "clean_run_duplicated": audit(requests, clean)["duplicated"], "chunks": n_chunks,
        "chunks_when_killed": at_kill, "chunks_after_killed_run": after_first, "killed_run_exit_code": first_exit,
        "rows_per_s_vs_local": round(local_s / cluster_s, 2)},
        "seconds": round(cluster_s, 1), "killed_run_stderr_tail": (err or "")[-300:],
        "engine": "Ray Data on a 3-node cluster on this machine: a head with no CPUs, two worker nodes of 1 CPU "
                  "(2 scorer actors); one worker node killed mid-job, one added back, the job rerun"})
    return result


def ddp_rows(data_dir: Path, out: Path, epochs: int) -> list[dict]:
    import shutil

    from recsys.data import PreparedDataset

    users = PreparedDataset.load(data_dir).n_users
    result = []
    for devices in (1, 2):
        run = out / f"ddp-{devices}proc"
        command = [sys.executable, "-m", "pipelines.cli", "train", "retriever", "--model", "sasrec", "--config",
                   "pipelines/configs/sasrec_ml1m.yaml", "--data", str(data_dir), "--out", str(run),
                   "--max-epochs", str(epochs), "--threads", "1", "--set", "patience=1000"]
        if devices > 1:
            command += ["--devices", str(devices), "--strategy", "ddp"]
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, timeout=7200)
        seconds = time.perf_counter() - start
        train = json.loads((run / "train.json").read_text())
        result.append({"name": f"ddp-sasrec-{devices}proc", "metrics": {
            "val_ndcg@10": train["best_val_ndcg@10"], "epochs": train["epochs"],
            "samples_per_s": round(train["epochs"] * users / train["seconds"], 1)}, "seconds": round(seconds, 1),
            "processes": devices, "samples_per_s": "training sequences (one per user) per second of the run's "
                                                   "training wall clock, validation included"})
    return result


INDEXES = [("HNSW32,Flat", {"efSearch": 256}, True), ("IVF4096,Flat", {"nprobe": 32}, False),
           ("IVF4096,Flat", {"nprobe": 32}, True), ("IVF4096,PQ16,RFlat", {"nprobe": 32, "k_factor": 4}, True),
           ("IVF4096,PQ32", {"nprobe": 32}, True), ("IVF4096,PQ13,Refine(SQ8)", {"nprobe": 32, "k_factor": 8}, True),
           ("IVF4096,SQ8", {"nprobe": 32}, True), ("IVF4096,Flat[2 shards]", {"nprobe": 32}, True)]
"""(factory, search parameters, through the L2 reduction of inner product) of the ``index`` part;
``[2 shards]``: the factory built twice, over the two halves of the catalogue; ``Refine(SQ8)``: PQ codes
shortlist 8x the candidates, 8-bit scalar-quantised vectors re-rank them (under 100 bytes a vector);
``SQ8``: the inverted lists hold 8-bit scalar-quantised vectors (a quarter of Flat's bytes)."""


def row_key(factory: str, mips: bool) -> str:
    """A row of :data:`INDEXES` as ``--index-factories`` names it: ``IVF4096,SQ8-mips``."""
    return f"{factory}{'-mips' if mips else ''}"


def zipf_catalogue(anchors: np.ndarray, n: int, noise: float, rng) -> np.ndarray:
    """(n, d) float32 vectors: anchors drawn with Zipf(1.1) weights, plus N(0, (noise * mean norm)^2 / d)."""
    weights = 1.0 / np.arange(1, len(anchors) + 1) ** 1.1
    order = rng.permutation(len(anchors))
    sigma = noise * float(np.linalg.norm(anchors, axis=1).mean()) / np.sqrt(anchors.shape[1])
    out = np.empty((n, anchors.shape[1]), dtype=np.float32)
    for start in range(0, n, 1_000_000):                     # in blocks: the noise of 10M rows at once is 2.5 GB
        m = min(1_000_000, n - start)
        picks = order[rng.choice(len(anchors), size=m, p=weights / weights.sum())]
        out[start:start + m] = anchors[picks] + sigma * rng.standard_normal((m, anchors.shape[1]), dtype=np.float32)
    return out


def build_index(factory: str, vectors: np.ndarray, metric: int, rng):
    """A trained and filled FAISS index (``[2 shards]``: an ``IndexShards`` of two, one per half)."""
    import faiss

    d = vectors.shape[1]
    if factory.endswith("[2 shards]"):
        shards = faiss.IndexShards(d, True, True)                # threaded, successive ids
        for half in np.array_split(vectors, 2):
            shards.add_shard(build_index(factory.removesuffix("[2 shards]"), half, metric, rng))   # faiss keeps it
        return shards
    index = faiss.index_factory(d, factory, metric)
    index.train(vectors[rng.choice(len(vectors), size=min(len(vectors), 256 * 1024), replace=False)])
    for start in range(0, len(vectors), 1_000_000):
        index.add(vectors[start:start + 1_000_000])
    return index


def set_search(index, params: dict) -> None:
    import faiss

    parts = [faiss.downcast_index(index.at(i)) for i in range(index.count())] \
        if isinstance(index, faiss.IndexShards) else [index]
    for part in parts:
        for key, value in params.items():
            if key == "k_factor":
                faiss.downcast_index(part).k_factor = value
            else:
                faiss.ParameterSpace().set_index_parameter(part, key, value)


def index_bytes(index) -> int:
    import faiss

    if isinstance(index, faiss.IndexShards):
        return sum(index_bytes(faiss.downcast_index(index.at(i))) for i in range(index.count()))
    return int(faiss.serialize_index(index).nbytes)


def index_rows(sasrec_dir: Path, n: int, noise: float, queries: int = 1000, k: int = 100,
               indexes: list[tuple] = INDEXES) -> list[dict]:
    """The ``index`` part: Flat, then every row of ``indexes`` (:data:`INDEXES`), on one catalogue (module
    docstring)."""
    import faiss
    from safetensors.numpy import load_file

    from recsys.retrieval.index import augment_items, mips_width, pad_queries

    rng = np.random.default_rng(0)
    anchors = load_file(str(sasrec_dir / "model.safetensors"))["item_emb.weight"][1:].astype(np.float32)  # no padding
    vectors = zipf_catalogue(anchors, n, noise, rng)
    q = zipf_catalogue(anchors, queries, noise, rng)
    scale = f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    build = time.perf_counter() - start
    start = time.perf_counter()
    _, exact = flat.search(q, k)
    flat_s = time.perf_counter() - start
    rows = [{"name": f"Flat-{scale}", "metrics": {"recall@100": 1.0, "qps": round(queries / flat_s, 1),
                                                  "memory_mb": round(index_bytes(flat) / 2**20, 1),
                                                  "build_seconds": round(build, 1), "qps_vs_flat": 1.0},
             "seconds": round(build + flat_s, 1), "mips": False}]
    del flat
    max_norm = float(np.linalg.norm(vectors, axis=1).max())
    for factory, params, mips in indexes:
        width = mips_width(vectors.shape[1], factory)
        data = augment_items(vectors, max_norm, width) if mips else vectors
        start = time.perf_counter()
        index = build_index(factory, data, faiss.METRIC_L2 if mips else faiss.METRIC_INNER_PRODUCT, rng)
        build = time.perf_counter() - start
        del data
        set_search(index, params)
        query = pad_queries(q, width) if mips else q
        index.search(query[:10], k)                                            # warm-up
        start = time.perf_counter()
        _, found = index.search(query, k)
        seconds = time.perf_counter() - start
        recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))
        rows.append({"name": f"{row_key(factory, mips)}-{scale}", "search": params, "mips": mips,
                     "metrics": {"recall@100": round(recall, 4), "qps": round(queries / seconds, 1),
                                 "memory_mb": round(index_bytes(index) / 2**20, 1), "build_seconds": round(build, 1),
                                 "qps_vs_flat": round(flat_s / seconds, 2)}, "seconds": round(build + seconds, 1)})
        print(rows[-1], flush=True)
        del index
    for r in rows:
        r |= {"vectors": n, "dim": int(vectors.shape[1]), "queries": queries, "anchors": len(anchors),
              "threads": faiss.omp_get_max_threads()}
    return rows


def plan_rows(rows: list[dict], items: int = 1_000_000, users: int = 100_000_000, dim: int = 64,
              history: int = 200) -> list[dict]:
    """The ``plan`` part (module docstring) from the ``index`` and ``rescore-local`` rows in ``rows`` and the
    other result files."""
    def result(name: str) -> dict:
        return json.loads((RESULTS / f"{name}.json").read_text())

    def row(source: list[dict], name: str) -> dict:
        return next(r for r in source if r["name"] == name)

    MB = 2**20
    sasrec = max(result("sasrec_throughput")["rows"], key=lambda r: r["metrics"]["samples_per_s"])
    retrieval = result("retrieval")["rows"]
    hnsw = row(retrieval, "HNSW32,Flat(ef_search=128)-synthetic1m")
    ivfpq = row(retrieval, "IVF1024,PQ16(nprobe=32)-synthetic1m")
    rescore = row(rows, "rescore-local")
    online = row(result("serving_cpu")["rows"], "current-c32")
    largest = max(r["vectors"] for r in rows if "vectors" in r)
    out = [{"name": "plan-tables", "metrics": {
        "item_table_mb": round(items * dim * 4 / MB), "item_table_training_mb": round(4 * items * dim * 4 / MB),
        "histories_mb": round(users * history * 4 / MB)},
        "inputs": f"{items:,} items x {dim} fp32 (x4 with gradients and AdamW's two moments); {users:,} users x "
                  f"{history} int32 history ids (SASRec reads histories, it keeps no user table)"}]
    for r in rows:
        if r.get("vectors") == largest and r["name"].startswith(("Flat", "HNSW", "IVF")):
            per_vector = r["metrics"]["memory_mb"] * MB / largest
            out.append({"name": "plan-index-" + r["name"].rsplit("-", 1)[0], "metrics": {
                "memory_mb": round(per_vector * items / MB), "recall@100_measured": r["metrics"]["recall@100"]},
                "inputs": f"{per_vector:.0f} bytes per vector measured on {largest:,} vectors (row {r['name']})"})
    out += [
        {"name": "plan-sasrec-epoch", "metrics": {
            "node_hours_per_epoch": round(users / sasrec["metrics"]["samples_per_s"] / 3600, 1)},
         "inputs": f"{sasrec['metrics']['samples_per_s']} training sequences/s on this 2-core machine "
                   f"(sasrec_throughput row {sasrec['name']}); data-parallel over N nodes divides it by N"},
        {"name": "plan-candidates", "metrics": {
            "node_hours_hnsw": round(users / hnsw["metrics"]["qps"] / 3600, 2),
            "node_hours_ivfpq": round(users / ivfpq["metrics"]["qps"] / 3600, 2)},
         "inputs": f"top-100 searches of 1M vectors per second on this machine: {hnsw['metrics']['qps']:.0f} "
                   f"(HNSW32, recall {hnsw['metrics']['recall@100']:.2f}), {ivfpq['metrics']['qps']:.0f} "
                   f"(IVF1024,PQ16, recall {ivfpq['metrics']['recall@100']:.2f}); retrieval only, not the user "
                   f"state"},
        {"name": "plan-rescore", "metrics": {
            "process_hours": round(users / rescore["metrics"]["rows_per_s"] / 3600, 1)},
         "inputs": f"{rescore['metrics']['rows_per_s']} rows/s per rescore process (row rescore-local: SASRec + "
                   f"FAISS + FIRST over 20, one user each); a Ray cluster runs one process per CPU"},
        {"name": "plan-online", "metrics": {
            "requests_per_core_s": round(1000 / online["metrics"]["server_cpu_ms_per_request"])},
         "inputs": f"{online['metrics']['server_cpu_ms_per_request']} ms of server CPU per /v1/recommend "
                   f"(serving_cpu row {online['name']}); replicas behind a load balancer add cores"}]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["ray", "ddp", "index", "plan"],
                   default=["ray", "ddp", "index", "plan"])
    p.add_argument("--quickstart", default="artifacts", help="output directory of `recsys quickstart`")
    p.add_argument("--rows", type=int, default=6000, help="ray: requests to re-score")
    p.add_argument("--chunk-size", type=int, default=500, help="ray: rows per chunk")
    p.add_argument("--kill-after", type=int, default=3, help="ray: chunks in the manifest before a node is killed")
    p.add_argument("--ddp-epochs", type=int, default=3, help="ddp: epochs of each run")
    p.add_argument("--index-vectors", type=int, default=10_000_000, help="index: catalogue size")
    p.add_argument("--index-noise", type=float, default=0.5, help="index: noise norm / mean item vector norm")
    p.add_argument("--index-factories", nargs="+", metavar="ROW",
                   help="index: measure only these rows beside Flat (e.g. 'IVF4096,SQ8-mips'); the part's other "
                        "rows in the result file are kept")
    p.add_argument("--out", default="artifacts/scale")
    a = p.parse_args(argv)
    known = {row_key(f, mips) for f, _, mips in INDEXES}
    if a.index_factories and not set(a.index_factories) <= known:
        raise SystemExit(f"--index-factories: unknown {sorted(set(a.index_factories) - known)}; known: {sorted(known)}")
    provenance = Provenance("pipelines.benchmarks.scale")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_dir = Path(a.quickstart) / "runs" / "default-seed0" / "serve"
    if not (serve_dir / "manifest.json").exists():
        raise SystemExit(f"{serve_dir}: no deployment; run `recsys quickstart --out {a.quickstart}` first")
    if "ray" in a.parts and not os.access(Path(sys.executable).with_name("ray"), os.X_OK):
        raise SystemExit("the ray part needs Ray's `ray` command: pip install 'ray[data]'")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    rows = []
    if "ray" in a.parts:
        rows += ray_rows(serve_dir, out, a.rows, a.chunk_size, a.kill_after)
    if "ddp" in a.parts:
        rows += ddp_rows(Path(a.quickstart) / "data" / "ml-1m", out, a.ddp_epochs)
    if "index" in a.parts:
        chosen = [i for i in INDEXES if not a.index_factories or row_key(i[0], i[2]) in a.index_factories]
        rows += index_rows(Path(a.quickstart) / "runs" / "default-seed0" / "sasrec" / "model", a.index_vectors,
                           a.index_noise, indexes=chosen)
    previous = RESULTS / "scale.json"
    kept = [r for r in json.loads(previous.read_text())["rows"] if r["name"] not in {r["name"] for r in rows}] \
        if previous.exists() else []
    if "plan" in a.parts:                                  # from the rows just measured and those kept
        planned = plan_rows(kept + rows)
        kept = [r for r in kept if not r["name"].startswith("plan-")]
        rows += planned
    for r in rows:
        r |= {"commit": provenance.commit, "date": provenance.date}        # parts are recorded at different times
    path = write_result("scale", provenance, {"rows": kept + rows})
    for r in rows:
        print(r["name"], r["metrics"], *([r["seconds"], "s"] if "seconds" in r else [r["inputs"]]))
    print(f"scale: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
