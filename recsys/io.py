"""Atomic writes: an artifact directory appears complete or not at all, never half-written."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path):
    """Yield a staging directory beside ``target``; on success it replaces ``target``, on error it is removed.

    >>> with atomic_directory("artifacts/data/ml-1m") as staging:   # doctest: +SKIP
    ...     frame.write_parquet(staging / "interactions.parquet")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
