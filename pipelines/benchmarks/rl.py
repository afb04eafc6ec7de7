"""RL for rerankers on ML-1M: GRPO vs Rank-GRPO (two rewards, and off-policy with the paper's per-rank
clip) vs the SFT start; SCASRec from an SFT taught to stop; F-GRPO vs GRPO on the slate-then-rank task;
GroupRank on the groupwise model; LiPO-lambda and DPO on the same rollouts (``--runs lipo dpo``:
preferences among each prompt's G scored rollouts, :mod:`recsys.rl.lipo`).

    python -m pipelines.benchmarks.rl --seeds 0 1 2 --workers 2
    python -m pipelines.benchmarks.rl --quickstart artifacts      # start from the main job's SFT and candidates

``rank-grpo-offpolicy-exp_inf``: two optimiser steps per rollout batch (``mu`` 2) with Rank-GRPO's clip
range (0.06 / 0.08, per rank). ``scasrec``: a listwise SFT of the same recipe with ``supervise: auto_stop``
(the end token taught where the served ranking stops improving, row ``sft-auto-stop``), then RL with
SCASRec's stepwise corrective returns (:mod:`recsys.rl.scasrec`); its rows report ``list_items``, the mean
number of items the greedy answers write before the end token (the rest come in the retriever's order).

Every algorithm starts from the same SFT checkpoint (the ``tiny`` listwise / groupwise models of the
rerankers benchmark, ``artifacts/rerankers/*-sft-tiny``, or ``--init``), uses the same prompts
(``--train-split valid``: validation targets minus the ``--val-users`` selection users; ``train``: the
candidates' training targets), only those whose held-out item is in the window (``reachable_only``),
the same rollouts per step (G x prompts) and the same number of steps; only the seed changes between
repeats. Evaluation: the test users' SASRec top-20 reranked by greedy constrained generation with the
model's retriever prior (listwise) or expected scores (groupwise); full-ranking pipeline metrics plus
candidate-set ``cand_ndcg@10``, and for each listwise RL row a paired bootstrap of its per-user NDCG@10
against the SFT start (``ndcg10_vs_sft``). ``metrics`` is the model validation selected (the start
itself when no checkpoint beat it: ``kept_start``), ``last_metrics`` the final RL weights. The SFT rows are deterministic (one model, greedy decoding),
so they appear once.

Slate-then-rank (``slate-rank-*`` rows, :mod:`recsys.rerank.slate`): from the same SFT checkpoint, one
completion chooses a slate of 10 of the 20 candidates, then ranks 5 of them; ``slate-rank-grpo``
trains on one joint reward (slate recall + NDCG@5 of the ranking) for every token, ``slate-rank-f-grpo``
gives each phase its own group-relative advantage. Evaluation: greedy answers on the test users,
``recall@3``, ``recall@5``, ``ndcg@3``, ``ndcg@5`` of the final ranking (one held-out item, so recall@k
is the hit rate) and the slate's recall; per seed, a paired bootstrap of per-user recall@5 against the
SFT start and F-GRPO against GRPO (``recall5_vs_grpo_same_seed``). Run it on sampled pools (``recsys
candidates --retriever pool-popularity --n 20``: the held-out item among 19 negatives in a random order,
F-GRPO's MovieLens task) with an item-identifier model: on a retriever's top 20 in the retriever's order a
model that copies that order makes every slate of a group the same, and the slate phase learns nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipelines.benchmarks.common import (
    Provenance,
    per_user_ndcg10,
    per_user_slate_hits,
    write_result,
)
from pipelines.rl import RLConfig

METRICS = ["ndcg@5", "ndcg@10", "hr@5", "hr@10"]
SLATE_METRICS = ["recall@3", "recall@5", "ndcg@3", "ndcg@5", "slate_recall"]
RUNS = {"grpo": {"algo": "grpo"}, "rank-grpo-exp_inf": {"algo": "rank-grpo", "reward": "exp_inf"},
        "rank-grpo-log_decay": {"algo": "rank-grpo", "reward": "log_decay"}, "groupwise-grouprank": {"algo": "grouprank"},
        "slate-rank-grpo": {"algo": "slate-grpo", "slate_size": 10, "rank_size": 5},
        "slate-rank-f-grpo": {"algo": "f-grpo", "slate_size": 10, "rank_size": 5},
        "lipo": {"algo": "lipo"}, "dpo": {"algo": "dpo"},
        "rank-grpo-offpolicy-exp_inf": {"algo": "rank-grpo", "reward": "exp_inf", "mu": 2, "eps_low": 0.06,
                                        "eps_high": 0.08},
        "scasrec": {"algo": "scasrec"}}
LISTWISE_RL = ("grpo", "rank-grpo-exp_inf", "rank-grpo-log_decay", "rank-grpo-offpolicy-exp_inf", "lipo", "dpo",
               "scasrec")
"""Rows paired against the listwise SFT start (per-user NDCG@10)."""


def _metrics(result: dict) -> dict:
    m = result["reranked"]
    return {k: m[k] for k in METRICS} | {"cand_ndcg@10": m["cand_ndcg@10"]} | (
        {"list_items": round(result["list_items"], 3)} if "list_items" in result else {})


def auto_stop_sft(data: str, cands: str, init: str, out: Path) -> str:
    """The listwise SFT of ``init``'s own recipe (its run's ``train.json``) with ``supervise: auto_stop``:
    SCASRec's start, whose end token is learnt; resumes or is reused when already trained."""
    import json

    from pipelines.reranker import RerankerSFTConfig, train_reranker
    from recsys.data import PreparedDataset

    if (out / "model" / "reranker.json").exists():
        return str(out / "model")
    recipe = json.loads((Path(init).parent / "train.json").read_text())["config"]
    config = RerankerSFTConfig(**{**recipe, "supervise": "auto_stop"})
    return str(train_reranker(PreparedDataset.load(data), cands, out, config, progress=False, resume="auto"))


def _evaluate(data: str, model: str, cands: str, out: str, mode: str, limit: int | None = None) -> dict:
    from pipelines.rerank import rerank_candidates
    from recsys.data import PreparedDataset

    if mode == "slate":
        from pipelines.rerank import evaluate_slate_rank

        m = evaluate_slate_rank(PreparedDataset.load(data), model, cands, limit=limit, out=out or None)
        return {k: m[k] for k in SLATE_METRICS} | {f"cand_{k}": m[f"cand_{k}"] for k in ("recall@5", "ndcg@5")}
    return rerank_candidates(PreparedDataset.load(data), model, cands, out, depth=20, mode=mode, progress=False,
                             limit=limit)


def _run(data: str, cands: str, out: str, name: str, init: str, seed: int, threads: int, overrides: dict,
         limit: int | None) -> dict:
    import json

    import torch

    from pipelines.rl import RLConfig, train_rl
    from recsys.data import PreparedDataset

    torch.set_num_threads(threads)
    ds = PreparedDataset.load(data)
    config = RLConfig(**{**overrides, **RUNS[name], "init": init, "seed": seed})
    model = train_rl(ds, cands, out, config, progress=False)
    summary = json.loads((Path(out) / "train.json").read_text())
    mode = "first" if name == "groupwise-grouprank" else "slate" if name.startswith("slate-rank") else "generate"
    result = _evaluate(data, str(model), cands, str(Path(out) / "eval"), mode, limit)
    metric = summary["val_metric"].replace("/", "_")
    last = _evaluate(data, str(Path(out) / "last-model"), cands, str(Path(out) / "eval-last"), mode, limit)
    return {"name": name, "seed": seed, "metrics": result if mode == "slate" else _metrics(result),
            "last_metrics": last if mode == "slate" else _metrics(last), "kept_start": summary["kept_start"],
            "seconds": round(summary["seconds"], 1), "steps": summary["steps"], f"start_{metric}": summary[f"start_{metric}"],
            f"best_{metric}": summary[f"best_{metric}"], "curve": reward_curve(out)}


def describe_candidates(cands: str) -> str:
    """What the windows are, from the directory's ``candidates.json``: a retriever's top 20 or a sampled pool."""
    import json

    meta = json.loads((Path(cands) / "candidates.json").read_text())
    if meta["retriever"].startswith("pool-"):
        return (f"sampled pools of {meta['n']} (seed {meta.get('seed')}): the held-out item and {meta['n'] - 1} "
                f"negatives outside the history drawn by {meta['retriever'][5:]}, in a random order")
    return f"{meta['retriever']} top-20"


def reward_curve(run_dir) -> list[list[float]]:
    """[[step, mean reward], ...] from the run's CSV log."""
    import polars as pl

    frames = [pl.read_csv(f) for f in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"))]
    if not frames:
        return []
    df = pl.concat(frames, how="diagonal_relaxed").filter(pl.col("train/reward").is_not_null())
    return [[int(s), round(float(r), 4)] for s, r in df.select("step", "train/reward").iter_rows()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m")
    p.add_argument("--rerankers", default="artifacts/rerankers", help="output directory of the rerankers benchmark")
    p.add_argument("--out", default="artifacts/rl")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--train-split", default="valid", choices=["valid", "train"],
                   help="prompts from the validation targets (minus the selection users) or the training targets")
    p.add_argument("--val-users", type=int, default=500, help="validation users that select the checkpoint")
    p.add_argument("--candidates", help="candidates directory (default: the rerankers benchmark's cands-sasrec50)")
    p.add_argument("--test-users", type=int, help="evaluate on the first N test users (CPU budgets; default all)")
    p.add_argument("--result", default="rl", help="results/<name>.json (run listwise and groupwise apart)")
    p.add_argument("--init", help="listwise SFT model to start from (default: the rerankers benchmark's)")
    p.add_argument("--quickstart", help="a `recsys quickstart` --out directory: its data, SASRec top-50 "
                                        "candidates and listwise SFT (runs/default-seed0) instead of the "
                                        "rerankers benchmark's")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.rl")

    src, out = Path(a.rerankers), Path(a.out)
    cands = a.candidates or str(src / "cands-sasrec50")
    inits = {"listwise": str(src / "listwise-sft-tiny" / "model"), "groupwise": str(src / "groupwise-sft-tiny" / "model")}
    if a.quickstart:
        run = Path(a.quickstart) / "runs" / "default-seed0"
        a.data, cands = str(Path(a.quickstart) / "data" / "ml-1m"), a.candidates or str(run / "candidates")
        inits["listwise"] = str(run / "reranker-sft" / "model")
    inits = {**inits, **({"listwise": a.init} if a.init else {})}
    needed = {"groupwise" if n == "groupwise-grouprank" else "listwise" for n in a.runs}
    for path in (inits[k] for k in needed):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: run `python -m pipelines.benchmarks.rerankers` first")
    overrides = {"max_steps": a.max_steps, "group_size": a.group_size, "prompts_per_step": a.prompts_per_step,
                 "lr": a.lr, "val_every": a.val_every, "val_users": a.val_users, "train_split": a.train_split,
                 "temperature": a.temperature}
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    rows = []
    if any(n in a.runs for n in LISTWISE_RL):
        rows.append({"name": "sft", "seed": None, "metrics": _metrics(_evaluate(
            a.data, inits["listwise"], cands, str(out / "sft-eval"), "generate", a.test_users))})
    if "scasrec" in a.runs:
        inits["auto_stop"] = auto_stop_sft(a.data, cands, inits["listwise"], out / "sft-auto-stop")
        rows.append({"name": "sft-auto-stop", "seed": None, "metrics": _metrics(_evaluate(
            a.data, inits["auto_stop"], cands, str(out / "sft-auto-stop-eval"), "generate", a.test_users))})
    if any(n.startswith("slate-rank") for n in a.runs):
        rows.append({"name": "slate-rank-sft", "seed": None, "metrics": _evaluate(
            a.data, inits["listwise"], cands, str(out / "slate-sft-eval"), "slate", a.test_users)})
    if "groupwise" in needed:
        rows.append({"name": "groupwise-sft", "seed": None, "metrics": _metrics(_evaluate(
            a.data, inits["groupwise"], cands, str(out / "gw-sft-eval"), "first", a.test_users))})
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        start = {"groupwise-grouprank": "groupwise", "scasrec": "auto_stop"}
        jobs = [pool.submit(_run, a.data, cands, str(out / f"{name}-seed{s}"), name,
                            inits[start.get(name, "listwise")], s, threads, overrides, a.test_users)
                for s in a.seeds for name in a.runs]
        rows += [j.result() for j in jobs]

    listwise_rl = LISTWISE_RL
    if any(r["name"] == "sft" for r in rows):           # per-user NDCG@10 of each RL run against the SFT start
        from recsys.metrics import paired_bootstrap

        sft = per_user_ndcg10(out / "sft-eval")
        for r in rows:
            if r["name"] in listwise_rl:
                run = out / f"{r['name']}-seed{r['seed']}"
                r["ndcg10_vs_sft"] = paired_bootstrap(sft, per_user_ndcg10(run / "eval"))
                r["last_ndcg10_vs_sft"] = paired_bootstrap(sft, per_user_ndcg10(run / "eval-last"))
            if r["name"] in ("scasrec", "sft-auto-stop"):  # and against the SFT it started from
                run = out / (f"scasrec-seed{r['seed']}/eval" if r["name"] == "scasrec" else "sft-auto-stop-eval")
                r["ndcg10_vs_sft_auto_stop"] = paired_bootstrap(per_user_ndcg10(out / "sft-auto-stop-eval"),
                                                                per_user_ndcg10(run))
                r.setdefault("ndcg10_vs_sft", paired_bootstrap(sft, per_user_ndcg10(run)))

    if any(r["name"] == "slate-rank-sft" for r in rows):   # per-user recall@5: each run vs the start, F-GRPO vs GRPO
        from recsys.metrics import paired_bootstrap

        sft = per_user_slate_hits(out / "slate-sft-eval")
        for r in rows:
            if r["name"] in ("slate-rank-grpo", "slate-rank-f-grpo"):
                r["recall5_vs_sft"] = paired_bootstrap(sft, per_user_slate_hits(out / f"{r['name']}-seed{r['seed']}" / "eval"))
            if r["name"] == "slate-rank-f-grpo" and "slate-rank-grpo" in a.runs:
                r["recall5_vs_grpo_same_seed"] = paired_bootstrap(
                    per_user_slate_hits(out / f"slate-rank-grpo-seed{r['seed']}" / "eval"),
                    per_user_slate_hits(out / f"slate-rank-f-grpo-seed{r['seed']}" / "eval"))

    def mean(name: str, metric: str = "ndcg@10") -> float | None:
        values = [r["metrics"][metric] for r in rows if r["name"] == name]
        return sum(values) / len(values) if values else None

    means = {name: {m: mean(name, m) for m in (SLATE_METRICS if name.startswith("slate-rank") else METRICS)}
             for name in {r["name"] for r in rows}}
    ratios = {f"{name}/sft ndcg@10": means[name]["ndcg@10"] / means["sft"]["ndcg@10"]
              for name in a.runs if name in listwise_rl and "sft" in means}
    means_last = {name: {m: sum(v) / len(v) for m in METRICS
                         if (v := [r["last_metrics"][m] for r in rows if r["name"] == name])}
                  for name in a.runs if name in listwise_rl}
    ratios |= {f"{name} last/sft ndcg@10": means_last[name]["ndcg@10"] / means["sft"]["ndcg@10"]
               for name in means_last if "sft" in means}
    if "groupwise-grouprank" in a.runs:
        ratios["grouprank/groupwise-sft ndcg@10"] = means["groupwise-grouprank"]["ndcg@10"] / means["groupwise-sft"]["ndcg@10"]
    if {"slate-rank-grpo", "slate-rank-f-grpo"} <= set(a.runs):
        f, g = means["slate-rank-f-grpo"]["recall@5"], means["slate-rank-grpo"]["recall@5"]
        ratios["slate-rank-f-grpo/slate-rank-grpo recall@5"] = f / g if g else None
    write_result(a.result, provenance, {
        "dataset": "ml-1m", "split": "test", "backbone": "tiny (built in code, SASRec-initialised item tokens)",
        "candidates": describe_candidates(cands), "test_users": a.test_users or "all",
        "evaluation": "listwise: greedy constrained generation with the model's retriever prior; groupwise: expected "
                      "digit scores; full-ranking pipeline metrics over the test users",
        "settings": overrides | {"beta": RLConfig.beta, "reachable_only": RLConfig.reachable_only,
                                 "complete_lists": RLConfig.complete_lists,
                                 "grpo_reward": f"NDCG@{RLConfig.grpo_reward_depth or 'N'} of the served ranking "
                                                "(N: the window, 20)",
                                 "grouprank_ties": RLConfig.grouprank_ties,
                                 "grouprank_teacher": RLConfig.grouprank_teacher, "seeds": a.seeds},
        "candidates_dir": cands, "init": inits["listwise"], "init_auto_stop": inits.get("auto_stop"),
        "rows": rows, "means": means, "means_last": means_last, "ratios": ratios,
    })


if __name__ == "__main__":
    main()
