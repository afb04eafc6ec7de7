import pytest
import torch

from recsys import precision
from recsys.precision import autocast, lightning_precision


@pytest.fixture(autouse=True)
def _hardware_decides(monkeypatch):
    monkeypatch.delenv(precision.BF16_ENV, raising=False)          # the suite's fp32 pin (conftest) lifted


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert lightning_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert lightning_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device_type="cpu": device_type == "cuda")
    assert lightning_precision("auto", "gpu") == "bf16-mixed"
    assert lightning_precision("auto", "cpu") == "32-true"


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused():
    assert lightning_precision("bf16-mixed") == "bf16-mixed"
    assert lightning_precision("32-true") == "32-true"
    with pytest.raises(ValueError, match="precision must be one of"):
        lightning_precision("fp8")


def test_autocast_is_bf16_only_where_fast(monkeypatch):
    x = torch.randn(3, 4)
    for fast in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda fast=fast: fast)
        with autocast("cpu"):
            y = x @ x.T
        assert y.dtype == (torch.bfloat16 if fast else torch.float32)
    with autocast("cpu", enabled=True):
        assert (x @ x.T).dtype == torch.bfloat16


def test_recsys_bf16_0_keeps_fp32_where_auto_would_pick_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(precision.BF16_ENV, "0")
    assert lightning_precision("auto", "cpu") == "32-true" and lightning_precision("bf16-mixed") == "bf16-mixed"
    with autocast("cpu"):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
