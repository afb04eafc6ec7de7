"""Rerankers over a strong retriever, from scratch in one resumable command.

    python -m pipelines.benchmarks.rerankers_strong --out artifacts/strong

Stages (each skipped when its output is up to date, each training stage resuming after an interruption,
so the run may span several sittings: rerun the same command to continue):

    data                fetch + prepare ML-1M (leave-one-out)
    sasrec-seedS        the strong retriever: ``sasrec_ml1m.yaml`` (its hour recipe) on one thread
    candidates-seedS    its top-50 for every user's validation and test target (FAISS, exact inner product)
    features            side features of every list (:mod:`recsys.portable.features`; fitted on training
                        interactions only), cached for all rows
    fusion rows         a scorer over those features trained on the validation lists
                        (:mod:`pipelines.fusion`): all groups (2 seeds, MLP; and linear), the retriever's
                        own scores alone, and one ablation row per group left out and per group alone
    candidates-t30      the retriever's top-20 at each user's last 30 training items (LM training windows)
    listwise-tiny-items the item-token listwise LM (``listwise_items_tiny.yaml``, tiny backbone built in
                        code, item tokens from the retriever), then its FIRST logits over every list as
                        one more feature (rows ``...+lm``); two seeds
    hybrid-smollm2      SmolLM2-135M (its first 4 layers) reading each item as a soft token, the retriever's
                        item vector projected into the LM (``hybrid_smollm2.yaml``, :mod:`pipelines.hybrid`,
                        LLaRA), FIRST over the top-20 with a retriever prior chosen on validation, and its
                        logit as a fusion feature (rows ``fusion-...+smollm2``); ``-scratch``: the same
                        architecture and training from random weights; two seeds, every row of
                        seed 0 before any of seed 1, and the pretrained-minus-scratch interval of each
                        seed and of their per-user mean
    hybrid-smollm2-text the same with content soft tokens (``hybrid_smollm2_text.yaml``): each item's
                        soft token is projected from the LM's reading of its text alone, not from the
                        retriever's vector (rows ``...smollm2-text`` and ``...smollm2-text-scratch``;
                        seed 0, :data:`HYBRID_RECIPES`)
    hybrid-smollm2-titles the first recipe with the first 8 title words before each soft token
                        (``hybrid_smollm2_titles.yaml``, LLaRA's item form; seed 0, hours a row)

Every row is evaluated on all 6,040 test users with the full-ranking protocol: the held-out item ranked
over the whole catalogue, a target outside the retriever's top-50 is a miss. ``paired`` is the 95%
paired bootstrap interval of the row's per-user NDCG@10 minus the retriever order's. The row
``end-to-end`` is the row with the best validation-holdout NDCG@10 (chosen without test).

Writes ``pipelines/benchmarks/results/rerankers_strong.json``; ``python -m pipelines.benchmarks.render``
puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import RESULTS, Provenance, write_result

CONFIGS = Path(__file__).parents[1] / "configs"
DEPTH = 50
"""Candidates per list (every fusion row reranks all of them)."""
METRICS = ["ndcg@10", "hr@10", "ndcg@5", "hr@5", "ndcg@20", "hr@20", "mrr"]
SEEDS = (0, 1)
"""Seeds of the rows that may be the best (the others run seed 0)."""
HYBRID_RECIPES = {"smollm2": ("hybrid_smollm2.yaml", SEEDS), "smollm2-text": ("hybrid_smollm2_text.yaml", (0,)),
                  "smollm2-titles": ("hybrid_smollm2_titles.yaml", (0,))}
"""The hybrid SmolLM2 rerankers: row name after ``hybrid-`` -> (recipe in ``pipelines/configs``, its seeds). The
content and title recipes are probes: one seed, a second only once a row of theirs beats the retriever."""


def _paired(before: np.ndarray, after: np.ndarray) -> dict:
    from recsys.metrics import paired_bootstrap

    b = paired_bootstrap(before, after)
    return {"ndcg@10": [round(b["ci_low"], 5), round(b["ci_high"], 5)], "mean_diff": round(b["mean_diff"], 5),
            "better": b["better"], "worse": b["worse"]}


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, retriever_users: np.ndarray, later: np.ndarray,
                    save_to: Path | None = None) -> dict:
    """Metrics of the lists ordered by (R, L) ``scores``, the paired interval against the retriever, and the
    same comparison on the users whose test item comes strictly after their last history item; ``save_to``
    keeps the per-user NDCG@10 (.npy) for comparisons between rows."""
    from pipelines.fusion import list_ranks, ranking_metrics

    metrics, users = ranking_metrics(list_ranks(scores, targets), METRICS)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        np.save(save_to, users)
    return {"metrics": {m: round(metrics[m], 5) for m in METRICS}, "num_users": metrics["num_queries"],
            "paired": _paired(retriever_users, users),
            "later_than_history": {"users": int(later.sum()), "ndcg@10": round(float(users[later].mean()), 5),
                                   "retriever_ndcg@10": round(float(retriever_users[later].mean()), 5),
                                   "paired": _paired(retriever_users[later], users[later])}}


PRIOR_USERS = 1000
"""Validation users on which the hybrid reranker's retriever prior is chosen (a pretrained LM on CPU scores
a few windows a second)."""
PRIOR_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 1000.0)
"""Retriever priors tried on validation (1000 reproduces the retriever's order)."""


def first_then_retriever(first: np.ndarray, beta: float, depth: int) -> np.ndarray:
    """(R, depth) list scores: the (R, w) FIRST logits of the top-w minus ``beta * ln(1 + position)`` order the
    top-w, the other candidates follow in the retriever's order."""
    from recsys.portable.window import retriever_prior

    w = first.shape[1]
    pos = np.arange(depth, dtype=np.float64)
    head = first + retriever_prior(w, beta)
    return np.concatenate([head - head.min(1, keepdims=True) + 1.0, -pos[None, w:].repeat(len(first), 0) / depth], 1)


def choose_prior(first: np.ndarray, targets: np.ndarray, window: int, depth: int) -> tuple[float, dict]:
    """The retriever prior of :data:`PRIOR_GRID` with the best NDCG@10 on these (validation) lists, and the
    NDCG@10 of each."""
    from pipelines.fusion import list_ranks, ranking_metrics

    by_beta = {b: ranking_metrics(list_ranks(first_then_retriever(first, b, depth), targets), ["ndcg@10"])[0]["ndcg@10"]
               for b in PRIOR_GRID}
    return max(by_beta, key=by_beta.get), {str(b): round(v, 5) for b, v in by_beta.items()}


def run(out: Path, dataset: str = "ml-1m", seed: int = 0, sasrec_overrides: dict | None = None,
        lm_overrides: dict | None = None, lm_seeds: tuple[int, ...] = SEEDS, depth: int = DEPTH,
        groups: tuple[str, ...] | None = None, hybrid: tuple[str, ...] = ("pretrained", "scratch"),
        hybrid_seeds: tuple[int, ...] = SEEDS, hybrid_overrides: dict | None = None,
        hybrid_recipes: tuple[str, ...] = tuple(HYBRID_RECIPES), columns=None, log=print) -> dict:
    """Run (or resume) every stage; returns the rows and the seconds per stage. ``dataset``: a name
    (``ml-1m``), a directory, or a file read with ``columns`` (:class:`recsys.data.ColumnMap`); the overrides
    update the retriever's and the LM's recipes; ``groups``: the side-feature groups (default all,
    ``retriever`` first)."""
    from pipelines.config import load_config
    from pipelines.fusion import (
        ALL_GROUPS,
        LM_COLUMN,
        FusionTrainConfig,
        feature_lists,
        fill_unscored,
        fit_fusion,
        fit_side_features,
        lm_logits,
    )
    from pipelines.hybrid import HybridTrainConfig, train_hybrid
    from pipelines.quickstart import Stages
    from pipelines.reranker import RerankerSFTConfig, train_reranker
    from pipelines.retrieval import candidates
    from pipelines.train import SASRecTrainConfig, train_sasrec
    from recsys.data import PrepareConfig, PreparedDataset, load_dataset, prepare
    from recsys.data.candidates import read_candidate_lists
    from recsys.portable.features import GROUPS, requests_from_candidates
    from recsys.rerank.fusion import FusionConfig, FusionRanker

    stages = Stages(out, log)
    data_dir = out / "data" / (Path(dataset).stem if columns else Path(dataset).name)

    def data():
        ds = prepare(load_dataset(dataset, columns, on_duplicates="drop" if columns else None, log=log), data_dir,
                     PrepareConfig())
        return {"users": ds.n_users, "items": ds.n_items, "fingerprint": ds.fingerprint}

    read = {"columns": columns.__dict__} if columns else {}
    stages.run("data", {"dataset": str(dataset), "prepare": PrepareConfig().__dict__} | read, data)
    ds = PreparedDataset.load(data_dir)
    base = {"fingerprint": ds.fingerprint}
    runs = out / "runs"
    per_user = runs / "per-user-ndcg10"
    everything = list(groups or ALL_GROUPS)

    # The retriever and its candidates.
    sas_dir = runs / f"sasrec-seed{seed}"
    sas_cfg = load_config(SASRecTrainConfig, CONFIGS / "sasrec_ml1m.yaml",
                          {"seed": seed, "num_threads": 1, **(sasrec_overrides or {})})

    def sasrec():
        train_sasrec(ds, sas_dir, sas_cfg, progress=False, resume="auto")
        return json.loads((sas_dir / "train.json").read_text())

    sas = stages.run(f"sasrec-seed{seed}", base | {"config": sas_cfg.__dict__}, sasrec)
    cands = runs / f"candidates-seed{seed}"
    recall = stages.run(f"candidates-seed{seed}", base | {"sasrec": str(sas_dir), "n": depth},
                        lambda: candidates(ds, "sasrec", cands, n=depth, sasrec=sas_dir, splits=("valid", "test")
                                           )["recall"])
    base |= {"candidates": str(cands)}

    # Side features of every validation and test list, all groups, computed once.
    feat_dir = runs / f"features-seed{seed}"

    def features():
        side = fit_side_features(ds, everything)
        for split in ("valid", "test"):
            f, t, names = feature_lists(ds, cands, split, side, depth)
            feat_dir.mkdir(parents=True, exist_ok=True)
            np.savez(feat_dir / f"{split}.npz", features=f, targets=t)
        return {"names": names}

    names = stages.run("features", base | {"groups": everything}, features)["names"]
    split_data = {s: dict(np.load(feat_dir / f"{s}.npz")) for s in ("valid", "test")}
    @functools.cache
    def requests(split: str):
        """The split's lists as feature requests, read once and shared by every row (read-only)."""
        return requests_from_candidates(ds, read_candidate_lists(ds, cands, split), depth)

    test_requests = requests("test")
    later = np.asarray([r.time > r.history_times[-1] for r in test_requests])
    targets = split_data["test"]["targets"]
    from pipelines.fusion import ranking_metrics

    retriever_users = ranking_metrics(np.where(targets >= 0, targets, np.inf).astype(np.float64), METRICS)[1]
    rows = [{"name": "retriever-order", "seed": seed,
             **evaluate_scores(-np.arange(depth, dtype=np.float64)[None].repeat(len(targets), 0), targets,
                               retriever_users, later),
             "seconds": round(sas["seconds"], 1), "epochs": sas["epochs"],
             "best_val_ndcg@10": round(sas["best_val_ndcg@10"], 5), "model": "SASRec, sasrec_ml1m.yaml"}]
    for r in rows:
        r.pop("paired")

    def popularity():                    # the floor: most-interacted training items, full ranking
        from recsys.evaluation import evaluate_full_ranking
        from recsys.models.popularity import Popularity

        examples = ds.eval_examples("test")
        ranks = evaluate_full_ranking(Popularity.fit(ds), examples, ["hr@10"], progress=False, return_ranks=True)[1]
        order = {int(u): i for i, u in enumerate(examples.users)}
        at = [order[r.uidx] for r in test_requests]                      # the candidates' order
        metrics, users = ranking_metrics(ranks[at, 0], METRICS)
        return {"name": "popularity", "seed": 0, "features": ["popularity"], "scorer": "full ranking by training count",
                "metrics": {m: round(metrics[m], 5) for m in METRICS}, "num_users": metrics["num_queries"],
                "paired": _paired(retriever_users, users),
                "later_than_history": {"users": int(later.sum()), "ndcg@10": round(float(users[later].mean()), 5),
                                       "retriever_ndcg@10": round(float(retriever_users[later].mean()), 5)}}

    rows.append(stages.run("popularity", base, popularity))

    def columns(groups, lm: bool = False) -> list[int]:
        """Indices of the groups' columns in the cached features; the LM's logit is appended after them."""
        return [names.index(c) for g in groups for c in GROUPS[g]] + ([len(names)] if lm else [])

    def fusion_row(name: str, groups, hidden: int = 32, row_seed: int = 0, lm: str | None = None,
                   lm_depth: int | None = None, lm_cols: dict | None = None, lm_trained: dict | None = None) -> dict:
        """A fusion scorer over ``groups`` (and the LM logits ``lm_cols`` of the model ``lm``, if given; the
        LM's training record ``lm_trained`` is part of the stage's settings: a retrained LM retrains the row)."""
        config = FusionTrainConfig(features=tuple(groups), scorer=FusionConfig(hidden=hidden, seed=row_seed), lm=lm,
                                   lm_depth=lm_depth, depth=depth)
        run_dir = runs / f"{name}-seed{row_seed}"

        def train_and_test():
            def part(split):
                f = split_data[split]["features"]
                if lm_cols is not None:
                    f = np.concatenate([f, lm_cols[split][..., None]], -1)
                return f[..., columns(groups, lm is not None)]

            cols = [names[i] for i in columns(groups)] + ([LM_COLUMN] if lm else [])
            start = time.time()
            summary = fit_fusion(ds, part("valid"), split_data["valid"]["targets"], cols, run_dir, config, start,
                                 str(cands), log=log)
            scores = FusionRanker.from_pretrained(run_dir / "model").score(part("test"))
            return {"name": name, "seed": row_seed, "features": list(groups) + (["lm"] if lm else []),
                    "scorer": f"MLP, hidden {hidden}" if hidden else "linear",
                    **evaluate_scores(scores, targets, retriever_users, later, per_user / f"{name}-seed{row_seed}.npy"),
                    "holdout_ndcg@10": round(summary["holdout_ndcg@10"], 5), "seconds": summary["seconds"]}

        return stages.run(f"{name}-seed{row_seed}", base | {"config": config.__dict__, "lm_trained": lm_trained},
                          train_and_test)

    for s in SEEDS:
        rows.append(fusion_row("fusion-mlp", everything, row_seed=s))
    rows.append(fusion_row("fusion-linear", everything, hidden=0))
    rows.append(fusion_row("fusion-retriever-only", ["retriever"]))
    for g in everything[1:]:
        rows.append(fusion_row(f"fusion-mlp-without-{g}", [x for x in everything if x != g]))
        rows.append(fusion_row(f"fusion-retriever+{g}", ["retriever", g]))

    # The item-token listwise LM: trained on windows from the last 30 training items of every user.
    t30 = runs / f"candidates-t30-seed{seed}"
    window = load_config(RerankerSFTConfig, CONFIGS / "listwise_items_tiny.yaml", lm_overrides).window
    if lm_seeds or hybrid:
        stages.run(f"candidates-t30-seed{seed}", base | {"sasrec": str(sas_dir), "n": window, "per_user": 30},
                   lambda: candidates(ds, "sasrec", t30, n=window, sasrec=sas_dir, train_targets_per_user=30)["recall"])

    def lm_rows(s: int) -> list[dict]:
        """The LM of seed ``s``: trained, its logits over every list, alone and as a fusion feature."""
        lm_dir = runs / f"listwise-tiny-items-seed{s}"
        lm_cfg = load_config(RerankerSFTConfig, CONFIGS / "listwise_items_tiny.yaml",
                             {**(lm_overrides or {}), "seed": s, "init_items_from": str(sas_dir / "model")})

        def train_lm():
            start = time.time()
            train_reranker(ds, t30, lm_dir, lm_cfg, progress=False, resume="auto")
            meta = json.loads((lm_dir / "model" / "reranker.json").read_text())
            return {"seconds": round(time.time() - start, 1), "retriever_prior": meta.get("retriever_prior")}

        trained = stages.run(f"listwise-tiny-items-seed{s}", base | {"config": lm_cfg.__dict__}, train_lm)
        logit_file = runs / f"lm-logits-seed{s}.npz"

        def logits():
            reqs = {split: requests(split) for split in ("valid", "test")}
            np.savez(logit_file, **{split: lm_logits(ds, lm_dir / "model", reqs[split], window) for split in reqs})
            return str(logit_file)

        stages.run(f"lm-logits-seed{s}", base | {"lm": trained}, logits)
        lm_cols = dict(np.load(logit_file))

        def lm_alone():
            beta = trained["retriever_prior"] or 0.0
            return {"name": "listwise-tiny-items", "seed": s, "features": ["lm"], "retriever_prior": beta,
                    "scorer": f"FIRST over the top-{window} minus the retriever prior (the rest in the retriever's order)",
                    **evaluate_scores(first_then_retriever(lm_cols["test"][:, :window], beta, depth), targets,
                                      retriever_users, later), "seconds": trained["seconds"]}

        return [stages.run(f"listwise-tiny-items-eval-seed{s}", base | {"lm": trained}, lm_alone),
                fusion_row("fusion-mlp+lm", everything, row_seed=s, lm=str(lm_dir / "model"), lm_cols=lm_cols,
                           lm_trained=trained),
                fusion_row("fusion-retriever+lm", ["retriever"], row_seed=s, lm=str(lm_dir / "model"), lm_cols=lm_cols,
                           lm_trained=trained)]


    def hybrid_rows(recipe: str, pretrained: bool, s: int) -> list[dict]:
        """The hybrid-token SmolLM2 reranker of ``recipe`` (:data:`HYBRID_RECIPES`) and seed ``s``, pretrained
        or ``-scratch``; the seed draws the training windows, their order and every new weight."""
        name = f"hybrid-{recipe}" + ("" if pretrained else "-scratch")
        run_dir = runs / f"{name}-seed{s}"
        config = load_config(HybridTrainConfig, CONFIGS / HYBRID_RECIPES[recipe][0],
                             {**(hybrid_overrides or {}), "pretrained": pretrained, "seed": s,
                              "retriever": str(sas_dir / "model")})

        def train():
            start = time.time()
            train_hybrid(ds, t30, run_dir, config, progress=False, resume="auto")
            return {"seconds": round(time.time() - start, 1),
                    **{k: v for k, v in json.loads((run_dir / "train.json").read_text()).items() if k != "config"}}

        trained = stages.run(f"{name}-seed{s}", base | {"config": config.__dict__}, train)
        logit_file = runs / f"{name}-logits-seed{s}.npz"

        def top_window(requests) -> np.ndarray:
            """(R, window) the LM's logits of each list's top ``window`` (presented in the retriever's order)."""
            w = config.window
            return lm_logits(ds, run_dir / "model", requests, window=w, depth=w)[:, :w]

        def logits():
            np.savez(logit_file, test=top_window(test_requests))
            return str(logit_file)

        stages.run(f"{name}-logits-seed{s}", base | {"trained": trained}, logits)
        got = {"test": np.load(logit_file)["test"]}
        valid_file = runs / f"{name}-valid-logits-seed{s}.npy"

        def valid_logits():               # every validation list: the fusion rows train on them
            np.save(valid_file, top_window(requests("valid")))
            return str(valid_file)

        stages.run(f"{name}-valid-logits-seed{s}", base | {"trained": trained}, valid_logits)
        got["valid"] = np.load(valid_file)
        as_feature = {split: fill_unscored(got[split], depth) for split in ("valid", "test")}

        def evaluate():
            w = config.window
            beta, by_beta = choose_prior(got["valid"][:PRIOR_USERS], split_data["valid"]["targets"][:PRIOR_USERS], w,
                                         depth)
            return {"name": name, "seed": s, "features": ["lm"], "retriever_prior": beta, "prior_on_validation": by_beta,
                    "scorer": f"FIRST over the top-{w} minus the retriever prior chosen on {PRIOR_USERS} validation "
                              "users (the rest in the retriever's order)", "backbone": "SmolLM2-135M, first "
                    f"{config.keep_layers} layers, {'pretrained' if pretrained else 'random init'}",
                    "best_val_cand_ndcg@10": trained["best_val_cand_ndcg@10"], "epochs": trained.get("epochs"),
                    **evaluate_scores(first_then_retriever(got["test"], beta, depth), targets, retriever_users, later,
                                    per_user / f"{name}-seed{s}.npy"),
                    "seconds": trained["seconds"]}

        lm = {"lm": str(run_dir / "model"), "lm_depth": config.window, "lm_cols": as_feature, "lm_trained": trained}
        short = name.removeprefix("hybrid-")
        return [stages.run(f"{name}-eval-seed{s}", base | {"trained": trained}, evaluate),
                fusion_row(f"fusion-retriever+{short}", ["retriever"], row_seed=s, **lm),
                fusion_row(f"fusion-mlp+{short}", everything, row_seed=s, **lm)]

    for s in sorted(set(lm_seeds) | set(hybrid_seeds if hybrid else ())):   # every row of seed 0 first
        if s in lm_seeds:
            rows += lm_rows(s)
        if s in hybrid_seeds:
            for recipe in (r for r in hybrid_recipes if s in HYBRID_RECIPES[r][1]):
                for variant in hybrid:
                    rows += hybrid_rows(recipe, variant == "pretrained", s)

    def compare(row: str, against: str, seeds: tuple[int, ...] | None = None) -> dict | None:
        """Paired interval of one row's per-user NDCG@10 minus another's: stage names with their seed, or, with
        ``seeds``, row names whose per-user NDCG@10 is averaged over those seeds first (the seed-averaged models
        compared; None unless every seed of both rows was run)."""
        names = [(row, against)] if seeds is None else [(f"{row}-seed{s}", f"{against}-seed{s}") for s in seeds]
        files = [(per_user / f"{a}.npy", per_user / f"{b}.npy") for a, b in names]
        if not all(a.exists() and b.exists() for a, b in files):
            return None
        after = np.mean([np.load(a) for a, _ in files], 0)
        before = np.mean([np.load(b) for _, b in files], 0)
        label = {} if seeds is None else {"seeds": list(seeds), "per_user": "mean over the seeds"}
        return {"row": row, "against": against, **label, **_paired(before, after)}

    pairs = [(f"fusion-mlp-without-{g}-seed0", "fusion-mlp-seed0") for g in everything[1:]]
    pairs += [p for s in lm_seeds for p in ((f"fusion-mlp+lm-seed{s}", f"fusion-mlp-seed{s}"),
                                              (f"fusion-retriever+lm-seed{s}", "fusion-retriever-only-seed0"))]
    for s in hybrid_seeds:
        for recipe in hybrid_recipes:
            for short in (recipe, f"{recipe}-scratch"):
                pairs += [(f"fusion-retriever+{short}-seed{s}", "fusion-retriever-only-seed0"),
                          (f"fusion-mlp+{short}-seed{s}", f"fusion-mlp-seed{s}")]
            pairs += [(f"{first}{recipe}-seed{s}", f"{first}{recipe}-scratch-seed{s}")
                      for first in ("hybrid-", "fusion-retriever+", "fusion-mlp+")]
    comparisons = [c for c in (compare(a, b) for a, b in pairs) if c]
    if len(hybrid_seeds) > 1:
        comparisons += [c for c in (compare(f"{first}{recipe}", f"{first}{recipe}-scratch", tuple(hybrid_seeds))
                                    for recipe in hybrid_recipes for first in ("hybrid-", "fusion-retriever+",
                                                                                "fusion-mlp+")) if c]

    learned = [r for r in rows if "holdout_ndcg@10" in r]
    best = max(learned, key=lambda r: r["holdout_ndcg@10"])
    rows.append({**best, "name": "end-to-end", "pipeline": f"SASRec top-{depth} -> {best['name']} (seed {best['seed']})",
                 "chosen_by": "the best validation-holdout NDCG@10 among the fusion rows"})
    return {"rows": rows, "comparisons": comparisons, "candidate_recall": recall, "seconds": stages.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/strong", help="where data, runs and stage markers are written")
    p.add_argument("--seed", type=int, default=0, help="the retriever's seed")
    p.add_argument("--sasrec-minutes", type=float, default=60.0, help="the retriever's training budget")
    p.add_argument("--lm-minutes", type=float, default=20.0, help="each listwise LM's training budget")
    p.add_argument("--lm-seeds", type=int, nargs="*", default=list(SEEDS), help="seeds of the listwise LM")
    p.add_argument("--hybrid-minutes", type=float, default=None,
                   help="cap on each hybrid SmolLM2 reranker's training (default: its recipe's)")
    p.add_argument("--hybrid", nargs="*", choices=["pretrained", "scratch"], default=["pretrained", "scratch"],
                   help="which hybrid SmolLM2 rows to train (none: leave them out)")
    p.add_argument("--hybrid-seeds", type=int, nargs="*", default=list(SEEDS), help="seeds of the hybrid rows")
    p.add_argument("--hybrid-recipes", nargs="*", choices=list(HYBRID_RECIPES), default=list(HYBRID_RECIPES),
                   help="which hybrid SmolLM2 recipes to train (rows hybrid-RECIPE)")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.rerankers_strong")
    result = run(Path(a.out), seed=a.seed, sasrec_overrides={"max_minutes": a.sasrec_minutes},
                 lm_overrides={"max_minutes": a.lm_minutes}, lm_seeds=tuple(a.lm_seeds), hybrid=tuple(a.hybrid),
                 hybrid_seeds=tuple(a.hybrid_seeds), hybrid_overrides={"max_minutes": a.hybrid_minutes},
                 hybrid_recipes=tuple(a.hybrid_recipes))
    throughput = RESULTS / "sasrec_throughput.json"
    if throughput.exists():
        t = json.loads(throughput.read_text())
        result["sasrec_throughput"] = {"from": "results/sasrec_throughput.json", "command": t.get("command"),
                                       "commit": t.get("commit"), "rows": t.get("rows")}
    write_result("rerankers_strong", provenance, {
        "dataset": "ml-1m", "split": "test", "depth": DEPTH,
        "protocol": "leave-one-out, full ranking over the catalogue, history masked; a target outside the "
                    f"retriever's top-{DEPTH} is a miss; paired = 95% bootstrap interval of per-user NDCG@10 minus "
                    "the retriever order's (all test users); later_than_history = the same on the users whose test "
                    "item's timestamp is after their last history item's (ML-1M logs many ratings in the same "
                    "second, ordered by file position)",
        "labels": "tiny = a model built in code, trained here (no pretrained weights)", **result})


if __name__ == "__main__":
    main()
