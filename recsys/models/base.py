"""What every retrieval model shares: loading by directory and ``recommend`` on top of ``score``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recsys.errors import RecsysError
from recsys.types import RankedList, ScoredItem


def read_model_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise RecsysError(f"{directory}: not a saved model (no config.json); train one with `recsys train retriever`")
    return json.loads(path.read_text())


def load_model(directory: str | Path):
    """Load a saved model of any type from its directory (``config.json`` names the type)."""
    from recsys.models.popularity import Popularity
    from recsys.models.sasrec import SASRec

    registry = {"popularity": Popularity, "sasrec": SASRec}
    model_type = read_model_config(directory).get("model_type")
    if model_type not in registry:
        raise RecsysError(f"{directory}/config.json: unknown model_type {model_type!r}; known: {', '.join(registry)}")
    return registry[model_type].from_pretrained(directory)


@torch.no_grad()
def recommend(model, history: list[int] | np.ndarray, k: int, item_ids: list[str], *, exclude_seen: bool = True,
              exclude: list[int] = ()) -> RankedList:
    """Top-k items for one history of item indices. ``item_ids[i - 1]`` is the id of index i."""
    scores = model.score([np.asarray(history, dtype=np.int64)])[0].float()
    banned = list(exclude) + (list(history) if exclude_seen else [])
    if banned:
        scores[torch.as_tensor(banned, dtype=torch.long)] = -torch.inf
    k = min(k, int(torch.isfinite(scores).sum()))
    top = torch.topk(scores, k)
    items = tuple(ScoredItem(item_ids[i - 1], int(i), float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist()))
    return RankedList(items, type(model).__name__.lower())
