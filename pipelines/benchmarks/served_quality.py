"""What the deployed stack recommends: the served answers of every test user, scored against the held-out item.

    recsys quickstart --out artifacts/quickstart
    python -m pipelines.benchmarks.served_quality --quickstart artifacts/quickstart

The deployment the main job exports (``runs/default-seed0/serve``: SASRec + FAISS retrieval of 50 candidates,
reranked by the fusion reranker) answers each ML-1M test user through the code behind ``/v1/recommend`` and
``recsys rescore`` (:meth:`serving.runtime.Recommender.recommend_batch`, ONNX Runtime, numpy), as a replay:
the user's history up to the held-out interaction, their user id, and that interaction's time as the request's
``time`` (the answer they would have got just before it). Each user is answered twice, with reranking and
without (the retrieval order the API falls back to). Rows: NDCG@10 / HR@10 / NDCG@5 / HR@5 of the held-out
item among the 10 served items; ``paired``: the 95% paired bootstrap interval of (reranked - retrieval)
per-user NDCG@10; ``cpu_ms_per_request``: this process's CPU per answered user (one ONNX Runtime thread,
batches of ``--batch`` users). Offline, the main job scores the same reranker on the same users from its
own candidate files (bf16 where the CPU has AMX): the two should agree within noise, and a gap here that the
offline number lacks is a training/serving skew.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, process_cpu_seconds, write_result

METRICS = ["ndcg@10", "hr@10", "ndcg@5", "hr@5"]


def served_ranks(rec, queries, targets: list[int], batch: int) -> tuple[np.ndarray, float]:
    """(Q,) 0-based rank of each target among the served items (``inf`` when absent) and CPU seconds spent."""
    ranks, start = [], process_cpu_seconds()
    for i in range(0, len(queries), batch):
        for answer, target in zip(rec.recommend_batch(queries[i:i + batch]), targets[i:i + batch]):
            ranks.append(answer["items"].index(target) if target in answer["items"] else np.inf)
    return np.asarray(ranks, dtype=np.float64), process_cpu_seconds() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", default="artifacts", help="a `recsys quickstart` --out directory")
    p.add_argument("--serve-dir", help="another deployment of the same dataset (default: the quickstart's)")
    p.add_argument("--batch", type=int, default=64, help="users per recommend_batch call")
    p.add_argument("--users", type=int, help="the first N test users only (default: all)")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.served_quality")
    from recsys.data import PreparedDataset
    from recsys.metrics import compute_metrics, ndcg, paired_bootstrap
    from serving.runtime import Recommender, RecommendQuery

    quickstart = Path(a.quickstart)
    serve_dir = Path(a.serve_dir or quickstart / "runs" / "default-seed0" / "serve")
    if not (serve_dir / "manifest.json").exists():
        raise SystemExit(f"{serve_dir}: no deployment; run `recsys quickstart --out {quickstart}` first")
    dataset = PreparedDataset.load(quickstart / "data" / "ml-1m")
    rec = Recommender(serve_dir, threads=1)
    if rec.manifest.dataset_fingerprint != dataset.fingerprint:
        raise SystemExit(f"{serve_dir} was exported for another dataset than {dataset.directory}")
    ex = dataset.eval_examples("test")
    n = a.users or len(ex.users)
    ids, times = dataset.users.sort("uidx")["user_id"].to_list(), dataset.user_timestamps()
    targets = [int(t[0]) for t in ex.targets[:n]]
    rows, per_user = [], {}
    for name, rerank in (("retrieval", False), ("served", True)):
        queries = [RecommendQuery([int(x) for x in h], k=10, candidates=50, rerank=rerank, user_id=ids[u],
                                  time=int(times[u][len(h)])) for u, h in zip(ex.users[:n], ex.histories[:n])]
        ranks, cpu = served_ranks(rec, queries, targets, a.batch)
        gains = np.ones((n, 1))
        per_user[name] = ndcg(ranks[:, None], gains, 10)
        metrics = {k: round(v, 4) for k, v in compute_metrics(ranks[:, None], gains, METRICS).items() if k in METRICS}
        rows.append({"name": f"served-{rec.reranks}" if rerank else "retrieval-order", "metrics": metrics | {
            "cpu_ms_per_request": round(1000 * cpu / n, 3), "users": n}})
    paired = paired_bootstrap(per_user["retrieval"], per_user["served"])
    rows[1]["paired"] = {"ndcg@10": [round(paired["ci_low"], 4), round(paired["ci_high"], 4)]}
    rows[1]["metrics"] |= {"paired_ndcg@10": rows[1]["paired"]["ndcg@10"], "better": paired["better"],
                           "worse": paired["worse"]}
    path = write_result("served_quality", provenance, {
        "deployment": str(serve_dir), "models": sorted(rec.manifest.models), "reranker": rec.reranks,
        "dataset": "ml-1m", "split": "test", "protocol": "replay: history before the held-out item, the user's "
        "id, the held-out interaction's time; the held-out item's rank among the 10 served items", "rows": rows})
    for r in rows:
        m = r["metrics"]
        print(f"{r['name']:>16}  NDCG@10 {m['ndcg@10']:.4f}  HR@10 {m['hr@10']:.4f}  {m['cpu_ms_per_request']:.2f} ms CPU "
              f"per user" + (f"  paired {r['paired']['ndcg@10']}" if "paired" in r else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
