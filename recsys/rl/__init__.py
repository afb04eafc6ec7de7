"""RL objectives for rankers as pure tensor functions, one algorithm per module.

- :mod:`~recsys.rl.advantages`: group-relative advantages (GRPO's baseline).
- :mod:`~recsys.rl.grpo`: clipped surrogate, k3 KL, loss aggregation.
- :mod:`~recsys.rl.rank_grpo`: Rank-GRPO's per-rank rewards, advantages and ratios.
- :mod:`~recsys.rl.f_grpo`: F-GRPO's slate and rank phases.
- :mod:`~recsys.rl.rewards`: list rewards, format gate, GroupRank's reward.
- :mod:`~recsys.rl.lipo`: LiPO-lambda and DPO over scored rollouts.
- :mod:`~recsys.rl.vstar`: V-STAR's Sibling-GRPO, dense level rewards and TD targets.
- :mod:`~recsys.rl.objectives`: each algorithm's complete objective over a :class:`Rollouts` batch, and the
  ``OBJECTIVES`` registry (name -> advantages + loss) both trainers call.

No module here imports Lightning or a model: the trainers (``pipelines/rl.py``, ``pipelines/generative.py``)
sample the rollouts and call the registry.
"""
