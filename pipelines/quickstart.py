"""``recsys quickstart``: the whole product on real data in one command.

Stages (each skipped when its output is up to date, each training stage resuming after an interruption):

    data        fetch + prepare the dataset (leave-one-out)
    popularity  the popularity baseline
    sasrec      SASRec, the retriever
    candidates  SASRec top-N through a FAISS index, for train/valid/test targets
    fusion      the fusion reranker: side features the retriever lacks (EASE, item successions, what is
                popular now, demographics, genres, ...) scored by a small MLP trained on the validation lists
    reranker    listwise reranker (tiny backbone): SFT, then a short Rank-GRPO run
    generative  semantic IDs from SASRec's item embeddings + generative recommender SFT
    evaluate    test metrics of popularity, SASRec, SASRec -> each reranker, generative (full ranking), and
                the paired bootstrap interval of each reranker's NDCG@10 minus SASRec's order
    export      ONNX serving directory (SASRec + the reranker's FIRST scorer)

Presets: ``small`` (under a minute on the bundled fixture, for tests), ``default`` (about 20 minutes on a 2-core
CPU) and ``full`` (the benchmark recipes in ``pipelines/configs``: hours on CPU). Every result is
labelled: the rerankers and the generative model use the ``tiny`` backbone built in code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipelines.train import PRESETS as SASREC_PRESETS
from recsys.errors import RecsysError
from recsys.metrics import ndcg, paired_bootstrap, target_rank
from recsys.precision import autocast

CONFIGS = Path(__file__).parent / "configs"
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tiny"
"""The synthetic dataset the ``small`` preset runs on unless given another."""

PRESETS = {
    "small": {
        "sasrec": {"max_epochs": 2, "model.hidden_size": 16, "model.max_len": 20},
        "candidates": 10, "depth": 10,
        "reranker": {"max_epochs": 1, "tiny_hidden_size": 32, "tiny_layers": 1, "window": 10, "max_history": 10,
                     "val_users": 10, "batch_size": 8},
        "rl": {"max_steps": 2, "val_every": 1, "group_size": 2, "prompts_per_step": 2, "val_users": 10, "window": 10},
        "semantic_ids": {"levels": 2, "codebook_size": 4},
        "generative": {"max_epochs": 1, "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
                       "model.max_items": 10, "batch_size": 8, "val_users": 20, "val_beam": 10},
        "beam": 10,
    },
    "default": {
        "sasrec": SASREC_PRESETS["short"],
        "candidates": 50, "depth": 20,
        "reranker": {"max_minutes": 3.0, "max_epochs": 2},
        "rl": {"max_steps": 20, "val_every": 10, "val_users": 200},
        "semantic_ids": {"levels": 3, "codebook_size": 32},
        "generative": {"max_minutes": 3.5, "max_epochs": 2, "val_users": 500},
        "beam": 50,
    },
    "full": {
        "sasrec": {}, "candidates": 50, "depth": 20, "reranker": {}, "rl": {},
        "semantic_ids": {"levels": 3, "codebook_size": 32}, "generative": {}, "beam": 50,
    },
}


def same_settings(stored, new) -> bool:
    """Whether a stage's ``new`` settings are those it ran with (``stored``): equal, except that a setting
    absent from ``stored`` (added to the code since) matches when it is None, i.e. off."""
    if isinstance(stored, dict) and isinstance(new, dict):
        return (set(stored) <= set(new) and all(same_settings(stored[k], new[k]) for k in stored)
                and all(new[k] is None for k in set(new) - set(stored)))
    return stored == new


PROTOCOL = ("leave-one-out, full ranking, history masked; reranker: SASRec top-N reordered, a target outside the "
            "candidates is a miss; generative: beam search, a target outside the beam is a miss")
"""How every quickstart figure is measured (written into ``quickstart.json``)."""


class Stages:
    """Times stages and skips those whose ``stages/NAME.json`` records the same settings (:func:`same_settings`)."""

    def __init__(self, out: Path, log):
        self.out, self.log, self.seconds = out, log, {}

    def run(self, name: str, settings: dict, fn):
        marker = self.out / "stages" / f"{name}.json"
        record = json.loads(json.dumps(settings, default=str))
        start = time.time()
        if marker.exists() and same_settings(json.loads(marker.read_text())["settings"], record):
            self.log(f"[{name}] up to date")
            result = json.loads(marker.read_text())["result"]
        else:
            self.log(f"[{name}] running ...")
            result = fn()
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"settings": record, "result": result}, indent=2, default=str))
        self.seconds[name] = round(time.time() - start, 1)
        self.log(f"[{name}] {self.seconds[name]:.0f} s")
        return result


def _ranks(rerank_dir: Path, cands: Path) -> tuple[list[float], list[float]]:
    """0-based target ranks before (retriever order) and after reranking, from ``reranked_test.parquet``."""
    import polars as pl

    df = pl.read_parquet(rerank_dir / "reranked_test.parquet")
    before, after = [], []
    for row in df.iter_rows(named=True):
        depth = len(row["reranked"])
        before.append(target_rank(row["candidates"][:depth], row["target"]))
        after.append(target_rank(row["reranked"], row["target"]))
    return before, after


def evaluate_stages(ds, runs: Path, cands: Path, p: dict, window: int) -> dict:
    """Every model of a quickstart run on the test split (the ``evaluate`` stage): popularity, SASRec, the
    fusion and listwise rerankers over SASRec's candidates with paired intervals, the generative model."""
    from pipelines.fusion import evaluate_fusion
    from pipelines.generative import evaluate_generative, load_for
    from pipelines.jobs import evaluate_model
    from pipelines.rerank import candidate_set_metrics, rerank_candidates

    metrics = [f"{m}@{k}" for k in (1, 5, 10, 20) for m in ("hr", "ndcg")]
    results = {"popularity": evaluate_model(ds, runs / "popularity", "test", metrics),
               "sasrec": evaluate_model(ds, runs / "sasrec", "test", metrics)}
    fu = evaluate_fusion(ds, runs / "fusion" / "model", cands, "test", metrics)
    fusion_name = f"sasrec -> fusion (side features, top {p['candidates']})"
    results[fusion_name] = fu["reranked"]
    paired = {fusion_name: paired_bootstrap(fu["per_user"]["retriever"], fu["per_user"]["reranked"])}
    rerank_candidates(ds, runs / "reranker-rank-grpo" / "model", cands, runs / "rerank-eval", "test",
                           window=window, depth=p["depth"], mode="first")
    before, after = _ranks(runs / "rerank-eval", cands)
    rr = candidate_set_metrics(before, after, metrics)
    listwise_name = f"sasrec -> listwise-tiny (rank-grpo, top {p['depth']})"
    results[listwise_name] = {m: rr["reranked"][m] for m in metrics}
    paired[listwise_name] = paired_bootstrap(*(ndcg(np.asarray(r)[:, None], np.ones((len(r), 1)), 10)
                                               for r in (before, after)))
    test = ds.eval_examples("test")
    with autocast("cpu"):
        g = evaluate_generative(load_for(ds, runs / "generative-sft" / "model"), test.histories,
                                [int(t[0]) for t in test.targets], beam=p["beam"], metrics=metrics)
    results[f"generative-tiny (sft, beam {p['beam']})"] = {m: g[m] for m in metrics}
    return {"results": {name: {m: float(r[m]) for m in metrics} for name, r in results.items()},
            "paired_ndcg@10": paired}


def print_summary(summary: dict, out: Path, log=print) -> None:
    """The results table, each reranker's paired interval, the stage times and what to run next."""
    from pipelines.jobs import format_table

    results, serve_dir = summary["results"], summary["serve"].removeprefix("recsys serve ")
    log("\n" + format_table(list(results.items()), ["hr@10", "ndcg@10", "hr@5", "ndcg@5"]))
    for name, b in summary["paired_ndcg@10"].items():
        log(f"{name}: NDCG@10 minus SASRec's order {b['mean_diff']:+.4f}, 95% paired bootstrap interval "
            f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}] over {b['queries']} test users "
            f"({b['better']} better, {b['worse']} worse)")
    log("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items())
        + f" (total {summary['total_seconds'] / 60:.1f} min)")
    log("published anchor (SASRec, ML-1M full ranking): hr@10 0.2853, ndcg@10 0.1603")
    log(f"\nserve it:  recsys serve {serve_dir}")
    log(f"report:    recsys report {out}")


def prepared(dataset, data_dir: Path, log=print) -> dict:
    """The ``data`` stage: ``dataset`` prepared into ``data_dir`` with the default split, unless it already is
    (a directory prepared with other settings is prepared again)."""
    from recsys.data import PrepareConfig, PreparedDataset, load_dataset, prepare

    try:
        ds = PreparedDataset.load(data_dir)
        if ds.manifest["config"] == PrepareConfig().__dict__:
            return {"users": ds.n_users, "items": ds.n_items}
    except RecsysError:
        pass
    ds = prepare(load_dataset(dataset, log=log), data_dir, PrepareConfig())
    return {"users": ds.n_users, "items": ds.n_items}


def quickstart(out="artifacts", dataset="ml-1m", preset: str = "default", seed: int = 0, log=print) -> dict:
    """Run every stage (see the module docstring); returns and writes ``out/quickstart.json``."""
    from pipelines.config import load_config
    from pipelines.fusion import FusionTrainConfig, train_fusion_reranker
    from pipelines.generative import GenerativeTrainConfig, train_generative
    from pipelines.reranker import RerankerSFTConfig, train_reranker
    from pipelines.retrieval import build_semantic_ids, candidates
    from pipelines.rl import RLConfig, train_rl
    from pipelines.train import SASRecTrainConfig, train_popularity, train_sasrec
    from recsys.data import PreparedDataset
    from recsys.portable.features import supported_groups
    from recsys.retrieval.semantic_ids import SemanticIDConfig
    from serving.export import export

    if preset not in PRESETS:
        raise RecsysError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p, out = PRESETS[preset], Path(out)
    stages = Stages(out, log)
    data_dir = out / "data" / Path(str(dataset)).name
    runs = out / "runs" / f"{preset}-seed{seed}"

    stages.run("data", {"dataset": str(dataset)}, lambda: prepared(dataset, data_dir, log))
    ds = PreparedDataset.load(data_dir)
    settings = {"fingerprint": ds.fingerprint, "preset": preset, "seed": seed}

    stages.run("popularity", settings, lambda: str(train_popularity(ds, runs / "popularity")))
    sas_cfg = load_config(SASRecTrainConfig, CONFIGS / "sasrec_ml1m.yaml" if preset == "full" else None,
                          {**p["sasrec"], "seed": seed})
    stages.run("sasrec", settings | {"config": sas_cfg.__dict__},
               lambda: json.loads((train_sasrec(ds, runs / "sasrec", sas_cfg).parent / "train.json").read_text())
               ["best_val_ndcg@10"])
    sas_model = runs / "sasrec" / "model"
    cands = runs / "candidates"
    recall = stages.run("candidates", settings | {"n": p["candidates"]},
                        lambda: candidates(ds, "sasrec", cands, n=p["candidates"], sasrec=runs / "sasrec")["recall"])

    fu_cfg = load_config(FusionTrainConfig, CONFIGS / "fusion_ml1m.yaml",
                         {"features": ",".join(supported_groups(ds)), "depth": p["candidates"], "scorer.seed": seed})
    stages.run("fusion", settings | {"n": p["candidates"], "config": fu_cfg.__dict__},
               lambda: train_fusion_reranker(ds, cands, runs / "fusion", fu_cfg, log=log)["holdout_ndcg@10"])

    rr_cfg = load_config(RerankerSFTConfig, CONFIGS / "listwise_sft_tiny.yaml",
                         {**p["reranker"], "seed": seed, "init_items_from": str(sas_model)})
    rl_cfg = load_config(RLConfig, CONFIGS / "rl_rank_grpo_tiny.yaml",
                         {**p["rl"], "seed": seed, "init": str(runs / "reranker-sft" / "model")})

    def reranker():
        train_reranker(ds, cands, runs / "reranker-sft", rr_cfg, progress=True)
        train_rl(ds, cands, runs / "reranker-rank-grpo", rl_cfg, progress=True)
        return json.loads((runs / "reranker-rank-grpo" / "train.json").read_text())["best_val_cand_ndcg@10"]

    stages.run("reranker", settings | {"sft": rr_cfg.__dict__, "rl": rl_cfg.__dict__}, reranker)

    sid_cfg = SemanticIDConfig(**p["semantic_ids"], seed=seed)
    gen_overrides = {**p["generative"], "seed": seed, "semantic_ids": str(runs / "semantic-ids")}
    gen_cfg = load_config(GenerativeTrainConfig, CONFIGS / "generative_sft_tiny.yaml", gen_overrides)

    def generative():
        build_semantic_ids(ds, "cf", runs / "semantic-ids", sid_cfg, sasrec=runs / "sasrec")
        train_generative(ds, runs / "generative-sft", gen_cfg, progress=True)
        return json.loads((runs / "generative-sft" / "train.json").read_text())["best_val_ndcg@10"]

    stages.run("generative", settings | {"sid": sid_cfg.__dict__, "config": repr(gen_cfg)}, generative)

    evaluated = stages.run("evaluate", settings | {"depth": p["depth"], "beam": p["beam"], "at_k": [1, 5, 10, 20],
                                                   "n": p["candidates"]},
                           lambda: evaluate_stages(ds, runs, cands, p, rr_cfg.window))
    results = evaluated["results"]
    serve_dir = runs / "serve"
    stages.run("export", settings | {"fusion": True},
               lambda: str(export(ds, sas_model, serve_dir, runs / "reranker-rank-grpo" / "model",
                                  generative_dir=runs / "generative-sft" / "model", fusion_dir=runs / "fusion" / "model")))

    summary = {"dataset": str(dataset), "preset": preset, "seed": seed, "split": "test",
               "protocol": PROTOCOL,
               "candidate_recall": recall, "results": results, "paired_ndcg@10": evaluated["paired_ndcg@10"],
               "seconds": stages.seconds,
               "total_seconds": round(sum(stages.seconds.values()), 1), "serve": f"recsys serve {serve_dir}"}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))         # out/stages/ made it
    print_summary(summary, out, log)
    return summary
