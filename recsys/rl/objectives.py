"""Each RL algorithm as one complete objective over a batch of rollouts, and the registry naming them.

A trainer samples G answers to each of B prompts, scores them, and fills a :class:`Rollouts`; then, for an
algorithm name, :data:`OBJECTIVES` gives its :class:`Objective`: ``advantages`` once per batch (they depend on
the rewards only) and ``loss`` at each of the ``mu`` updates on that batch (the ratio against the rollout
policy's ``old_logp`` leaves 1 after the first update: off-policy steps, clipped). One loop calls it for both
trainers, the rerankers' and the generative recommender's (``pipelines/rl_loop.py``).

    >>> objective = OBJECTIVES["rank-grpo"]                                   # doctest: +SKIP
    >>> adv = objective.advantages(rollouts, settings)
    >>> for _ in range(mu):
    ...     loss, stats = objective.loss(policy_logp(), rollouts, adv, settings)

No Lightning, no model: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recsys.rl.advantages import group_advantages
from recsys.rl.f_grpo import f_grpo_loss, phase_advantages
from recsys.rl.grpo import kl_k3, policy_loss
from recsys.rl.lipo import group_preference_loss
from recsys.rl.rank_grpo import (
    PAD,
    rank_advantages,
    rank_grpo_loss,
    rank_rewards,
    token_advantages,
)
from recsys.rl.vstar import sibling_advantages, sibling_loss, td_targets


@dataclass
class Rollouts:
    """G sampled answers to each of B prompts, prompt-major: N = B * G rows of T answer tokens.

    mask (N, T) bool: the tokens the loss reads. reward (N,): each answer's reward. old_logp (N, T): the tokens'
    log-probs under the policy that sampled them; ref_logp (N, T): under the reference (both without gradient).
    What one algorithm also needs (None otherwise):

    - ``rank-grpo``: rel (N, R) per-rank relevance, bins (N, T) each token's rank
      (:func:`recsys.rl.rank_grpo.segment_ranks`).
    - ``scasrec``: returns (N, R) per-rank stepwise returns (:func:`recsys.rl.scasrec.step_returns`), bins.
    - ``f-grpo``: slate_reward, rank_reward (N,) and slate_mask, rank_mask (N, T) (the two phases' tokens).
    - ``vstar``: codes (B, G, D) the sampled semantic IDs, dense (N, D) the value head's per-level rewards.
    """

    group_size: int
    mask: torch.Tensor
    reward: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    rel: torch.Tensor | None = None
    bins: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    slate_reward: torch.Tensor | None = None
    rank_reward: torch.Tensor | None = None
    slate_mask: torch.Tensor | None = None
    rank_mask: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    dense: torch.Tensor | None = None


@dataclass(frozen=True)
class Settings:
    """An objective's hyper-parameters (the trainers' configs document where each comes from)."""

    beta: float = 0.0
    """Weight of the k3 KL to the reference, per token."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    """The ratio's clip range [1 - eps_low, 1 + eps_high]."""
    aggregation: str = "token_mean"
    """How per-token losses become one (:func:`recsys.rl.grpo.aggregate`)."""
    scale_rewards: str = "std"
    """Group-relative advantages divided by the group's std (``std``) or only centred (``none``)."""
    rank_reward: str = "exp_inf"
    """``rank-grpo``: per-rank reward (:func:`recsys.rl.rank_grpo.rank_rewards`)."""
    shaping: dict = field(default_factory=dict)
    """``rank-grpo``: length shaping of the end token (:func:`recsys.rl.rank_grpo.token_advantages`)."""
    preference_beta: float = 0.05
    """``lipo`` / ``dpo``: the preference temperature."""
    sibling_credit: str = "visits"
    sibling_weight: float = 1.0
    value_weight: float = 1.0
    gamma: float = 0.99
    """``vstar``: Sibling-GRPO's credit and weight, the TD value loss's weight and discount."""


@dataclass
class Advantages:
    """token (N, T): each token's advantage (what a step moves, logged as ``adv_abs``); scored (N, T) bool: the
    tokens that carry one; the algorithm's own advantages as its loss reads them."""

    token: torch.Tensor
    scored: torch.Tensor
    sequence: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    slate: torch.Tensor | None = None
    rank_phase: torch.Tensor | None = None
    sibling: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Objective:
    advantages: Callable[[Rollouts, Settings], Advantages]
    loss: Callable[..., tuple[torch.Tensor, dict]]
    """``loss(logp (N, T) with gradient, rollouts, advantages, settings, values=None)`` -> (scalar, stats);
    ``values`` (N, D): the value head's estimates (``vstar`` only)."""
    values: bool = False
    """Whether ``loss`` reads the value head's estimates (the trainer then computes them with the log-probs)."""


def _clip(s: Settings) -> tuple:
    return s.beta, s.eps_low, s.eps_high, s.aggregation


def grpo_advantages(r: Rollouts, s: Settings) -> Advantages:
    """GRPO (arXiv 2402.03300 §4.1.2): the answer's reward minus its group's mean (over the std), on every token."""
    adv = group_advantages(r.reward, r.group_size, s.scale_rewards)[:, None]
    return Advantages(adv.expand_as(r.mask), r.mask.bool(), sequence=adv)


def grpo_loss(logp, r: Rollouts, a: Advantages, s: Settings, values=None):
    return policy_loss(logp, r.old_logp, a.sequence.to(logp.device), r.mask, r.ref_logp, *_clip(s))


def per_rank_advantages(rewards: torch.Tensor, r: Rollouts, s: Settings) -> Advantages:
    """Per-rank rewards (N, R) normalised across each prompt's G answers rank by rank, spread over each rank's
    tokens (``r.bins``) with the end token's shaping ``s.shaping``."""
    adv = rank_advantages(rewards, r.group_size, s.scale_rewards).to(r.mask.device)
    return Advantages(token_advantages(adv, r.bins, **s.shaping), r.bins != PAD, rank=adv)


def rank_grpo_advantages(r: Rollouts, s: Settings) -> Advantages:
    """Rank-GRPO (arXiv 2510.20150 §3.2): one advantage per rank of the list, spread over that rank's tokens."""
    return per_rank_advantages(rank_rewards(r.rel, s.rank_reward), r, s)


def rank_grpo_objective_loss(logp, r: Rollouts, a: Advantages, s: Settings, values=None):
    return rank_grpo_loss(logp, r.old_logp, a.rank, r.bins, r.ref_logp, *_clip(s), **s.shaping)


def scasrec_advantages(r: Rollouts, s: Settings) -> Advantages:
    """SCASRec (arXiv 2602.03324): each rank's stepwise corrective return, group-normalised per rank as in
    Rank-GRPO; the end token takes the advantage of the rank it stops at (``s.shaping``, completed lists), so
    it is learnt against continuing (:mod:`recsys.rl.scasrec`)."""
    return per_rank_advantages(r.returns, r, s)


def f_grpo_advantages(r: Rollouts, s: Settings) -> Advantages:
    """F-GRPO: the slate phase's and the rank phase's group-relative advantages, each on its own tokens."""
    slate, rank = phase_advantages(r.slate_reward, r.rank_reward, r.group_size, s.scale_rewards)
    token = slate[:, None] * r.slate_mask + rank[:, None] * r.rank_mask
    return Advantages(token, r.slate_mask | r.rank_mask, slate=slate, rank_phase=rank)


def f_grpo_objective_loss(logp, r: Rollouts, a: Advantages, s: Settings, values=None):
    return f_grpo_loss(logp, r.old_logp, a.slate, a.rank_phase, r.slate_mask, r.rank_mask, r.ref_logp, *_clip(s))


def preference_loss(algo: str):
    """LiPO-lambda or DPO over each prompt's G scored answers (:func:`recsys.rl.lipo.group_preference_loss`): no
    ratio, no clip; the KL to the reference is logged, the preference's beta keeps the policy near it."""
    def loss(logp, r: Rollouts, a: Advantages, s: Settings, values=None):
        mask, B = r.mask, r.mask.shape[0] // r.group_size
        sequence = (logp * mask).sum(1).reshape(B, r.group_size)
        out, stats = group_preference_loss(sequence, (r.ref_logp * mask).sum(1).reshape(B, r.group_size),
                                           r.reward.reshape(B, r.group_size).to(sequence), s.preference_beta, algo)
        stats["kl"] = (kl_k3(logp, r.ref_logp) * mask).sum() / mask.sum().clamp(min=1)
        return out, stats
    return loss


def vstar_advantages(r: Rollouts, s: Settings) -> Advantages:
    """V-STAR (arXiv 2602.10699 §4): GRPO's advantages plus Sibling-GRPO's, per prompt over the tree of its G
    semantic IDs (:func:`recsys.rl.vstar.sibling_advantages`)."""
    adv = grpo_advantages(r, s)
    B, G, _ = r.codes.shape
    sib = [sibling_advantages(c, w, credit=s.sibling_credit) for c, w in zip(r.codes, r.reward.view(B, G))]
    adv.sibling = (torch.cat([a for a, _ in sib]), torch.cat([c for _, c in sib]) & r.mask.cpu())
    return adv


def vstar_loss(logp, r: Rollouts, a: Advantages, s: Settings, values=None):
    """GRPO's loss + ``sibling_weight`` x Sibling-GRPO's + ``value_weight`` x the value head's TD loss (its
    per-level estimates (N, D) against :func:`recsys.rl.vstar.td_targets` of the dense rewards, on the
    answers that are items)."""
    loss, stats = grpo_loss(logp, r, a, s)
    A, carry = a.sibling
    loss = loss + s.sibling_weight * sibling_loss(logp, A, carry, r.ref_logp, s.beta)
    target = td_targets(values.float(), r.dense.to(values.device), s.gamma)
    value_loss = ((values.float() - target) ** 2)[r.mask[:, 0].to(values.device)].mean()
    stats["value_loss"] = value_loss.detach()
    return loss + s.value_weight * value_loss, stats


GRPO = Objective(grpo_advantages, grpo_loss)
OBJECTIVES: dict[str, Objective] = {
    "grpo": GRPO,
    "grouprank": GRPO,             # GroupRank's reward (recsys.rl.rewards.grouprank_reward), GRPO's objective
    "slate-grpo": GRPO,            # F-GRPO's single-reward baseline: slate + rank reward, one advantage
    "rank-grpo": Objective(rank_grpo_advantages, rank_grpo_objective_loss),
    "scasrec": Objective(scasrec_advantages, rank_grpo_objective_loss),
    "f-grpo": Objective(f_grpo_advantages, f_grpo_objective_loss),
    "lipo": Objective(grpo_advantages, preference_loss("lipo")),
    "dpo": Objective(grpo_advantages, preference_loss("dpo")),
    "vstar": Objective(vstar_advantages, vstar_loss, values=True),
}
"""Algorithm name -> its objective (lipo / dpo log GRPO's advantages, which they do not use)."""
