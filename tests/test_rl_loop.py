"""The RL loop both trainers share, on a policy small enough to check by eye: four one-token answers, one of
them rewarded."""

from dataclasses import dataclass

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.rl_loop import RLLoop, RolloutStep
from recsys.rl.objectives import Rollouts, Settings


@dataclass
class BanditConfig:
    algo: str = "grpo"
    mu: int = 1
    seed: int = 0
    lr: float = 0.3
    group_size: int = 8

    def objective_settings(self) -> Settings:
        return Settings(beta=0.0, eps_low=0.2, eps_high=0.2)


class Bandit(RLLoop):
    """Logits over four answers; answer 2 earns 1, the others 0."""

    def __init__(self, config: BanditConfig):
        super().__init__()
        self.cfg, self.batches = config, []
        self.start_rl(torch.nn.Linear(1, 4, bias=False))

    def probs(self, model=None) -> torch.Tensor:
        return (model or self.model)(torch.ones(1)).softmax(-1)

    def rollout(self, rows, batch: int) -> RolloutStep:
        self.batches.append(batch)
        gen = torch.Generator().manual_seed(self.rollout_seed(batch))
        answers = torch.multinomial(self.probs().detach(), len(rows) * self.cfg.group_size, True, generator=gen)
        reward = (answers == 2).float()

        def log_probs(model, values):
            return model(torch.ones(1)).log_softmax(-1)[answers][:, None], None

        mask = torch.ones(len(answers), 1, dtype=torch.bool)
        return RolloutStep(Rollouts(self.cfg.group_size, mask, reward, None), log_probs, {"train/reward": reward.mean()})


def fit(config: BanditConfig, batches: int) -> tuple[Bandit, L.Trainer]:
    module = Bandit(config)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(list(range(4 * batches)), batch_size=4, collate_fn=list))
    return module, trainer


@pytest.mark.parametrize("mu", [1, 2])
def test_the_loop_learns_the_rewarded_answer_with_mu_updates_per_rollout_batch(mu):
    torch.manual_seed(0)
    module, trainer = fit(BanditConfig(mu=mu), batches=15)
    assert module.probs(module.ref)[2].item() < 0.5                         # the start: far from it
    assert module.probs()[2].item() > 0.9                                   # learned: the reward's answer
    assert trainer.global_step == 15 * mu                                   # mu optimiser steps per batch
    assert module.batches == list(range(15))                                # one rollout seed per batch


@pytest.mark.parametrize("mu", [1, 2])
def test_the_reference_stays_the_start_and_only_later_updates_are_off_policy(mu):
    """The frozen reference is the policy as it started; the first update of a batch is on-policy (ratio 1,
    nothing clipped), the second of ``mu = 2`` is not (a large step leaves the clip range)."""
    torch.manual_seed(0)
    module = Bandit(BanditConfig(mu=mu, lr=1.0))
    start = module.model.weight.detach().clone()
    clips, log_dict = [], module.log_dict
    module.log_dict = lambda logs, **kw: (clips.append(float(logs["train/clip_fraction"])), log_dict(logs, **kw))
    trainer = L.Trainer(max_steps=mu, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(list(range(4)), batch_size=4, collate_fn=list))
    assert torch.equal(module.ref.weight, start) and not module.ref.weight.requires_grad
    assert not torch.equal(module.model.weight, start)
    assert len(clips) == 1 and (clips[0] > 0.0) == (mu == 2)       # the logs hold the batch's last update
