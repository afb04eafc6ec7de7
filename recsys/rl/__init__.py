"""RL objectives for rankers as pure tensor functions, one algorithm per module.

- :mod:`~recsys.rl.advantages`: group-relative advantages (GRPO's baseline).
- :mod:`~recsys.rl.grpo`: clipped surrogate, k3 KL, loss aggregation.
- :mod:`~recsys.rl.rank_grpo`: Rank-GRPO's per-rank rewards, advantages and ratios.
- :mod:`~recsys.rl.f_grpo`: F-GRPO's slate and rank phases.
- :mod:`~recsys.rl.rewards`: list rewards, format gate, GroupRank's reward.
- :mod:`~recsys.rl.lipo`: LiPO-lambda and DPO (offline).

No module here imports Lightning or a model: the trainer in ``pipelines/rl.py`` composes them.
"""
