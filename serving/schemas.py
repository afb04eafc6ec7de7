"""Request models shared by the HTTP API (:mod:`serving.app`) and batch re-scoring (:mod:`serving.rescore`):
one definition of a valid request and its limits, whichever way it arrives.

Strict by design: an unknown field, a non-finite number (``NaN``, ``Infinity``, an overflowing ``1e400``) or a
repeated candidate is an error naming the field, never ignored, coerced or a crash further in.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

ItemId = Annotated[str, Field(min_length=1, max_length=256)]
MAX_K = 100
"""Most items one answer may hold, on every endpoint and in batch re-scoring."""
MAX_HISTORY = 1000
MAX_CANDIDATES = 100


class Strict(BaseModel):
    """Unknown fields and non-finite numbers are validation errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def distinct(items: list[str] | None) -> list[str] | None:
    """``items`` unchanged when no id repeats; else a ValueError naming the first repeat and its position."""
    seen: set[str] = set()
    for i, item in enumerate(items or []):
        if item in seen:
            raise ValueError(f"candidate {item!r} at position {i} is repeated; candidates must be distinct")
        seen.add(item)
    return items


class RecommendRequest(Strict):
    user_id: str | None = Field(None, max_length=256, description="a known user: their whole history is used")
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY, description="item ids, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)
    candidates: int = Field(50, ge=1, le=500, description="retrieved before reranking")
    rerank: bool = True


class GenerateRequest(Strict):
    user_id: str | None = Field(None, max_length=256, description="a known user: their whole history is used")
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY, description="item ids, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY,
                                  description="never returned (nor is the history)")
    beam: int = Field(20, ge=1, le=100, description="beam width (at least k is used)")


class RerankRequest(Strict):
    history: list[ItemId] = Field(..., max_length=MAX_HISTORY)
    candidates: list[ItemId] = Field(..., min_length=1, max_length=MAX_CANDIDATES,
                                     description="distinct item ids (a repeated id is a 422)")
    k: int | None = Field(None, ge=1, le=MAX_K)

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates):
        return distinct(candidates)


class RescoreRow(Strict):
    """One row of a re-scoring input: a recommendation (``user_id`` or ``history``) or, with ``candidates``,
    a reranking; the API's limits. Null columns count as absent; ``k`` null means 10."""

    request_id: str = Field(..., min_length=1, max_length=256)
    user_id: str | None = Field(None, max_length=256)
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY)
    candidates: list[ItemId] | None = Field(None, min_length=1, max_length=MAX_CANDIDATES)
    k: int | None = Field(None, ge=1, le=MAX_K)

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates):
        return distinct(candidates)


COLUMNS = tuple(RescoreRow.model_fields)
"""The columns a re-scoring input may have."""
