import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# fp32 on every CPU kind, so that exact comparisons hold where AMX would make `precision: auto` pick bf16
# (subprocesses inherit it; tests/test_precision.py lifts it to test the choice itself)
os.environ["RECSYS_BF16"] = "0"


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


@pytest.fixture(scope="session")
def _exported_once(tmp_path_factory):
    """Built once per session (the export with int8 quantisation takes ~12 s): a tiny SASRec, a tiny
    listwise reranker and their deployment, over the ring dataset prepared as ``tiny_dataset`` prepares it
    (the deployment the abuse benchmark serves)."""
    from pipelines.benchmarks.abuse import deploy

    root = tmp_path_factory.mktemp("exported")
    deploy(root, quantize=True)
    return root


@pytest.fixture
def exported(_exported_once, tmp_path):
    """(deployment directory, the SASRec model, the reranker directory): this test's own copy of the
    session's export, so a test may change its files."""
    import shutil

    from recsys.models.sasrec import SASRec

    for name in ("sas", "rr", "serve"):
        shutil.copytree(_exported_once / name, tmp_path / name)
    return tmp_path / "serve", SASRec.from_pretrained(tmp_path / "sas"), tmp_path / "rr"
