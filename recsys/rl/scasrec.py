"""SCASRec's stepwise corrective reward and its stopping rule, for lists that a retriever's order completes.

Cite: Chen et al., "SCASRec: A Self-Correcting and Auto-Stopping Model for Generative Route List
Recommendation", arXiv 2602.03324: a stepwise corrective reward (SCR) that refines the list step by step
and concentrates on the steps that matter, and a learnable End-of-Recommendation token (EOR) that ends the
list "when no further improvement is expected". The paper's exact formulas are not reproduced here; this
module is the reading of those two ideas for a reranker whose short list is completed by the window's
given (retriever) order, as the rerankers here serve it:

- the list's utility after a prefix of t written items, ``U_t``, is the DCG of the held-out item in the
  completed ranking (the prefix, then the window's other items in their given order), 0 when the window
  does not hold it; ``U_0`` is the retriever's own order;
- the stepwise reward of step t is the change it makes, ``r_t = U_t - U_{t-1}``: writing the held-out item
  earlier than the retriever had it gains, writing an item the retriever ranked below it pushes it down and
  loses, anything else is 0 (the hard steps carry the signal, the neutral ones none);
- the return of rank k (a reward-to-go), ``G_k = U_L - U_{k-1}`` for a list of L items (k <= L), is what the
  list gained over stopping before rank k; the end token at rank L + 1 and the ranks after it return 0
  (stopping changes nothing), so after group normalisation per rank (Rank-GRPO's advantages, arXiv
  2510.20150 §3.2) the end token is worth more than continuing exactly when the group's continuations lost;
- the EOR supervision for SFT (:func:`auto_stop_length`): a teacher list stops at the first step whose next
  teacher item would not raise ``U``.

Positions are 0-based indices into the window's given order; ranks in formulas are 1-based.
"""

from __future__ import annotations

import math

import torch


def completed_rank(written: list[int], target: int | None) -> int | None:
    """1-based rank of the held-out item (window position ``target``) in the completed list: ``written``
    (positions, in the order written), then the window's other positions in their given order; None when the
    window does not hold it.

    Example: window of 5, target 3. written [] -> 4; [1] -> 4 (1 was above it anyway); [4] -> 5 (pushed
    down); [3] -> 1; [4, 3] -> 2."""
    if target is None or target < 0:
        return None
    if target in written:
        return written.index(target) + 1
    return len(written) + 1 + sum(1 for p in range(target) if p not in written)


def completed_utilities(written: list[int], target: int | None) -> list[float]:
    """``U_0 .. U_L`` (L = len(written)): the DCG ``1 / log2(1 + rank)`` of the held-out item in the list
    completed after each prefix of ``written`` (0.0 throughout when the window lacks it).

    Example: target 3 of 5, written [4, 3]: ranks 4, 5, 2 -> [1/log2(5), 1/log2(6), 1/log2(3)]
    = [0.4307, 0.3869, 0.6309]."""
    out = []
    for t in range(len(written) + 1):
        rank = completed_rank(written[:t], target)
        out.append(0.0 if rank is None else 1.0 / math.log2(1 + rank))
    return out


def step_returns(written: list[list[int]], targets: list[int | None], n_ranks: int) -> torch.Tensor:
    """(B, n_ranks) per-rank returns ``G_k = U_L - U_{k-1}`` for k <= L, 0 after (the end token's rank L + 1
    and the ranks the retriever's order fills).

    Example: target 3 of 5, written [4, 3] (U = [0.4307, 0.3869, 0.6309]) -> [0.2002, 0.2440, 0, 0, 0]: rank 1
    (writing 4) still gains over stopping before it, because the list goes on to write the held-out item;
    written [4] -> [-0.0438, 0, 0, 0, 0]."""
    out = torch.zeros(len(written), n_ranks)
    for b, (w, t) in enumerate(zip(written, targets)):
        u = completed_utilities(w[:n_ranks], t)
        for k in range(len(u) - 1):
            out[b, k] = u[-1] - u[k]
    return out


def auto_stop_length(teacher: list[int], target: int | None) -> int:
    """How many items of a teacher list (positions, best first) the EOR-supervised answer keeps: it stops at
    the first step after which no next item could raise the completed list's utility, i.e. once the held-out
    item is written, or stands next in the given order, or the window lacks it (``max_next dU <= 0``).

    Examples (window of 5): teacher [3, 0, 1, 2, 4], target 3 -> 1 (the held-out item, then EOR); target 0
    with teacher [0, 1, 2, 3, 4] -> 0 (the retriever already has it first: EOR at once); target None -> 0;
    teacher [2, 4, 0, 1, 3], target 4 -> 2 (2 was above 4 anyway, then 4)."""
    for t in range(len(teacher) + 1):
        written = teacher[:t]
        if target is None or target < 0 or target in written or completed_rank(written, target) == t + 1:
            return t
    return len(teacher)
