"""Group-relative advantages (GRPO: Shao et al., "DeepSeekMath", arXiv 2402.03300, section 4.1.2).

Rollouts are laid out prompt-major: rows ``b*G .. b*G+G-1`` are the G rollouts of prompt b. Each
reward is compared with the other rollouts of its own prompt; for 2-D rewards ``(B*G, N)`` every
column (for Rank-GRPO: every rank) is normalised on its own (Rank-GRPO, arXiv 2510.20150: per-rank advantages).

Departures: none. ``scale="std"`` divides by the unbiased standard deviation plus ``eps`` (1e-4, the
Rank-GRPO code's value), so a group whose rewards are all equal gets zero advantages, not NaN;
``scale="none"`` only centres (Dr. GRPO, arXiv 2503.20783; our reading of F-GRPO, arXiv 2605.12995).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of ``rewards`` (B*G,) or (B*G, N) within each group of ``group_size`` rows; same shape.

    Example (G=2, worked by hand): rewards [1, 0, 3, 3] -> groups [1, 0] and [3, 3]; means 0.5 and 3;
    unbiased stds 0.7071 and 0; ``scale="std"``: [0.5/0.7072, -0.5/0.7072, 0, 0] = [0.7070, -0.7070, 0, 0];
    ``scale="none"``: [0.5, -0.5, 0, 0].
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape (B*G,) or (B*G, N), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rows do not split into groups of {group_size}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = rewards.float().reshape(-1, group_size, *rewards.shape[1:])              # (B, G[, N])
    adv = r - r.mean(1, keepdim=True)
    if scale == "std":
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(rewards.shape)
