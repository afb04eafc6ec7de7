"""RL for rerankers: their rollouts and rewards for the shared RL loop, the algorithm chosen by config.

    recsys train reranker --algo rank-grpo --init runs/listwise-sft/model --data D --candidates C --out O

Each training step takes ``prompts_per_step`` prompts (a user's history and candidate window), samples
``group_size`` rollouts per prompt with the reranker's constrained decoding at ``temperature`` and scores
them against the held-out item into a :class:`recsys.rl.objectives.Rollouts` batch (old log-probs stored
once per batch); :class:`pipelines.rl_loop.RLLoop` then takes ``OBJECTIVES[algo]``'s advantages and ``mu``
optimiser steps on its clipped loss. The maths lives in :mod:`recsys.rl`. The algorithms:

- ``grpo``: one sequence reward for every token (Shao et al. 2024): the DCG of the whole served ranking
  (``complete_lists``), DCG@1:N, the full-list reward Rank-GRPO's suffix DCG@k:N departs from
  (``grpo_reward_depth`` cuts it off).
- ``rank-grpo``: per-rank rewards (``reward: exp_inf | log_decay``) and per-rank advantages, the
  rank-level ratio of Rank-GRPO (Zhu et al. 2025); with ``complete_lists`` (default) the end token takes
  the advantage of the first rank it hands to the retriever's order, else the paper's length shaping.
- ``scasrec``: SCASRec's stepwise corrective reward (Chen et al. 2026, :mod:`recsys.rl.scasrec`): each
  rank's return is what the completed list gained over stopping before it, group-normalised per rank with
  Rank-GRPO's rank-level ratio; the end token is taught to stop when continuing does not pay. Start it from an
  SFT with ``supervise: auto_stop`` (the end token learnt), so lists stop when the model says so.
- ``grouprank``: the groupwise scorer samples a 0-9 score per candidate; reward = NDCG@10 + 0.2
  Recall@10 + 0.1 (1 - JS(predicted || teacher scores)) (GroupRank, Sun et al. 2025), ties between
  sampled digits broken at random in expectation (``grouprank_ties``), the teacher scores those of the
  groupwise SFT (``grouprank_teacher``).
- ``f-grpo`` and ``slate-grpo``: the slate-then-rank task (:mod:`recsys.rerank.slate`): one completion
  chooses ``slate_size`` of the window's candidates, then ranks ``rank_size`` of them. Slate reward:
  recall of the held-out item in the slate; rank reward: NDCG@rank_size of the ranking. ``f-grpo``
  gives slate tokens the slate advantage and rank tokens the rank advantage (Surana et al. 2026);
  ``slate-grpo`` is its GRPO baseline, one joint reward (slate + rank) on every token.

Log-probabilities are those of the distribution the rollouts were drawn from: the constrained
(renormalised) distribution over allowed tokens, with the reranker's retriever prior, at the rollout
temperature. A frozen copy of the starting model is the KL
reference. "Epochs" are ``val_every`` steps: validation (greedy decoding on held-out validation users,
candidate-set NDCG@10) and checkpoints happen at their end, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipelines.callbacks import (
    RNGState,
    ShardedBatches,
    StreamSampler,
    best_checkpoint,
    budget_timer,
    checkpoint_callbacks,
    gather_rows,
    process_rank,
    resume_checkpoint,
)
from pipelines.rerank import (
    load_reranker,
    slate_constraint,
    slate_items,
    tune_retriever_prior,
)
from pipelines.rl_loop import RLLoop, RolloutStep
from pipelines.trainer import Runtime, make_trainer
from recsys.data import PreparedDataset
from recsys.data.candidates import hold_out, read_candidate_lists
from recsys.errors import RecsysError
from recsys.metrics import compute_metrics, target_rank
from recsys.rerank.first import replay_log_probs
from recsys.rerank.listwise import ListwiseReranker
from recsys.rerank.sft import SFTExample, teacher_scores
from recsys.rl.f_grpo import (
    coverage_reward,
    joint_reward,
    phase_masks,
)
from recsys.rl.lipo import PREFERENCE_ALGOS
from recsys.rl.objectives import Rollouts, Settings
from recsys.rl.rank_grpo import (
    segment_ranks,
)
from recsys.rl.rewards import grouprank_reward, ndcg_at_k, relevance
from recsys.rl.scasrec import step_returns
from recsys.types import CandidateList

COMPLETED_SHAPING = {"early_stop_penalty": 0.0, "end_of_list_reward": 0.0, "end_takes_next_rank": True}
"""Rank-GRPO on completed lists: a short list is no failure, its end token chooses the ranks after it."""
ALGOS = ("grpo", "rank-grpo", "scasrec", "grouprank", "slate-grpo", "f-grpo", *PREFERENCE_ALGOS)
RANKED_ALGOS = ("rank-grpo", "scasrec")
"""Objectives that read the list's tokens rank by rank (:func:`recsys.rl.rank_grpo.segment_ranks`)."""
SLATE_ALGOS = ("slate-grpo", "f-grpo")


@dataclass(frozen=True)
class RLConfig:
    """An RL run on a reranker started from an SFT checkpoint."""

    algo: str = "rank-grpo"
    """``grpo``, ``rank-grpo``, ``scasrec``, ``slate-grpo``, ``f-grpo`` (listwise models), ``grouprank`` (groupwise), or the
    preference objectives over the G scored rollouts of a prompt, ``lipo`` (LiPO-lambda) and ``dpo`` (its best
    against its worst; :func:`recsys.rl.lipo.group_preference_loss`), for either kind."""
    init: str = ""
    """The starting model: OUT/model of ``recsys train reranker --algo sft``."""
    reward: str = "exp_inf"
    """``rank-grpo`` only: ``exp_inf`` or ``log_decay``."""
    grpo_reward_depth: int | None = None
    """``grpo``: the sequence reward is NDCG at this depth of the served ranking; None: the whole list (N),
    as in Rank-GRPO's vanilla GRPO (its rank-1 log_decay reward), reading all N ranks as both Rank-GRPO rewards
    do."""
    group_size: int = 8
    """Rollouts per prompt (G)."""
    prompts_per_step: int = 8
    """Prompts (users' windows) per batch of rollouts."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    mu: int = 1
    """Optimiser steps per batch of rollouts (>1: off-policy, old log-probs stored)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    beta: float = 1e-3
    """KL weight against the starting model (k3 estimator)."""
    eps_low: float = 0.2
    """Lower clipping range of the importance ratio (1 - eps_low)."""
    eps_high: float = 0.28
    """Upper clipping range (1 + eps_high; DAPO's clip-higher, arXiv 2503.14476)."""
    aggregation: str = "token_mean"
    """How per-token losses become one: TRL's ``loss_type`` names (:data:`recsys.rl.grpo.AGGREGATIONS`)."""
    preference_beta: float = 0.05
    """``lipo`` / ``dpo``: beta of the implicit reward beta * (log pi - log ref) (LiPO's default 0.05)."""
    scale_rewards: str = "std"
    """``std`` or ``none`` (advantages only centred)."""
    max_steps: int = 200
    """Batches of rollouts."""
    val_every: int = 50
    """Steps per "epoch": validation and checkpoints at its end."""
    max_minutes: float | None = None
    """Stop after this many minutes (the best checkpoint is kept); None: no cap."""
    val_users: int = 500
    """Validation windows scored at every validation."""
    train_split: str = "valid"
    """Prompts from ``valid`` (minus the held-out selection users, as in SFT) or ``train`` candidates."""
    complete_lists: bool = True
    """Listwise rewards score the ranking the reranker serves: the generated items, then the window's
    other candidates in their given (retriever) order, as evaluation and ``rank_windows`` complete it;
    Rank-GRPO's end token then takes the advantage of the first rank it hands over (no length shaping).
    False: the generated items only, with the paper's length shaping (a list is the recommendation)."""
    reachable_only: bool = True
    """Train only on prompts whose held-out item is in the window. The others reward every rollout 0,
    so their advantages are 0 and they only cost rollouts (DAPO's dynamic sampling, Yu et al. 2025,
    drops such zero-variance groups after sampling; filtering before sampling is the same for them)."""
    grouprank_ties: str = "random"
    """``grouprank`` only: how ties between sampled digits rank in the reward, ``random`` (their expected
    NDCG / Recall over tie orders) or ``stable`` (candidate order, i.e. the retriever's: one digit
    everywhere then earns the retriever's NDCG; :mod:`recsys.rl.rewards`)."""
    grouprank_teacher: str = "sft"
    """``grouprank`` only: the target scores of the reward's distribution term, ``sft`` (the groupwise SFT's own
    teacher scores: 9 for the held-out item, a retriever-rank prior 5..0 for the others,
    :func:`recsys.rerank.sft.teacher_scores`) or ``binary`` (9 for the held-out item, 0 elsewhere). With
    ``binary`` the term pays for writing 0 everywhere else; group-normalised advantages then turn its small
    differences into full-size ones whenever the ranking terms tie within a group (measured: the digits
    collapse and validation falls, README)."""
    window: int = 20
    """Candidates per prompt."""
    slate_size: int = 10
    """``f-grpo`` / ``slate-grpo``: candidates chosen in the slate phase."""
    rank_size: int = 5
    """``f-grpo`` / ``slate-grpo``: slate items ranked in the rank phase."""
    seed: int = 0
    """Seeds the prompt order and the rollouts."""
    precision: str = "auto"
    """``auto``, ``32-true`` or ``bf16-mixed``; not part of a run's identity."""

    def objective_settings(self) -> Settings:
        """The hyper-parameters :data:`recsys.rl.objectives.OBJECTIVES` reads from this run."""
        sums = self.reward == "exp_inf" and self.algo != "scasrec"     # SCASRec's returns are rewards-to-go
        shaping = COMPLETED_SHAPING | {"end_sums_handed_ranks": sums} if self.complete_lists else {}
        return Settings(beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high, aggregation=self.aggregation,
                        scale_rewards=self.scale_rewards, rank_reward=self.reward, shaping=shaping,
                        preference_beta=self.preference_beta)

    @property
    def val_metric(self) -> str:
        """What validation reports and checkpoints select on: candidate-set NDCG@10 of the reranked
        window, or NDCG@rank_size of the final ranking for the slate-then-rank task."""
        return f"val/cand_ndcg@{self.rank_size}" if self.algo in SLATE_ALGOS else "val/cand_ndcg@10"

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages compare rollouts of the same prompt")
        if self.algo == "scasrec" and not self.complete_lists:
            raise ValueError("scasrec scores the list the retriever's order completes: it needs complete_lists")
        if self.grouprank_teacher not in ("sft", "binary"):
            raise ValueError(f"grouprank_teacher must be 'sft' or 'binary', got {self.grouprank_teacher!r}")
        if self.grouprank_ties not in ("random", "stable"):
            raise ValueError(f"grouprank_ties must be 'random' or 'stable', got {self.grouprank_ties!r}")


class PromptData(L.LightningDataModule):
    def __init__(self, dataset: PreparedDataset, candidates_dir, config: RLConfig):
        super().__init__()
        self.cfg = config
        valid = [r.top(config.window) for r in read_candidate_lists(dataset, candidates_dir, "valid")]
        rest, self.valid_rows = hold_out(valid, config.val_users)
        self.train_rows = (rest if config.train_split == "valid" else
                           [r.top(config.window) for r in read_candidate_lists(dataset, candidates_dir, "train")])
        if config.reachable_only:
            self.train_rows = [r for r in self.train_rows if r.has_target]
        if not self.train_rows:
            raise RecsysError(f"no {config.train_split} prompt holds its held-out item in the top-{config.window} "
                              f"candidates of {candidates_dir}: nothing to learn from")

    def train_dataloader(self):
        """Batches of ``prompts_per_step`` prompts; under data parallelism each process takes its share of an
        epoch's batches (:class:`pipelines.callbacks.ShardedBatches`), so one step of the run is one batch per
        process, their gradients averaged."""
        size = self.cfg.val_every * self.cfg.prompts_per_step
        batches = ShardedBatches(StreamSampler(len(self.train_rows), size, self.cfg.seed), self.cfg.prompts_per_step,
                                 *process_rank(self))
        return DataLoader(self.train_rows, batch_sampler=batches, collate_fn=list)

    def val_dataloader(self):
        """Each process's validation prompts: every ``world_size``-th (all of them in one process)."""
        rank, world = process_rank(self)
        return DataLoader(self.valid_rows[rank::world], batch_size=64, collate_fn=list)


def prompt_forward(model, prompt: dict, answer: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) that predict each answer token, from one forward pass over prompt + answer.

    prompt: left-padded ``input_ids``/``attention_mask``; answer (B, T) with -1 after the end."""
    ids = torch.cat([prompt["input_ids"], answer.clamp(min=0)], 1)
    mask = torch.cat([prompt["attention_mask"], (answer >= 0).long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P = prompt["input_ids"].shape[1]
    return logits[:, P - 1:-1]


class RerankerRLModule(RLLoop):
    """A reranker's rollouts and rewards for :class:`pipelines.rl_loop.RLLoop`, and its validation."""

    def __init__(self, scorer, config: RLConfig):
        super().__init__()
        self.cfg, self.scorer = config, scorer
        self.bb = scorer.bb
        self.start_rl(self.bb.model)
        self.listwise = isinstance(scorer, ListwiseReranker)
        self.slate = config.algo in SLATE_ALGOS
        if config.algo not in PREFERENCE_ALGOS and self.listwise == (config.algo == "grouprank"):
            raise RecsysError(f"algo {config.algo!r} does not fit a {'listwise' if self.listwise else 'groupwise'} model")
        self._val: list[float] = []

    # ---------------------------------------------------------------- rollouts and rewards
    def _constraint(self, windows: list[list[int]]):
        """A fresh decoding constraint for these windows (listwise: rank the window; slate tasks)."""
        if self.slate:
            return slate_constraint(self.scorer, windows, self.cfg.slate_size, self.cfg.rank_size)
        return self.scorer.list_constraint(windows)

    def rollouts(self, rows: list[CandidateList], generator: torch.Generator) -> dict:
        """G rollouts per prompt: ``prompt`` batch, ``answer`` (B*G, T), token ``mask``, sequence
        ``reward`` (B*G,), and per algorithm ``rel`` (per-rank relevance) or the two phase rewards."""
        G = self.cfg.group_size
        hists = [r.history for r in rows for _ in range(G)]
        windows = [r.window for r in rows for _ in range(G)]
        targets = [r.target for r in rows for _ in range(G)]
        if self.listwise:
            _, answer = self.scorer.generate(hists, windows, True, self.cfg.temperature, generator, return_tokens=True,
                                             constraint=self._constraint(windows))
            prompt = self.scorer._batch(self.scorer.prompts(hists, windows))
            roll = {"prompt": prompt, "answer": answer, "mask": answer >= 0, "windows": windows}
            if self.slate:
                parsed = [self._slate_rank(a, w) for a, w in zip(answer, windows)]
                R = self.cfg.rank_size
                slate_r = torch.tensor([coverage_reward(s, {t}) for (s, _), t in zip(parsed, targets)])
                rel = torch.tensor([relevance(r, {t}, R) for (_, r), t in zip(parsed, targets)])
                rank_r = ndcg_at_k(rel, torch.ones(len(rel)), R)
                return roll | {"slate_reward": slate_r, "rank_reward": rank_r, "reward": joint_reward(slate_r, rank_r)}
            N = len(windows[0])
            parsed = [self.parse(a, w) for a, w in zip(answer, windows)]
            served = [p.order if self.cfg.complete_lists else p.generated for p in parsed]
            rel = torch.tensor([relevance([w[i] for i in s], {t}, N) for s, w, t in zip(served, windows, targets)])
            depth = self.cfg.grpo_reward_depth or N
            roll |= {"reward": ndcg_at_k(rel, torch.ones(len(rel)), depth), "rel": rel,
                     "validity": torch.tensor([float(p.valid) for p in parsed]).mean(),
                     "items": torch.tensor([float(len(p.generated)) for p in parsed])}
            if self.cfg.algo == "scasrec":
                roll["returns"] = step_returns([list(p.generated) for p in parsed],
                                               [w.index(t) if t in w else None for w, t in zip(windows, targets)], N)
            return roll
        prompt, answer, digits, _ = self.scorer.sample(hists, windows, self.cfg.temperature, generator)
        relevant = torch.tensor([[c == t for c in w] for w, t in zip(windows, targets)])
        if self.cfg.grouprank_teacher == "sft":                       # windows arrive in the retriever's order
            teacher = torch.tensor([teacher_scores(SFTExample([], w, [], w, t)) for w, t in zip(windows, targets)],
                                   dtype=torch.float32)
        else:
            teacher = torch.where(relevant, 9.0, 0.0)
        reward = grouprank_reward(digits.float(), teacher, relevant, ties=self.cfg.grouprank_ties)
        digit_pos = torch.zeros_like(answer, dtype=torch.bool)
        digit_pos[:, 2:-1:4] = True                                     # "X : d \n" ... <eor>
        return {"prompt": prompt, "answer": answer, "mask": digit_pos, "reward": reward, "windows": windows}

    def _slate_rank(self, answer: torch.Tensor, window: list[int]) -> tuple[list[int], list[int]]:
        return slate_items(self.scorer, answer, window)

    def parse(self, answer: torch.Tensor, window: list[int]):
        """The parse of a generated answer (T,) (-1 = padding): the positions it names, in order, and its
        validity flags (constrained decoding always gives a valid list; logged as a check)."""
        text = self.bb.tokenizer.decode([t for t in answer.tolist() if t >= 0], skip_special_tokens=False)
        return self.scorer.parse(text, window)

    def log_probs(self, model, roll: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) (B*G, T) of the rollouts' tokens under ``model``'s sampling distribution
        (constrained, at the rollout temperature)."""
        answer, mask, temp = roll["answer"], roll["mask"], self.cfg.temperature
        logits = prompt_forward(model, roll["prompt"], answer)
        if self.listwise:
            return replay_log_probs(logits, answer, self._constraint(roll["windows"]), temp)
        # groupwise: only the digits are sampled, from the softmax over the ten digit tokens
        digits = (logits[..., self.scorer.digit_ids].float() / temp).log_softmax(-1)          # (B, T, 10)
        index = (answer[..., None] == self.scorer.digit_ids.to(answer.device)).float().argmax(-1)   # (B, T)
        lp = digits.gather(-1, index[..., None])[..., 0] * mask
        ent = -(digits.exp() * digits).sum(-1) * mask
        return lp, ent

    # ---------------------------------------------------------------- training
    def rollout(self, rows: list[CandidateList], batch: int) -> RolloutStep:
        cfg, G, B = self.cfg, self.cfg.group_size, len(rows)
        roll = self.rollouts(rows, torch.Generator().manual_seed(self.rollout_seed(batch)))
        answer, mask, reward = roll["answer"], roll["mask"], roll["reward"]
        self.model.train()
        with torch.no_grad():
            old_logp, entropy = self.log_probs(self.model, roll)
        rollouts = Rollouts(G, mask, reward, old_logp)
        if cfg.algo in RANKED_ALGOS:
            rollouts.rel, rollouts.returns = roll["rel"], roll.get("returns")
            rollouts.bins = segment_ranks(answer, mask, self.bb.separator_id, self.bb.end_id, roll["rel"].shape[1])
        elif cfg.algo == "f-grpo":
            rollouts.slate_reward, rollouts.rank_reward = roll["slate_reward"], roll["rank_reward"]
            rollouts.slate_mask, rollouts.rank_mask = phase_masks(answer, mask, self.bb.rank_marker_id)
        logs = {"train/reward": reward.mean(), "train/reward_std": reward.reshape(B, G).std(1).mean(),
                "train/entropy": (entropy.sum() / mask.float().sum().clamp(min=1)),
                "train/length": mask.float().sum(1).mean()}
        if self.slate:
            logs |= {"train/slate_reward": roll["slate_reward"].mean(), "train/rank_reward": roll["rank_reward"].mean(),
                     # prompts whose G slates earned different rewards: the only ones the slate phase learns from
                     "train/slate_signal": (roll["slate_reward"].reshape(B, G).std(1) > 0).float().mean()}
        if "validity" in roll:
            logs["train/validity"] = roll["validity"]
            logs["train/list_items"] = roll["items"].mean()           # items written before the end token
        return RolloutStep(rollouts, lambda model, values: (self.log_probs(model, roll)[0], None), logs)

    # ---------------------------------------------------------------- validation
    def validation_step(self, rows: list[CandidateList], batch_idx):
        hists = [r.history for r in rows]
        windows = [r.window for r in rows]
        if self.slate:                                 # the final ranking of rank_size items; the rest is a miss
            answers = self.scorer.generate(hists, windows, True, 0.0, return_tokens=True,
                                           constraint=self._constraint(windows))[1]
            orders = [self._slate_rank(a, w)[1] for a, w in zip(answers, windows)]
        elif self.listwise:
            answers = self.scorer.generate(hists, windows, True, 0.0, return_tokens=True)[1]
            orders = [[w[i] for i in self.parse(a, w).order] for a, w in zip(answers, windows)]
        else:
            orders = self.scorer.rank_windows(hists, windows, batch_size=len(windows))
        for r, o in zip(rows, orders):
            if r.has_target:
                self._val.append(target_rank(o, r.target))

    def on_validation_epoch_end(self):
        ranks = gather_rows(self, np.array(self._val, dtype=np.float64).reshape(-1, 1))   # every process's
        self._val.clear()
        k = int(self.cfg.val_metric.rsplit("@", 1)[1])
        m = compute_metrics(ranks, np.ones_like(ranks), [f"ndcg@{k}"]) if len(ranks) else {f"ndcg@{k}": 0.0}
        self.log(self.cfg.val_metric, m[f"ndcg@{k}"], prog_bar=True)


def save_model(module: RerankerRLModule, path: Path, meta: dict) -> None:
    """Write the module's policy as a reranker model directory (weights, tokenizer, ``reranker.json``)."""
    module.model.save_pretrained(path)
    module.bb.tokenizer.save_pretrained(path)
    (path / "reranker.json").write_text(json.dumps(meta, indent=2))


def train_rl(dataset: PreparedDataset, candidates_dir, out, config: RLConfig, progress: bool = True,
             resume: bool = True, runtime: Runtime | None = None) -> Path:
    """RL on a reranker from ``config.init``; saves the best model by validation to ``out/model``: the
    best RL checkpoint, or the starting model itself when no checkpoint beat it (``kept_start``), and
    the final weights, whatever validation says, to ``out/last-model`` (with the start's retriever prior)."""
    if not config.init:
        raise RecsysError("RL needs a starting model: set init to the SFT run's model/ directory")
    out = Path(out)
    defining = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("max_steps", "max_minutes", "precision")}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint,
                                   "candidates": str(Path(candidates_dir).resolve())}, resume)
    L.seed_everything(config.seed, verbose=False)
    scorer = load_reranker(config.init, dataset, window=config.window)
    scorer.bf16 = False                                   # Lightning's precision plugin does the autocast
    data = PromptData(dataset, candidates_dir, config)
    module = RerankerRLModule(scorer, config)
    metric = config.val_metric
    best, latest = checkpoint_callbacks(out / "checkpoints", metric)
    timer = budget_timer(config.max_minutes)
    callbacks = [best, latest, RNGState(), timer]
    epochs = -(-config.max_steps // config.val_every)
    # use_distributed_sampler off: the datamodule shards its own batches and validation prompts by rank
    trainer = make_trainer(out, runtime, progress=progress, max_epochs=epochs, precision=config.precision,
                           callbacks=callbacks, log_every_n_steps=1, use_distributed_sampler=False)
    if not last:                                          # the starting point is scored too: step 0
        trainer.validate(module, datamodule=data, verbose=False)
        start_score = float(trainer.callback_metrics[metric])
    else:
        start_score = json.loads((out / "start.json").read_text())[metric]
    if trainer.is_global_zero:
        (out / "start.json").write_text(json.dumps({metric: start_score}))
    start_state = {k: v.detach().clone() for k, v in module.state_dict().items()}     # the SFT model, step 0
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    if not trainer.is_global_zero:                    # data parallel: the first process writes the model
        return out / "model"
    best_path, best_score = best_checkpoint(best)
    kept_start = start_score >= best_score            # RL never beat its starting point on validation: keep it
    init_meta = json.loads((Path(config.init) / "reranker.json").read_text())
    save_model(module, out / "last-model", init_meta)   # the final weights, unselected (the start's prior)
    module.load_state_dict(start_state if kept_start else
                           torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"])
    prior_table = None
    if module.listwise and not module.slate and "retriever_prior" in init_meta and not kept_start:
        # re-chosen for the RL'd weights; a kept start keeps its own (chosen on its own validation users)
        init_meta["retriever_prior"], prior_table = tune_retriever_prior(scorer, data.valid_rows, config.window)
    save_model(module, out / "model", init_meta)
    (out / "train.json").write_text(json.dumps({
        "kind": init_meta["kind"], "algo": config.algo, "seconds": timer.time_elapsed("train"),
        "steps": trainer.global_step // config.mu, f"start_{metric.replace('/', '_')}": start_score,
        f"best_{metric.replace('/', '_')}": max(start_score, best_score), "kept_start": kept_start, "val_metric": metric,
        "retriever_prior": init_meta.get("retriever_prior"), "val_cand_ndcg@10_by_retriever_prior": prior_table,
        "config": dataclasses.asdict(config),
        "dataset_fingerprint": dataset.fingerprint}, indent=2))
    return out / "model"
