"""Filtering and splitting of interaction frames (pure functions over polars frames).

- :func:`kcore`: iterative k-core filter.
- :func:`order_interactions`: per-user chronological position ``pos`` with deterministic tie-breaking.
  ML-1M has many ratings in the same second; ``"file"`` keeps the file's order among ties (what the
  SASRec/HSTU preprocessing does with a stable sort), ``"hash"`` orders ties by a seeded hash of the
  item id, which cannot leak an ID ordering (a pitfall of ASIN-sorted Amazon files).
- :func:`leave_one_out`: last interaction = test, second to last = valid, the rest train.
- :func:`temporal_split`: one global time cut for valid and one for test.
"""

from __future__ import annotations

import hashlib

import polars as pl

from recsys.errors import DataError


def kcore(df: pl.DataFrame, min_user: int = 0, min_item: int = 0) -> pl.DataFrame:
    """Drop users with < ``min_user`` and items with < ``min_item`` interactions until both hold."""
    while min_user > 0 or min_item > 0:
        before = df.height
        if min_item > 0:
            df = df.filter(pl.len().over("item_id") >= min_item)
        if min_user > 0:
            df = df.filter(pl.len().over("user_id") >= min_user)
        if df.height == before:
            break
    if df.height == 0:
        raise DataError(f"k-core filter (min_user={min_user}, min_item={min_item}) removed every interaction")
    return df


def _stable_hash(values: list[str], seed: int) -> list[int]:
    """64-bit SHA-256 prefix of ``seed:value``: the same on every machine and polars version."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{v}".encode()).digest()[:8], "big") >> 1 for v in values]


def order_interactions(df: pl.DataFrame, tie_break: str = "file", seed: int = 0) -> pl.DataFrame:
    """Sort by (user, timestamp, tie-break) and add ``pos``: 0-based chronological index per user."""
    df = df.with_row_index("_row")
    if tie_break == "file":
        df = df.with_columns(pl.col("_row").cast(pl.Int64).alias("_tie"))
    elif tie_break == "hash":
        items = df["item_id"].unique().to_list()
        table = pl.DataFrame({"item_id": items, "_tie": _stable_hash(items, seed)}, schema_overrides={"_tie": pl.Int64})
        df = df.join(table, on="item_id", how="left")
    else:
        raise ValueError(f"tie_break must be 'file' or 'hash', got {tie_break!r}")
    df = df.sort(["user_id", "timestamp", "_tie", "_row"])
    return df.with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int32).alias("pos")).drop("_row", "_tie")


def leave_one_out(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Label ``split`` in {train, valid, test} per user; needs ``pos``. Returns (frame, users dropped).

    Users with fewer than 3 interactions cannot give one train, one valid and one test item: dropped.
    """
    n = pl.len().over("user_id")
    kept = df.filter(n >= 3)
    dropped = df["user_id"].n_unique() - kept["user_id"].n_unique()
    split = pl.when(pl.col("pos") == n - 1).then(pl.lit("test")) \
        .when(pl.col("pos") == n - 2).then(pl.lit("valid")).otherwise(pl.lit("train"))
    return kept.with_columns(split.alias("split")), dropped


def temporal_split(df: pl.DataFrame, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> pl.DataFrame:
    """Label ``split`` by two global timestamp quantiles: the last ``test_fraction`` of time-ordered
    interactions is test, the ``valid_fraction`` before it valid, the rest train."""
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError("valid_fraction and test_fraction must be > 0 and sum to < 1")
    t_valid = df["timestamp"].quantile(1 - valid_fraction - test_fraction, interpolation="lower")
    t_test = df["timestamp"].quantile(1 - test_fraction, interpolation="lower")
    split = pl.when(pl.col("timestamp") > t_test).then(pl.lit("test")) \
        .when(pl.col("timestamp") > t_valid).then(pl.lit("valid")).otherwise(pl.lit("train"))
    return df.with_columns(split.alias("split"))
