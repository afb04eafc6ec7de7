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
MAX_TIME = 2 ** 40
"""Latest request time accepted, in Unix seconds (about the year 36,800): rejects a millisecond timestamp."""


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
    time: int | None = Field(None, ge=0, le=MAX_TIME, description="the request's time, Unix seconds (default: "
                             "now), for a reranker's features that read time (recent popularity, time since the "
                             "user's last interaction); give it when replaying past requests")


class GenerateRequest(Strict):
    user_id: str | None = Field(None, max_length=256, description="a known user: their whole history is used")
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY, description="item ids, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY,
                                  description="never returned (nor is the history)")
    beam: int = Field(20, ge=1, le=100, description="beam width (at least k is used)")


class RerankRequest(Strict):
    user_id: str | None = Field(None, max_length=256, description="a known user: their whole history is used")
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY, description="item ids, oldest first")
    candidates: list[ItemId] = Field(..., min_length=1, max_length=MAX_CANDIDATES,
                                     description="distinct item ids (a repeated id is a 422)")
    k: int | None = Field(None, ge=1, le=MAX_K)
    time: int | None = Field(None, ge=0, le=MAX_TIME, description="as in /v1/recommend")

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
    time: int | None = Field(None, ge=0, le=MAX_TIME, description="as in /v1/recommend")

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates):
        return distinct(candidates)


COLUMNS = tuple(RescoreRow.model_fields)
"""The columns a re-scoring input may have."""


class RequestError(ValueError):
    """A request that passed validation but cannot be served: its HTTP status, where the problem is (``loc``)
    and a message naming it. The API answers it; a batch job rejects the row with the message."""

    def __init__(self, status: int, msg: str, loc: tuple, kind: str = "value_error"):
        super().__init__(msg)
        self.status, self.loc, self.kind = status, loc, kind


def known_items(ids: list[str], item_idx: dict[str, int]) -> tuple[list[int], list[str]]:
    """(the idx of the ids the catalogue has, the ids it lacks), each in input order."""
    return [item_idx[i] for i in ids if i in item_idx], [i for i in ids if i not in item_idx]


def resolve_history(user_id: str | None, history: list[str] | None, users: dict,
                    item_idx: dict[str, int]) -> tuple[list[int], list[str]]:
    """The request's history in item idx (a known user's whole history, or the given item ids the catalogue
    has) and its unknown item ids; :class:`RequestError` when neither or both are given (422), the user is
    unknown (404) or no known item is left (422)."""
    if (user_id is None) == (history is None):
        raise RequestError(422, "give exactly one of user_id or history", ("body",))
    unknown: list[str] = []
    if user_id is not None:
        if user_id not in users:
            example = next(iter(users), None)
            raise RequestError(404, f"unknown user_id {user_id!r}" + (
                f" (ids of this model look like {example!r})" if example else ""), ("body", "user_id"), "unknown_user")
        idx = list(users[user_id])
    else:
        idx, unknown = known_items(history, item_idx)
    if not idx:
        raise RequestError(422, "empty history" + (f" (unknown item ids {unknown[:20]})" if unknown else ""),
                           ("body", "history"))
    return idx, unknown
