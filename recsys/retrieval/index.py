"""An item index over FAISS, and the brute-force torch top-k it is tested against.

    >>> index = ItemIndex.build(ids, vectors, "HNSW32,Flat", metric="ip")      # doctest: +SKIP
    >>> scores, ids = index.search(user_vectors, k=100, exclude=histories)      # doctest: +SKIP

- Factory strings are FAISS's (``Flat``, ``IVF{n},Flat``, ``HNSW{M},Flat``, ``IVF{n},PQ{m}``, ...).
- Metrics: ``ip`` (inner product), ``cosine`` (vectors and queries L2-normalised, then inner
  product), ``l2``. Scores are always "higher is better": for ``l2`` the score is the negative squared
  distance.
- Exclusion of each query's seen items: over-fetch ``k + |excluded|`` and filter. An approximate index
  may still come back short (an IVF probe that holds too few items); those queries are answered by
  the exact scan, so ``k`` items always come back when ``k`` non-excluded items exist.
- Inner product through L2 (Bachrach et al., RecSys 2014): the index is built in L2 on vectors augmented
  with ``sqrt(M^2 - |x|^2)`` (M = the largest norm; zero-padded to a multiple of the product quantizer's
  sub-quantizer count) and queries with 0, which turns maximum inner product into nearest neighbour; scores are
  mapped back to inner products. ``mips="auto"`` does it for a graph index (HNSW) when item norms differ
  (largest / median norm > 1.5): recall@100 of HNSW32 (efSearch 128) on ML-1M SASRec items (norm ratio
  3.4) 0.49 without, 0.998 with; on a 1M Gaussian mixture with even norms (ratio about 1.2) 0.92 without,
  0.75 with. ``mips=True`` forces it for any factory. For IVF it depends on the data: 200k vectors drawn
  around SASRec's ML-1M items with Zipf popularity, IVF4096,Flat at nprobe 32: 0.35 without, 0.98 with
  (``python -m pipelines.benchmarks.scale --parts index --index-vectors 200000``, results/scale.json); on
  catalogues with even norms it can lose, as HNSW does, so measure it on yours. ``mips=False`` never.
- GPU: with a CUDA build of FAISS and a visible GPU the index is copied to the GPU for search
  (``device="auto"``); results agree with the CPU index up to float error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.errors import RecsysError
from recsys.io import atomic_directory

METRICS = ("ip", "cosine", "l2")


def _check_vectors(vectors: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise RecsysError(f"{what} must be a 2-D array (n, dim), got shape {v.shape}")
    if dim is not None and v.shape[1] != dim:
        raise RecsysError(f"{what} have dimension {v.shape[1]}, the index has {dim}")
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise RecsysError(f"{what}: row {int(bad.argmax())} contains NaN or inf ({int(bad.sum())} bad rows)")
    return v


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def augment_items(x: np.ndarray, max_norm: float, width: int | None = None) -> np.ndarray:
    """(N, d) -> (N, d + 1): append sqrt(M^2 - |x|^2) so that L2 nearest = maximum inner product
    (Bachrach et al. 2014, "Speeding up the Xbox recommender system using a Euclidean transformation for
    inner-product spaces", §3); ``width`` > d + 1 pads with zeros (a product quantizer needs a multiple of its
    sub-quantizer count), which changes no distance."""
    extra = np.sqrt(np.maximum(max_norm ** 2 - (x * x).sum(1), 0.0))
    pad = np.zeros((len(x), (width or x.shape[1] + 1) - x.shape[1] - 1), np.float32)
    return np.hstack([x, extra[:, None], pad]).astype(np.float32)


def mips_width(dim: int, factory: str) -> int:
    """Width of :func:`augment_items` vectors for a factory: d + 1, rounded up to a multiple of the product
    quantizer's sub-quantizer count M when the factory has one (``PQ{M}``)."""
    import re

    pq = re.search(r"PQ(\d+)", factory)
    m = int(pq.group(1)) if pq else 1
    return dim + 1 + (-(dim + 1) % m)


def pad_queries(q: np.ndarray, width: int) -> np.ndarray:
    """(Q, d) -> (Q, width) with zeros: a query against :func:`augment_items` vectors."""
    return np.hstack([q, np.zeros((len(q), width - q.shape[1]), np.float32)])


def brute_force_topk(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip",
                     exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a full score matrix in torch: the reference for every FAISS index.

    queries (Q, d), vectors (N, d); ``exclude[q]`` are row positions of ``vectors`` to skip.
    Returns (scores (Q, k'), positions (Q, k')) with k' = min(k, N - most excluded), best first.
    """
    q, x = torch.from_numpy(np.asarray(queries, np.float32)), torch.from_numpy(np.asarray(vectors, np.float32))
    if metric == "cosine":
        q, x = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(x, dim=1)
    scores = q @ x.T if metric in ("ip", "cosine") else -torch.cdist(q, x).pow(2)
    if exclude is not None:
        for row, items in enumerate(exclude):
            if len(items):
                scores[row, torch.as_tensor(np.asarray(items, dtype=np.int64))] = -torch.inf
    top = torch.topk(scores, min(k, x.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


@dataclass(frozen=True)
class IndexMeta:
    """Everything needed to trust a saved index: it is refused on load if any of it mismatches."""

    dim: int
    metric: str
    factory: str
    count: int
    embedding_model: str
    """Name and version of what made the vectors, e.g. ``sasrec:<hash of the item embeddings>``."""
    vectors_sha256: str
    mips_norm: float | None = None
    """M of the MIPS-to-L2 reduction when it is used (inner product on a graph index), else None."""


class ItemIndex:
    """Item vectors in a FAISS index, with the id map and the exact vectors kept for fallback."""

    def __init__(self, index, ids: np.ndarray, vectors: np.ndarray, meta: IndexMeta):
        self.index, self.ids, self.vectors, self.meta = index, np.asarray(ids), vectors, meta
        self._search_index = index

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: Sequence, vectors: np.ndarray, factory: str = "Flat", metric: str = "ip",
              embedding_model: str = "unknown", device: str = "auto", seed: int = 0,
              mips: bool | str = "auto") -> ItemIndex:
        """Build (and train, when the factory needs it) an index over ``vectors`` (N, d)."""
        import faiss

        if metric not in METRICS:
            raise RecsysError(f"metric must be one of {METRICS}, got {metric!r}")
        ids = np.asarray(ids)
        if len(ids) == 0:
            raise RecsysError("cannot build an index over zero items")
        x = _check_vectors(vectors, "item vectors")
        if len(ids) != len(x):
            raise RecsysError(f"{len(ids)} ids but {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise RecsysError("item ids must be unique")
        if metric == "cosine":
            x = _normalise(x)
        norms = np.linalg.norm(x, axis=1)
        uneven = norms.max() > 1.5 * max(float(np.median(norms)), 1e-12)
        use_mips = metric == "ip" and ("HNSW" in factory and uneven if mips == "auto" else bool(mips))
        mips_norm = float(norms.max()) if use_mips else None
        x_index = augment_items(x, mips_norm, mips_width(x.shape[1], factory)) if mips_norm is not None else x
        faiss_metric = faiss.METRIC_L2 if metric == "l2" or mips_norm is not None else faiss.METRIC_INNER_PRODUCT
        try:
            index = faiss.index_factory(x_index.shape[1], factory, faiss_metric)
        except RuntimeError as e:
            raise RecsysError(f"FAISS cannot build {factory!r} for dimension {x.shape[1]}: "
                              f"{str(e).strip().splitlines()[-1]}") from None
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.cp.seed = seed
            index.train(x_index)
        index.add(x_index)
        meta = IndexMeta(x.shape[1], metric, factory, len(ids), embedding_model,
                         hashlib.sha256(x.tobytes()).hexdigest()[:16], mips_norm)
        out = cls(index, ids, x, meta)
        out.to_device(device)
        return out

    def to_device(self, device: str = "auto") -> ItemIndex:
        """Search on a GPU when asked (``cuda``) or available (``auto``), else on the CPU."""
        import faiss

        gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if device == "cuda" and not gpu_ok:
            raise RecsysError("device 'cuda' asked, but this FAISS build has no GPU support or no GPU is visible "
                              "(install the gpu extra: pip install -e '.[gpu]')")
        if device in ("cuda", "auto") and gpu_ok:
            self._gpu_resources = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        else:
            self._search_index = self.index
        return self

    # ---- searching --------------------------------------------------------------------------
    def set_params(self, nprobe: int | None = None, ef_search: int | None = None) -> ItemIndex:
        """Speed/recall knobs: ``nprobe`` for IVF indexes, ``ef_search`` for HNSW."""
        import faiss

        if nprobe is not None:
            ivf = faiss.try_extract_index_ivf(self._search_index)
            if ivf is None:
                raise RecsysError(f"nprobe applies to IVF indexes, not {self.meta.factory!r}")
            ivf.nprobe = nprobe
        if ef_search is not None:
            if not hasattr(self.index, "hnsw"):
                raise RecsysError(f"ef_search applies to HNSW indexes, not {self.meta.factory!r}")
            self.index.hnsw.efSearch = ef_search
        return self

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence] | None = None,
               batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids per query, best first, never one of the query's ``exclude`` ids.

        queries (Q, d) -> (scores (Q, k), ids (Q, k)). Raises if some query has fewer than k
        candidates left after exclusion (ask for fewer, or exclude less).
        """
        if k < 1:
            raise RecsysError(f"k must be >= 1, got {k}")
        q = _check_vectors(queries, "query vectors", self.meta.dim)
        if self.meta.metric == "cosine":
            q = _normalise(q)
        excl_pos = self._positions(exclude, len(q))
        most = max((len(e) for e in excl_pos), default=0)
        if k + most > self.meta.count:
            raise RecsysError(f"k={k} is more than the {self.meta.count - most} items left to rank "
                              f"({self.meta.count} in the index, up to {most} excluded for a query)")
        scores = np.empty((len(q), k), np.float32)
        pos = np.empty((len(q), k), np.int64)
        for start in range(0, len(q), batch_size):
            sl = slice(start, start + batch_size)
            scores[sl], pos[sl] = self._search_batch(q[sl], k, excl_pos[sl])
        return scores, self.ids[pos]

    def _positions(self, exclude, n_queries: int) -> list[np.ndarray]:
        if exclude is None:
            return [np.empty(0, np.int64)] * n_queries
        if len(exclude) != n_queries:
            raise RecsysError(f"exclude has {len(exclude)} entries for {n_queries} queries")
        if not hasattr(self, "_pos_of"):
            self._pos_of = {item: p for p, item in enumerate(self.ids.tolist())}
        return [np.unique([self._pos_of[i] for i in items if i in self._pos_of]).astype(np.int64) for items in exclude]

    def _search_batch(self, q: np.ndarray, k: int, excl: list[np.ndarray]):
        fetch = min(self.meta.count, k + max((len(e) for e in excl), default=0))
        M = self.meta.mips_norm
        if M is not None:   # L2 on augmented vectors: |q|^2 + M^2 - 2 q.x = dist  ->  q.x
            dist, found = self._search_index.search(pad_queries(q, self._search_index.d), fetch)
            score = ((q * q).sum(1, keepdims=True) + M * M - dist) / 2
        else:
            dist, found = self._search_index.search(q, fetch)
            score = -dist if self.meta.metric == "l2" else dist
        if fetch == k:  # nothing to exclude in this batch: keep FAISS's answer, fix only short rows
            out_s, out_p = score.astype(np.float32), found.astype(np.int64)
            for row in np.flatnonzero((found < 0).any(1)):
                s, p = brute_force_topk(q[row:row + 1], self.vectors, k, self.meta.metric)
                out_s[row], out_p[row] = s[0], p[0]
            return out_s, out_p
        out_s, out_p = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for row in range(len(q)):
            keep = (found[row] >= 0) & ~np.isin(found[row], excl[row])
            if keep.sum() >= k:
                out_s[row], out_p[row] = score[row][keep][:k], found[row][keep][:k]
            else:  # an approximate index came back short: answer this query exactly
                s, p = brute_force_topk(q[row:row + 1], self.vectors, k, self.meta.metric, [excl[row]])
                out_s[row], out_p[row] = s[0], p[0]
        return out_s, out_p

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss``, ``ids.npy``, ``vectors.npy`` and ``meta.json`` (atomically)."""
        import faiss

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.ids)
            np.save(tmp / "vectors.npy", self.vectors)
            (tmp / "meta.json").write_text(json.dumps(self.meta.__dict__, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, embedding_model: str | None = None, device: str = "auto") -> ItemIndex:
        """Load a saved index; refuse it if its files disagree with its metadata, or if
        ``embedding_model`` is given and differs from the one that built it."""
        import faiss

        directory = Path(directory)
        if not (directory / "meta.json").exists():
            raise RecsysError(f"{directory}: not a saved index (no meta.json); build one with `recsys index build`")
        meta = IndexMeta(**json.loads((directory / "meta.json").read_text()))
        if embedding_model is not None and meta.embedding_model != embedding_model:
            raise RecsysError(f"{directory}: built from {meta.embedding_model!r}, expected {embedding_model!r}; "
                              "rebuild the index for these embeddings")
        index = faiss.read_index(str(directory / "index.faiss"))
        ids, vectors = np.load(directory / "ids.npy", allow_pickle=False), np.load(directory / "vectors.npy")
        problems = [f"{name} {got} != {want}" for name, got, want in [
            ("dimension", index.d if meta.mips_norm is None else min(index.d, meta.dim + 1),
             meta.dim + (meta.mips_norm is not None)), ("index size", index.ntotal, meta.count),
            ("id count", len(ids), meta.count),
            ("vectors hash", hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest()[:16], meta.vectors_sha256)]
            if got != want]
        if problems:
            raise RecsysError(f"{directory}: files do not match meta.json ({'; '.join(problems)})")
        return cls(index, ids, vectors, meta).to_device(device)
