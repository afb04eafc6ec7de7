"""Candidate generation: each user's top-N items for a target, with retrieval scores.

Retrievers share one call, ``retrieve(histories, n) -> (scores (Q, n), idx (Q, n))``, best first,
never an item of the history:

- :class:`SASRecRetriever`: the SASRec user vector against its item embeddings in an :class:`ItemIndex`.
- :class:`TextRetriever`: the mean text embedding of the last ``window`` history items (cosine).
- :class:`PopularityRetriever`: the floor.
- :class:`HybridRetriever`: reciprocal-rank fusion (Cormack et al., SIGIR 2009),
  ``score(i) = sum_r 1 / (c + rank_r(i))`` with c = 60, over each retriever's top ``depth``.

:func:`pool_candidates` writes the same files without a retriever: each target among sampled negatives
in a random order (the "20 candidates, 1 positive" pools of LLM-recommendation benchmarks).

Targets (:func:`candidate_examples`): ``valid`` and ``test`` as in evaluation; ``train`` = each user's
last training item(s) with only the history *before* it, so a reranker trained on these lists never
sees its target's future.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data.candidates import hit_positions, write_candidates
from recsys.data.prepared import EvalExamples, PreparedDataset
from recsys.errors import RecsysError
from recsys.io import atomic_directory
from recsys.precision import autocast
from recsys.retrieval.index import ItemIndex


def candidate_examples(dataset: PreparedDataset, split: str, train_targets_per_user: int = 1) -> EvalExamples:
    """Histories and targets of ``split``; for ``train``, the last ``train_targets_per_user`` training
    items of each user, each with the history before it."""
    if split != "train":
        return dataset.eval_examples(split)
    users, histories, targets = [], [], []
    for u, seq in enumerate(dataset.train_sequences()):
        for j in range(1, min(train_targets_per_user, len(seq) - 1) + 1):
            users.append(u), histories.append(seq[:-j]), targets.append(seq[-j:len(seq) - j + 1])
    return EvalExamples(np.asarray(users, dtype=np.int64), histories, targets)


def _batches(n: int, size: int, progress: bool, desc: str):
    return tqdm(range(0, n, size), desc=desc, unit="batch", disable=not progress, leave=False)


class SASRecRetriever:
    """SASRec user vectors searched against its item embeddings (inner product)."""

    def __init__(self, model, factory: str = "Flat", index: ItemIndex | None = None, mips: bool | str = "auto"):
        """``index``: a saved index of these embeddings; else one is built with ``factory`` (``mips``: inner
        product through L2, :class:`recsys.retrieval.index.ItemIndex`)."""
        self.model = model.eval()
        items = model.item_emb.weight[1:].detach().float().numpy()
        self.version = f"sasrec:{hashlib.sha256(items.tobytes()).hexdigest()[:12]}"
        self.index = index or ItemIndex.build(np.arange(1, len(items) + 1), items, factory, "ip", self.version,
                                              mips=mips)
        if self.index.meta.embedding_model != self.version:
            raise RecsysError(f"index built from {self.index.meta.embedding_model!r}, not this model ({self.version!r})")

    @torch.no_grad()
    def user_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        device_type = self.model.item_emb.weight.device.type
        with autocast(device_type):
            return self.model.user_embeddings(self.model.pad_histories(histories)).float().numpy()

    def retrieve(self, histories, n):
        return self.index.search(self.user_vectors(histories), n, exclude=histories)


class TextRetriever:
    """Mean of the last ``window`` history items' text vectors, searched by cosine."""

    def __init__(self, item_vectors: np.ndarray, version: str, window: int = 10, factory: str = "Flat"):
        self.item_vectors, self.window = np.asarray(item_vectors, np.float32), window   # (N, d), row i = idx i+1
        self.index = ItemIndex.build(np.arange(1, len(item_vectors) + 1), self.item_vectors, factory, "cosine", version)

    def retrieve(self, histories, n):
        queries = np.stack([self.item_vectors[np.asarray(h[-self.window:]) - 1].mean(0) if len(h) else
                            self.item_vectors.mean(0) for h in histories])
        return self.index.search(queries, n, exclude=histories)


class PopularityRetriever:
    """Most-interacted training items, minus the history."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, np.float64)            # (N + 1,), index 0 = padding

    def retrieve(self, histories, n):
        scores = np.tile(self.counts, (len(histories), 1))
        scores[:, 0] = -np.inf
        for row, h in enumerate(histories):
            scores[row, np.asarray(h, dtype=np.int64)] = -np.inf
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(scores, idx, 1).astype(np.float32), idx


class HybridRetriever:
    """Reciprocal-rank fusion of several retrievers' top ``depth`` lists."""

    def __init__(self, retrievers: list, depth: int = 400, c: float = 60.0):
        self.retrievers, self.depth, self.c = retrievers, depth, c

    def retrieve(self, histories, n):
        lists = [r.retrieve(histories, max(n, self.depth))[1] for r in self.retrievers]
        scores_out, idx_out = np.empty((len(histories), n), np.float32), np.empty((len(histories), n), np.int64)
        for row in range(len(histories)):
            fused: dict[int, float] = {}
            for lst in lists:
                for rank, item in enumerate(lst[row].tolist()):
                    fused[item] = fused.get(item, 0.0) + 1.0 / (self.c + rank + 1)
            best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
            idx_out[row], scores_out[row] = [i for i, _ in best], [s for _, s in best]
        return scores_out, idx_out


def retrieve_examples(retriever, examples: EvalExamples, n: int, batch_size: int = 512,
                      progress: bool = True, desc: str = "retrieve") -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, n), idx (Q, n)) for every example, in batches with a progress bar."""
    scores, idx = [], []
    for start in _batches(len(examples.users), batch_size, progress, desc):
        s, i = retriever.retrieve(examples.histories[start:start + batch_size], n)
        scores.append(s), idx.append(np.asarray(i, dtype=np.int64))
    return np.concatenate(scores), np.concatenate(idx)


def hit_ranks(candidates: np.ndarray, examples: EvalExamples) -> np.ndarray:
    """(Q,) 0-based position of each example's (first) target among its candidates, -1 if absent."""
    return hit_positions(candidates, np.array([t[0] for t in examples.targets]))


def recall_at(hits: np.ndarray, cutoffs=(20, 50, 100, 200)) -> dict[str, float]:
    """Share of examples whose target is within the first k candidates, for each k."""
    return {f"recall@{k}": float(((hits >= 0) & (hits < k)).mean()) for k in cutoffs}


def _check_room(dataset: PreparedDataset, examples: dict[str, EvalExamples], n: int, users: np.ndarray) -> None:
    """Raise if some history leaves fewer than ``n`` unseen items to draw candidates from."""
    for split, ex in examples.items():
        longest = int(np.argmax([len(h) for h in ex.histories]))
        left = dataset.n_items - len(ex.histories[longest])
        if n > left:
            raise RecsysError(f"n={n} candidates, but user {users[ex.users[longest]]!r} ({split}) has seen "
                              f"{len(ex.histories[longest])} of {dataset.n_items} items, leaving {left}; lower n")


def _write_split(directory: Path, split: str, dataset: PreparedDataset, ex: EvalExamples, idx: np.ndarray,
                 scores: np.ndarray) -> dict[str, float]:
    """Write ``candidates_<split>.parquet`` (candidates (Q, n), best first) and return the target's recall."""
    ids = dataset.catalog.sort("idx")["item_id"].to_numpy()
    users = dataset.users.sort("uidx")["user_id"].to_numpy()
    target = np.array([t[0] for t in ex.targets])
    hits = write_candidates(directory, split, users[ex.users], ex.users, target, ids[target - 1],
                            [len(h) for h in ex.histories], idx, scores)
    return recall_at(hits, tuple(k for k in (20, 50, 100, 200) if k <= idx.shape[1]) or (idx.shape[1],))


def generate_candidates(dataset: PreparedDataset, retriever, name: str, out: str | Path, n: int = 200,
                        splits=("train", "valid", "test"), train_targets_per_user: int = 1,
                        progress: bool = True) -> dict:
    """Write ``candidates_<split>.parquet`` and ``candidates.json`` (recall of the target) to ``out``."""
    summary = {"retriever": name, "n": n, "dataset_fingerprint": dataset.fingerprint, "recall": {}}
    examples = {split: candidate_examples(dataset, split, train_targets_per_user) for split in splits}
    _check_room(dataset, examples, n, dataset.users.sort("uidx")["user_id"].to_numpy())
    with atomic_directory(out) as tmp:
        for split, ex in examples.items():
            scores, idx = retrieve_examples(retriever, ex, n, progress=progress, desc=f"candidates {split}")
            summary["recall"][split] = _write_split(tmp, split, dataset, ex, idx, scores)
        (tmp / "candidates.json").write_text(json.dumps(summary, indent=2))
    return summary


POOL_NEGATIVES = ("popularity", "uniform")


def sample_pool(rng: np.random.Generator, weights: np.ndarray, history, target: int, n: int) -> np.ndarray:
    """(n,) the ``target`` and ``n - 1`` distinct negatives outside ``history``, in a random order.

    weights (n_items + 1,): sampling weight of each item idx (index 0, padding, is never drawn);
    negatives are drawn without replacement in proportion to them."""
    banned = np.zeros(len(weights), dtype=bool)
    banned[0], banned[np.asarray(history, dtype=np.int64)], banned[target] = True, True, True
    p = np.where(banned, 0.0, weights.astype(np.float64))
    if np.count_nonzero(p) < n - 1:
        raise RecsysError(f"a pool of {n} needs {n - 1} negatives, but only {np.count_nonzero(p)} items are left")
    negatives = rng.choice(len(p), size=n - 1, replace=False, p=p / p.sum())
    return rng.permutation(np.concatenate([[target], negatives]))


def pool_candidates(dataset: PreparedDataset, out: str | Path, n: int = 20, negatives: str = "popularity",
                    seed: int = 0, splits=("train", "valid", "test"), train_targets_per_user: int = 1,
                    progress: bool = True) -> dict:
    """Sampled candidate pools, the candidate sets of LLM-recommendation benchmarks (F-GRPO's MovieLens
    task: 20 candidates, 1 positive): each target with ``n - 1`` negatives outside the history, drawn
    in proportion to training popularity (``popularity``: a popular item is no giveaway) or uniformly
    (``uniform``), shuffled with a seeded generator. Same files as :func:`generate_candidates`, with
    ``scores`` 0 (a pool has no retriever order; recall is 1 by construction)."""
    if negatives not in POOL_NEGATIVES:
        raise RecsysError(f"negatives must be one of {POOL_NEGATIVES}, got {negatives!r}")
    weights = (dataset.item_popularity("train").astype(np.float64) if negatives == "popularity"
               else np.ones(dataset.n_items + 1))
    weights[0] = 0.0
    summary = {"retriever": f"pool-{negatives}", "n": n, "seed": seed, "dataset_fingerprint": dataset.fingerprint,
               "recall": {}}
    examples = {split: candidate_examples(dataset, split, train_targets_per_user) for split in splits}
    _check_room(dataset, examples, n, dataset.users.sort("uidx")["user_id"].to_numpy())
    with atomic_directory(out) as tmp:
        for i, (split, ex) in enumerate(examples.items()):
            rng = np.random.default_rng([seed, i])
            idx = np.stack([sample_pool(rng, weights, h, int(t[0]), n)
                            for h, t in tqdm(zip(ex.histories, ex.targets), total=len(ex.targets),
                                             desc=f"pools {split}", disable=not progress, leave=False)])
            summary["recall"][split] = _write_split(tmp, split, dataset, ex, idx, np.zeros(idx.shape))
        (tmp / "candidates.json").write_text(json.dumps(summary, indent=2))
    return summary
