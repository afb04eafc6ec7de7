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
