"""V-STAR's training signals: Sibling-GRPO advantages and loss, dense per-level rewards, TD targets.

Cite: Jiang et al., "Spend Search Where It Pays: Value-Guided Structured Sampling and Optimization
for Generative Recommendation", arXiv 2602.10699 (KDD 2026), eqs. 15-19.

Candidates of one prompt are G semantic IDs ``codes`` (G, D) with rewards (G,). At depth l the
candidates sharing the parent prefix h = y_<l form the sibling group; its children are the distinct
codes v = y_l. Child score R(h, v) = mean reward of the candidates through v; with mu_h and sigma_h
the mean and *population* std of the child scores::

    A_node(h, v) = (R(h, v) - mu_h) / (sigma_h + 1e-4)          (0 when h has fewer than 2 children)

    J_sib = (1/|C|) sum_l sum_h sum_{v in S(h)} A_node(h, v) * rho(v | x, h)

A node's advantage sits on the l-th token of every candidate through it (``credit="visits"``), so that
the per-token loss ``-(exp(logp - sg(logp)) * A - beta * min(KL_k3, 100))``, averaged over the tokens that
carry a node, weighs each node by its visit count, as V-STAR's code does; ``credit="first"`` puts it on the
first candidate through it only (each node once). Added to the GRPO loss with weight 1.0.

Worked example (G = 4, D = 2; checked by hand in the tests)::

    codes   [[0, 0], [0, 1], [1, 0], [1, 0]]    rewards [1, 0, 0, 0]
    depth 0: root children 0 -> mean(1, 0) = 0.5 and 1 -> mean(0, 0) = 0;  mu 0.25, sigma 0.25
             A = +0.25 / 0.2501 = +0.9996 on candidate 0, -0.9996 on candidate 2
    depth 1: prefix (0,) children 0 -> 1, 1 -> 0;  mu 0.5, sigma 0.5: A = +0.9998 (cand 0), -0.9998 (cand 1)
             prefix (1,) has one child (0): no signal
    visits: A = [[0.9996, 0.9998], [0.9996, -0.9998], [-0.9996, 0], [-0.9996, 0]]   (carried: all but [2|3, 1])
    first:  A = [[0.9996, 0.9998], [0, -0.9998], [-0.9996, 0], [0, 0]]

Dense per-level reward for the value model only [3P note], weights w = (0.3, 0.5, 1.0) for three
levels (we append 1.0 for the de-duplication level)::

    r_l = w_l                                      if y_<=l equals the target's prefix
    r_l = -w_l * (1 - cos(mean vec of the candidates sharing y_<=l, vec(target)))    otherwise

TD target (gamma = 0.99), states s_0 (history only) .. s_D (full code), r_0 = 0, V(s_{D+1}) = 0::

    target(s_l) = r_l + gamma * sg(V(s_{l+1}))
"""

from __future__ import annotations

import torch

from recsys.rl.grpo import kl_k3


def sibling_advantages(codes: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-4,
                       credit: str = "visits") -> tuple[torch.Tensor, torch.Tensor]:
    """Node advantages (G, D) and a bool mask (G, D) of the tokens that carry a node with signal.

    ``credit``: ``visits`` puts a node's advantage on the level-l token of every candidate through it (the
    loss, a mean over carrying tokens, then weighs a node by its visit count); ``first`` on the first
    candidate through it only (every node once)."""
    if credit not in ("visits", "first"):
        raise ValueError(f"credit must be 'visits' or 'first', got {credit!r}")
    G, D = codes.shape
    adv = torch.zeros(G, D)
    carry = torch.zeros(G, D, dtype=torch.bool)
    rewards = rewards.float().cpu()
    rows = [tuple(r) for r in codes.tolist()]
    for level in range(D):
        groups: dict[tuple, dict[int, list[int]]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r[:level], {}).setdefault(r[level], []).append(i)
        for children in groups.values():
            if len(children) < 2:
                continue
            scores = torch.stack([rewards[idx].mean() for idx in children.values()])
            a = (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
            for value, idx in zip(a, children.values()):
                at = idx if credit == "visits" else idx[:1]
                adv[at, level], carry[at, level] = value, True
    return adv, carry


def sibling_loss(logp: torch.Tensor, advantages: torch.Tensor, carry: torch.Tensor, ref_logp: torch.Tensor | None = None,
                 beta: float = 1e-3, kl_max: float = 100.0) -> torch.Tensor:
    """Scalar Sibling-GRPO loss from per-token log-probs (R, D) of the candidates' code tokens."""
    per_token = -torch.exp(logp - logp.detach()) * advantages.to(logp)
    if ref_logp is not None and beta:
        per_token = per_token + beta * kl_k3(logp, ref_logp.detach()).clamp(max=kl_max)
    m = carry.to(logp.device)
    if not m.any():
        return (logp * 0).sum()
    return per_token[m].mean()


def level_rewards(codes: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor, target_vector: torch.Tensor,
                  weights=(0.3, 0.5, 1.0, 1.0)) -> torch.Tensor:
    """Dense rewards (G, D): level l of candidate i scored against the target's code prefix (see above).

    ``codes`` (G, D), ``target`` (D,), ``vectors`` (G, d) the candidates' item vectors, ``target_vector`` (d,).
    """
    G, D = codes.shape
    w = torch.as_tensor(list(weights)[:D], dtype=torch.float32)
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    t = torch.nn.functional.normalize(target_vector.float(), dim=-1)
    out = torch.zeros(G, D)
    for level in range(D):
        same_prefix = (codes[:, None, :level + 1] == codes[None, :, :level + 1]).all(-1).float()   # (G, G)
        mean = torch.nn.functional.normalize(same_prefix @ unit / same_prefix.sum(1, keepdim=True), dim=-1)
        match = (codes[:, :level + 1] == target[:level + 1]).all(-1)
        out[:, level] = torch.where(match, w[level], -w[level] * (1 - mean @ t))
    return out


def td_targets(values: torch.Tensor, rewards: torch.Tensor, gamma: float = 0.99) -> torch.Tensor:
    """TD targets (G, D + 1) for V(s_0..s_D) from values (G, D + 1) and level rewards (G, D); no gradient."""
    r = torch.cat([torch.zeros_like(rewards[:, :1]), rewards], 1)
    nxt = torch.cat([values[:, 1:].detach(), torch.zeros_like(values[:, :1])], 1)
    return r + gamma * nxt


def prefix_reward(codes: torch.Tensor, target: torch.Tensor, shaping: float = 0.1) -> torch.Tensor:
    """Policy reward (G,): 1 for the held-out item, else ``shaping`` x (matching leading code levels / D).

    Our choice (MiniOneRec's "ranking" reward could not be verified against a paper): the hit is what counts; the
    small prefix term gives groups without a hit a gradient toward the target's region of the catalog.
    Example (D = 4, target [1, 2, 3, 0]): [1, 2, 3, 0] -> 1; [1, 2, 0, 0] -> 0.1 * 2/4 = 0.05; [0, 2, 3, 0] -> 0.
    """
    eq = (codes == target).long()
    matched = eq.cumprod(-1).sum(-1).float()
    D = codes.shape[-1]
    return torch.where(matched == D, torch.ones_like(matched), shaping * matched / D)
