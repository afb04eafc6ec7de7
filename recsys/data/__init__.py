"""Data layer: fetch MovieLens, read it into polars frames, split it, write the prepared artifact.

    >>> from recsys.data import load_dataset, prepare, PreparedDataset   # doctest: +SKIP
    >>> raw = load_dataset("ml-1m")                     # fetched into $RECSYS_HOME on first use
    >>> ds = prepare(raw, "artifacts/ml-1m")            # leave-one-out split, parquet + manifest
    >>> ex = ds.eval_examples("test")                   # histories and held-out items
"""

from __future__ import annotations

from pathlib import Path

from recsys.data.assets import DATASETS, dataset_dir, fetch_dataset, verify
from recsys.data.prepared import EvalExamples, PrepareConfig, PreparedDataset, prepare
from recsys.data.readers import RawDataset, read_dataset

__all__ = ["DATASETS", "EvalExamples", "PrepareConfig", "PreparedDataset", "RawDataset", "fetch_dataset",
           "load_dataset", "prepare", "read_dataset"]

# The ML-100K RecBole item file has 18 colliding "Title (Year)" keys; keep the first, as RecBole does.
_DUPLICATE_POLICY = {"ml-1m": "error", "ml-100k": "drop"}


def load_dataset(name_or_path: str | Path, *, on_duplicates: str | None = None, log=print) -> RawDataset:
    """Read a named dataset (fetched into the cache if absent) or a directory of dataset files."""
    if str(name_or_path) in DATASETS:
        name = str(name_or_path)
        directory = dataset_dir(name)
        if not verify(directory):
            fetch_dataset(name, log=log)
        return read_dataset(directory, name, on_duplicates=on_duplicates or _DUPLICATE_POLICY[name])
    return read_dataset(name_or_path, on_duplicates=on_duplicates or "error")
