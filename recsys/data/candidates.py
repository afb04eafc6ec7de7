"""Candidate files: one writer, one reader, and the lists they hold as :class:`recsys.types.CandidateList`.

A candidates directory holds ``candidates_<split>.parquet`` for ``train``, ``valid`` and ``test`` (written by
``recsys candidates``) and ``candidates.json`` (the retriever and its recall). One row per list:

    user_id         str             the user
    uidx            int32           the user's dense index
    target          int32           the held-out item's idx
    target_item_id  str             its catalogue id
    history_length  int             the list was retrieved after the first ``history_length`` items of the
                                    user's whole sequence (train, valid, test in time order)
    candidates      array[int32,n]  item idx, best first
    scores          array[f32,n]    the retriever's score of each
    hit_rank        int32           0-based position of the target among the candidates, -1 when absent

The history is stored as its length, not its items (a train split of 30 lists per user would repeat each
history 30 times); :func:`read_candidate_lists` attaches it from the prepared dataset. Torch-free.

    >>> lists = read_candidate_lists(dataset, "artifacts/candidates/sasrec", "valid")   # doctest: +SKIP
    >>> lists[0].history, lists[0].top(20), lists[0].target_rank()                       # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsys.errors import DataError
from recsys.metrics import relevant_ranks
from recsys.types import CandidateList

SPLITS = ("train", "valid", "test")
COLUMNS = ("user_id", "uidx", "target", "target_item_id", "history_length", "candidates", "scores", "hit_rank")
"""The columns of a candidates file."""


def candidates_path(directory: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return Path(directory) / f"candidates_{split}.parquet"


def hit_positions(candidates: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(Q,) 0-based position of each list's target among its (Q, n) candidates, -1 when absent (the file's
    ``hit_rank``; :func:`recsys.metrics.relevant_ranks` with one relevant item)."""
    position = relevant_ranks(np.asarray(candidates), np.asarray(target)[:, None])[:, 0]
    return np.where(np.isfinite(position), position, -1).astype(np.int64)


def write_candidates(directory: str | Path, split: str, user_id, uidx, target, target_item_id, history_length,
                     candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Write ``candidates_<split>.parquet``: Q lists of (Q, n) ``candidates`` (item idx, best first) and their
    ``scores``, the other arguments (Q,) each. Returns (Q,) ``hit_rank`` (-1 when the target is absent)."""
    candidates, target = np.asarray(candidates), np.asarray(target)
    hits = hit_positions(candidates, target)
    pl.DataFrame({"user_id": user_id, "uidx": np.asarray(uidx, dtype=np.int32), "target": target.astype(np.int32),
                  "target_item_id": target_item_id, "history_length": np.asarray(history_length, dtype=np.int64),
                  "candidates": candidates.astype(np.int32), "scores": np.asarray(scores, dtype=np.float32),
                  "hit_rank": hits.astype(np.int32)}).write_parquet(candidates_path(directory, split))
    return hits


def read_candidates(directory: str | Path, split: str) -> pl.DataFrame:
    """The rows of ``candidates_<split>.parquet`` (columns :data:`COLUMNS`); an error names the file and what
    is wrong with it."""
    path = candidates_path(directory, split)
    if not path.exists():
        raise DataError(f"{path}: no candidates for split {split!r}; run `recsys candidates` first")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a candidates file has "
                        f"{', '.join(COLUMNS)}")
    return frame


def candidate_lists(sequences: list[np.ndarray], rows: pl.DataFrame, source: str = "candidates") -> list[CandidateList]:
    """A :class:`CandidateList` per row of a candidates frame, its history the first ``history_length`` items
    of ``sequences[uidx]`` (each user's whole sequence, :meth:`recsys.data.PreparedDataset.user_sequences`); a
    history longer than the user's sequence is an error naming ``source`` and the row."""
    out = []
    cols = ("user_id", "uidx", "history_length", "candidates", "scores", "target")
    for i, (user, u, n, cands, scores, target) in enumerate(rows.select(cols).iter_rows()):
        if u >= len(sequences) or n > len(sequences[u]):
            raise DataError(f"{source}, row {i} (user {user!r}): history_length {n} is longer than the user's "
                            f"{len(sequences[u]) if u < len(sequences) else 0} items: the file belongs to another "
                            "dataset")
        out.append(CandidateList(user, int(u), sequences[u][:n], np.asarray(cands, dtype=np.int64),
                                 np.asarray(scores, dtype=np.float32), int(target)))
    return out


def hold_out(lists: list[CandidateList], n: int) -> tuple[list[CandidateList], list[CandidateList]]:
    """(the rest, the last ``n``) of ``lists``: the trainers keep the last ``val_users`` validation lists to
    select checkpoints, and may learn from the others."""
    cut = len(lists) - min(n, len(lists))
    return lists[:cut], lists[cut:]


def read_candidate_lists(dataset, directory: str | Path, split: str) -> list[CandidateList]:
    """Every list of ``candidates_<split>.parquet`` with its history from ``dataset`` (a
    :class:`recsys.data.PreparedDataset`)."""
    return candidate_lists(dataset.user_sequences(), read_candidates(directory, split),
                           str(candidates_path(directory, split)))
