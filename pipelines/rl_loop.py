"""The RL loop both RL trainers share: the rerankers' (:mod:`pipelines.rl`) and the generative recommender's
(:mod:`pipelines.generative`). Lightning with manual optimisation, one batch of rollouts per training step.

A trainer says how to roll out and how to score tokens (:meth:`RLLoop.rollout` returns a :class:`RolloutStep`);
the loop does the rest, the same for every algorithm:

1. the answers' token log-probs under the frozen reference (the KL term's, and LiPO / DPO's baseline);
2. the objective's advantages, once per batch (:data:`recsys.rl.objectives.OBJECTIVES`);
3. ``mu`` updates with the objective's loss: the first at the rollout policy (ratio 1), the later ones off-policy,
   their ratio against the rollout policy's log-probs clipped;
4. the logs: what the trainer reports of its rollouts, plus the loss, KL, clip fraction and mean |advantage|.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch

from recsys.rl.objectives import OBJECTIVES, Rollouts


@dataclass
class RolloutStep:
    """One batch of rollouts as the loop consumes it."""

    rollouts: Rollouts
    """The objective's batch; ``old_logp`` None means the first update's log-probs (the policy that sampled);
    ``ref_logp`` is filled by the loop."""
    log_probs: Callable[[torch.nn.Module, bool], tuple[torch.Tensor, torch.Tensor | None]]
    """``(model, values) -> (logp, estimates)``: (N, T) log-probs of the answers' tokens under ``model``, with
    gradient when enabled; with ``values`` also the value head's (N, D) estimates, else None."""
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    """The batch's own figures, ``train/reward`` among them (also shown as ``reward`` in the progress bar)."""


class RLLoop(L.LightningModule):
    """Mixed into a trainer's LightningModule, which calls :meth:`start_rl` in its ``__init__``, implements
    :meth:`rollout` and has a ``cfg`` with ``algo``, ``mu``, ``seed``, ``lr`` and ``objective_settings()``."""

    def start_rl(self, model: torch.nn.Module) -> None:
        """The policy ``model`` (trained) and a frozen copy of it as it starts, the reference."""
        self.model = model
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.automatic_optimization = False

    def rollout_seed(self, batch: int) -> int:
        """The seed of the ``batch``-th rollout batch: a resumed run samples what an uninterrupted one would."""
        return self.cfg.seed * 1_000_003 + batch

    def rollout(self, rows: list, batch: int) -> RolloutStep:
        """Sample G answers to each prompt of ``rows`` (seeded by :meth:`rollout_seed` of ``batch``) and score them."""
        raise NotImplementedError

    def training_step(self, rows, batch_idx):
        cfg = self.cfg
        step = self.rollout(rows, self.global_step // cfg.mu)             # the step counter counts optimiser steps
        batch, objective, settings = step.rollouts, OBJECTIVES[cfg.algo], cfg.objective_settings()
        self.model.train()
        with torch.no_grad():
            batch.ref_logp = step.log_probs(self.ref, False)[0]
        adv = objective.advantages(batch, settings)
        opt = self.optimizers()
        for _ in range(cfg.mu):
            logp, values = step.log_probs(self.model, objective.values)
            if batch.old_logp is None:                                   # on-policy at the first update
                batch.old_logp = logp.detach()
            loss, stats = objective.loss(logp, batch, adv, settings, values)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        logs = step.logs | {
            "train/loss": loss.detach(), "train/kl": stats.get("kl", torch.tensor(0.0)),
            "train/clip_fraction": stats["clip_fraction"],
            # mean |advantage| over the tokens the loss scores: the size of a step at a given lr
            "train/adv_abs": adv.token.abs()[adv.scored].mean() if adv.scored.any() else torch.tensor(0.0)}
        if "value_loss" in stats:
            logs["train/value_loss"] = stats["value_loss"]
        self.log_dict({k: torch.as_tensor(v).float() for k, v in logs.items()}, batch_size=len(rows))
        self.log("reward", torch.as_tensor(logs["train/reward"]).float(), prog_bar=True, batch_size=len(rows))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=0.0)
