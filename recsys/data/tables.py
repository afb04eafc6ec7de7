"""Your own data: interactions (and optionally items and users) in CSV, TSV, Parquet or JSON Lines, with
named columns mapped onto the frames of :mod:`recsys.data.schema`.

A source is one file or a directory of part files of one format (``part-0000.csv``, ...). The format comes
from the extension unless given. Only the mapped columns are read as data; every other column of the
interactions file is ignored::

    columns = ColumnMap(user_col="customer", item_col="sku", time_col="ts", items="products.csv",
                        item_id_col="sku", title_col="name", text_cols=("brand",), category_col="category")
    raw = read_columns("orders.csv", columns)

Timestamps may be Unix seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude) or
ISO-8601 strings (``2024-05-01``, ``2024-05-01T13:45:00Z``, ``2024-05-01 13:45:00+02:00``; a time without
an offset is UTC); :func:`parse_timestamps` says which it found. Every metadata column is optional: an item
without a catalogue row, or without a title, is titled by its id.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.readers import RawDataset, read_delimited, user_features_table
from recsys.data.schema import (
    Locate,
    validate_catalog,
    validate_interactions,
)
from recsys.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""File extension -> format."""


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of which files hold what (``recsys data prepare FILE --user-col ...``)."""

    user_col: str = "user_id"
    """The interactions' user id column (read as text)."""
    item_col: str = "item_id"
    """The interactions' item id column (read as text)."""
    time_col: str = "timestamp"
    """Unix seconds / milliseconds / microseconds / nanoseconds, or ISO-8601 text (detected)."""
    rating_col: str | None = None
    """Optional explicit feedback; kept as ``rating``."""
    min_rating: float | None = None
    """Keep only interactions rated at least this (needs ``rating_col``)."""
    items: str | None = None
    """Optional item file (or directory of parts)."""
    item_id_col: str = "item_id"
    """The items file's id column (matched against ``item_col``)."""
    title_col: str | None = None
    """The items' title column; None: ``title`` if the file has one, else the id."""
    text_cols: tuple[str, ...] = ()
    """More item text (description, brand, ...), appended to what text encoders and LM prompts read."""
    category_col: str | None = None
    """Item categories (``genres`` in the catalogue): a list, or text separated by ``category_sep``."""
    category_sep: str = "|"
    """What separates several categories in one text cell (``Action|Comedy``)."""
    year_col: str | None = None
    """Items' year (release, publication); a value that is not a whole number is left empty."""
    users: str | None = None
    """Optional user file (or directory of parts)."""
    user_id_col: str = "user_id"
    """The users file's id column (matched against ``user_col``)."""
    feature_cols: tuple[str, ...] | None = None
    """User feature columns (kept as text), each ``column`` or ``column=name`` to rename it (the fusion
    reranker's demographics read ``gender`` and ``age``); None: every column but the id."""
    format: str | None = None
    """``csv``, ``tsv``, ``parquet`` or ``jsonl`` for every file; None: from each file's extension."""
    domain: str = "items"
    """What the items are, for the words of text prompts: ``items``, ``products``, ``movies``, ``music``,
    ``books``, ``news`` (``domains`` in ``recsys/portable/templates.yaml``)."""

    def __post_init__(self):
        if self.format is not None and self.format not in set(FORMATS.values()):
            raise DataError(f"format must be one of {sorted(set(FORMATS.values()))}, got {self.format!r}")
        if self.min_rating is not None and self.rating_col is None:
            raise DataError("min_rating needs rating_col: the column that holds the ratings")


def table_files(path: str | Path, fmt: str | None = None) -> tuple[list[Path], str]:
    """The files of a source (the file itself, or a directory's files of one format, sorted) and the format."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.is_file() and not p.name.startswith((".", "_")))
    if fmt is None:
        kinds = {FORMATS.get(p.suffix.lower()) for p in files}
        if path.is_dir():
            files = [p for p in files if p.suffix.lower() in FORMATS]
            kinds.discard(None)
        if not files or None in kinds:
            raise DataError(f"{path}: cannot tell the format from the extension; expected one of "
                            f"{', '.join(sorted(FORMATS))}, or pass --format")
        if len(kinds) > 1:
            raise DataError(f"{path}: part files of several formats ({', '.join(sorted(kinds))}); keep one")
        fmt = kinds.pop()
    elif path.is_dir():
        files = [p for p in files if FORMATS.get(p.suffix.lower()) == fmt] or files
    if not files:
        raise DataError(f"{path}: no data files in this directory")
    return files, fmt


def _read_one(path: Path, fmt: str) -> pl.DataFrame:
    if fmt in ("csv", "tsv"):                                               # TSV has no quoting
        return read_delimited(path, "," if fmt == "csv" else "\t", quote_char='"' if fmt == "csv" else None)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        return pl.read_ndjson(path, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable {fmt} file ({first})") from None


def read_table(path: str | Path, columns: list[str], fmt: str | None = None,
               optional: tuple[str, ...] = (), keep_all: bool = False) -> tuple[pl.DataFrame, Locate, str]:
    """Read ``columns`` (and those of ``optional`` a file has; every column with ``keep_all``) from every part
    of a source.

    Returns the rows of all parts in order, a :data:`Locate` naming each row's file and line (or Parquet row)
    for messages, and the format. A part without a required column is an error naming it and listing the
    columns it has.
    """
    files, fmt = table_files(path, fmt)
    frames, places = [], []
    for f in files:
        df = _read_one(f, fmt)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"{f}: missing column(s) {missing}; it has {df.columns}")
        frames.append(df if keep_all else df.select(columns + [c for c in optional if c in df.columns]))
        places.append((f, df.height))
    try:
        table = pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path}: its parts disagree on column types ({str(e).splitlines()[0]})") from None
    ends = np.cumsum([n for _, n in places])
    header = 1 if fmt in ("csv", "tsv") else 0

    def locate(row: int) -> str:
        part = int(np.searchsorted(ends, row, side="right"))
        f, within = places[part][0], row - (int(ends[part - 1]) if part else 0)
        where = f"row {within}" if fmt == "parquet" else f"line {within + 1 + header}"
        return where if len(files) == 1 else f"{f.name} {where}"

    return table, locate, fmt


UNITS = ((1e17, "nanoseconds", 10**9), (1e14, "microseconds", 10**6), (1e11, "milliseconds", 1000),
         (0.0, "seconds", 1))
"""Largest absolute Unix time in each unit is above the threshold (1e11 s is the year 5138, 1e11 ms 1973)."""


def parse_timestamps(values: pl.Series, source: str, column: str, locate: Locate) -> tuple[pl.Series, str]:
    """(Int64 Unix seconds, what was detected) from numbers in any Unix unit or ISO-8601 text."""
    text = values.cast(pl.String).str.strip_chars()
    empty = text.is_null() | (text == "")
    if empty.any():
        row = int(empty.arg_max())
        raise DataError(f"{source}: column '{column}' {locate(row)} is empty; expected a timestamp")
    numbers = text.cast(pl.Float64, strict=False)
    if numbers.is_not_null().all():
        peak = float(numbers.abs().max())
        _, unit, per_second = next(u for u in UNITS if peak >= u[0])
        seconds = (numbers / per_second).floor().cast(pl.Int64)
        return seconds.alias(column), f"Unix {unit} (largest {peak:.3g})"
    if numbers.is_not_null().any():
        row = int(numbers.is_null().arg_max())
        raise DataError(f"{source}: column '{column}' {locate(row)} has {values[row]!r} among numeric timestamps; "
                        "expected one kind (Unix time or ISO-8601) throughout")
    unique = text.unique()
    parsed = {}
    for v in unique.to_list():
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
        except ValueError:
            row = int((text == v).arg_max())
            raise DataError(f"{source}: column '{column}' {locate(row)} has {v!r}; expected Unix time or an "
                            "ISO-8601 date/time such as 2024-05-01T13:45:00Z") from None
        parsed[v] = int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())
    seconds = text.replace_strict(parsed, return_dtype=pl.Int64)
    return seconds.alias(column), "ISO-8601 text (times without an offset read as UTC)"


def _categories(values: pl.Series, separator: str) -> list[list[str]]:
    if isinstance(values.dtype, pl.List):
        return [[str(c) for c in (v or []) if c is not None and str(c) != ""] for v in values.to_list()]
    return [[c.strip() for c in (v or "").split(separator) if c.strip()] for v in values.cast(pl.String).to_list()]


def _catalog(columns: ColumnMap, item_ids: pl.Series, on_duplicates: str = "error") -> tuple[pl.DataFrame, dict]:
    """The catalogue of every interacted item: rows of the items file where it has them, the id as title else;
    a repeated item id is an error, or with ``on_duplicates="drop"`` its first row is kept."""
    ids = item_ids.unique().sort()
    report = {"items_in_interactions": len(ids)}
    base = pl.DataFrame({"item_id": ids})
    if columns.items is None:
        catalog = base.with_columns(pl.col("item_id").alias("title"), pl.lit(None, pl.Int32).alias("year"),
                                    pl.lit([], pl.List(pl.String)).alias("genres"), pl.lit("").alias("extra"))
    else:
        wanted = [columns.item_id_col] + ([columns.title_col] if columns.title_col else [])
        wanted += list(columns.text_cols) + [c for c in (columns.category_col, columns.year_col) if c]
        table, locate, _ = read_table(columns.items, list(dict.fromkeys(wanted)), columns.format,
                                      optional=() if columns.title_col else ("title",))
        source = str(columns.items)
        table = table.with_columns(pl.col(columns.item_id_col).cast(pl.String).str.strip_chars().alias("item_id"))
        null_id = table["item_id"].is_null() | (table["item_id"] == "")
        if null_id.any():
            raise DataError(f"{source}: column '{columns.item_id_col}' {locate(int(null_id.arg_max()))} is empty; "
                            "expected an item id")
        repeated = ~table["item_id"].is_first_distinct()
        if repeated.any() and on_duplicates == "drop":
            report["item_rows_dropped_as_repeats"] = int(repeated.sum())
            table = table.filter(~repeated)
        elif repeated.any():
            row = int(repeated.arg_max())
            raise DataError(f"{source}: item id {table['item_id'][row]!r} appears more than once (first repeat at "
                            f"{locate(row)}); item ids must be unique (--drop-duplicates keeps the first)")
        matched = int(table["item_id"].is_in(ids.implode()).sum())
        if matched == 0:
            raise DataError(f"{source}: none of its {table.height} item ids matches an item of the interactions "
                            f"(e.g. {table['item_id'][0]!r} vs {ids[0]!r}); check --item-id-col and --item-col")
        title = columns.title_col or ("title" if "title" in table.columns else None)
        text = pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in columns.text_cols], separator=" | ") \
            if columns.text_cols else pl.lit("")
        rows = table.select(
            "item_id",
            (pl.col(title).cast(pl.String).str.strip_chars() if title else pl.lit(None, pl.String)).alias("title"),
            pl.Series("genres", _categories(table[columns.category_col], columns.category_sep) if columns.category_col
                      else [[] for _ in range(table.height)], dtype=pl.List(pl.String)),
            (pl.col(columns.year_col).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
             .cast(pl.Int32, strict=False) if columns.year_col else pl.lit(None, pl.Int32)).alias("year"),
            text.alias("extra"))
        catalog = base.join(rows, on="item_id", how="left").with_columns(
            pl.when(pl.col("title").is_null() | (pl.col("title") == "")).then(pl.col("item_id"))
            .otherwise(pl.col("title")).alias("title"),
            pl.col("genres").fill_null(pl.lit([], pl.List(pl.String))), pl.col("extra").fill_null(""))
        report |= {"item_file_rows": table.height, "items_with_metadata": matched,
                   "items_titled_by_id": len(ids) - matched}
    checked = validate_catalog(catalog.select("item_id", "title", "year", "genres"), str(columns.items or "items"))
    extra = checked.select("item_id").join(catalog.select("item_id", "extra"), on="item_id", how="left")["extra"]
    text = [t + f" | {x}" if x.strip(" |") else t for t, x in zip(checked["text"].to_list(), extra.to_list())]
    return checked.with_columns(pl.Series("text", text, dtype=pl.String)), report


def read_columns(path: str | Path, columns: ColumnMap = ColumnMap(), name: str | None = None, *,
                 on_duplicates: str = "error", log=print) -> RawDataset:
    """Interactions from ``path`` (a file or a directory of parts) with ``columns`` mapped onto the shared
    schema, the catalogue (items file optional) and the user features (users file optional)."""
    path = Path(path)
    source = str(path)
    wanted = [columns.user_col, columns.item_col, columns.time_col] + ([columns.rating_col] if columns.rating_col
                                                                        else [])
    table, locate, fmt = read_table(path, list(dict.fromkeys(wanted)), columns.format)
    if table.height == 0:
        raise DataError(f"{source}: no interactions (the file has a header but no rows)")
    seconds, detected = parse_timestamps(table[columns.time_col], source, columns.time_col, locate)
    df = table.select(pl.col(columns.user_col).cast(pl.String).alias("user_id"),
                      pl.col(columns.item_col).cast(pl.String).alias("item_id"))
    df = df.with_columns(seconds.alias("timestamp"),
                         (table[columns.rating_col].cast(pl.String) if columns.rating_col
                          else pl.lit(None, pl.String)).alias("rating"))
    kept = np.arange(df.height)
    if columns.min_rating is not None:
        rating = df["rating"].str.strip_chars().cast(pl.Float64, strict=False)
        keep = (rating >= columns.min_rating).fill_null(False).to_numpy()
        kept = kept[keep]
        df = df.filter(pl.Series(keep))
        if df.height == 0:
            raise DataError(f"{source}: no interaction has {columns.rating_col} >= {columns.min_rating}")
    df = validate_interactions(df, source, on_duplicates=on_duplicates, locate=lambda r: locate(int(kept[r])))
    catalog, report = _catalog(columns, df["item_id"], on_duplicates)
    users = None
    if columns.users is not None:
        renamed = dict(f.split("=", 1) if "=" in f else (f, f) for f in columns.feature_cols or ())
        users_table, _, _ = read_table(columns.users, [columns.user_id_col, *renamed], columns.format,
                                       keep_all=columns.feature_cols is None)
        renamed = renamed or {c: c for c in users_table.columns if c != columns.user_id_col}
        users = user_features_table(users_table.select(pl.col(columns.user_id_col).alias("user_id"),
                                                       *(pl.col(c).alias(n) for c, n in renamed.items())),
                                    Path(columns.users))
    log(f"{source}: {df.height} interactions ({fmt}), {df['user_id'].n_unique()} users, "
        f"{report['items_in_interactions']} items; {columns.time_col}: {detected}"
        + (f"; {report['items_with_metadata']} items described by {columns.items}, {report['items_titled_by_id']} "
           "titled by their id" if columns.items else ""))
    return RawDataset(name or path.stem, df, catalog, f"columns:{path}", users, columns.domain)
