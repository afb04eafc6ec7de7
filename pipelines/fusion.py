"""The fusion reranker job: side features of a retriever's candidates (and optionally the logits of an
item-token LM: a tiny listwise reranker or a hybrid-token pretrained one), a small scorer trained on the
validation targets, and its evaluation on test.

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
from recsys.data.candidates import read_candidate_lists
from recsys.errors import RecsysError
from recsys.metrics import compute_metrics
from recsys.portable.features import GROUPS, SideFeatures, requests_from_candidates
from recsys.rerank.fusion import FusionConfig, FusionRanker, list_ranks, train_fusion

ALL_GROUPS = tuple(GROUPS)
LM_COLUMN = "lm_logit"


@dataclass(frozen=True)
class FusionTrainConfig:
    """A fusion reranker: which features, which scorer, how it is trained."""

    features: tuple[str, ...] = ALL_GROUPS
    """Feature groups (:data:`recsys.portable.features.GROUPS`)."""
    lm: str | None = None
    """A trained item-token FIRST model (``RUN/model`` of a listwise reranker with ``identifiers: items``, or
    of a hybrid-token reranker): its logit of each candidate (the model alone, no retriever prior) joins the
    features as ``lm_logit``."""
    lm_depth: int | None = None
    """Show the LM only the top ``lm_depth`` candidates (its cost grows with them); the rest take the list's
    lowest LM logit. None: all ``depth``."""
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


def window_scorer(dataset: PreparedDataset, lm_dir: str | Path, window: int):
    """``score(histories, candidate lists) -> list of (n,) numpy scores`` of a trained item-token FIRST model
    (no retriever prior): a listwise reranker run's model, or a hybrid-token one (``hybrid.json``,
    :mod:`pipelines.hybrid`). Both score a candidate by its own item row, so scores compare across windows."""
    if (Path(lm_dir) / "hybrid.json").exists():
        import torch

        from pipelines.hybrid import Window, load_hybrid, window_scores
        from recsys.portable.prompts import item_titles

        model, config = load_hybrid(lm_dir, dataset)
        titles = item_titles(dataset, config.domain)   # the words are dropped with title_words 0; the domain stays

        def hybrid(histories, cands):
            with torch.no_grad():
                w = [Window([int(x) for x in h[-config.max_history:]], c, -1) for h, c in zip(histories, cands)]
                return list(window_scores(model, w, titles, config).float().numpy())
        return hybrid
    from pipelines.rerank import load_reranker

    scorer = load_reranker(lm_dir, dataset, window=window)
    if scorer.identifiers != "items":
        raise RecsysError(f"{lm_dir}: the fusion reads item-token FIRST logits; this reranker names candidates "
                          f"by {scorer.identifiers}")
    scorer.retriever_prior = 0.0
    return lambda histories, cands: [s.numpy() for s in scorer.first_scores(list(histories), cands)]


def fill_unscored(scores: np.ndarray, length: int) -> np.ndarray:
    """(R, length) from (R, k <= length) scores of each list's first k candidates: the rest take their
    list's lowest score (the LM ranks them no higher than anything it saw)."""
    out = np.repeat(scores.min(1, keepdims=True), length, 1).astype(np.float32)
    out[:, :scores.shape[1]] = scores
    return out


def lm_logits(dataset: PreparedDataset, lm_dir: str | Path, requests, window: int = 20,
              depth: int | None = None, batch_size: int = 32) -> np.ndarray:
    """(R, L) FIRST logits of every candidate under an item-token model (:func:`window_scorer`), scored in
    windows of ``window`` candidates in the retriever's order: [0, w), [w, 2w), ..., the last window ending
    at ``depth`` (all L by default; it overlaps the one before, whose logits the overlapped candidates
    keep). Candidates past ``depth`` are not shown to the LM (:func:`fill_unscored`). An item row's logit at
    the answer position is the model's score for that item as the next one, comparable across windows."""
    score = window_scorer(dataset, lm_dir, window)
    L = len(requests[0].candidates)
    D = min(depth or L, L)
    starts = sorted({min(s, max(D - window, 0)) for s in range(0, D, window)})
    out = np.zeros((len(requests), D), dtype=np.float32)
    done = np.zeros(D, dtype=bool)
    for s in starts:
        cols = [j for j in range(s, min(s + window, D)) if not done[j]]
        for i in range(0, len(requests), batch_size):
            chunk = requests[i:i + batch_size]
            scores = score([r.history for r in chunk], [[int(c) for c in r.candidates[s:min(s + window, D)]]
                                                        for r in chunk])
            for k, sc in enumerate(scores):
                out[i + k, cols] = np.asarray(sc)[[j - s for j in cols]]
        done[cols] = True
    return fill_unscored(out, L)


def feature_lists(dataset: PreparedDataset, candidates_dir, split: str, side: SideFeatures, depth: int,
                  lm: str | None = None, lm_depth: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(R, depth, F) features of every list of ``candidates_<split>.parquet``, (R,) the target's position
    (-1 if the retriever missed it) and the column names."""
    rows = read_candidate_lists(dataset, candidates_dir, split)
    width = min(len(r.candidates) for r in rows) if rows else 0
    if width < depth:
        raise RecsysError(f"{candidates_dir}: lists of {width} candidates, fewer than depth {depth}")
    requests = requests_from_candidates(dataset, rows, depth)
    features = side.transform_many(requests)
    names = list(side.names)
    if lm:
        features = np.concatenate([features, lm_logits(dataset, lm, requests, depth=lm_depth)[..., None]], -1)
        names.append(LM_COLUMN)
    targets = np.asarray([r.top(depth).target_rank() for r in rows])
    targets = np.where(np.isfinite(targets), targets, -1).astype(np.int64)
    return features, targets, names


def train_fusion_reranker(dataset: PreparedDataset, candidates_dir, out, config: FusionTrainConfig = FusionTrainConfig(),
                          log=print) -> dict:
    """Fit the side features on the training interactions, the scorer on ``config.train_split``'s lists;
    save to ``out/model``; return the training summary (also ``out/train.json``)."""
    out = Path(out)
    start = time.time()
    side = fit_side_features(dataset, list(config.features), config.ease_lambda)
    features, targets, names = feature_lists(dataset, candidates_dir, config.train_split, side, config.depth, config.lm,
                                             config.lm_depth)
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
        {"groups": list(config.features), "ease_lambda": config.ease_lambda, "lm": config.lm, "lm_depth": config.lm_depth,
         "depth": config.depth,
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
    features, targets, _ = feature_lists(dataset, candidates_dir, split, side, meta["depth"], meta["lm"],
                                        meta.get("lm_depth"))
    after, after_users = ranking_metrics(list_ranks(model.score(features), targets), metrics)
    before, before_users = ranking_metrics(np.where(targets >= 0, targets, np.inf).astype(np.float64), metrics)
    return {"reranked": after, "retriever": before, "per_user": {"reranked": after_users, "retriever": before_users}}
