"""The fusion reranker job: side features of a retriever's candidates (and optionally a listwise LM's
logits), a small scorer trained on the validation targets, and its evaluation on test.

A run directory holds::

    model/fusion.safetensors, model/fusion.json     the scorer (:class:`recsys.rerank.fusion.FusionRanker`)
    model/features.json                             what the scorer reads: feature groups, EASE's lambda, the LM
    train.json                                      the config, seconds and the holdout curve

The side-feature tables are refitted from the dataset's training interactions when the model is
loaded (deterministic, a few seconds on ML-1M), so the run directory stays small.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.metrics import compute_metrics
from recsys.rerank.features import GROUPS, SideFeatures, requests_from_candidates
from recsys.rerank.fusion import FusionConfig, FusionRanker, list_ranks, train_fusion

ALL_GROUPS = tuple(GROUPS)
LM_COLUMN = "lm_logit"


@dataclass(frozen=True)
class FusionTrainConfig:
    """A fusion reranker: which features, which scorer, how it is trained."""

    features: tuple[str, ...] = ALL_GROUPS
    """Feature groups (:data:`recsys.rerank.features.GROUPS`)."""
    lm: str | None = None
    """A trained listwise reranker with item-token identifiers (``RUN/model``): its FIRST logit of each
    candidate (the model alone, no retriever prior) joins the features as ``lm_logit``."""
    depth: int = 50
    """Candidates reranked per list (the top ``depth`` of the candidates file)."""
    train_split: str = "valid"
    """Whose candidate lists teach the scorer: ``valid`` (targets the retriever never trained on)."""
    ease_lambda: float = 300.0
    """EASE's L2 weight (lambda of arXiv 1905.03375, eq. 8)."""
    scorer: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    """The MLP and its training (:class:`recsys.rerank.fusion.FusionConfig`)."""

    def __post_init__(self):
        unknown = [g for g in self.features if g not in GROUPS]
        if unknown or not self.features:
            raise RecsysError(f"features: unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
        if self.train_split not in ("train", "valid"):
            raise RecsysError(f"train_split must be 'train' or 'valid', got {self.train_split!r}")


def fit_side_features(dataset: PreparedDataset, groups: list[str], ease_lambda: float = 300.0) -> SideFeatures:
    """:meth:`SideFeatures.fit`, with MiniLM's title embeddings (cached) when the ``text`` group is asked for."""
    vectors = None
    if "text" in groups:
        from pipelines.retrieval import text_vectors

        vectors = text_vectors(dataset)[0]
    return SideFeatures.fit(dataset, groups, ease_lambda, vectors)


def lm_logits(dataset: PreparedDataset, lm_dir: str | Path, requests, window: int = 20,
              batch_size: int = 32) -> np.ndarray:
    """(R, L) FIRST logits of every candidate under a listwise item-token reranker (no retriever prior),
    scored in windows of ``window`` candidates: [0, w), [w, 2w), ..., the last window ending at L (it
    overlaps the one before; the overlapped candidates keep their earlier logit). An item token's logit
    at the answer position is the model's score for that item as the next one, comparable across windows."""
    from pipelines.reranker import load_reranker

    scorer = load_reranker(lm_dir, dataset, window=window)
    if scorer.identifiers != "items":
        raise RecsysError(f"{lm_dir}: the fusion reads item-token FIRST logits; this reranker names candidates "
                          f"by {scorer.identifiers}")
    scorer.retriever_prior = 0.0
    L = len(requests[0].candidates)
    starts = sorted({min(s, max(L - window, 0)) for s in range(0, L, window)})
    out = np.zeros((len(requests), L), dtype=np.float32)
    done = np.zeros(L, dtype=bool)
    for s in starts:
        cols = [j for j in range(s, min(s + window, L)) if not done[j]]
        for i in range(0, len(requests), batch_size):
            chunk = requests[i:i + batch_size]
            scores = scorer.first_scores([r.history for r in chunk], [[int(c) for c in r.candidates[s:s + window]]
                                                                      for r in chunk])
            for k, sc in enumerate(scores):
                out[i + k, cols] = sc.numpy()[[j - s for j in cols]]
        done[cols] = True
    return out


def feature_lists(dataset: PreparedDataset, candidates_dir, split: str, side: SideFeatures, depth: int,
                  lm: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(R, depth, F) features of every list of ``candidates_<split>.parquet``, (R,) the target's position
    (-1 if the retriever missed it) and the column names."""
    from pipelines.reranker import load_candidates

    rows = load_candidates(candidates_dir, split)
    width = min(len(c) for c in rows["candidates"].to_list()) if rows.height else 0
    if width < depth:
        raise RecsysError(f"{candidates_dir}: lists of {width} candidates, fewer than depth {depth}")
    requests = requests_from_candidates(dataset, rows, depth)
    features = side.transform_many(requests)
    names = list(side.names)
    if lm:
        features = np.concatenate([features, lm_logits(dataset, lm, requests)[..., None]], -1)
        names.append(LM_COLUMN)
    targets = np.asarray([int(np.flatnonzero(r.candidates == t)[0]) if t in r.candidates else -1
                          for r, t in zip(requests, rows["target"].to_list())])
    return features, targets, names


def train_fusion_reranker(dataset: PreparedDataset, candidates_dir, out, config: FusionTrainConfig = FusionTrainConfig(),
                          log=print) -> dict:
    """Fit the side features on the training interactions, the scorer on ``config.train_split``'s lists;
    save to ``out/model``; return the training summary (also ``out/train.json``)."""
    out = Path(out)
    start = time.time()
    side = fit_side_features(dataset, list(config.features), config.ease_lambda)
    features, targets, names = feature_lists(dataset, candidates_dir, config.train_split, side, config.depth, config.lm)
    return fit_fusion(dataset, features, targets, names, out, config, start, str(candidates_dir), log)


def fit_fusion(dataset: PreparedDataset, features: np.ndarray, targets: np.ndarray, names: list[str], out,
               config: FusionTrainConfig, start: float | None = None, candidates: str = "", log=print) -> dict:
    """Train the scorer on computed (N, L, F) features and (N,) target positions and save the run to ``out``
    (what :func:`train_fusion_reranker` does after computing them; benchmarks that train many scorers on
    column subsets of the same features call it directly)."""
    out, start = Path(out), start or time.time()
    model, summary = train_fusion(features, targets, names, config.scorer)
    model.save_pretrained(out / "model")
    (out / "model" / "features.json").write_text(json.dumps(
        {"groups": list(config.features), "ease_lambda": config.ease_lambda, "lm": config.lm, "depth": config.depth,
         "dataset_fingerprint": dataset.fingerprint}, indent=2))
    summary |= {"seconds": round(time.time() - start, 1), "config": dataclasses.asdict(config),
                "dataset_fingerprint": dataset.fingerprint, "candidates": candidates}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    log(f"fusion: holdout ndcg@10 {summary['holdout_ndcg@10']:.4f} (retriever order "
        f"{summary['holdout_retriever_ndcg@10']:.4f}), epoch {summary['best_epoch']}, {summary['seconds']:.0f} s")
    return summary


def load_fusion(model_dir, dataset: PreparedDataset) -> tuple[FusionRanker, SideFeatures, dict]:
    """The scorer, its side features refitted on ``dataset`` (which must be the one it was trained on)
    and its ``features.json``."""
    from pipelines.jobs import read_model_meta

    meta = read_model_meta(model_dir, "features.json", dataset, "a fusion reranker")
    return FusionRanker.from_pretrained(model_dir), fit_side_features(dataset, meta["groups"], meta["ease_lambda"]), meta


def ranking_metrics(ranks: np.ndarray, metrics: list[str]) -> tuple[dict, np.ndarray]:
    """Full-ranking metrics of one held-out item per user from its (R,) rank (``inf`` = a miss), and the
    per-user NDCG@10 for paired comparisons."""
    from recsys.metrics import ndcg

    r = ranks[:, None]
    g = np.ones_like(r)
    return compute_metrics(r, g, metrics), ndcg(r, g, 10)


def evaluate_fusion(dataset: PreparedDataset, model_dir, candidates_dir, split: str, metrics: list[str]) -> dict:
    """Rerank ``split``'s lists with a fusion run; metrics of the reranked and the retriever's order,
    and the per-user NDCG@10 of both (``per_user``, for a paired bootstrap)."""
    model, side, meta = load_fusion(model_dir, dataset)
    features, targets, _ = feature_lists(dataset, candidates_dir, split, side, meta["depth"], meta["lm"])
    after, after_users = ranking_metrics(list_ranks(model.score(features), targets), metrics)
    before, before_users = ranking_metrics(np.where(targets >= 0, targets, np.inf).astype(np.float64), metrics)
    return {"reranked": after, "retriever": before, "per_user": {"reranked": after_users, "retriever": before_users}}
