"""Beyond one process: batch re-scoring on a real Ray cluster (and the local engine beside it), data-parallel
SASRec training with one and two processes.

    recsys quickstart                                          # the README's main job: writes artifacts/
    python -m pipelines.benchmarks.scale --parts ray --quickstart artifacts
    python -m pipelines.benchmarks.scale --parts ddp --quickstart artifacts

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["ray", "ddp"], default=["ray", "ddp"])
    p.add_argument("--quickstart", default="artifacts", help="output directory of `recsys quickstart`")
    p.add_argument("--rows", type=int, default=6000, help="ray: requests to re-score")
    p.add_argument("--chunk-size", type=int, default=500, help="ray: rows per chunk")
    p.add_argument("--kill-after", type=int, default=3, help="ray: chunks in the manifest before a node is killed")
    p.add_argument("--ddp-epochs", type=int, default=3, help="ddp: epochs of each run")
    p.add_argument("--out", default="artifacts/scale")
    a = p.parse_args(argv)
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
    previous = RESULTS / "scale.json"
    kept = [r for r in json.loads(previous.read_text())["rows"] if r["name"] not in {r["name"] for r in rows}] \
        if previous.exists() else []
    for r in rows:
        r |= {"commit": provenance.commit, "date": provenance.date}        # parts are recorded at different times
    path = write_result("scale", provenance, {"rows": kept + rows})
    for r in rows:
        print(r["name"], r["metrics"], r["seconds"], "s")
    print(f"scale: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
