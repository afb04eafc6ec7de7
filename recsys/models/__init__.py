"""Retrieval models. Each scores every catalog item for a batch of histories:
``model.score(histories) -> (B, n_items + 1)`` (column 0 is padding and scores ``-inf``)."""

from recsys.models.base import load_model, recommend
from recsys.models.popularity import Popularity
from recsys.models.sasrec import SASRec, SASRecConfig

__all__ = ["Popularity", "SASRec", "SASRecConfig", "load_model", "recommend"]
