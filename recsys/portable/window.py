"""Sliding-window reranking of a long candidate list with a window scorer (RankGPT / RankLLM, FIRST).

The window moves from the back of the list to the front (window 20, stride 10 by default), so good
items bubble up: with 100 candidates the windows are [80, 100), [70, 90), ..., [0, 20), nine calls.
Each call reorders the items inside its window; the next window overlaps the first ``window - stride``
items of the previous one.

Torch-free (numpy only): the serving runtime blends FIRST logits with :func:`retriever_prior` from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def retriever_prior(n: int, beta: float) -> np.ndarray:
    """(n,) float32 ``-beta * ln(1 + j)`` for window positions j = 0..n-1 in the retriever's order: added to an
    LM's FIRST logits it blends them with the retriever's ranking (beta 0: the LM alone; a large beta: the
    retriever's order). ``n = 3, beta = 1`` -> ``[0, -0.693, -1.099]``."""
    return (-beta * np.log1p(np.arange(n, dtype=np.float64))).astype(np.float32)


def window_starts(n: int, window: int = 20, stride: int = 10) -> list[int]:
    """Start positions, back to front. ``n = 100`` -> ``[80, 70, ..., 0]``; ``n = 25`` -> ``[5, 0]``."""
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if n <= window:
        return [0]
    starts = list(range(n - window, 0, -stride))
    return starts + [0]


def sliding_window_rerank(items: Sequence, rank_window: Callable[[list], list[int]], window: int = 20,
                          stride: int = 10) -> list:
    """Rerank ``items`` with ``rank_window(window_items) -> order`` (positions, best first, complete)."""
    items = list(items)
    for start in window_starts(len(items), window, stride):
        chunk = items[start:start + window]
        order = rank_window(chunk)
        if sorted(order) != list(range(len(chunk))):
            raise ValueError(f"rank_window must return a permutation of 0..{len(chunk) - 1}, got {order}")
        items[start:start + window] = [chunk[i] for i in order]
    return items
