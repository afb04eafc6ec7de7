"""Side features of a retriever's candidates: what a reranker can know that the retriever does not.

A sequential retriever such as SASRec sees item ids in order and nothing else. For each candidate of
a list this module computes signals from outside that view, fitted on the training interactions only
(``SideFeatures.fit``) and read per request (``SideFeatures.transform``). Groups, each an option of a
recipe (:data:`GROUPS`, columns in this order):

=============  =====================================================================================
retriever      the retriever's own view: score minus the list's top score, ``ln(1 + position)``, and
               the log-softmax of the scores over the list (3 columns)
ease           a second retriever: EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse
               Data", WWW 2019, arXiv 1905.03375, eq. 8: ``B = I - P diagMat(1 / diag P)`` with
               ``P = (X^T X + lambda I)^-1``, diagonal of B zeroed) scores ``sum_{j in history} B[j, c]``
               of the whole history and of its last 10 items, each z-scored over the list (2)
transitions    ``ln(1 + w)`` where w counts training sequences that go from the last history item
               (weight 1) or the one before it (weight 1/2) to the candidate within 1, 2 or 3 steps
               (weights 1, 1/2, 1/3): item-to-item succession, which a model of the whole sequence
               smooths away (1)
popularity     ``ln(1 + training interactions)`` (1)
recency        ``ln(1 + training interactions in the 30 days before the request)``: what is popular
               now, which needs the request's time (1)
demographics   ``ln P(item | gender, age) - ln P(item)``, add-one smoothed, from the training
               interactions of users of the same gender and age group (a missing value is a group of
               its own; 0 for a request without a known user); needs those user features (1)
genres         the share of the genre mass of the last 50 history items that the candidate's genres
               carry; needs the catalogue's ``genres`` (1)
year           ``|year - median year of the last 50 history items| / 10``; needs ``year`` (1)
time_gap       ``ln(1 + hours)`` since the last history interaction, the same for every candidate of a
               list: it only matters through a nonlinear scorer, which can let recency count more
               after a long absence (1)
text           a text retriever's view: the cosine of the candidate's text embedding with the mean of
               the last 10 history items' (unit-norm item vectors given to ``fit``, e.g. MiniLM on the
               titles) (1)
=============  =====================================================================================

Shapes: L candidates per list, F features (``len(names)``); a request is a :class:`Request`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.errors import DataError, RecsysError
from recsys.types import CandidateList

GROUPS = {
    "retriever": ["retriever_gap", "retriever_log_position", "retriever_log_softmax"],
    "ease": ["ease_history", "ease_last10"],
    "transitions": ["transitions"],
    "popularity": ["popularity"],
    "recency": ["recent_30d"],
    "demographics": ["demographic_lift"],
    "genres": ["genre_share"],
    "year": ["year_distance"],
    "time_gap": ["hours_since_last"],
    "text": ["text_cosine"],
}
"""Feature group -> the columns it adds, in order."""

RECENT_SECONDS = 30 * 86400
STEP_WEIGHTS = (1.0, 1 / 2, 1 / 3)
"""Weight of a succession 1, 2 and 3 steps later in ``transitions``."""
EASE_MAX_ITEMS = 20000
"""EASE inverts an (n_items x n_items) matrix: beyond this many items leave the ``ease`` group out."""


@dataclass(frozen=True)
class Request:
    """One candidate list to describe: the user (``uidx``, -1 for an anonymous history), their history (item
    idx, oldest first), the time of the request and of each history item (Unix seconds; the history's may be
    empty when unknown), the candidates and the retriever's scores, best first."""

    uidx: int
    history: np.ndarray
    history_times: np.ndarray
    time: int
    candidates: np.ndarray
    scores: np.ndarray


def ease_weights(X: np.ndarray, lam: float) -> np.ndarray:
    """EASE's item-item matrix from a binary (users, items) matrix X (arXiv 1905.03375, eq. 8).

    Example: X = [[1, 1], [1, 0]], lambda 1: G = X^T X + I = [[3, 1], [1, 2]], P = G^-1 = [[0.4, -0.2],
    [-0.2, 0.6]], B = -P / diag(P) by column, diagonal 0 -> [[0, 1/3], [1/2, 0]]."""
    G = (X.T @ X).astype(np.float64)
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    B[np.diag_indices_from(B)] = 0.0
    return B.astype(np.float32)


def succession_counts(sequences, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse weighted counts of ``a`` followed by ``b`` within 3 steps (weights :data:`STEP_WEIGHTS`) over
    the sequences: sorted keys ``a * (n_items + 1) + b`` and their weights.

    Example: one sequence [1, 2, 3], n_items 3: (1, 2) 1, (2, 3) 1, (1, 3) 1/2 -> keys [6, 7, 11],
    weights [1, 0.5, 1]."""
    keys, weights = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for step, w in enumerate(STEP_WEIGHTS, 1):
            if len(seq) > step:
                keys.append(seq[:-step] * (n_items + 1) + seq[step:])
                weights.append(np.full(len(seq) - step, w))
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return keys, np.bincount(inverse, weights=np.concatenate(weights))


def lookup(keys: np.ndarray, weights: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The weight of each query key in a sorted sparse table (0 where absent)."""
    if not len(keys):
        return np.zeros(len(query))
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return np.where(keys[pos] == query, weights[pos], 0.0)


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-6)


class SideFeatures:
    """Fitted side-feature tables; ``transform`` a :class:`Request` into (L, F) features."""

    def __init__(self, groups: list[str], n_items: int):
        unknown = [g for g in groups if g not in GROUPS]
        if unknown or not groups:
            raise RecsysError(f"unknown feature group(s) {unknown}; known: {', '.join(GROUPS)}")
        self.groups, self.n_items = list(groups), n_items
        self.names = [c for g in self.groups for c in GROUPS[g]]

    @classmethod
    def fit(cls, dataset, groups: list[str], ease_lambda: float = 300.0,
            text_vectors: np.ndarray | None = None) -> SideFeatures:
        """Fit on ``dataset``'s training interactions (a :class:`recsys.data.PreparedDataset`). A group whose
        data the dataset lacks is a DataError naming the feature and the file that would hold it.
        ``text_vectors`` (n_items, d), row i = item idx i + 1: the item embeddings of the ``text`` group."""
        self = cls(groups, dataset.n_items)
        n = dataset.n_items
        train = dataset.interactions.filter(pl.col("split") == "train")
        users, items = train["uidx"].to_numpy(), train["idx"].to_numpy().astype(np.int64)
        self.popularity = np.bincount(items, minlength=n + 1).astype(np.float64)
        if "ease" in groups:
            if n > EASE_MAX_ITEMS:
                raise RecsysError(f"feature group 'ease' inverts an n_items x n_items matrix; {n} items is over "
                                  f"{EASE_MAX_ITEMS}: leave 'ease' out of the recipe's features")
            X = np.zeros((dataset.n_users, n + 1), dtype=np.float32)
            X[users, items] = 1.0
            self.ease = ease_weights(X, ease_lambda)
        if "transitions" in groups:
            self.succ_keys, self.succ_weights = succession_counts(dataset.train_sequences(), n)
        if "recency" in groups:
            # one sorted key per training interaction, item-major then time: a candidate's interactions in a
            # time range are one contiguous run, counted with two searchsorted calls for the whole list
            times = train["timestamp"].to_numpy().astype(np.int64)
            self.time0 = int(times.min()) if len(times) else 0
            self.time_span = int(times.max()) - self.time0 + 1 if len(times) else 1
            self.item_time_keys = np.sort(items * self.time_span + (times - self.time0))
        if "demographics" in groups:
            try:
                uf = dataset.user_features(["gender", "age"]).sort("uidx")
            except DataError as e:
                raise DataError(f"feature group 'demographics' needs the user features gender and age: {e}") from None
            labels = (uf["gender"].cast(pl.Utf8).fill_null("?") + "|" + uf["age"].cast(pl.Utf8).fill_null("?")).to_list()
            names = sorted(set(labels))
            self.user_group = np.asarray([names.index(x) for x in labels])
            counts = np.zeros((len(names), n + 1))
            np.add.at(counts, (self.user_group[users], items), 1.0)
            p_item = (self.popularity + 1) / (self.popularity.sum() + n)
            self.lift = np.log((counts + 1) / (counts.sum(1, keepdims=True) + n)) - np.log(p_item)[None]
        if "text" in groups:
            if text_vectors is None or len(text_vectors) != n:
                raise RecsysError(f"feature group 'text' needs item text vectors for the {n} items, got "
                                  f"{None if text_vectors is None else len(text_vectors)}")
            v = np.asarray(text_vectors, dtype=np.float32)
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            self.text = np.concatenate([np.zeros((1, v.shape[1]), dtype=np.float32), v])
        if "genres" in groups or "year" in groups:
            catalog = dataset.catalog.sort("idx")
            for group, column in (("genres", "genres"), ("year", "year")):
                if group in groups and column not in catalog.columns:
                    raise DataError(f"{dataset.directory / 'catalog.parquet'}: feature group {group!r} needs the "
                                    f"column {column!r}, which this catalogue lacks")
            if "genres" in groups:
                genre_lists = catalog["genres"].to_list()
                vocab = sorted({g for gs in genre_lists if gs for g in gs})
                self.genre = np.zeros((n + 1, max(len(vocab), 1)), dtype=np.float32)
                for i, gs in zip(catalog["idx"].to_list(), genre_lists):
                    for g in gs or []:
                        self.genre[i, vocab.index(g)] = 1.0
            if "year" in groups:
                years = catalog["year"].cast(pl.Float64)
                self.year = np.full(n + 1, float(years.median() or 0.0))
                self.year[catalog["idx"].to_numpy()] = years.fill_null(float(years.median() or 0.0)).to_numpy()
        return self

    TABLES = ("popularity", "ease", "succ_keys", "succ_weights", "item_time_keys", "time0", "time_span",
              "user_group", "lift", "genre", "year", "text")
    """The fitted arrays :meth:`save` writes (those the groups need; ``popularity`` always)."""

    def save(self, path) -> None:
        """The fitted tables as one ``.npz`` (what a torch-free server loads with :meth:`load`)."""
        arrays = {name: np.asarray(getattr(self, name)) for name in self.TABLES if hasattr(self, name)}
        np.savez(path, groups=np.asarray(self.groups), n_items=np.asarray(self.n_items), **arrays)

    @classmethod
    def load(cls, path) -> SideFeatures:
        """Tables written by :meth:`save`; a file without a table its groups need is an error naming both."""
        with np.load(path) as z:
            self = cls([str(g) for g in z["groups"]], int(z["n_items"]))
            for name in cls.TABLES:
                if name in z.files:
                    value = z[name]
                    setattr(self, name, int(value) if value.ndim == 0 else value)
        need = {"ease": ["ease"], "transitions": ["succ_keys", "succ_weights"],
                "recency": ["item_time_keys", "time0", "time_span"], "demographics": ["user_group", "lift"],
                "genres": ["genre"], "year": ["year"], "text": ["text"]}
        missing = [t for g in self.groups for t in need.get(g, []) if not hasattr(self, t)]
        if missing or not hasattr(self, "popularity"):
            raise RecsysError(f"{path}: side-feature tables lack {missing or ['popularity']} for groups {self.groups}")
        return self

    def transform(self, r: Request) -> np.ndarray:
        """(L, F) float32 features of ``r``'s candidates, columns as in :attr:`names`."""
        c, h = np.asarray(r.candidates, dtype=np.int64), np.asarray(r.history, dtype=np.int64)
        if not len(h):
            raise RecsysError(f"user {r.uidx}: side features need a non-empty history")
        cols = []
        for g in self.groups:
            if g == "retriever":
                s = np.asarray(r.scores, dtype=np.float64)
                top = s.max()
                cols += [s - top, np.log1p(np.arange(len(c))), s - top - np.log(np.exp(s - top).sum())]
            elif g == "ease":
                block = self.ease[np.ix_(h, c)]                                  # (history, L): only the candidates
                cols += [zscore(block.sum(0)), zscore(block[-10:].sum(0))]
            elif g == "transitions":
                w = sum(weight * lookup(self.succ_keys, self.succ_weights, prev * (self.n_items + 1) + c)
                        for prev, weight in zip(h[::-1][:2], (1.0, 0.5)))
                cols.append(np.log1p(w))
            elif g == "popularity":
                cols.append(np.log1p(self.popularity[c]))
            elif g == "recency":
                def key(t: int) -> np.ndarray:      # first key at or after time t of each candidate, clipped to its run
                    return c * self.time_span + np.clip(t - self.time0, 0, self.time_span)

                recent = np.searchsorted(self.item_time_keys, key(r.time)) - np.searchsorted(
                    self.item_time_keys, key(r.time - RECENT_SECONDS))
                cols.append(np.log1p(recent.astype(np.float64)))
            elif g == "demographics":                       # an anonymous request (uidx -1): no lift
                cols.append(self.lift[self.user_group[r.uidx], c] if r.uidx >= 0 else np.zeros(len(c)))
            elif g == "genres":
                mass = self.genre[h[-50:]].sum(0)
                cols.append(self.genre[c] @ mass / max(mass.sum(), 1.0))
            elif g == "year":
                cols.append(np.abs(self.year[c] - np.median(self.year[h[-50:]])) / 10.0)
            elif g == "text":
                query = self.text[h[-10:]].mean(0)
                cols.append(self.text[c] @ (query / max(float(np.linalg.norm(query)), 1e-12)))
            elif g == "time_gap":
                last = r.history_times[-1] if len(r.history_times) else r.time
                cols.append(np.full(len(c), np.log1p(max(r.time - last, 0) / 3600.0)))
        return np.stack(cols, 1).astype(np.float32)

    def transform_many(self, requests) -> np.ndarray:
        """(R, L, F) features of requests whose lists all have L candidates: :meth:`transform` of each (the
        reference, tested equal), computed for the whole batch at once, one numpy call per feature rather
        than one per feature and request; only EASE's history x candidates block is gathered per request."""
        R = len(requests)
        if R == 0:
            return np.zeros((0, 0, len(self.names)), dtype=np.float32)
        if R == 1:                                      # the batch's set-up costs more than it saves
            return self.transform(requests[0])[None]
        C = np.stack([np.asarray(r.candidates, dtype=np.int64) for r in requests])             # (R, L)
        hs = [np.asarray(r.history, dtype=np.int64) for r in requests]
        for r, h in zip(requests, hs):
            if not len(h):
                raise RecsysError(f"user {r.uidx}: side features need a non-empty history")
        L, n_hist = C.shape[1], np.array([len(h) for h in hs])
        now = np.array([int(r.time) for r in requests], dtype=np.int64)[:, None]              # (R, 1)

        @functools.cache
        def tails(n: int) -> np.ndarray:
            """(R, n) the last n history items of each request, left-padded with item 0 (once per n)."""
            out = np.zeros((R, n), dtype=np.int64)
            for row, h in zip(out, hs):
                t = h[-n:]
                row[n - len(t):] = t
            return out

        def zscore_rows(x: np.ndarray) -> np.ndarray:
            return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)

        cols = []
        for g in self.groups:
            if g == "retriever":
                s = np.stack([np.asarray(r.scores, dtype=np.float64) for r in requests])
                top = s.max(1, keepdims=True)
                cols += [s - top, np.broadcast_to(np.log1p(np.arange(L)), (R, L)),
                         s - top - np.log(np.exp(s - top).sum(1, keepdims=True))]
            elif g == "ease":
                blocks = [self.ease[np.ix_(h, c)] for h, c in zip(hs, C)]                    # (history, L) each
                cols += [zscore_rows(np.stack([b.sum(0) for b in blocks])),
                         zscore_rows(np.stack([b[-10:].sum(0) for b in blocks]))]
            elif g == "transitions":
                stride = self.n_items + 1
                last = np.array([h[-1] for h in hs])[:, None]
                w = 1.0 * lookup(self.succ_keys, self.succ_weights, last * stride + C)
                if (n_hist > 1).any():
                    before = np.array([h[-2] if len(h) > 1 else 0 for h in hs])[:, None]
                    w = w + np.where(n_hist[:, None] > 1, 0.5 * lookup(self.succ_keys, self.succ_weights,
                                                                       before * stride + C), 0.0)
                cols.append(np.log1p(w))
            elif g == "popularity":
                cols.append(np.log1p(self.popularity[C]))
            elif g == "recency":
                def key(t: np.ndarray) -> np.ndarray:
                    return C * self.time_span + np.clip(t - self.time0, 0, self.time_span)

                recent = np.searchsorted(self.item_time_keys, key(now)) - np.searchsorted(
                    self.item_time_keys, key(now - RECENT_SECONDS))
                cols.append(np.log1p(recent.astype(np.float64)))
            elif g == "demographics":                       # an anonymous request (uidx -1): no lift
                u = np.array([r.uidx for r in requests])[:, None]
                cols.append(np.where(u >= 0, self.lift[self.user_group[np.maximum(u, 0)], C], 0.0))
            elif g == "genres":                             # row 0 (padding) of the genre table is all zero
                mass = self.genre[tails(50)].sum(1)                                               # (R, G)
                cols.append(np.einsum("rlg,rg->rl", self.genre[C], mass) / np.maximum(mass.sum(1), 1.0)[:, None])
            elif g == "year":
                n = np.minimum(n_hist, 50)
                years = np.sort(np.where(tails(50) > 0, self.year[tails(50)], np.inf), 1)           # padding last
                rows = np.arange(R)
                median = (years[rows, (n - 1) // 2] + years[rows, n // 2]) / 2
                cols.append(np.abs(self.year[C] - median[:, None]) / 10.0)
            elif g == "text":                               # row 0 (padding) of the text table is all zero
                query = self.text[tails(10)].sum(1) / np.minimum(n_hist, 10)[:, None].astype(np.float32)
                query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
                cols.append(np.einsum("rld,rd->rl", self.text[C], query))
            elif g == "time_gap":
                last = np.array([r.history_times[-1] if len(r.history_times) else r.time for r in requests])[:, None]
                cols.append(np.broadcast_to(np.log1p(np.maximum(now - last, 0) / 3600.0), (R, L)))
        return np.stack(cols, -1).astype(np.float32)


def supported_groups(dataset) -> list[str]:
    """The groups of :data:`GROUPS` that ``dataset`` has the data for (user features for ``demographics``,
    catalogue columns for ``genres`` and ``year``, at most :data:`EASE_MAX_ITEMS` items for ``ease``), without
    ``text``, which needs a text encoder's vectors."""
    entry = dataset.manifest.get("user_features") or {}
    has = {"demographics": {"gender", "age"} <= set(entry.get("columns", [])),
           "genres": "genres" in dataset.catalog.columns, "year": "year" in dataset.catalog.columns,
           "ease": dataset.n_items <= EASE_MAX_ITEMS, "text": False}
    return [g for g in GROUPS if has.get(g, True)]


def requests_from_candidates(dataset, lists: list[CandidateList], depth: int | None = None) -> list[Request]:
    """A :class:`Request` per candidate list of ``dataset`` (:func:`recsys.data.candidates.read_candidate_lists`):
    its history, the request time that of the user's next item (the held-out one: the moment the
    recommendation was asked for), the top ``depth`` candidates (default all) and their scores."""
    times = dataset.user_timestamps()
    out = []
    for r in lists:
        n, t = len(r.history), times[r.uidx]
        out.append(Request(r.uidx, r.history, t[:n], int(t[n]), r.candidates[:depth],
                           r.scores[:depth].astype(np.float64)))
    return out
