"""Data layer: fetch MovieLens, read it into polars frames, split it, write the prepared artifact.

    >>> from recsys.data import load_dataset, prepare, PreparedDataset   # doctest: +SKIP
    >>> raw = load_dataset("ml-1m")                     # fetched into $RECSYS_HOME on first use
    >>> ds = prepare(raw, "artifacts/ml-1m")            # leave-one-out split, parquet + manifest
    >>> ex = ds.eval_examples("test")                   # histories and held-out items
    >>> raw = load_dataset("orders.csv", ColumnMap(user_col="customer", item_col="sku"))  # your own # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from recsys.data.assets import DATASETS, dataset_dir, fetch_dataset, verify
from recsys.data.prepared import EvalExamples, PrepareConfig, PreparedDataset, prepare
from recsys.data.readers import RawDataset, detect_layout, read_dataset
from recsys.data.tables import FORMATS, ColumnMap, read_columns, table_files
from recsys.errors import DataError

__all__ = ["DATASETS", "ColumnMap", "EvalExamples", "PrepareConfig", "PreparedDataset", "RawDataset", "fetch_dataset",
           "load_dataset", "prepare", "read_columns", "read_dataset"]

# The ML-100K RecBole item file has 18 colliding "Title (Year)" keys; keep the first, as RecBole does.
_DUPLICATE_POLICY = {"ml-1m": "error", "ml-100k": "drop"}


def load_dataset(name_or_path: str | Path, columns: ColumnMap | None = None, *, on_duplicates: str | None = None,
                 log=print) -> RawDataset:
    """Read a named dataset (fetched into the cache if absent), a MovieLens directory (RecBole or GroupLens
    layout), or your own table: a CSV/TSV/Parquet/JSON Lines file or directory of parts, its columns mapped
    by ``columns`` (:mod:`recsys.data.tables`; the default names ``user_id, item_id, timestamp``)."""
    if columns is None and str(name_or_path) not in DATASETS and Path(name_or_path).is_dir():
        try:
            detect_layout(Path(name_or_path))
        except DataError as not_movielens:               # then a directory of part files of one table
            try:
                table_files(name_or_path)
            except DataError:
                raise DataError(f"{not_movielens}, or part files of one table ({', '.join(sorted(FORMATS))})") from None
            columns = ColumnMap()
    if columns is not None or Path(name_or_path).is_file():
        return read_columns(name_or_path, columns or ColumnMap(), on_duplicates=on_duplicates or "error", log=log)
    if str(name_or_path) in DATASETS:
        name = str(name_or_path)
        directory = dataset_dir(name)
        if not verify(directory):
            fetch_dataset(name, log=log)
        return read_dataset(directory, name, on_duplicates=on_duplicates or _DUPLICATE_POLICY[name])
    return read_dataset(name_or_path, on_duplicates=on_duplicates or "error")
