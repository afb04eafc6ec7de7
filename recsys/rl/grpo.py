"""GRPO's clipped surrogate with token-level ratios, the k3 KL estimator and loss aggregation.

Cite: Shao et al., "DeepSeekMath", arXiv 2402.03300 (GRPO); asymmetric clipping ("clip-higher") from
Yu et al., "DAPO", arXiv 2503.14476; aggregation names follow TRL's ``loss_type``.

Per token t of rollout i, with ratio ``w = exp(logp - old_logp)``::

    loss_t = -min(w * A, clip(w, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t   = exp(ref - logp) - (ref - logp) - 1                   (k3, Schulman's estimator)

Aggregation over the completion mask M (B, T):
- ``token_mean``   sum(loss * M) / sum(M)                 (TRL "bnpo", DAPO's token-level mean)
- ``sequence_mean`` mean_i [sum_t loss * M / sum_t M]       (the GRPO paper, TRL "grpo")
- ``constant``     sum(loss * M) / (B * max_tokens)         (Dr. GRPO: no length bias)
An all-zero mask gives a loss of exactly 0 with zero gradient (no division by zero).

Departures: none in the maths. Defaults are PPO's eps_low = eps_high = 0.2 and beta = 0; the
Rank-GRPO recipe sets eps_low 0.06, eps_high 0.08, beta 1e-3 (Rank-GRPO, arXiv 2510.20150, and its public training script).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = ref - logp (>= 0, 0 when equal).

    Example: logp = log 0.5, ref = log 0.25 -> d = log 0.5 = -0.6931; exp(d) - d - 1 = 0.5 + 0.6931 - 1 = 0.1931.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss ``-min(w A, clip(w) A)`` and a bool mask of tokens where clipping was active.

    ``log_ratio`` (B, T); ``advantages`` broadcastable to it ((B, 1) for sequence-level, (B, T) per token).
    Example: w = 1.5, A = 1, eps 0.2 -> min(1.5, 1.2) = 1.2, loss -1.2 (clipped); w = 0.5, A = 1 -> loss -0.5.
    """
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token_mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over ``mask`` (B, T) to a scalar (see the module docstring)."""
    total = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))   # padding may hold inf/NaN
    mask = mask.to(per_token.dtype)
    if how == "token_mean":
        return total.sum() / mask.sum().clamp(min=1)
    if how == "sequence_mean":
        return (total.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "constant":
        return total.sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
                aggregation: str = "token_mean", log_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss (scalar) and statistics, for completion tokens of shape (B, T).

    ``logp``: log-probs of the sampled tokens under the current policy (with gradient); ``old_logp``:
    the same under the policy that sampled them (no gradient; equal to ``logp.detach()`` when on-policy,
    which makes every ratio exactly 1); ``advantages`` (B, 1) or (B, T); ``mask`` (B, T) completion
    tokens that count. ``log_ratio`` overrides the token ratio (Rank-GRPO passes its per-rank ratio).
    """
    mask = mask.bool()
    if log_ratio is None:
        log_ratio = logp - old_logp.detach()
    per_token, clipped = clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
    stats = {"clip_fraction": _masked_mean(clipped.float(), mask)}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp.detach())
        stats["kl"] = _masked_mean(kl.detach(), mask)
        if beta:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation)
    return loss, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return ((x * m).sum() / m.sum().clamp(min=1)).detach()
