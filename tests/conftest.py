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


@pytest.fixture
def exported(tiny_dataset, tmp_path):
    import json

    from recsys.llm.backbone import build_tiny
    from recsys.models.sasrec import SASRec, SASRecConfig
    from serving.export import export

    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=tiny_dataset.n_items, max_len=12, hidden_size=16, num_layers=2),
                 tiny_dataset.fingerprint)
    sas.save_pretrained(tmp_path / "sas")
    bb = build_tiny(n_items=tiny_dataset.n_items, hidden_size=32, num_layers=1)
    bb.model.save_pretrained(tmp_path / "rr")
    bb.tokenizer.save_pretrained(tmp_path / "rr")
    (tmp_path / "rr" / "reranker.json").write_text(json.dumps({
        "kind": "listwise", "prompt": "tiny", "window": 8, "group_size": 8, "max_history": 10,
        "dataset_fingerprint": tiny_dataset.fingerprint}))
    out = export(tiny_dataset, tmp_path / "sas", tmp_path / "serve", tmp_path / "rr", quantize=True)
    return out, sas, tmp_path / "rr"
