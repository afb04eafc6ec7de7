"""F-GRPO: one rollout, two phases (choose a slate, then rank it), one advantage per phase.

Cite: Surana et al., "F-GRPO: Factorized Group-Relative Policy Optimization for Unified Candidate
Generation and Ranking", arXiv 2605.12995 (no public code).

Output format used here (one completion): the slate identifiers, the rank marker, the ranked
identifiers, the end token. Tokens up to and including the marker are the slate phase (ending the
slate is a slate decision); the tokens after it, up to and including the end token, are the rank phase.
The policy factorises as pi(slate, order | x) = pi_slate(slate | x) pi_rank(order | x, slate).

- Slate reward: order-invariant coverage of the relevant items (recall, or F1).
- Rank reward: position-aware utility of the ranking (NDCG@k).
- Advantages per phase within the G rollouts; slate tokens get only A_slate, rank tokens only A_rank.
- The GRPO baseline of the paper uses one joint reward R_slate + lambda R_rank on every token (lambda 1).

Departures (the paper's details are UNVERIFIED beyond the abstract): :func:`phase_advantages` only
centres by default (``scale="none"``, the Dr. GRPO setting, arXiv 2503.20783), while the RL trainer passes
its ``scale_rewards``, ``"std"`` unless a recipe says otherwise (every recorded F-GRPO run standardised); the clipped
surrogate and KL are GRPO's (:func:`recsys.rl.grpo.policy_loss`) applied to both phases with one
normaliser; a missing rank marker makes the whole completion the slate phase (the format reward,
added by the caller, penalises it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from recsys.rl.advantages import group_advantages
from recsys.rl.grpo import policy_loss


def phase_masks(completion_ids: torch.Tensor, mask: torch.Tensor, marker_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slate_mask, rank_mask), each (B, T) bool, split at the first ``marker_id`` (which joins the slate).

    Example: ``A C <rank> C A <eor> <pad>`` -> slate [1, 1, 1, 0, 0, 0, 0], rank [0, 0, 0, 1, 1, 1, 0].
    """
    mask = mask.bool()
    is_marker = (completion_ids == marker_id) & mask
    markers_before = is_marker.long().cumsum(1) - is_marker.long()
    slate = mask & (markers_before == 0)
    return slate, mask & ~slate


def coverage_reward(slate: Sequence[int], relevant: Iterable[int], kind: str = "recall") -> float:
    """Order-invariant slate reward: recall of the relevant items, or F1 (duplicates count once).

    Example: slate [4, 2, 9], relevant {2, 5}: recall 1/2 = 0.5; precision 1/3, F1 = 2 (0.5 / 3) / (0.5 + 1/3) = 0.4.
    """
    relevant, chosen = set(relevant), set(slate)
    if not relevant:
        return 0.0
    hits = len(chosen & relevant)
    recall = hits / len(relevant)
    if kind == "recall":
        return recall
    if kind == "f1":
        precision = hits / max(len(chosen), 1)
        return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)
    raise ValueError(f"kind must be 'recall' or 'f1', got {kind!r}")


def phase_advantages(slate_rewards: torch.Tensor, rank_rewards: torch.Tensor, group_size: int,
                     scale: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages (B*G,) for each phase, computed separately."""
    return (group_advantages(slate_rewards, group_size, scale), group_advantages(rank_rewards, group_size, scale))


def joint_reward(slate_rewards: torch.Tensor, rank_rewards: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """The single-reward GRPO baseline: R_slate + lambda R_rank."""
    return slate_rewards + lam * rank_rewards


def f_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, slate_adv: torch.Tensor, rank_adv: torch.Tensor,
                slate_mask: torch.Tensor, rank_mask: torch.Tensor, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
                aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """The two-phase clipped objective: per-token advantage A_slate on slate tokens, A_rank on rank tokens."""
    adv = torch.where(slate_mask, slate_adv[:, None], torch.where(rank_mask, rank_adv[:, None], 0.0))
    return policy_loss(logp, old_logp, adv, slate_mask | rank_mask, ref_logp, beta, eps_low, eps_high, aggregation)
