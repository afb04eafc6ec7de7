"""Data contracts shared by every stage (frozen dataclasses).

Later stages (candidates, rerankers, rollouts) add their contracts here, so that retrieval, reranking,
serving and batch jobs read and write the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoredItem:
    """One recommended item: its catalog id, dense index and the model's score."""

    item_id: str
    idx: int
    score: float


@dataclass(frozen=True)
class RankedList:
    """A ranked list of items for one user or history, best first, and the model that made it."""

    items: tuple[ScoredItem, ...]
    model: str

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]
