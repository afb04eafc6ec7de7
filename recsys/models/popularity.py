"""Popularity: every user gets the items most interacted with in training. The floor every model must beat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recsys.errors import RecsysError


class Popularity:
    """Scores = training interaction counts (``counts``: (n_items + 1,), index 0 = padding)."""

    def __init__(self, counts: np.ndarray, dataset_fingerprint: str | None = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.dataset_fingerprint = dataset_fingerprint

    @property
    def n_items(self) -> int:
        return len(self.counts) - 1

    @classmethod
    def fit(cls, dataset) -> Popularity:
        """Count interactions in the training split of a :class:`~recsys.data.PreparedDataset`."""
        return cls(dataset.item_popularity("train"), dataset.fingerprint)

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(B, n_items + 1) the same popularity scores for every history."""
        s = torch.as_tensor(self.counts, dtype=torch.float32).clone()
        s[0] = -torch.inf
        return s.expand(len(histories), -1)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"model_type": "popularity", "n_items": self.n_items,
                                                           "dataset_fingerprint": self.dataset_fingerprint}, indent=2))
        np.save(directory / "counts.npy", self.counts)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Popularity:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        counts = np.load(directory / "counts.npy")
        if len(counts) != config["n_items"] + 1:
            raise RecsysError(f"{directory}: counts.npy has {len(counts)} entries, config says {config['n_items']} + 1")
        return cls(counts, config.get("dataset_fingerprint"))
