"""Semantic IDs: residual k-means codes for items, a de-duplication level, and a prefix trie.

TIGER (Rajput et al., NeurIPS 2023, arXiv 2305.05065) learns codes with an RQ-VAE; we use the
residual k-means (RQ-KMeans) alternative that later generative recommenders use in place of the RQ-VAE: k-means with K codes on the
embeddings, then k-means on the residuals, for L levels (FAISS k-means). Items whose L codes
collide get an extra level holding their index among the colliding items, so every item has a
unique code and the trie reaches every item.

Departures / options:
- ``balanced=True`` assigns points to centroids greedily under a capacity of ceil(N / K) per code,
  which spreads items over codes (a fix for skewed code usage); off by default.
- Embeddings are standardised (zero mean, unit variance per dimension) before the first level, one of
  the fixes for code collapse reported by TIGER reproductions.

Shapes: N items, d embedding dimension, L levels, K codes per level.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recsys.errors import RecsysError
from recsys.io import atomic_directory


@dataclass(frozen=True)
class SemanticIDConfig:
    """How semantic IDs are built."""

    levels: int = 3
    """L: residual k-means levels (before the de-duplication level)."""
    codebook_size: int = 32
    """K: codes per level."""
    balanced: bool = False
    """Capacity-constrained assignment (about N / K items per code)."""
    niter: int = 25
    """k-means iterations per level."""
    seed: int = 0
    """k-means seed."""


def _assign(x: np.ndarray, centroids: np.ndarray, balanced: bool) -> np.ndarray:
    """(N,) nearest centroid per row, or greedy capacity-constrained assignment if ``balanced``."""
    dist = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)   # (N, K)
    if not balanced:
        return dist.argmin(1)
    n, k = dist.shape
    capacity = np.full(k, -(-n // k))
    codes = np.full(n, -1)
    for flat in np.argsort(dist, axis=None, kind="stable"):                # closest pairs first
        i, c = divmod(int(flat), k)
        if codes[i] < 0 and capacity[c] > 0:
            codes[i], capacity[c] = c, capacity[c] - 1
    return codes


def residual_kmeans(x: np.ndarray, config: SemanticIDConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes (N, L) and the L codebooks (K, d) of residual k-means on ``x`` (N, d)."""
    import faiss

    n = len(x)
    if config.codebook_size > n:
        raise RecsysError(f"codebook_size {config.codebook_size} exceeds the {n} items")
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codes, books = np.zeros((n, config.levels), np.int64), []
    for level in range(config.levels):
        km = faiss.Kmeans(residual.shape[1], config.codebook_size, niter=config.niter, seed=config.seed + level,
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, n))
        km.train(residual)
        codes[:, level] = _assign(residual, km.centroids, config.balanced)
        books.append(km.centroids.copy())
        residual -= km.centroids[codes[:, level]]
    return codes, books


def perplexity(codes: np.ndarray) -> float:
    """exp(entropy) of the code distribution: K when all K codes are used equally, 1 if one code."""
    p = np.bincount(codes) / len(codes)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class PrefixTrie:
    """Valid next codes for every prefix of the items' codes, and the item at each full code."""

    def __init__(self, codes: np.ndarray):
        self.depth = codes.shape[1]
        self._next: dict[tuple, set] = {}
        self._item: dict[tuple, int] = {}
        for item, row in enumerate(map(tuple, codes.tolist())):
            for level in range(self.depth):
                self._next.setdefault(row[:level], set()).add(row[level])
            self._item[row] = item
        self._next = {p: np.array(sorted(s), dtype=np.int64) for p, s in self._next.items()}

    def next_codes(self, prefix=()) -> np.ndarray:
        """Sorted valid codes after ``prefix``; empty for a full code or an invalid prefix."""
        return self._next.get(tuple(prefix), np.empty(0, np.int64))

    def item(self, code) -> int | None:
        """Row of the item with this full code, or None."""
        return self._item.get(tuple(code))

    def __len__(self) -> int:
        return len(self._item)


class SemanticIDs:
    """Codes (N, L + 1) for items: L residual k-means levels and one de-duplication level."""

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, config: SemanticIDConfig, stats: dict, source: str,
                 vectors: np.ndarray | None = None):
        self.item_ids, self.codes, self.config, self.stats, self.source = np.asarray(item_ids), codes, config, stats, source
        self.vectors = vectors
        """(N, d) the standardised embeddings the codes were built from (``vectors.npy``; None if not saved):
        V-STAR's dense reward compares items by them."""
        self.trie = PrefixTrie(codes)

    @classmethod
    def fit(cls, item_ids, embeddings: np.ndarray, config: SemanticIDConfig = SemanticIDConfig(),
            source: str = "unknown") -> SemanticIDs:
        """Build codes for ``embeddings`` (N, d) of ``item_ids``; ``source`` names the embeddings."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(item_ids) or len(x) == 0:
            raise RecsysError(f"embeddings must be (N, d) with N = {len(item_ids)} items, got {x.shape}")
        if not np.isfinite(x).all():
            raise RecsysError(f"embeddings: row {int((~np.isfinite(x).all(1)).argmax())} contains NaN or inf")
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
        codes, books = residual_kmeans(x, config)
        # De-duplication level: position of each item among the items sharing its L codes.
        _, group = np.unique(codes, axis=0, return_inverse=True)
        group = group.ravel()
        order = np.argsort(group, kind="stable")
        rank = np.empty(len(group), np.int64)
        starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
        sizes = np.diff(np.r_[starts, len(group)])
        rank[order] = np.arange(len(group)) - np.repeat(starts, sizes)
        full = np.concatenate([codes, rank[:, None]], axis=1)
        reconstruction = sum(b[c] for b, c in zip(books, codes.T))
        stats = {
            "items": len(x), "levels": config.levels, "codebook_size": config.codebook_size,
            "collision_rate": float(1 - len(sizes) / len(x)),
            "max_collisions": int(sizes.max()), "dedup_codes_used": int(rank.max() + 1),
            "code_usage": [float(len(np.unique(codes[:, l])) / config.codebook_size) for l in range(config.levels)],
            "perplexity": [perplexity(codes[:, l]) for l in range(config.levels)],
            "relative_reconstruction_error": float(((x - reconstruction) ** 2).sum() / (x ** 2).sum()),
        }
        return cls(item_ids, full, config, stats, source, x)

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(directory) as tmp:
            np.save(tmp / "codes.npy", self.codes)
            np.save(tmp / "item_ids.npy", self.item_ids)
            if self.vectors is not None:
                np.save(tmp / "vectors.npy", self.vectors.astype(np.float32))
            (tmp / "semantic_ids.json").write_text(json.dumps({"config": asdict(self.config), "stats": self.stats,
                                                               "source": self.source}, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> SemanticIDs:
        directory = Path(directory)
        if not (directory / "semantic_ids.json").exists():
            raise RecsysError(f"{directory}: no semantic_ids.json; build with `recsys index semantic-ids`")
        meta = json.loads((directory / "semantic_ids.json").read_text())
        codes, ids = np.load(directory / "codes.npy"), np.load(directory / "item_ids.npy", allow_pickle=False)
        if len(codes) != len(ids) or codes.shape[1] != meta["config"]["levels"] + 1:
            raise RecsysError(f"{directory}: codes {codes.shape} do not match {len(ids)} items and the config")
        vectors = np.load(directory / "vectors.npy") if (directory / "vectors.npy").exists() else None
        if vectors is not None and len(vectors) != len(ids):
            raise RecsysError(f"{directory}: vectors.npy has {len(vectors)} rows for {len(ids)} items")
        return cls(ids, codes, SemanticIDConfig(**meta["config"]), meta["stats"], meta["source"], vectors)
