"""Rerankers on ML-1M test: SASRec candidates reranked by SFT'd listwise and groupwise LLM rerankers.

    python -m pipelines.benchmarks.rerankers --sasrec artifacts/bench/runs/sasrec-seed0

Steps (each skipped when its output exists, so a rerun only redoes what is missing):
1. SASRec top-50 candidates for train / valid / test (the top-20 is their prefix).
2. ``tiny`` listwise and groupwise SFT (recipes ``*_sft_tiny.yaml``; item tokens from SASRec),
   reranking all test users' top-20 (FIRST / expected-score), the listwise one also the top-50
   through the sliding window (window 20, stride 10).
   The same listwise reranker with item-token identifiers (``listwise_items_tiny.yaml``: windows from
   each user's last 30 training items, SASRec top-20 plus random negatives, retriever prior chosen on
   validation), on the same test candidates.
3. FIRST vs full constrained generation, same model, same users, same batching: the speed ratio and
   the NDCG@10 difference.
4. ``smollm2-135m`` (``--smollm2-only`` writes these rows alone to ``results/rerankers_smollm2.json``):
   validity of unconstrained generation before SFT; the model as converted, FIRST plus the retriever
   prior chosen on validation (zero-shot); listwise and groupwise SFT (recipes ``*_sft_smollm2.yaml``:
   SASRec's top-20 on each user's last training item, an hour and 25 minutes of CPU), reranking the
   first ``--smollm2-users`` (groupwise ``--smollm2-groupwise-users``) test users; validity after.

Rows carry full-ranking pipeline metrics (a target outside the candidates is a miss) and candidate-set
metrics (``cand_``, only users whose target is among the candidates). Rows on a user subset say so and
come with the retriever order on the same subset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.benchmarks.common import Provenance, per_user_ndcg10, write_result

METRICS = ["ndcg@10", "hr@10", "ndcg@5", "hr@5", "mrr"]
CONFIGS = Path(__file__).parents[1] / "configs"


def row(name: str, result: dict, which: str = "reranked", **extra) -> dict:
    m = result[which]
    return {"name": name, "metrics": {k: m[k] for k in METRICS} | {f"cand_{k}": m[f"cand_{k}"] for k in METRICS},
            "num_users": m["num_queries"], "target_in_candidates": m["target_in_candidates"], **extra}


def ndcg_vs_retriever(eval_dir: Path, depth: int = 20, split: str = "test") -> dict:
    """Paired bootstrap of per-user NDCG@10, reranked vs the retriever's order, over every user of a
    ``rerank`` output (``reranked_<split>.parquet``); a target outside the candidates scores 0 in both."""
    from recsys.metrics import paired_bootstrap

    return paired_bootstrap(per_user_ndcg10(eval_dir, "candidates", depth, split), per_user_ndcg10(eval_dir, split=split))


def validity(dataset, model_dir_or_backbone, candidates_dir, users: int, max_history: int = 10) -> dict:
    """Unconstrained greedy generation on the first ``users`` test windows: how often the answer is a
    valid ranking (every line one identifier of the window, no duplicates, the end token)."""
    from pipelines.reranker import item_titles
    from recsys.data.candidates import read_candidate_lists
    from recsys.llm.backbone import load_backbone
    from recsys.rerank.listwise import ListwiseReranker
    from recsys.rerank.parse import parse_ranking

    bb = load_backbone(model_dir_or_backbone)
    rr = ListwiseReranker(bb, item_titles(dataset), 20, max_history=max_history)
    end = bb.tokenizer.decode([bb.end_id])
    counts = {"valid": 0, "complete": 0, "malformed_lines": 0, "duplicates": 0, "out_of_window": 0}
    rows = [r.top(20) for r in read_candidate_lists(dataset, candidates_dir, "test")[:users]]
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        texts = rr.generate([r.history for r in chunk], [r.window for r in chunk], constrained=False)
        for t in texts:
            p = parse_ranking(t, 20, end)
            counts["valid"] += p.valid
            counts["complete"] += p.valid and len(p.generated) == 20
            counts["malformed_lines"] += p.malformed
            counts["duplicates"] += p.duplicate
            counts["out_of_window"] += p.out_of_window
    n = len(rows)
    return {"users": n, "valid_rate": counts["valid"] / n, "complete_rate": counts["complete"] / n,
            "malformed_lines_per_answer": counts["malformed_lines"] / n,
            "duplicates_per_answer": counts["duplicates"] / n, "out_of_window_per_answer": counts["out_of_window"] / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m", help="prepared ML-1M directory")
    p.add_argument("--sasrec", default="artifacts/bench/runs/sasrec-seed0", help="SASRec run directory")
    p.add_argument("--out", default="artifacts/rerankers")
    p.add_argument("--speed-users", type=int, default=1000, help="test users in the FIRST vs generation timing")
    p.add_argument("--sliding-users", type=int, default=1000,
                   help="test users in the top-50 sliding-window rows (one list at a time: CPU budgets)")
    p.add_argument("--smollm2-users", type=int, default=500,
                   help="test users reranked by the listwise smollm2 models (the first N)")
    p.add_argument("--smollm2-groupwise-users", type=int, default=200,
                   help="test users reranked by the groupwise smollm2 model (the first N)")
    p.add_argument("--validity-users", type=int, default=20)
    p.add_argument("--smollm2-only", action="store_true",
                   help="only the smollm2-135m rows, written to results/rerankers_smollm2.json")
    p.add_argument("--skip-smollm2", action="store_true",
                   help="only the tiny rows (and the FIRST vs generation speed), results/rerankers.json")
    a = p.parse_args()
    if a.smollm2_only and a.skip_smollm2:
        p.error("--smollm2-only and --skip-smollm2 exclude each other")
    provenance = Provenance("pipelines.benchmarks.rerankers")

    from pipelines.config import load_config
    from pipelines.rerank import rerank_candidates
    from pipelines.reranker import RerankerSFTConfig, train_reranker
    from pipelines.retrieval import candidates
    from recsys.data import PreparedDataset
    from recsys.precision import lightning_precision

    out = Path(a.out)
    ds = PreparedDataset.load(a.data)
    cands = out / "cands-sasrec50"
    if not (cands / "candidates.json").exists():
        candidates(ds, "sasrec", cands, n=50, sasrec=a.sasrec)
    sasrec_model = str(Path(a.sasrec) / "model")
    rows, stages, extra = [], {}, {}

    def timed(name, fn, *args, **kw):
        t = time.time()
        value = fn(*args, **kw)
        stages[name] = round(time.time() - t, 1)
        return value

    def rerank(model, tag, **kw):
        path = out / "eval" / tag
        cached = path / "rerank_metrics_test.json"
        if cached.exists():
            return json.loads(cached.read_text())
        return rerank_candidates(ds, model, cands, path, progress=False, **kw)

    if a.smollm2_only:
        smollm2(a, ds, out, cands, rows, extra, timed, rerank)
        write_result("rerankers_smollm2", provenance, {
            "dataset": "ml-1m", "split": "test", "device": f"cpu, precision {lightning_precision('auto', 'cpu')} (bf16 only on AMX CPUs)",
            "candidates": f"SASRec ({a.sasrec}) top-20",
            "protocol": "pipeline metrics: full ranking, target outside the candidates = miss; cand_: only "
                        "users whose target is among the candidates; every row on the first N test users, "
                        "N given in the row, with the retriever order on the same users",
            "rows": rows, "stage_seconds": stages, **extra,
            "ratios": {f"{r['name']}/retriever ndcg@10": r["metrics"]["ndcg@10"] / r["retriever_ndcg@10"]
                       for r in rows if "retriever_ndcg@10" in r}})
        return

    # -------- tiny: listwise and groupwise SFT
    tiny = {}
    for kind in ("listwise", "groupwise"):
        cfg = load_config(RerankerSFTConfig, CONFIGS / f"{kind}_sft_tiny.yaml", {"init_items_from": sasrec_model})
        tiny[kind] = timed(f"train {kind}-sft-tiny", train_reranker, ds, cands, out / f"{kind}-sft-tiny", cfg,
                           progress=False)
    lw20 = timed("rerank listwise-sft-tiny top-20", rerank, tiny["listwise"], "lw-tiny-20", depth=20)
    rows.append(row("retriever-order", lw20, "retriever", backbone="-", depth=20))
    rows.append(row("listwise-sft-tiny", lw20, backbone="tiny", depth=20, scoring="FIRST",
                    ndcg10_vs_retriever=ndcg_vs_retriever(out / "eval" / "lw-tiny-20")))
    lw50 = timed("rerank listwise-sft-tiny top-50", rerank, tiny["listwise"], "lw-tiny-50", depth=50,
                 limit=a.sliding_users)
    rows.append(row(f"retriever-order@50 (first {a.sliding_users} users)", lw50, "retriever", backbone="-", depth=50))
    rows.append(row(f"listwise-sft-tiny@50 (first {a.sliding_users} users)", lw50, backbone="tiny", depth=50,
                    scoring="FIRST, sliding window 20/10"))
    # -------- tiny with item-token identifiers: windows from the training sequences, retriever prior
    pre = out / "cands-sasrec50-t30"
    if not (pre / "candidates.json").exists():
        timed("candidates train windows", candidates, ds, "sasrec", pre, n=50, sasrec=a.sasrec,
              train_targets_per_user=30)
    cfg = load_config(RerankerSFTConfig, CONFIGS / "listwise_items_tiny.yaml", {"init_items_from": sasrec_model})
    items = timed("train listwise-sft-tiny-items", train_reranker, ds, pre, out / "listwise-items-tiny", cfg,
                  progress=False)
    prior = json.loads((items / "reranker.json").read_text())["retriever_prior"]
    it20 = timed("rerank listwise-sft-tiny-items top-20", rerank, items, "lw-items-20", depth=20)
    rows.append(row("listwise-sft-tiny-items", it20, backbone="tiny", depth=20, retriever_prior=prior,
                    scoring="FIRST over item-token identifiers, minus retriever prior",
                    ndcg10_vs_retriever=ndcg_vs_retriever(out / "eval" / "lw-items-20")))
    it50 = timed("rerank listwise-sft-tiny-items top-50", rerank, items, "lw-items-50", depth=50, limit=a.sliding_users)
    rows.append(row(f"listwise-sft-tiny-items@50 (first {a.sliding_users} users)", it50, backbone="tiny", depth=50,
                    retriever_prior=prior, scoring="FIRST over item tokens, sliding window 20/10"))
    gw20 = timed("rerank groupwise-sft-tiny top-20", rerank, tiny["groupwise"], "gw-tiny-20", depth=20)
    rows.append(row("groupwise-sft-tiny", gw20, backbone="tiny", depth=20, scoring="expected digit, c=20",
                    ndcg10_vs_retriever=ndcg_vs_retriever(out / "eval" / "gw-tiny-20")))

    # -------- FIRST vs full generation: same model, users, batching (32 lists per call), one run
    first = rerank_candidates(ds, tiny["listwise"], cands, out / "eval" / "speed-first", limit=a.speed_users,
                              depth=20, mode="first", progress=False)
    gen = rerank_candidates(ds, tiny["listwise"], cands, out / "eval" / "speed-generate", limit=a.speed_users,
                            depth=20, mode="generate", progress=False)
    speed = {"model": "listwise-sft-tiny", "users": a.speed_users, "first_seconds": round(first["seconds"], 2),
             "generate_seconds": round(gen["seconds"], 2), "first_ndcg@10": first["reranked"]["ndcg@10"],
             "generate_ndcg@10": gen["reranked"]["ndcg@10"]}

    if not a.skip_smollm2:
        smollm2(a, ds, out, cands, rows, extra, timed, rerank)
    base = rows[0]["metrics"]["ndcg@10"]
    write_result("rerankers", provenance, {
        "dataset": "ml-1m", "split": "test", "candidates": f"SASRec ({a.sasrec}) top-50; rows at depth 20 use the top-20",
        "protocol": "pipeline metrics: full ranking, target outside the candidates = miss; cand_: only users whose "
                    "target is among the candidates",
        "rows": rows, "speed": speed, "stage_seconds": stages, **extra,
        "ratios": {"first_speedup": speed["generate_seconds"] / speed["first_seconds"],
                   "first_vs_generate_ndcg@10_relative_change":
                       (speed["first_ndcg@10"] - speed["generate_ndcg@10"]) / max(speed["generate_ndcg@10"], 1e-12),
                   "listwise-sft-tiny/retriever ndcg@10": rows[1]["metrics"]["ndcg@10"] / base,
                   "listwise-sft-tiny-items/retriever ndcg@10":
                       next(r for r in rows if r["name"] == "listwise-sft-tiny-items")["metrics"]["ndcg@10"] / base,
                   "listwise-sft-tiny-items@50/retriever@50 ndcg@10": it50["reranked"]["ndcg@10"]
                       / it50["retriever"]["ndcg@10"],
                   "groupwise-sft-tiny/retriever ndcg@10":
                       next(r for r in rows if r["name"] == "groupwise-sft-tiny")["metrics"]["ndcg@10"] / base},
    })


def smollm2(a, ds, out: Path, cands: Path, rows: list, extra: dict, timed, rerank) -> None:
    """The ``smollm2-135m`` rows (user subsets on CPU): zero-shot FIRST, listwise and groupwise SFT,
    each with the retriever order on the same users, and unconstrained validity before and after SFT."""
    from pipelines.config import load_config
    from pipelines.rerank import zero_shot_reranker
    from pipelines.reranker import RerankerSFTConfig, train_reranker

    def add(name, res, **extra_fields):
        rows.append(row(name, res, backbone="smollm2-135m", depth=20, **extra_fields)
                    | {"retriever_ndcg@10": res["retriever"]["ndcg@10"]})

    n, ng = a.smollm2_users, a.smollm2_groupwise_users
    extra["validity_before_sft"] = timed("validity smollm2 base", validity, ds, "smollm2-135m", cands,
                                         a.validity_users)
    lw_cfg = load_config(RerankerSFTConfig, CONFIGS / "listwise_sft_smollm2.yaml")
    zero = out / "listwise-zero-shot-smollm2"
    if not (zero / "model" / "reranker.json").exists() or "val_cand_ndcg@10_by_retriever_prior" not in \
            json.loads((zero / "model" / "reranker.json").read_text()):
        timed("prior listwise-zero-shot-smollm2", zero_shot_reranker, ds, zero, candidates_dir=cands,
              max_history=lw_cfg.max_history, prior_users=lw_cfg.prior_users)
    res = timed("rerank listwise-zero-shot-smollm2", rerank, zero / "model", "zero-shot-smollm2", depth=20, limit=n)
    rows.append(row(f"retriever-order (first {n} users)", res, "retriever", backbone="-", depth=20))
    prior = json.loads((zero / "model" / "reranker.json").read_text())["retriever_prior"]
    add("listwise-zero-shot-smollm2", res, users=f"first {n} test users", retriever_prior=prior,
        scoring="FIRST, not fine-tuned, retriever prior chosen on validation")
    for kind, cfg, users in (("listwise", lw_cfg, n),
                             ("groupwise", load_config(RerankerSFTConfig, CONFIGS / "groupwise_sft_smollm2.yaml"), ng)):
        model = timed(f"train {kind}-sft-smollm2", train_reranker, ds, cands, out / f"{kind}-sft-smollm2", cfg,
                      progress=False)
        res = timed(f"rerank {kind}-sft-smollm2", rerank, model, f"{kind}-smollm2", depth=20, limit=users)
        summary = json.loads((out / f"{kind}-sft-smollm2" / "train.json").read_text())
        extra[f"{kind}_smollm2_training"] = {k: summary[k] for k in ("seconds", "epochs", "best_val_cand_ndcg@10",
                                                                      "train_examples")}
        if kind == "listwise":
            extra["validity_after_sft"] = timed("validity smollm2 sft", validity, ds, model, cands, a.validity_users)
            add("listwise-sft-smollm2", res, users=f"first {n} test users", retriever_prior=summary["retriever_prior"],
                scoring="FIRST, retriever prior chosen on validation")
        else:
            if users != n:
                rows.append(row(f"retriever-order (first {users} users)", res, "retriever", backbone="-", depth=20))
            add("groupwise-sft-smollm2", res, users=f"first {users} test users", scoring="expected digit, c=20")


if __name__ == "__main__":
    main()
