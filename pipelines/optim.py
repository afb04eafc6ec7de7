"""Learning-rate schedules as pure functions, and the LambdaLR wrapper the Lightning modules use.

``warmup_cosine`` is the schedule of most transformer recipes (linear warmup, then half a cosine
down to ``floor`` x the peak rate, e.g. Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts).
``plateau_scheduler`` cuts the rate when a validation metric stops improving: the schedule for runs
bounded by a time budget, where the number of steps a cosine would need is unknown in advance.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    ``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the remaining steps
    done; ``floor`` from ``total_steps`` on. Example (total 10, warmup 2, floor 0): steps 0, 1 ->
    0.5, 1.0; step 2 -> 1.0; step 6 -> 0.5; step 10 -> 0.0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
                 floor: float = 0.0) -> dict | None:
    """Lightning's ``lr_scheduler`` entry (stepped every optimiser step), or None for ``constant``."""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    fn = lambda step: warmup_cosine(step, total_steps, warmup_steps, floor)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, fn), "interval": "step"}


def plateau(optimizer: torch.optim.Optimizer, factor: float, patience: int, mode: str = "max"):
    """``ReduceLROnPlateau``: the rate is multiplied by ``factor`` after more than ``patience`` validations
    in a row without a new best (relative threshold 1e-4).

    The caller steps it with the metric right after each validation (``scheduler.step(value)``) and keeps
    its ``state_dict`` in the checkpoint: Lightning's own epoch-interval stepping runs after the
    checkpoint of that validation is written, so a run resumed from it would miss one step."""
    if not 0.0 < factor < 1.0:
        raise ValueError(f"plateau factor must be in (0, 1), got {factor}")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)
