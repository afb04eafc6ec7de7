"""The interaction and catalog frames every stage shares, and their validation.

Interactions: ``user_id: str, item_id: str, timestamp: i64, rating: f32`` (rating may be null).
Catalog: ``item_id: str, title: str, year: i32 (nullable), genres: list[str], text: str``; the
prepared catalog adds ``idx: i32`` (dense, from 1; 0 is the padding index of sequence models).

Readers load every column as text and call :func:`cast_column`, which converts it and, on failure,
raises a :class:`DataError` naming the file, the column, the line and the offending value, instead of
a traceback from deep inside polars.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from recsys.errors import DataError

INTERACTION_SCHEMA = {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "rating": pl.Float32}
CATALOG_COLUMNS = ("item_id", "title", "year", "genres", "text")


def require_columns(df: pl.DataFrame, required: list[str] | tuple[str, ...], source: str) -> None:
    """Raise if ``df`` lacks any of ``required``; the message lists what the file does have."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {df.columns}")


Locate = Callable[[int], str]
"""Where a 0-based row of a frame is in its source, for messages: ``row -> "line 12"``."""


def lines_after(header_lines: int) -> Locate:
    """The 1-based line of a row in a text file with ``header_lines`` lines before the first row."""
    return lambda row: f"line {row + 1 + header_lines}"


def cast_column(df: pl.DataFrame, column: str, dtype: pl.DataType, source: str, *, header_lines: int = 1,
                nullable: bool = False, locate: Locate | None = None) -> pl.DataFrame:
    """Cast one text column to ``dtype``; name the first line that does not parse (or is empty).

    ``header_lines`` converts a 0-based row index into the 1-based line number of the file (``locate``, if
    given, names the place instead: a row of a Parquet file, a line of one part of several).
    Floats written as integers (``978300760.0``) are accepted for integer columns.
    """
    locate = locate or lines_after(header_lines)
    raw = df[column]
    text = raw.str.strip_chars() if raw.dtype == pl.String else raw
    empty = text.is_null() | (text == "") if raw.dtype == pl.String else raw.is_null()
    if dtype in (pl.Int64, pl.Int32):
        # Parse as float first so that "978300760.0" (RecBole writes :float columns) is accepted,
        # then reject values with a fractional part instead of silently truncating them.
        as_float = text.cast(pl.Float64, strict=False)
        integral = as_float.is_not_null() & (as_float == as_float.floor())
        cast = pl.select(pl.when(integral).then(as_float).otherwise(None).cast(dtype)).to_series()
    else:
        cast = text.cast(dtype, strict=False)
    failed = cast.is_null() & ~empty
    if not nullable:
        failed = failed | empty
    if failed.any():
        row = int(failed.arg_max())
        value = raw[row]
        what = "is empty" if value is None or str(value).strip() == "" else f"has {value!r}"
        raise DataError(f"{source}: column '{column}' {locate(row)} {what}; expected {dtype}")
    return df.with_columns(cast.alias(column))


def validate_interactions(df: pl.DataFrame, source: str, *, header_lines: int = 1,
                          on_duplicates: str = "error", locate: Locate | None = None) -> pl.DataFrame:
    """Check and convert a raw interaction frame into the contract above.

    ``on_duplicates``: what to do with rows that repeat the same (user, item, timestamp):
    ``"error"`` (default) or ``"drop"`` (keep the first). Repeats at different times are kept:
    they are real repeat consumption. ``header_lines`` / ``locate``: as in :func:`cast_column`.
    """
    locate = locate or lines_after(header_lines)
    if df.height == 0:
        raise DataError(f"{source}: no interactions (the file has a header but no rows)")
    require_columns(df, ["user_id", "item_id", "timestamp"], source)
    if "rating" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias("rating"))
    for col in ("user_id", "item_id"):
        df = cast_column(df, col, pl.String, source, locate=locate)
    df = cast_column(df, "timestamp", pl.Int64, source, locate=locate)
    df = cast_column(df, "rating", pl.Float32, source, locate=locate, nullable=True)
    df = df.select(list(INTERACTION_SCHEMA))
    dup = ~df.select(pl.struct("user_id", "item_id", "timestamp").is_first_distinct()).to_series()  # repeats only
    if dup.any():
        if on_duplicates == "drop":
            return df.unique(subset=["user_id", "item_id", "timestamp"], keep="first", maintain_order=True)
        if on_duplicates != "error":
            raise ValueError(f"on_duplicates must be 'error' or 'drop', got {on_duplicates!r}")
        row = int(dup.arg_max())
        r = df.row(row, named=True)
        raise DataError(f"{source}: duplicate interaction at {locate(row)} "
                        f"(user_id={r['user_id']!r}, item_id={r['item_id']!r}, timestamp={r['timestamp']}); "
                        f"{int(dup.sum())} rows repeat an earlier (user, item, timestamp). "
                        "Pass --drop-duplicates to keep the first of each.")
    return df


def item_text(title: str, year: int | None, genres: list[str]) -> str:
    """What a text encoder or a text LLM sees for an item: ``Toy Story (1995) | Animation, Comedy``."""
    head = f"{title} ({year})" if year is not None else title
    return f"{head} | {', '.join(genres)}" if genres else head


def validate_catalog(df: pl.DataFrame, source: str, *, on_duplicates: str = "error") -> pl.DataFrame:
    """Check a catalog frame (``item_id, title, year, genres``) and add its ``text`` column."""
    if df.height == 0:
        raise DataError(f"{source}: empty item catalog")
    require_columns(df, ["item_id", "title", "year", "genres"], source)
    dup = ~df["item_id"].is_first_distinct()
    if dup.any():
        if on_duplicates == "drop":
            df = df.unique(subset=["item_id"], keep="first", maintain_order=True)
        else:
            row = int(dup.arg_max())
            raise DataError(f"{source}: item_id {df['item_id'][row]!r} appears more than once "
                            f"(first repeat at row {row + 1}); item ids must be unique")
    text = [item_text(t, y, g) for t, y, g in zip(df["title"].to_list(), df["year"].to_list(), df["genres"].to_list())]
    return df.with_columns(pl.Series("text", text, dtype=pl.String)).select(list(CATALOG_COLUMNS))
