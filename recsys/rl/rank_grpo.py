"""Rank-GRPO: per-rank rewards, advantages and importance ratios for generated ranked lists.

Cite: Zhu et al., "Rank-GRPO: Training LLM-based Conversational Recommender Systems with
Reinforcement Learning" (ConvRec-R1), arXiv 2510.20150; code github.com/yaochenzhu/Rank-GRPO
(``rank_grpo_trainer.py``, ``reward_funcs.py``).

A completion is a list, one item per line, then the end token. Tokens are segmented into ranks (a
token holding the separator closes its item, so the newline belongs to the item before it); every
token of rank k gets the rank's advantage ``A_{i,k}``, normalised across the G rollouts *per rank*;
the importance ratio of a rank is the geometric mean of its tokens' ratios.

Token bins returned by :func:`segment_ranks` (shape (B, T), long):
``0..N-1`` item ranks, ``N`` overflow (items past the N-th share one bin), ``END`` (-1) the end
token, ``PAD`` (-2) padding / tokens after the end.

Departures from the paper and code, all documented options:
- relevance comes from the segments themselves (one identifier per line under constrained decoding),
  so the reward's rank k and the tokens' rank k cannot drift apart (the paper's pitfall 1);
- the end token gets its own ratio bin (the code puts it with the overflow tokens);
- an additional ``kind="exp"`` with finite gamma, ``r_k = rel_k + r_{k+1} / gamma`` (the paper's
  exp-Gamma family; ``exp_inf`` is its limit);
- completed lists (``end_takes_next_rank`` in :func:`token_advantages`): a reranker serves the ranks
  after a short list from the window's given order, so relevance is that of the completed ranking and
  the end token is credited with the ranks it hands over (all of them under ``exp_inf``, the next one under
  rewards-to-go), instead of the length shaping (in the paper a list is the recommendation; unnamed items are
  not recommended).
"""

from __future__ import annotations

import torch

from recsys.rl.advantages import group_advantages
from recsys.rl.grpo import policy_loss
from recsys.rl.rewards import dcg_discounts

END, PAD = -1, -2
KINDS = ("exp_inf", "exp", "log_decay")


def rank_rewards(relevance: torch.Tensor, kind: str = "exp_inf", gamma: float = 2.0) -> torch.Tensor:
    """Per-rank rewards (B*G, N) from relevance (B*G, N) in {0, 1} (rank k = column k, 1-based in formulas).

    - ``exp_inf``: r_k = rel_k.
    - ``exp``: r_k = rel_k + r_{k+1} / gamma.
    - ``log_decay``: r_k = sum_{j >= k} rel_j / log2(j + 1) (the DCG from rank k onward).

    Example: rel = [1, 0, 1] -> exp_inf [1, 0, 1]; exp (gamma 2) [1.25, 0.5, 1];
    log_decay: gains [1, 0, 0.5] -> [1.5, 0.5, 0.5].
    """
    rel = relevance.float()
    if kind == "exp_inf":
        return rel.clone()
    if kind == "log_decay":
        gains = rel * dcg_discounts(rel.shape[1], rel.device).to(rel.dtype)
        return gains.flip(1).cumsum(1).flip(1)
    if kind == "exp":
        out = torch.zeros_like(rel)
        running = torch.zeros_like(rel[:, 0])
        for k in range(rel.shape[1] - 1, -1, -1):
            running = rel[:, k] + running / gamma
            out[:, k] = running
        return out
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def rank_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """A_{i,k}: each rank's rewards (B*G, N) normalised across the G rollouts of the prompt (not across ranks)."""
    return group_advantages(rewards, group_size, scale, eps)


def segment_ranks(completion_ids: torch.Tensor, mask: torch.Tensor, separator_id: int, end_id: int,
                  n_ranks: int) -> torch.Tensor:
    """Rank bin of every completion token (see the module docstring); (B, T) long.

    Example (separator "\\n", N=2): ``A \\n B \\n C \\n <eor> <pad>`` -> [0, 0, 1, 1, 2, 2, -1, -2]
    (C is overflow, bin 2 = N).
    """
    mask = mask.bool()
    sep = (completion_ids == separator_id) & mask
    before = sep.long().cumsum(1) - sep.long()                 # separators strictly before each token
    bins = before.clamp(max=n_ranks)
    is_end = (completion_ids == end_id) & mask
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    bins = torch.where(is_end, torch.full_like(bins, END), bins)
    return torch.where(~mask | after_end, torch.full_like(bins, PAD), bins)


def list_lengths(bins: torch.Tensor, n_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(items (B,) in 0..N, overflowed (B,) bool, ended (B,) bool) from :func:`segment_ranks` bins."""
    items = torch.where(bins >= 0, bins + 1, torch.zeros_like(bins)).amax(1).clamp(max=n_ranks)
    return items, (bins == n_ranks).any(1), (bins == END).any(1)


def token_advantages(rank_adv: torch.Tensor, bins: torch.Tensor, extra_token_penalty: float = -0.1,
                     end_of_list_reward: float = 0.1, early_stop_penalty: float = -0.1,
                     end_takes_next_rank: bool = False, end_sums_handed_ranks: bool = False) -> torch.Tensor:
    """Spread per-rank advantages (B, N) over tokens (B, T), plus the length shaping of the code.

    Item tokens get their rank's advantage; overflow tokens get ``extra_token_penalty``; the end token
    gets ``end_of_list_reward`` when the list has exactly N items and no overflow, ``early_stop_penalty``
    when it ends before N items, else 0; padding 0.

    ``end_takes_next_rank`` (completed lists, a departure): when the served ranking fills the ranks after
    a short list with the rest of the window in its given order, ending the list at L items chooses rank
    L+1 onward, so the end token gets rank L+1's advantage instead of the shaping (a full list's end
    token, the only allowed token, still gets ``end_of_list_reward``). Example, N = 4, rank advantages
    [a0, a1, a2, a3], ``A \n B \n <eor>``: bins [0, 0, 1, 1, -1] -> [a0, a0, a1, a1, a2].

    ``end_sums_handed_ranks`` (with ``end_takes_next_rank``): the end token gets the *sum* of the advantages of
    every rank it hands over, ranks L+1..N. This is the credit under ``exp_inf`` rewards, where rank k's reward
    is rank k's relevance alone: a hit at a handed-over rank past L+1 would otherwise reach no token. Under
    rewards-to-go (``exp``, ``log_decay``) rank L+1's advantage already carries the later ranks, so the next
    rank's advantage is the credit. Same example: the end token gets a2 + a3.
    """
    n = rank_adv.shape[1]
    gathered = rank_adv.gather(1, bins.clamp(0, n - 1))
    out = torch.where((bins >= 0) & (bins < n), gathered, torch.zeros_like(gathered))
    out = torch.where(bins == n, torch.full_like(out, extra_token_penalty), out)
    items, overflowed, _ = list_lengths(bins, n)
    value = torch.tensor([early_stop_penalty, 0.0, end_of_list_reward], dtype=out.dtype, device=out.device)
    end_value = value[torch.where(items < n, 0, torch.where(overflowed, 1, 2))]            # (B,)
    if end_takes_next_rank:
        if end_sums_handed_ranks:
            handed = torch.arange(n, device=out.device)[None, :] >= items[:, None]               # (B, N)
            next_rank = (rank_adv * handed).sum(1)
        else:
            next_rank = rank_adv.gather(1, items.clamp(max=n - 1)[:, None])[:, 0]
        end_value = torch.where(items < n, next_rank, end_value)
    return torch.where(bins == END, end_value[:, None].expand_as(out), out)


def rank_log_ratio(token_log_ratio: torch.Tensor, bins: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """Per-token log of the rank-level ratio: the mean token log-ratio of the token's rank, broadcast (B, T).

    exp of it is the geometric mean of the rank's token ratios, pi_bar(y^k) / pi_bar_old(y^k).
    Example: a rank of two tokens with log ratios 0.2 and 0.4 -> both get 0.3. End token: its own ratio.
    """
    B = bins.shape[0]
    n_bins = n_ranks + 3                                              # items, overflow, end, padding
    idx = torch.where(bins == END, n_ranks + 1, torch.where(bins == PAD, n_ranks + 2, bins))
    zero = torch.zeros(B, n_bins, dtype=token_log_ratio.dtype, device=bins.device)
    sums = zero.scatter_add(1, idx, torch.where(bins == PAD, torch.zeros_like(token_log_ratio), token_log_ratio))
    counts = zero.detach().scatter_add(1, idx, torch.ones_like(token_log_ratio)).clamp(min=1)
    return (sums / counts).gather(1, idx)


def rank_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, rank_adv: torch.Tensor, bins: torch.Tensor,
                   ref_logp: torch.Tensor | None = None, beta: float = 1e-3, eps_low: float = 0.06,
                   eps_high: float = 0.08, aggregation: str = "token_mean", ratio_level: str = "rank",
                   **shaping) -> tuple[torch.Tensor, dict]:
    """Rank-GRPO loss for completions (B, T) with per-rank advantages (B, N) and bins from :func:`segment_ranks`.

    ``ratio_level="rank"`` uses :func:`rank_log_ratio` (the paper's item-level ratio), ``"token"`` the
    plain token ratio. Defaults are the official code's (eps 0.06 / 0.08, beta 1e-3). ``shaping`` goes
    to :func:`token_advantages`.
    """
    n = rank_adv.shape[1]
    mask = bins != PAD
    log_ratio = logp - old_logp.detach()
    if ratio_level == "rank":
        log_ratio = rank_log_ratio(log_ratio, bins, n)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'rank' or 'token', got {ratio_level!r}")
    adv = token_advantages(rank_adv, bins, **shaping)
    return policy_loss(logp, old_logp, adv, mask, ref_logp, beta, eps_low, eps_high, aggregation, log_ratio=log_ratio)
