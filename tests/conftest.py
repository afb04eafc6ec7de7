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


@pytest.fixture
def tiny_dataset(tmp_path):
    """The synthetic ring dataset, prepared (leave-one-out)."""
    from recsys.data import prepare, read_dataset

    return prepare(read_dataset(FIXTURES / "tiny"), tmp_path / "prepared")
