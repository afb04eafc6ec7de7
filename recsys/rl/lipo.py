"""LiPO-lambda: listwise preference optimisation with LambdaLoss weights; DPO is its two-item case.

Cite: Liu et al., "LiPO: Listwise Preference Optimization through Learning-to-Rank", arXiv 2402.01878
(NAACL 2025); DPO: Rafailov et al., arXiv 2305.18290.

For a list of K responses with labels psi::

    s_i   = beta * (log pi(y_i | x) - log ref(y_i | x))
    L     = sum_{i, j: psi_i > psi_j} Delta_ij * log(1 + exp(-(s_i - s_j)))
    Delta = |G_i - G_j| * |1 / D(tau_i) - 1 / D(tau_j)|,  G = 2^psi - 1,  D(tau) = log2(1 + tau)

tau = the 1-based rank of each response under the current s (recomputed every step, no gradient).

Departures: D uses log2 (LambdaLoss / NDCG convention); the paper's natural log only rescales Delta by
a constant. The loss is summed over pairs and averaged over lists. Not the IRPO repo's "LiPO"
baseline (G = 2 psi - 1, unbounded), which is not the paper's lambda weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lambda_weights(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Delta_ij (B, K, K), zero unless labels_i > labels_j; computed without gradient.

    Example: labels [1, 0, 0], scores [0.1, 0.3, 0.2] -> tau = [3, 1, 2], G = [1, 0, 0];
    Delta_01 = |1/log2(4) - 1/log2(2)| = 0.5, Delta_02 = |1/log2(4) - 1/log2(3)| = 0.1309, all others 0.
    """
    with torch.no_grad():
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        tau = torch.empty_like(order)
        tau.scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order))
        inv_d = 1 / torch.log2(1 + tau.float())
        gain = 2 ** labels.float() - 1
        delta = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        return delta * (labels[:, :, None] > labels[:, None, :])


def lipo_lambda_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, beta: float = 0.05,
                     weighting: str = "lambda") -> torch.Tensor:
    """LiPO-lambda loss (scalar) from sequence log-probs (B, K) under the policy and the reference, labels (B, K).

    ``weighting="none"`` sets Delta = 1 on every ordered pair (with K = 2 this is exactly DPO).
    """
    s = beta * (policy_logps - ref_logps.detach())
    if weighting == "lambda":
        delta = lambda_weights(labels, s)
    elif weighting == "none":
        delta = (labels[:, :, None] > labels[:, None, :]).float()
    else:
        raise ValueError(f"weighting must be 'lambda' or 'none', got {weighting!r}")
    pair = F.softplus(-(s[:, :, None] - s[:, None, :]))                 # log(1 + exp(-(s_i - s_j)))
    return (delta * pair).sum((1, 2)).mean()


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: -log sigmoid(beta ((pi_w - ref_w) - (pi_l - ref_l))), averaged over the batch (B,)."""
    margin = (chosen_logps - ref_chosen_logps.detach()) - (rejected_logps - ref_rejected_logps.detach())
    return F.softplus(-beta * margin).mean()


PREFERENCE_ALGOS = ("lipo", "dpo")


def group_preference_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor,
                          beta: float = 0.05, algo: str = "lipo") -> tuple[torch.Tensor, dict]:
    """A preference loss over G scored rollouts of each prompt: sequence log-probs (B, G) under the policy
    and the reference, rewards (B, G) (e.g. each rollout's NDCG).

    ``lipo``: LiPO-lambda (:func:`lipo_lambda_loss`) over the G rollouts with the rewards as labels psi.
    ``dpo``: DPO on each prompt's best vs worst rollout (the first of equals), a prompt whose rollouts all
    earn the same reward giving no pair (it adds 0 to the mean over prompts, as a list without ordered pairs
    does in LiPO). Returns (loss, stats): ``clip_fraction`` 0 (no ratio is clipped).

    Example (dpo, beta 1): log-probs [[-1, -2, -3]], ref [[-2, -2, -2]], rewards [[0.2, 1.0, 0.0]]: chosen
    rollout 1 (s = 0), rejected rollout 2 (s = -1): loss = log(1 + e^-1) = 0.3133.
    """
    if algo == "lipo":
        loss = lipo_lambda_loss(policy_logps, ref_logps, rewards, beta)
    elif algo == "dpo":
        rows = torch.arange(rewards.shape[0], device=rewards.device)
        best, worst = rewards.argmax(1), rewards.argmin(1)
        pair = torch.stack([policy_logps[rows, best], policy_logps[rows, worst]], 1)
        ref_pair = torch.stack([ref_logps[rows, best], ref_logps[rows, worst]], 1)
        labels = torch.stack([rewards[rows, best], rewards[rows, worst]], 1)
        loss = lipo_lambda_loss(pair, ref_pair, labels, beta, weighting="none")
    else:
        raise ValueError(f"algo must be one of {PREFERENCE_ALGOS}, got {algo!r}")
    return loss, {"clip_fraction": torch.tensor(0.0)}
