"""Retrieval jobs: build an item index, write candidates, build semantic IDs (the CLI calls these)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.retrieval.candidates import (
    HybridRetriever,
    PopularityRetriever,
    SASRecRetriever,
    TextRetriever,
    generate_candidates,
    pool_candidates,
)
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.semantic_ids import SemanticIDConfig, SemanticIDs

RETRIEVERS = ("sasrec", "text-minilm", "hybrid", "popularity")
POOLS = {"pool-popularity": "popularity", "pool-uniform": "uniform"}
"""Sampled pools instead of a retriever's list: the target among negatives drawn by popularity / uniformly."""


def load_sasrec(dataset: PreparedDataset, run: str | Path | None):
    from pipelines.jobs import resolve_model_dir
    from recsys.models import SASRec

    if run is None:
        raise RecsysError("this retriever needs a trained SASRec: pass --sasrec RUN_DIR")
    model = SASRec.from_pretrained(resolve_model_dir(run, holds="config.json"))
    if model.dataset_fingerprint not in (None, dataset.fingerprint):
        raise RecsysError(f"{run} was trained on dataset {model.dataset_fingerprint}, not {dataset.fingerprint}")
    return model


def text_vectors(dataset: PreparedDataset, encoder: str = "all-minilm-l6-v2") -> tuple[np.ndarray, str]:
    """(n_items, d) text embeddings in idx order (row i = item idx i + 1), and the encoder version."""
    from recsys.retrieval.text import TextEncoder

    enc = TextEncoder.from_pretrained(encoder)
    return enc.encode_cached(dataset.catalog.sort("idx")["text"].to_list()), enc.version


def make_retriever(name: str, dataset: PreparedDataset, sasrec: str | Path | None = None, factory: str = "Flat",
                   index: str | Path | None = None):
    if name not in RETRIEVERS:
        raise RecsysError(f"unknown retriever {name!r}; known: {', '.join(RETRIEVERS)}")
    if name == "popularity":
        return PopularityRetriever(dataset.item_popularity("train"))
    if name == "sasrec":
        model = load_sasrec(dataset, sasrec)
        return SASRecRetriever(model, factory, ItemIndex.load(index) if index else None)
    if name == "text-minilm":
        vectors, version = text_vectors(dataset)
        return TextRetriever(vectors, version, factory=factory)
    return HybridRetriever([make_retriever("sasrec", dataset, sasrec, factory, index),
                            make_retriever("text-minilm", dataset, factory=factory)])


def build_index(dataset: PreparedDataset, source: str, out: str | Path, factory: str = "Flat",
                sasrec: str | Path | None = None, mips: bool | str = "auto") -> ItemIndex:
    """Index the items' SASRec embeddings (``source='sasrec'``, inner product; ``mips``: through L2, see
    :class:`recsys.retrieval.index.ItemIndex`) or text embeddings (``'text-minilm'``, cosine)."""
    if source == "sasrec":
        index = SASRecRetriever(load_sasrec(dataset, sasrec), factory, mips=mips).index
    elif source == "text-minilm":
        vectors, version = text_vectors(dataset)
        index = ItemIndex.build(np.arange(1, dataset.n_items + 1), vectors, factory, "cosine", version)
    else:
        raise RecsysError(f"unknown index source {source!r}; known: sasrec, text-minilm")
    index.save(out)
    return index


def build_semantic_ids(dataset: PreparedDataset, source: str, out: str | Path, config: SemanticIDConfig,
                       sasrec: str | Path | None = None) -> SemanticIDs:
    """Semantic IDs from ``text`` (MiniLM), ``cf`` (SASRec item embeddings) or ``concat`` (both, each
    standardised) embeddings."""
    parts = []
    if source in ("text", "concat"):
        parts.append(text_vectors(dataset)[0])
    if source in ("cf", "concat"):
        parts.append(load_sasrec(dataset, sasrec).item_emb.weight[1:].detach().float().numpy())
    if not parts:
        raise RecsysError(f"unknown semantic-ID source {source!r}; known: text, cf, concat")
    x = np.concatenate([(p - p.mean(0)) / np.maximum(p.std(0), 1e-8) for p in parts], axis=1)
    sid = SemanticIDs.fit(np.arange(1, dataset.n_items + 1), x, config, source=source)
    sid.save(out)
    return sid


def candidates(dataset: PreparedDataset, retriever: str, out: str | Path, n: int = 200, sasrec=None,
               factory: str = "Flat", index=None, splits=("train", "valid", "test"),
               train_targets_per_user: int = 1, seed: int = 0) -> dict:
    """Write candidates for ``splits`` with the named retriever (or a sampled pool, :data:`POOLS`, drawn
    with ``seed``); returns the recall summary. ``train_targets_per_user``: how many of each user's last
    training items get a candidate list (each with the history before it), e.g. 30 for reranker pretraining."""
    if retriever in POOLS:
        return pool_candidates(dataset, out, n, POOLS[retriever], seed, splits, train_targets_per_user)
    return generate_candidates(dataset, make_retriever(retriever, dataset, sasrec, factory, index), retriever, out,
                               n, splits, train_targets_per_user)
