"""bf16 where the hardware multiplies in bf16, fp32 where it only converts.

bf16 autocast is the fast path on CUDA GPUs with bf16 support and on CPUs with AMX tiles (Sapphire
Rapids and later: about 4x fp32 for the matmuls). On a CPU with AVX-512 BF16 but no AMX, oneDNN
multiplies bf16 at about *half* the fp32 rate (measured on a 2-core Xeon of this project's CI kind,
torch 2.13: 4000 x 576 x 1536 matmul 156 GFLOPS in bf16 vs 235 in fp32; SmolLM2-135M forward over
8 x 500 tokens 7.2 s with bf16 autocast vs about 3.5 s in fp32). So "use bf16" is a property of the
machine, not of the job: recipes say ``precision: auto`` and this module decides.

    >>> with autocast("cpu"):          # bf16 only where it is fast
    ...     y = model(x)                 # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "bf16-mixed", "32-true", "16-mixed", "bf16-true")


BF16_ENV = "RECSYS_BF16"
"""Set to ``0`` to keep fp32 wherever ``auto`` would pick bf16 (bit-for-bit comparisons, the test suite)."""


def bf16_is_fast(device_type: str = "cpu") -> bool:
    """True on CUDA devices that support bf16 and on CPUs with AMX tiles, unless ``$RECSYS_BF16`` is ``0``."""
    if os.environ.get(BF16_ENV) == "0":
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(torch.cpu._is_amx_tile_supported())


def autocast(device_type: str = "cpu", enabled: bool | None = None) -> torch.autocast:
    """``torch.autocast`` to bf16 on ``device_type``; ``enabled=None`` = :func:`bf16_is_fast`."""
    return torch.autocast(device_type, dtype=torch.bfloat16,
                          enabled=bf16_is_fast(device_type) if enabled is None else enabled)


def lightning_precision(precision: str, accelerator: str = "auto") -> str:
    """Lightning's ``precision`` for a job: ``auto`` becomes ``bf16-mixed`` where bf16 is fast
    (:func:`bf16_is_fast` on the device ``accelerator`` resolves to) and ``32-true`` elsewhere; any
    other value is passed through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if bf16_is_fast("cuda" if cuda else "cpu") else "32-true"
