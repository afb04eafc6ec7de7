"""Ranking metrics over numpy arrays, vectorised over queries.

One representation serves every metric: for each query q, ``ranks[q, r]`` is the 0-based position
of its r-th relevant item in the ranked list (``inf`` if the item is not in the list) and
``gains[q, r]`` its graded relevance (1 for binary relevance, 0 marks padding). Lists shorter than k,
several relevant items, and graded relevance all follow from that. Conventions are trec_eval's:

- ``ndcg@k``: linear gain, ``sum_{rank<k} g / log2(rank + 2)`` over the ideal DCG of the top-k gains.
- ``recall@k`` = relevant found in top k / number relevant; ``hr@k`` = 1 if any is found.
- ``precision@k`` divides by k even when the list is shorter.
- ``map@k`` divides by the number of relevant items (trec_eval's ``map_cut``).
- ``mrr`` / ``mrr@k``: reciprocal rank of the first relevant item (0 if none within k).

Queries without any relevant item are skipped by :func:`compute_metrics` and counted.

Hand-checked example (two queries, binary relevance)::

    q0: list [a, b, c], relevant {b}      -> rank 1: hr@1 = 0, hr@2 = 1, ndcg@2 = 1/log2(3) = 0.6309
    q1: list [x, y],    relevant {y, z}   -> ranks (1, inf): recall@2 = 0.5, mrr = 0.5,
                                             ndcg@2 = (1/log2 3) / (1 + 1/log2 3) = 0.3869
"""

from __future__ import annotations

import numpy as np

from recsys.errors import RecsysError

DEFAULT_METRICS = ["hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"]
"""What a full-ranking evaluation reports unless told otherwise."""

PAD = -1


def relevant_ranks(ranked: np.ndarray, relevant: np.ndarray, pad: int = PAD) -> np.ndarray:
    """(Q, R) 0-based rank of each relevant item in ``ranked`` (Q, L); ``inf`` if absent or padding.

    A repeated item counts at its first occurrence. Both inputs are integer ids padded with ``pad``.
    """
    ranked, relevant = np.asarray(ranked), np.asarray(relevant)
    if ranked.ndim != 2 or relevant.ndim != 2 or ranked.shape[0] != relevant.shape[0]:
        raise RecsysError(f"ranked (Q, L) and relevant (Q, R) must share Q; got {ranked.shape} and {relevant.shape}")
    match = (ranked[:, None, :] == relevant[:, :, None]) & (relevant[:, :, None] != pad)  # (Q, R, L)
    first = match.argmax(-1).astype(np.float64)
    return np.where(match.any(-1), first, np.inf)


def target_rank(ranking, target) -> float:
    """0-based position of ``target`` in one ranking (any sequence of item ids), ``inf`` when it is absent:
    the rank the metrics below read (:func:`relevant_ranks` is the same for padded (Q, L) arrays)."""
    ranking = list(ranking)
    return float(ranking.index(target)) if target in ranking else float("inf")


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise RecsysError(f"cut-off k must be >= 1, got {k}")


def hit_rate(ranks: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    """(Q,) 1 if any relevant item is ranked in the top k."""
    _check_k(k)
    return ((ranks < k) & (gains > 0)).any(-1).astype(np.float64)


def recall(ranks: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    """(Q,) share of relevant items ranked in the top k."""
    _check_k(k)
    n_rel = (gains > 0).sum(-1)
    return ((ranks < k) & (gains > 0)).sum(-1) / np.maximum(n_rel, 1)


def precision(ranks: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    """(Q,) relevant items in the top k, divided by k."""
    _check_k(k)
    return ((ranks < k) & (gains > 0)).sum(-1) / k


def ndcg(ranks: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    """(Q,) normalised DCG at k with linear gains."""
    _check_k(k)
    found = (ranks < k) & (gains > 0)
    dcg = np.where(found, gains / np.log2(np.where(found, ranks, 0) + 2), 0.0).sum(-1)
    ideal = -np.sort(-np.where(gains > 0, gains, 0.0), axis=-1)[:, :k]
    idcg = (ideal / np.log2(np.arange(ideal.shape[1]) + 2)).sum(-1)
    return dcg / np.maximum(idcg, 1e-12)


def mrr(ranks: np.ndarray, gains: np.ndarray, k: int | None = None) -> np.ndarray:
    """(Q,) 1 / (1 + rank of the first relevant item); 0 when it is not within k."""
    _check_k(k)
    first = np.where(gains > 0, ranks, np.inf).min(-1)
    limit = np.inf if k is None else k
    return np.where(first < limit, 1.0 / (first + 1), 0.0)


def average_precision(ranks: np.ndarray, gains: np.ndarray, k: int | None = None) -> np.ndarray:
    """(Q,) average precision over the relevant items found within k, divided by the number relevant."""
    _check_k(k)
    limit = np.inf if k is None else k
    r = np.sort(np.where((gains > 0) & (ranks < limit), ranks, np.inf), axis=-1)  # found ranks, ascending
    found = np.isfinite(r)
    prec = np.where(found, (np.arange(r.shape[1]) + 1) / (np.where(found, r, 0) + 1), 0.0)
    return prec.sum(-1) / np.maximum((gains > 0).sum(-1), 1)


METRICS = {"hr": hit_rate, "recall": recall, "precision": precision, "ndcg": ndcg, "mrr": mrr,
           "map": average_precision}
_NEEDS_K = {"hr", "recall", "precision", "ndcg"}


TREC_NAMES = {"ndcg_cut": "ndcg", "p": "precision", "recall": "recall", "map_cut": "map", "success": "hr",
              "recip_rank": "mrr", "map": "map"}
"""trec_eval's measure names (``ndcg_cut_10``, ``P_10``, ``recall_10``, ``map_cut_10``, ``success_10``,
``recip_rank``, ``map``) -> ours."""


def parse_metric(name: str) -> tuple[str, int | None]:
    """``"ndcg@10" -> ("ndcg", 10)``, ``"mrr" -> ("mrr", None)``; trec_eval's names too (``ndcg_cut_10``,
    ``recip_rank``, ``P_10``); raise listing the valid names."""
    text = name.strip().lower()
    trec, _, cut = text.rpartition("_")
    if text in TREC_NAMES:
        text = TREC_NAMES[text]
    elif trec in TREC_NAMES and cut.isdigit():
        text = f"{TREC_NAMES[trec]}@{cut}"
    base, _, k = text.partition("@")
    if base not in METRICS:
        raise RecsysError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (with @k, e.g. ndcg@10), or "
                          "trec_eval's ndcg_cut_10, P_10, recall_10, map_cut_10, success_10, recip_rank, map")
    if not k:
        if base in _NEEDS_K:
            raise RecsysError(f"metric {name!r} needs a cut-off, e.g. {base}@10")
        return base, None
    if not k.isdigit() or int(k) < 1:
        raise RecsysError(f"metric {name!r}: the cut-off after '@' must be a positive integer")
    return base, int(k)


def per_query(ranks: np.ndarray, gains: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """{metric name: (Q,) values} for every query (including those with no relevant item)."""
    out = {}
    for name in names:
        base, k = parse_metric(name)
        out[name] = METRICS[base](ranks, gains, k) if k is not None or base in _NEEDS_K else METRICS[base](ranks, gains)
    return out


def compute_metrics(ranks: np.ndarray, gains: np.ndarray, names: list[str]) -> dict[str, float]:
    """Mean of each metric over queries with at least one relevant item, plus ``num_queries`` and
    ``num_skipped`` (queries without a relevant item, left out of the means as trec_eval does)."""
    ranks, gains = np.asarray(ranks, dtype=np.float64), np.asarray(gains, dtype=np.float64)
    if ranks.shape != gains.shape or ranks.ndim != 2:
        raise RecsysError(f"ranks and gains must both be (Q, R); got {ranks.shape} and {gains.shape}")
    has_rel = (gains > 0).any(-1)
    values = per_query(ranks[has_rel], gains[has_rel], names)
    out = {n: float(v.mean()) if v.size else 0.0 for n, v in values.items()}
    out.update(num_queries=int(has_rel.sum()), num_skipped=int((~has_rel).sum()))
    return out


def paired_bootstrap(before: np.ndarray, after: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """How sure is a change of a per-query metric? ``before``, ``after``: (Q,) values of the same queries.

    Returns the mean difference ``after - before``, the percentile bootstrap interval of that mean
    (queries resampled with replacement, the same resample for both sides: a paired test), and how many
    queries got better or worse. Example: before [0, 1, 0, 1], after [1, 1, 0, 1] -> mean_diff 0.25,
    better 1, worse 0; every resample's mean lies in [0, 1], so the interval does too."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1 or not before.size:
        raise RecsysError(f"paired_bootstrap needs two (Q,) arrays of the same queries; got {before.shape}, {after.shape}")
    diff = after - before
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(n_resamples, diff.size))
    means = diff[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean_diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "better": int((diff > 0).sum()), "worse": int((diff < 0).sum()), "queries": int(diff.size)}


def item_coverage(lists: np.ndarray, n_items: int, pad: int = PAD) -> float:
    """Share of the catalog (``n_items``) that appears in at least one list of (Q, L) item ids."""
    items = np.unique(np.asarray(lists))
    return float((items != pad).sum() / n_items)


def intra_list_diversity(lists: np.ndarray, item_vectors: np.ndarray, pad: int = PAD) -> float:
    """Mean over lists of the mean pairwise cosine distance ``1 - cos`` between their items.

    ``lists``: (Q, L) indices into ``item_vectors`` (N, d); lists with fewer than 2 items are skipped.
    """
    lists = np.asarray(lists)
    v = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=-1, keepdims=True), 1e-12)
    valid = lists != pad
    x = v[np.where(valid, lists, 0)] * valid[..., None]                    # (Q, L, d)
    sim = x @ x.transpose(0, 2, 1)                                        # (Q, L, L)
    n = valid.sum(-1)
    pairs = n * (n - 1)
    off_diag = sim.sum((-1, -2)) - (x * x).sum((-1, -2))
    keep = pairs > 0
    return float((1 - off_diag[keep] / pairs[keep]).mean()) if keep.any() else 0.0


def list_validity(lists: list[list], catalog: set) -> dict[str, float]:
    """Rates over all entries of generated lists: ``malformed`` (entry is None: the parser could not
    read the line), ``out_of_catalog`` and ``duplicate`` (an item already earlier in its list), plus
    ``valid_lists``: share of lists with none of the three."""
    total = malformed = ooc = dup = clean = 0
    for items in lists:
        seen, bad = set(), False
        for item in items:
            total += 1
            if item is None:
                malformed, bad = malformed + 1, True
            elif item not in catalog:
                ooc, bad = ooc + 1, True
            elif item in seen:
                dup, bad = dup + 1, True
            else:
                seen.add(item)
        clean += not bad
    denominator = max(total, 1)
    return {"malformed": malformed / denominator, "out_of_catalog": ooc / denominator,
            "duplicate": dup / denominator, "valid_lists": clean / max(len(lists), 1)}
