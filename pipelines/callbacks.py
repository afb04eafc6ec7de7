"""Lightning callbacks shared by the training modules."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class RNGState(L.Callback):
    """Save the torch / numpy / python RNG states in every checkpoint and restore them on resume, so a
    run resumed from an epoch-end checkpoint continues exactly like the uninterrupted run. Plain lists
    and tensors only: checkpoints load with ``torch.load(weights_only=True)``."""

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, gauss_next = random.getstate()
        return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                "python": [version, list(state), gauss_next]}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, values, gauss_next = state["python"]
        random.setstate((version, tuple(values), gauss_next))
