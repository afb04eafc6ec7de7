"""Evaluation protocols.

- :func:`evaluate_full_ranking`: the SASRec/HSTU protocol. Every item of the catalog is scored, the
  user's history is masked (never the target itself), and metrics come from the rank of each held-out
  item. Ties are broken by a fixed random order of the items (seed 0): the expected result of random
  tie-breaking, made reproducible, so a model that scores everything equally gets chance-level
  numbers, not a perfect score (optimistic ties) or zero (pessimistic ties).
- :func:`evaluate_run`: trec_eval-style evaluation of run and qrels files (TREC text or parquet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from recsys.data.prepared import EvalExamples
from recsys.errors import DataError, RecsysError
from recsys.metrics import DEFAULT_METRICS, compute_metrics, parse_metric


def tie_order(n_items: int, seed: int = 0) -> torch.Tensor:
    """(n_items + 1,) a fixed random priority per item used to break score ties."""
    return torch.from_numpy(np.random.default_rng(seed).permutation(n_items + 1))


def full_ranking_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor,
                       order: torch.Tensor) -> np.ndarray:
    """0-based rank of each target among all items.

    scores: (B, N+1) float, column 0 = padding; targets: (B, R) item idx, 0 = padding;
    exclude: (B, N+1) bool, items removed from the ranking (history); order: (N+1,) tie priority.
    Returns (B, R) float ranks, ``inf`` for padding targets.
    """
    scores = scores.float().clone()
    is_target = torch.zeros_like(exclude).scatter_(1, targets, True)
    scores[exclude & ~is_target] = -torch.inf
    scores[:, 0] = -torch.inf
    t = scores.gather(1, targets).unsqueeze(-1)                             # (B, R, 1)
    s = scores.unsqueeze(1)                                                 # (B, 1, N+1)
    tied_before = (s == t) & (order[None, None, :] < order[targets].unsqueeze(-1))
    ranks = ((s > t) | tied_before).sum(-1).double()                        # (B, R)
    return torch.where(targets == 0, torch.inf, ranks).numpy()


def _pad(rows: list[np.ndarray], fill: int = 0) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def evaluate_full_ranking(model, examples: EvalExamples, metrics: list[str] = DEFAULT_METRICS, *,
                          batch_size: int = 256, progress: bool = True, return_ranks: bool = False):
    """Score every item for every example with ``model.score`` and compute ``metrics``.

    ``model``: anything with ``score(histories) -> (B, n_items + 1)`` and ``n_items``.
    Returns ``{metric: mean}`` (plus ``num_queries``), and the (Q, R) ranks if ``return_ranks``.
    """
    for m in metrics:
        parse_metric(m)
    n = len(examples.users)
    if n == 0:
        raise RecsysError("no examples to evaluate")
    order = tie_order(model.n_items)
    all_ranks = []
    for start in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        hist = examples.histories[start:start + batch_size]
        targets = torch.from_numpy(_pad(examples.targets[start:start + batch_size]))
        if int(targets.max()) > model.n_items:
            raise DataError(f"target item index {int(targets.max())} is outside the model's {model.n_items} items")
        exclude = torch.zeros(len(hist), model.n_items + 1, dtype=torch.bool)
        for row, h in enumerate(hist):
            exclude[row, torch.from_numpy(np.asarray(h, dtype=np.int64))] = True
        all_ranks.append(full_ranking_ranks(model.score(hist), targets, exclude, order))
    width = max(r.shape[1] for r in all_ranks)
    ranks = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=np.inf) for r in all_ranks])
    gains = (_pad(examples.targets) != 0).astype(np.float64)             # binary relevance, 0 = padding
    result = compute_metrics(ranks, gains, metrics)
    return (result, ranks) if return_ranks else result


# ---- TREC-style run files -------------------------------------------------------------------------

def _read_trec(path: Path, kind: str) -> pl.DataFrame:
    """Run: ``qid Q0 docid rank score tag``; qrels: ``qid iter docid rel``. Whitespace-separated."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    names = ["query_id", "q0", "item_id", "rank", "score", "tag"] if kind == "run" else ["query_id", "iter", "item_id", "relevance"]
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(names):
                raise DataError(f"{path}: line {line_no} has {len(parts)} fields; a TREC {kind} line has "
                                f"{len(names)} ({' '.join(names)})")
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: file is empty")
    df = pl.DataFrame(rows, schema=names, orient="row")
    value = "score" if kind == "run" else "relevance"
    cast = df[value].cast(pl.Float64, strict=False)
    if cast.is_null().any():
        bad = int(cast.is_null().arg_max())
        raise DataError(f"{path}: line {bad + 1} field '{value}' is {df[value][bad]!r}; expected a number")
    return df.with_columns(cast.alias(value)).select("query_id", "item_id", value)


def _read_table(path: str | Path, kind: str) -> pl.DataFrame:
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.exists():
            raise DataError(f"{path}: file not found")
        df = pl.read_parquet(path)
        value = "score" if kind == "run" else "relevance"
        missing = [c for c in ("query_id", "item_id", value) if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; a {kind} parquet has query_id, item_id, {value}")
        return df.select(pl.col("query_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                         pl.col(value).cast(pl.Float64))
    return _read_trec(path, kind)


def evaluate_run(run_path: str | Path, qrels_path: str | Path, metrics: list[str], *,
                 complete: bool = False) -> dict[str, float]:
    """Evaluate a ranked run against relevance judgements, the way trec_eval does.

    Each query's list is ordered by score (descending), ties by item id (descending), as trec_eval.
    Queries are averaged over those in both files with at least one relevant item; with
    ``complete`` (trec_eval ``-c``), qrels queries missing from the run count as zero.
    Output: ``{metric: mean, num_queries, num_skipped_no_relevant, num_missing_in_run}``.
    """
    for m in metrics:
        parse_metric(m)
    run, qrels = _read_table(run_path, "run"), _read_table(qrels_path, "qrels")
    repeated = run.select(pl.struct("query_id", "item_id").is_duplicated()).to_series()
    if repeated.any():
        row = int(repeated.arg_max())
        q, item = run["query_id"][row], run["item_id"][row]
        raise DataError(f"{run_path}: query {q!r} lists document {item!r} more than once "
                        f"({int(repeated.sum())} rows repeat a document); trec_eval refuses such a run too")
    run = run.sort(["query_id", "score", "item_id"], descending=[False, True, True])
    rel = qrels.filter(pl.col("relevance") > 0)
    judged = set(qrels["query_id"].unique().to_list())
    with_rel = set(rel["query_id"].unique().to_list())
    in_run = set(run["query_id"].unique().to_list())
    queries = sorted(with_rel & in_run) + (sorted(with_rel - in_run) if complete else [])
    ranked = {q: items for q, items in run.group_by("query_id").agg("item_id").iter_rows()}
    relevant = {q: (items, gains) for q, items, gains in rel.group_by("query_id").agg("item_id", "relevance").iter_rows()}
    R = max((len(relevant[q][0]) for q in queries), default=1)
    ranks, gains = np.full((len(queries), R), np.inf), np.zeros((len(queries), R))
    for i, q in enumerate(queries):
        position = {item: p for p, item in enumerate(ranked.get(q, []))}
        items, g = relevant[q]
        ranks[i, :len(items)] = [position.get(item, np.inf) for item in items]
        gains[i, :len(items)] = g
    out = compute_metrics(ranks, gains, metrics) if queries else {m: 0.0 for m in metrics} | {"num_queries": 0}
    out.pop("num_skipped", None)
    out["num_skipped_no_relevant"] = len((judged - with_rel) & in_run)
    out["num_missing_in_run"] = len(with_rel - in_run)
    return out
