"""Rewards for generated and scored lists: relevance rows, hit / recall / NDCG, the format gate, GroupRank.

Relevance (the Rank-GRPO matching rules, arXiv 2510.20150 and its ``reward_funcs.py``): position k of a generated list is
relevant when it is a held-out item not matched before (each ground-truth item counts once, so a
duplicate gets 0) and not in the user's history; positions keep their place (an invalid line is a
0 at its slot, the list is not compacted).

GroupRank (Sun et al., arXiv 2511.11653, eqs. 4-6)::

    R_G = NDCG@10 + gamma * Recall@10 + epsilon * (1 - JS(P || Q)),   gamma = 0.2, epsilon = 0.1

behind a format gate (R_G if the output is well formed, -0.1 if the tags parse but the content does
not, -0.5 otherwise). P and Q are the predicted and target scores normalised to sum to 1 (UNVERIFIED
in the paper; the natural choice), JS in bits so that it lies in [0, 1].

Departures: NDCG uses binary gains and the ideal list of min(|relevant|, k) items, as in
:mod:`recsys.metrics`. Ties between predicted scores (sampled 0-9 digits tie often) count as broken
uniformly at random: NDCG@10 and Recall@10 are their expectations over the tie orders
(:func:`expected_ndcg_recall_at_k`, ``ties="random"``, the default). Breaking ties in candidate order
(``ties="stable"``) rewards one digit everywhere with the retriever's own NDCG, since the candidates
arrive in its order: measured on ML-1M (``rl_grouprank``, 2026-11-23), RL collapsed onto a constant digit
(entropy 0.01-0.03 nats) and validation NDCG fell from 0.446 to 0.31-0.33. The paper does not say.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def relevance(ranked: Sequence[int | None], relevant: Iterable[int], n: int, seen: Iterable[int] = ()) -> list[int]:
    """0/1 per position (length n, zero-padded) of a generated list; ``None`` marks an invalid line.

    Example: ranked [7, 7, 3, None], relevant {7, 3}, n 5 -> [1, 0, 1, 0, 0] (the duplicate 7 gets 0).
    """
    unused, seen = set(relevant), set(seen)
    out = []
    for item in list(ranked)[:n]:
        hit = item is not None and item in unused and item not in seen
        out.append(int(hit))
        if hit:
            unused.discard(item)
    return out + [0] * (n - len(out))


def hit_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) 1 if any of the first k positions of rel (M, N) is relevant."""
    return (rel[:, :k].sum(1) > 0).float()


def recall_at_k(rel: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) relevant items in the first k positions / number of relevant items (0 when there are none)."""
    return rel[:, :k].float().sum(1) / n_relevant.float().clamp(min=1)


def dcg_discounts(k: int, device=None) -> torch.Tensor:
    """(k,) the DCG discount of each 0-based position q: 1 / log2(q + 2), i.e. [1, 0.6309, 0.5, ...]; the
    torch twin of :func:`recsys.metrics.ndcg`'s (the rewards and the reported metric discount alike)."""
    return 1 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32, device=device))


def ndcg_at_k(rel: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) binary NDCG@k of relevance rows (M, N) with ``n_relevant`` (M,) relevant items per row.

    Example: rel [0, 1, 1], 2 relevant, k 3: DCG = 1/log2(3) + 1/log2(4) = 0.6309 + 0.5 = 1.1309;
    IDCG = 1 + 0.6309 = 1.6309; NDCG = 0.6934.
    """
    k = min(k, rel.shape[1])
    discounts = dcg_discounts(k, rel.device)
    dcg = (rel[:, :k].float() * discounts).sum(1)
    ideal_cum = torch.cat([torch.zeros(1, device=rel.device), discounts.cumsum(0)])
    idcg = ideal_cum[n_relevant.long().clamp(0, k)]
    return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg))


def expected_ndcg_recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(NDCG@k, Recall@k), each (M,), of candidates sorted by ``scores`` (M, c), descending, with ties
    broken uniformly at random, in expectation; ``relevant`` (M, c) bool.

    A candidate with g strictly higher scores and m - 1 equal ones is equally likely at every 0-based
    position g .. g + m - 1 whatever the other candidates do, so by linearity of expectation its
    expected gain is the mean of ``[q < k] / log2(q + 2)`` over those positions.
    Example: scores [5, 5, 1], relevant [F, T, F], k 1: the target is at position 0 or 1 with probability
    1/2 each -> NDCG@1 = (1 + 0) / 2 = 0.5, Recall@1 = 0.5; with k 2: NDCG = (1 + 1/log2 3) / 2 = 0.8155,
    Recall = 1. Without ties this is :func:`ndcg_at_k` / :func:`recall_at_k` of the sorted list.
    """
    s = scores.float()
    above = (s[:, None, :] > s[:, :, None]).sum(-1)                                        # (M, c) g
    ties = (s[:, None, :] == s[:, :, None]).sum(-1)                                        # (M, c) m >= 1
    c = s.shape[1]
    q = above[..., None] + torch.arange(c, device=s.device)                                 # (M, c, c) positions
    inside = torch.arange(c, device=s.device) < ties[..., None]                             # j < m
    top = (q < k) & inside
    gain = torch.where(top, 1 / torch.log2(q.float() + 2), torch.zeros_like(q, dtype=torch.float32)).sum(-1) / ties
    hit = top.float().sum(-1) / ties
    rel = relevant.float()
    n_rel = rel.sum(1)
    kk = min(k, c)
    discounts = dcg_discounts(kk, s.device)
    idcg = torch.cat([torch.zeros(1, device=s.device), discounts.cumsum(0)])[n_rel.long().clamp(0, kk)]
    ndcg = torch.where(idcg > 0, (rel * gain).sum(1) / idcg.clamp(min=1e-12), torch.zeros_like(idcg))
    return ndcg, (rel * hit).sum(1) / n_rel.clamp(min=1)


def format_gate(reward: torch.Tensor, tags_ok: torch.Tensor, content_ok: torch.Tensor, bad_content: float = -0.1,
                bad_format: float = -0.5) -> torch.Tensor:
    """GroupRank's gate (M,): the reward if the output is well formed, ``bad_content`` if only the tags parse."""
    gated = torch.where(tags_ok.bool(), torch.full_like(reward, bad_content), torch.full_like(reward, bad_format))
    return torch.where(tags_ok.bool() & content_ok.bool(), reward, gated)


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon divergence in bits over the last axis of non-negative scores (normalised to sum 1).

    Example: p = [1, 0], q = [0, 1] -> 1 bit; p = q -> 0; p = [1, 1], q = [1, 0]: M = [0.75, 0.25],
    KL(P||M) = 0.5 log2(0.5/0.75) + 0.5 log2(0.5/0.25) = 0.2075, KL(Q||M) = log2(1/0.75) = 0.4150,
    JS = 0.3113. An all-zero score vector prefers no candidate: it is read as uniform, so p = [0, 0] against
    q = [1, 0] is the 0.3113 of the example (not a fixed 0.5 whatever q is).
    """

    def normalise(x):
        x = x.float().clamp(min=0)
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x / total.clamp(min=eps), torch.full_like(x, 1.0 / x.shape[-1]))

    p, q = normalise(p), normalise(q)
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a.clamp(min=eps)) - torch.log2(b.clamp(min=eps))),
                           torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def grouprank_reward(pred_scores: torch.Tensor, target_scores: torch.Tensor, relevant: torch.Tensor,
                     gamma: float = 0.2, epsilon: float = 0.1, k: int = 10, ties: str = "random") -> torch.Tensor:
    """R_G (M,) for groups of c candidates: predicted scores (M, c), target scores (M, c), relevant (M, c) bool.

    The ranking is the candidates sorted by predicted score; ties are broken at random, in expectation
    (``ties="random"``, :func:`expected_ndcg_recall_at_k`) or, ``"stable"``, earlier candidate first.
    Example: pred [2, 9, 0], target [9, 0, 0], relevant [T, F, F], k 10: ranking [1, 0, 2], rel [0, 1, 0],
    NDCG = 1/log2(3) = 0.6309, Recall = 1; P = [0.1818, 0.8182, 0], Q = [1, 0, 0], M = [0.5909, 0.4091, 0],
    KL(P||M) = 0.5090, KL(Q||M) = 0.7590, JS = 0.6340 bits; R = 0.6309 + 0.2 + 0.1 * 0.3660 = 0.8675.
    """
    if ties == "random":
        ndcg, recall = expected_ndcg_recall_at_k(pred_scores, relevant, k)
    elif ties == "stable":
        order = torch.sort(pred_scores.float(), dim=1, descending=True, stable=True).indices
        rel = relevant.gather(1, order).float()
        n_rel = relevant.float().sum(1)
        ndcg, recall = ndcg_at_k(rel, n_rel, k), recall_at_k(rel, n_rel, k)
    else:
        raise ValueError(f"ties must be 'random' or 'stable', got {ties!r}")
    return ndcg + gamma * recall + epsilon * (1 - js_divergence(pred_scores, target_scores))
