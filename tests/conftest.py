import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own $RECSYS_HOME: nothing leaks into (or is read from) the user's cache."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "recsys-home"))


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """The tiny data in all three layouts: tiny/ (committed) and GroupLens copies generated here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("fixtures")
    module.main(out, layouts=("grouplens-1m", "grouplens-100k"))
    return {"recbole": FIXTURES / "tiny", "grouplens-1m": out / "tiny-grouplens-1m",
            "grouplens-100k": out / "tiny-grouplens-100k"}


@pytest.fixture
def tiny_dataset(tmp_path):
    """The synthetic ring dataset, prepared (leave-one-out)."""
    from recsys.data import prepare, read_dataset

    return prepare(read_dataset(FIXTURES / "tiny"), tmp_path / "prepared")
