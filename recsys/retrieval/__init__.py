"""Retrieval: FAISS item indexes, candidate generation, semantic IDs."""

from recsys.retrieval.index import ItemIndex, brute_force_topk

__all__ = ["ItemIndex", "brute_force_topk"]
