"""Baselines on ML-1M: popularity and SASRec (several seeds), leave-one-out, full ranking, history masked.

    python -m pipelines.benchmarks.baselines_ml1m --seeds 0 1 --workers 2

Writes ``pipelines/benchmarks/results/baselines_ml1m.json``; ``python -m pipelines.benchmarks.render``
puts the table into BENCHMARKS.md. Seeds train in parallel worker processes (``--workers``), each
with ``cores / workers`` torch threads; ``seconds`` is each run's own training wall-clock time.

A killed benchmark resumes when rerun with the same arguments and ``--artifacts``: a finished seed
(its ``train.json`` holds the same config) is evaluated without retraining, an interrupted one
continues exactly from its last checkpoint, its time budget and ``seconds`` spanning both runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipelines.benchmarks.common import Provenance, write_result

METRICS = ["hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"]
PUBLISHED = {"sasrec (generative-recommenders README, sampled softmax)": {"hr@10": 0.2853, "ndcg@10": 0.1603,
                                                                          "hr@50": 0.5474, "ndcg@50": 0.2185},
             "hstu-large": {"hr@10": 0.3294, "ndcg@10": 0.1893}}


def _train_and_evaluate(data_dir: str, out: str, recipe: str, seed: int, threads: int, overrides: dict) -> dict:
    import dataclasses
    import json

    from pipelines.config import load_config
    from pipelines.jobs import evaluate_model
    from pipelines.train import RESUMABLE_CHANGES, SASRecTrainConfig, train_sasrec
    from recsys.data import PreparedDataset

    ds = PreparedDataset.load(data_dir)
    config = load_config(SASRecTrainConfig, recipe, {**overrides, "seed": seed, "num_threads": threads})
    done = Path(out) / "train.json"
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    if not (done.exists() and {k: v for k, v in json.loads(done.read_text())["config"].items()
                               if k not in RESUMABLE_CHANGES} == identity):
        train_sasrec(ds, out, config, progress=False)  # resumes from out/checkpoints/last.ckpt if present
    summary = json.loads(done.read_text())
    metrics = evaluate_model(ds, out, "test", METRICS, progress=False)
    return {"name": "sasrec", "seed": seed, "metrics": {m: metrics[m] for m in METRICS},
            "seconds": round(summary["seconds"], 1), "epochs": summary["epochs"],
            "best_val_ndcg@10": summary["best_val_ndcg@10"], "num_users": metrics["num_queries"],
            "val_curve": validation_curve(out)}


def validation_curve(run_dir: str | Path) -> list[list[float]]:
    """[[epoch, val ndcg@10], ...] from the run's CSV logs (all invocations, in order)."""
    import polars as pl

    frames = [pl.read_csv(f) for f in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"))]
    if not frames:
        return []
    df = pl.concat(frames, how="diagonal_relaxed").filter(pl.col("val/ndcg@10").is_not_null())
    return [[int(e) + 1, round(float(v), 5)] for e, v in df.select("epoch", "val/ndcg@10").iter_rows()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2, help="seeds trained at once")
    p.add_argument("--recipe", default=str(Path(__file__).parents[1] / "configs" / "sasrec_ml1m.yaml"))
    p.add_argument("--artifacts", default="artifacts/bench", help="where data and runs are written")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="training budget per seed")
    p.add_argument("--threads", type=int, help="torch threads per seed (default: cores / workers)")
    p.add_argument("--variant", help="a name for a variant of the recipe or code: writes "
                                     "results/baselines_ml1m_<variant>.json beside the main result")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.baselines_ml1m")

    from pipelines.jobs import evaluate_model
    from pipelines.train import train_popularity
    from recsys.data import PrepareConfig, load_dataset, prepare

    root = Path(a.artifacts)
    t = time.time()
    ds = prepare(load_dataset("ml-1m"), root / "data" / "ml-1m", PrepareConfig())
    prepare_seconds = time.time() - t
    t = time.time()
    train_popularity(ds, root / "runs" / "popularity")
    pop_seconds = time.time() - t
    pop = evaluate_model(ds, root / "runs" / "popularity", "test", METRICS, progress=False)
    rows = [{"name": "popularity", "seed": None, "metrics": {m: pop[m] for m in METRICS}, "seconds": round(pop_seconds, 2),
             "num_users": pop["num_queries"]}]

    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    overrides = {"max_epochs": a.max_epochs, "max_minutes": a.max_minutes}
    # spawn, not fork: forking after polars / torch started their thread pools deadlocks the children.
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_train_and_evaluate, str(ds.directory), str(root / "runs" / f"sasrec-seed{s}"), a.recipe,
                            s, threads, overrides) for s in a.seeds]
        rows += [j.result() for j in jobs]

    sas = [r for r in rows if r["name"] == "sasrec"]
    mean = {m: sum(r["metrics"][m] for r in sas) / len(sas) for m in METRICS}
    write_result(f"baselines_ml1m_{a.variant}" if a.variant else "baselines_ml1m", provenance, {
        **({"variant": a.variant} if a.variant else {}), "dataset": "ml-1m", "protocol": "leave-one-out by timestamp (file order among ties), full ranking over "
                                        f"{ds.n_items} items, history masked, ties broken by a fixed random item order",
        "recipe": Path(a.recipe).name, "prepare_seconds": round(prepare_seconds, 2), "rows": rows,
        "sasrec_mean": mean, "published": PUBLISHED,
        "ratios": {f"sasrec_mean_{m}/popularity": mean[m] / pop[m] for m in ("hr@10", "ndcg@10")} |
                  {f"sasrec_mean_{m}/published_sasrec": mean[m] / PUBLISHED[next(iter(PUBLISHED))][m]
                   for m in ("hr@10", "ndcg@10")},
    })


if __name__ == "__main__":
    main()
