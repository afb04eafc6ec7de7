"""Training and evaluation of the generative recommender (semantic IDs): SFT, and the rollouts and rewards of
its RL algorithms for the shared RL loop (:class:`pipelines.rl_loop.RLLoop`).

    recsys train generative --algo sft   --data D --semantic-ids S --out runs/gen-sft
    recsys train generative --algo vstar --data D --init runs/gen-sft/model --out runs/gen-vstar

- ``sft``: cross-entropy of every semantic-ID code of every item of each user's training sequence given
  the items before it (``token`` layout: next-token prediction over the code tokens; ``item`` layout: the
  per-level code heads at every item position, :class:`recsys.generative.model.ItemGenerativeRecommender`),
  the same split as SASRec. A sequence longer than the model's window is cut into windows of
  ``max_items + 1`` items that overlap by one (:func:`sequence_windows`), so every training item but a
  user's first is a target exactly once (``all_windows: false`` keeps only the most recent window);
  validation = beam search over the validation users, NDCG@10 with the history excluded.
- ``grpo``: per training prompt (history = a user's training items but the last, target = the last),
  ``group_size`` items sampled from the trie-constrained policy, reward :func:`recsys.rl.vstar.prefix_reward`,
  group-normalised advantages, GRPO's objective with a k3 KL to the frozen SFT model (Shao et al. 2024).
- ``rank-grpo``: ``group_size`` *lists* of ``list_length`` distinct items sampled item by item
  (:func:`recsys.generative.decoding.generate_list`, history and earlier items banned), relevance per
  rank, Rank-GRPO's per-rank rewards (``rank_reward``: exp_inf | log_decay) and per-rank advantages,
  the item-level importance ratio over the item's D code tokens (Zhu et al. 2025). Validation and
  evaluation are the same beam search as for the other algorithms (not the generated list).
- ``vstar``: rollouts by value-guided decoding (:mod:`recsys.generative.ved`), GRPO + Sibling-GRPO, and
  the value head trained by TD on dense per-level rewards (V-STAR, arXiv 2602.10699).

Evaluation (:func:`evaluate_generative`): for each test user, beam search of width ``beam`` with the
user's history banned at the last code level; the target's rank is its position among the returned
items, ``inf`` when the beam did not produce it (so HR@K and NDCG@K for K <= beam are exact for the
list the model would serve).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipelines.callbacks import (
    RNGState,
    StreamSampler,
    best_checkpoint,
    budget_timer,
    checkpoint_callbacks,
    early_stopping,
    resume_checkpoint,
)
from pipelines.optim import plateau
from pipelines.rl_loop import RLLoop, RolloutStep
from pipelines.sasrec import LengthBucketSampler
from pipelines.trainer import Runtime, make_trainer
from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.generative.decoding import Decoded, decode, generate_list, recommend_batch
from recsys.generative.model import GenerativeConfig, GenerativeRecommender
from recsys.generative.ved import VEDConfig, ved
from recsys.metrics import compute_metrics, ndcg
from recsys.retrieval.semantic_ids import SemanticIDs
from recsys.rl.objectives import Rollouts, Settings
from recsys.rl.rank_grpo import PAD
from recsys.rl.vstar import level_rewards, prefix_reward

ALGOS = ("sft", "grpo", "rank-grpo", "vstar")
METRICS = ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "hr@20", "ndcg@20", "mrr"]


@dataclass(frozen=True)
class GenerativeTrainConfig:
    """A generative-recommender run: SFT from scratch, or RL (``grpo``/``rank-grpo``/``vstar``) from an SFT model."""

    algo: str = "sft"
    """``sft`` (next-code cross-entropy from scratch), or RL from ``init``: ``grpo``, ``rank-grpo``, ``vstar``."""
    model: GenerativeConfig = field(default_factory=GenerativeConfig)
    """The model's shape (SFT builds it; RL reads the one saved with ``init``)."""
    semantic_ids: str | None = None
    """Directory written by ``recsys index semantic-ids``: SFT's codes; V-STAR's dense reward reads the
    embeddings saved there (``dense_reward: embeddings``). Other RL reads the codes saved with ``init``."""
    init: str | None = None
    """RL: the SFT run's ``model/`` directory."""
    batch_size: int = 64
    """SFT: training windows per step."""
    lr: float = 1e-3
    """AdamW learning rate (SFT and RL)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_epochs: int = 50
    """SFT: at most this many epochs (early stopping may end sooner)."""
    patience: int = 5
    """SFT: stop after this many validations without a new best NDCG@10."""
    lr_decay: float | None = None
    """SFT: multiply the learning rate by this factor after ``lr_patience`` validations without a new best
    (``ReduceLROnPlateau``); None keeps it constant."""
    lr_patience: int = 1
    """SFT: validations without a new best before ``lr_decay`` applies."""
    max_minutes: float | None = None
    """Stop training after this many minutes (the best checkpoint is kept); None: no cap."""
    limit_train_batches: int | None = None
    """SFT: at most this many batches per epoch (quick runs; default: all)."""
    all_windows: bool = True
    """SFT: train on every window of each user's sequence (:func:`sequence_windows`); False: the last only."""
    val_users: int = 1000
    """Validation users (the first ones of the validation split, fixed across epochs)."""
    val_beam: int = 20
    """Beam width of the validation NDCG@10 (trie-constrained beam search)."""
    seed: int = 0
    """Seeds the weights, the data order and the rollouts."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPUs and AMX CPUs, else fp32), ``32-true`` or ``bf16-mixed``; not part of a run's identity."""
    num_threads: int | None = None
    """torch intra-op threads (None: torch's default); not part of a run's identity."""
    # ---- RL
    max_steps: int = 100
    """RL: batches of rollouts (each followed by ``mu`` optimiser steps)."""
    val_every: int = 25
    """RL: validation and checkpoints every this many steps."""
    prompts_per_step: int = 16
    """RL: users (prompts) per batch of rollouts."""
    group_size: int = 16
    """RL: rollouts per prompt (G; ``vstar``: candidates value-guided decoding returns)."""
    temperature: float = 1.0
    """RL: sampling temperature of the rollouts."""
    beta: float = 1e-3
    """KL weight (k3) toward the SFT model."""
    eps: float = 0.2
    """RL: clipping range of the importance ratio (engages only with ``mu`` > 1)."""
    mu: int = 1
    """RL: optimiser steps per batch of rollouts. 1: on-policy (the ratio is 1, clipping never engages);
    >1: off-policy, each later step's ratio against the log-probs of the first, clipped at ``eps`` (per rank
    for ``rank-grpo``, Rank-GRPO arXiv 2510.20150 §4)."""
    shaping: float = 0.1
    """Reward for a miss: shaping x matching code prefix / D (see recsys.rl.vstar.prefix_reward)."""
    list_length: int = 5
    """``rank-grpo``: items per generated list (N)."""
    rank_reward: str = "exp_inf"
    """``rank-grpo``: per-rank reward, ``exp_inf`` (hit at that rank) or ``log_decay`` (DCG from it on)."""
    sibling_weight: float = 1.0
    """``vstar``: weight of the Sibling-GRPO loss added to the GRPO loss."""
    sibling_credit: str = "visits"
    """``vstar``: which candidates through a node carry its Sibling-GRPO advantage: ``visits`` (every one, so a
    node weighs by its visit count, as V-STAR's code does) or ``first`` (the first through it: each node once,
    eq. 18 read literally). :func:`recsys.rl.vstar.sibling_advantages`."""
    dense_reward: str = "embeddings"
    """``vstar``: the value head's per-level reward compares the candidates sharing a prefix with the target by
    ``embeddings`` (the vectors the semantic IDs were built from: V-STAR's choice; needs ``semantic_ids``) or
    ``codes`` (one-hot codes: the cosine is the share of code levels in common)."""
    value_weight: float = 1.0
    """``vstar``: weight of the value head's TD loss."""
    gamma: float = 0.99
    """``vstar``: discount of the value head's TD targets (:func:`recsys.rl.vstar.td_targets`)."""
    init_beam: int = 8
    """``vstar``: width of value-guided decoding's initial beam (:class:`recsys.generative.ved.VEDConfig`)."""
    budget_multiplier: float = 1.0
    """``vstar``: decoding's forward-call budget as a multiple of the initial beam's calls
    (:attr:`recsys.generative.ved.VEDConfig.budget_multiplier` says why 1)."""
    lam: float = 0.1
    """``vstar``: entropy weight in decoding's node priority V + lam * H."""
    ucb_beta: float = 1.0
    """``vstar``: UCB exploration weight when decoding picks a node to expand."""
    widen: str = "gated"
    """``vstar``: how decoding widens its tree (:attr:`recsys.generative.ved.VEDConfig.widen`)."""
    rank_by: str = "value"
    """``vstar``: which leaves decoding returns as rollouts (:attr:`recsys.generative.ved.VEDConfig.rank_by`)."""

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise RecsysError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.mu < 1:
            raise RecsysError(f"mu (optimiser steps per rollout batch) must be >= 1, got {self.mu}")
        for name, value, allowed in (("sibling_credit", self.sibling_credit, ("visits", "first")),
                                     ("dense_reward", self.dense_reward, ("embeddings", "codes")),
                                     ("widen", self.widen, ("gated", "complete")),
                                     ("rank_by", self.rank_by, ("value", "logp"))):
            if value not in allowed:
                raise RecsysError(f"{name} must be one of {allowed}, got {value!r}")

    def objective_settings(self) -> Settings:
        """The hyper-parameters :data:`recsys.rl.objectives.OBJECTIVES` reads from this run (one clip range
        ``eps`` on both sides, std-scaled group advantages)."""
        return Settings(beta=self.beta, eps_low=self.eps, eps_high=self.eps, scale_rewards="std",
                        rank_reward=self.rank_reward, sibling_credit=self.sibling_credit,
                        sibling_weight=self.sibling_weight, value_weight=self.value_weight, gamma=self.gamma)

    def ved(self) -> VEDConfig:
        return VEDConfig(self.group_size, self.init_beam, self.budget_multiplier, self.lam, self.ucb_beta,
                         self.temperature, self.widen, self.rank_by)


def sequence_windows(seq, n: int) -> list:
    """Windows of at most ``n`` items covering ``seq``, newest first, consecutive ones sharing one item.

    Every item but ``seq[0]`` is predicted exactly once (it is a target in the window that ends with it or
    contains it past its first position); a window shorter than 2 items predicts nothing and is dropped.
    Example: ``sequence_windows([1, 2, 3, 4, 5, 6], 3)`` is ``[[4, 5, 6], [2, 3, 4], [1, 2]]``.
    """
    if n < 2:
        raise RecsysError(f"a training window needs at least 2 items, got {n}")
    out, end = [], len(seq)
    while end >= 2:
        out.append(seq[max(0, end - n):end])
        end -= n - 1
    return out


def target_ranks(items: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """0-based position of each target in its row of ``items`` (B, K); inf when absent. (B,) float."""
    hit = items == torch.as_tensor(targets)[:, None]
    first = hit.float().argmax(1).double().numpy()
    return np.where(hit.any(1).numpy(), first, np.inf)


def evaluate_generative(model: GenerativeRecommender, histories, targets, beam: int = 50,
                        metrics=METRICS, batch_rows: int = 2048, progress: bool = True, per_user: bool = False):
    """Metrics of beam-search recommendations (history excluded) against one target per history; with
    ``per_user``, also each user's (Q,) NDCG@10, for paired comparisons."""
    model.eval()
    chunk = max(1, batch_rows // beam) * 8
    ranks = []
    for start in tqdm(range(0, len(histories), chunk), desc=f"beam {beam}", disable=not progress, leave=False):
        out = recommend_batch(model, histories[start:start + chunk], beam, beam, batch_rows=batch_rows)
        ranks.append(target_ranks(out.items, np.asarray(targets[start:start + chunk])))
    r = np.concatenate(ranks)[:, None]
    scores = compute_metrics(r, np.ones_like(r), list(metrics))
    return (scores, ndcg(r, np.ones_like(r), 10)) if per_user else scores


# ---------------------------------------------------------------------------------------------- data
class GenerativeData(L.LightningDataModule):
    """SFT: training sequences; RL: (history, target) prompts from the training split. Validation users
    are the first ``val_users`` of the validation split."""

    def __init__(self, dataset: PreparedDataset, model: GenerativeRecommender, config: GenerativeTrainConfig):
        super().__init__()
        self.cfg, self.model = config, model
        n = config.model.max_items + 1
        seqs = [s for s in dataset.train_sequences() if len(s) >= 2]
        self.seqs = [w for s in seqs for w in sequence_windows(s, n)] if config.all_windows else [s[-n:] for s in seqs]
        self.prompts = [{"history": s[:-1], "target": int(s[-1])} for s in seqs]
        valid = dataset.eval_examples("valid")
        self.valid = [{"history": h, "target": int(t[0])} for h, t in
                      list(zip(valid.histories, valid.targets))[:config.val_users]]

    def _collate(self, idx):
        return self.model.train_batch([self.seqs[i] for i in idx])

    def train_dataloader(self):
        if self.cfg.algo == "sft":
            sampler = LengthBucketSampler(np.array([len(s) for s in self.seqs]), self.cfg.batch_size, self.cfg.seed)
            return DataLoader(range(len(self.seqs)), batch_sampler=sampler, collate_fn=self._collate)
        size = self.cfg.val_every * self.cfg.prompts_per_step
        return DataLoader(self.prompts, batch_size=self.cfg.prompts_per_step, collate_fn=list,
                          sampler=StreamSampler(len(self.prompts), size, self.cfg.seed))

    def val_dataloader(self):
        return DataLoader(self.valid, batch_size=max(1, 2048 // self.cfg.val_beam), collate_fn=list)


# ---------------------------------------------------------------------------------------------- modules
class _Validated(L.LightningModule):
    """Validation shared by both phases: beam search NDCG@10 / HR@10 on the validation users."""

    def __init__(self, model: GenerativeRecommender, config: GenerativeTrainConfig):
        super().__init__()
        # Train mode for every submodule: from_pretrained leaves the LM in eval mode, and Lightning keeps
        # each submodule's mode as it finds it at the start of fit (dropout of the value head included).
        self.model, self.cfg = model.train(), config
        self._ranks: list[np.ndarray] = []

    def validation_step(self, rows, batch_idx):
        out = recommend_batch(self.model, [r["history"] for r in rows], 10, self.cfg.val_beam)
        self._ranks.append(target_ranks(out.items.cpu(), np.array([r["target"] for r in rows])))

    def on_validation_epoch_end(self):
        r = np.concatenate(self._ranks)[:, None]
        self._ranks.clear()
        m = compute_metrics(r, np.ones_like(r), ["ndcg@10", "hr@10"])
        self.log("val/ndcg@10", m["ndcg@10"], prog_bar=True)
        self.log("val/hr@10", m["hr@10"], prog_bar=True)
        self.after_validation(m["ndcg@10"])

    def after_validation(self, ndcg: float) -> None:
        """Runs after each validation, before its checkpoint is written."""


class GenerativeSFTModule(_Validated):
    """Next-item SFT; with ``lr_decay`` the rate is cut on validation plateaus (stepped here, not by
    Lightning, so that each checkpoint holds the scheduler state of its own validation)."""

    def __init__(self, model: GenerativeRecommender, config: GenerativeTrainConfig):
        super().__init__(model, config)
        self.plateau, self._plateau_state = None, None

    def training_step(self, batch, batch_idx):
        loss = self.model.sft_loss(**batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(next(iter(batch.values()))))
        return loss

    def after_validation(self, ndcg: float) -> None:
        if self.plateau is not None and not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.plateau.step(ndcg)
            self.log("train/lr", self.plateau.get_last_lr()[0])

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if not n.startswith("value_head.")]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.98), weight_decay=self.cfg.weight_decay)
        if self.cfg.lr_decay is not None:
            self.plateau = plateau(opt, self.cfg.lr_decay, self.cfg.lr_patience)
            if self._plateau_state is not None:                  # resuming: on_load_checkpoint ran first
                self.plateau.load_state_dict(self._plateau_state)
        return opt

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.plateau is not None:
            checkpoint["plateau"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._plateau_state = checkpoint.get("plateau")


def code_log_probs(model: GenerativeRecommender, histories, codes: torch.Tensor, exclude: torch.Tensor | None = None,
                   values: bool = False):
    """Constrained log-probs (R, D) of full codes (R, D) after their histories, one forward pass; with
    ``values`` also V(s_0..s_D) (R, D + 1) from the value head."""
    logits, v = model.teacher_forced(histories, codes, values)                        # (R, D, K)
    codes = codes.to(logits.device)
    nodes = torch.zeros(len(codes), dtype=torch.long, device=logits.device)
    logp = []
    for level in range(model.depth):
        lp = model.level_log_probs(logits[:, level], level, nodes, exclude)
        logp.append(lp.gather(1, codes[:, level:level + 1])[:, 0])
        nodes = model.trie.advance(nodes, codes[:, level])
    logp = torch.stack(logp, 1)
    return (logp, v) if values else logp


class GenerativeRLModule(RLLoop, _Validated):
    """A generative recommender's rollouts and rewards (GRPO, Rank-GRPO, V-STAR) for
    :class:`pipelines.rl_loop.RLLoop`; validation by beam search."""

    def __init__(self, model: GenerativeRecommender, config: GenerativeTrainConfig):
        super().__init__(model, config)
        if hasattr(model, "set_dropout"):          # item layout: RL compares deterministic policies
            model.set_dropout(0.0)
        self.start_rl(self.model)
        self.register_buffer("vectors", reward_vectors(model, config), persistent=False)

    def _exclude(self, histories, repeat: int = 1) -> torch.Tensor:
        ex = torch.zeros(len(histories), len(self.model.idx_codes), dtype=torch.bool)
        for row, h in enumerate(histories):
            ex[row, torch.as_tensor(h, dtype=torch.long)] = True
        return ex.repeat_interleave(repeat, 0).to(self.device)

    def rollouts(self, histories, batch: int) -> tuple[Decoded, float]:
        """G semantic IDs per history (sampled, or VED's for V-STAR) and the forward calls they took."""
        cfg = self.cfg
        exclude = self._exclude(histories)
        self.model.eval()
        if cfg.algo == "vstar":
            out, calls = ved(self.model, histories, cfg.ved(), seed=self.rollout_seed(batch), exclude=exclude)
            return out, float(calls.mean())
        gen = torch.Generator().manual_seed(self.rollout_seed(batch))
        out = decode(self.model, histories, cfg.group_size, sample=True, temperature=cfg.temperature, generator=gen,
                     exclude=exclude)
        return out, float(1 + (self.model.depth - 1) * cfg.group_size)

    def rollout(self, rows, batch: int) -> RolloutStep:
        if self.cfg.algo == "rank-grpo":
            return self._rank_grpo_rollout(rows, batch)
        cfg, G, D = self.cfg, self.cfg.group_size, self.model.depth
        hists = [r["history"] for r in rows]
        targets = torch.tensor([r["target"] for r in rows])
        out, calls = self.rollouts(hists, batch)
        target_codes = self.model.idx_codes[targets.to(self.device)]                                   # (B, D)
        reward = prefix_reward(out.codes, target_codes[:, None].cpu(), cfg.shaping)                     # (B, G)
        ok = (out.items > 0).view(-1)
        codes = out.codes.view(-1, D)
        rep = [h for h in hists for _ in range(G)]
        exclude = self._exclude(hists, G)
        on = ok[:, None].to(self.device)

        def log_probs(model, values: bool):
            res = code_log_probs(model, rep, codes, exclude, values=values)
            logp, estimates = res if values else (res, None)
            return torch.where(on, logp, torch.zeros_like(logp)), estimates

        rollouts = Rollouts(G, ok[:, None].expand(-1, D).to(self.device), reward.view(-1), None)
        if cfg.algo == "vstar":
            rollouts.codes = out.codes
            rollouts.dense = torch.cat([level_rewards(c, t, self.vectors[i], self.vectors[int(tt)])
                                        for c, t, i, tt in zip(out.codes, target_codes.cpu(), out.items, targets)])
        logs = {"train/reward": reward.mean(), "train/hit": (reward == 1).float().mean(),
                "train/reward_std": reward.std(1).mean(), "train/distinct": torch.tensor(
                    np.mean([len(set(r.tolist())) for r in out.items])).float(), "train/calls": torch.tensor(calls)}
        return RolloutStep(rollouts, log_probs, logs)

    def list_log_probs(self, model, histories, lists: list[list[int]]) -> torch.Tensor:
        """(R, N * D) constrained log-probs of each list's code tokens, item j after the history and
        items 0..j-1 with those banned (as :func:`generate_list` sampled it); 0 after a short list."""
        N, D = self.cfg.list_length, self.model.depth
        out = torch.zeros(len(lists), N * D, device=self.device)
        for j in range(N):
            rows = [r for r, lst in enumerate(lists) if len(lst) > j]
            if not rows:
                break
            prefixes = [list(histories[r]) + lists[r][:j] for r in rows]
            exclude = self._exclude([list(histories[r]) + lists[r][:j] for r in rows])
            codes = self.model.idx_codes[torch.tensor([lists[r][j] for r in rows], device=self.device)]
            out[rows, j * D:(j + 1) * D] = code_log_probs(model, prefixes, codes, exclude).float()
        return out

    def _rank_grpo_rollout(self, rows, batch: int) -> RolloutStep:
        """Rank-GRPO's rollouts: G lists of ``list_length`` items per history, one advantage per rank."""
        cfg, G, N, D = self.cfg, self.cfg.group_size, self.cfg.list_length, self.model.depth
        rep = [r["history"] for r in rows for _ in range(G)]
        targets = [r["target"] for r in rows for _ in range(G)]
        gen = torch.Generator().manual_seed(self.rollout_seed(batch))
        self.model.eval()
        with torch.no_grad():
            lists = generate_list(self.model, rep, N, sample=True, temperature=cfg.temperature, generator=gen)
        rel = torch.tensor([[float(j < len(lst) and lst[j] == t) for j in range(N)] for lst, t in zip(lists, targets)])
        lengths = torch.tensor([len(lst) for lst in lists], device=self.device)
        token = torch.arange(N * D, device=self.device)
        bins = torch.where(token[None, :] < lengths[:, None] * D, token[None, :] // D, torch.full_like(token, -2))
        hit = rel.amax(1)
        rollouts = Rollouts(G, bins != PAD, hit, None, rel=rel.to(self.device), bins=bins)
        logs = {"train/reward": hit.mean(), "train/hit_rank_mean": rel.argmax(1).float()[hit > 0].mean()
                if hit.any() else torch.tensor(-1.0), "train/list_length": lengths.float().mean()}
        return RolloutStep(rollouts, lambda model, values: (self.list_log_probs(model, rep, lists), None), logs)


def reward_vectors(model: GenerativeRecommender, config: GenerativeTrainConfig) -> torch.Tensor:
    """(n_items + 1, d) the item vectors V-STAR's dense level reward compares (row 0: padding).

    ``dense_reward: embeddings`` (V-STAR, arXiv 2602.10699 §4.3: the semantic similarity of the items): the
    vectors ``config.semantic_ids`` saved beside the codes, which must be the model's codes. ``codes``: one-hot
    codes per level, whose cosine is the share of levels two items have in common."""
    codes = model.idx_codes
    if config.algo != "vstar" or config.dense_reward == "codes":
        D, K = model.depth, model.trie.n_codes
        return torch.nn.functional.one_hot(codes, K).float().view(-1, D * K)
    if not config.semantic_ids:
        raise RecsysError("V-STAR's dense reward compares items by the embeddings their semantic IDs were built from: "
                          "set semantic_ids to that directory (recsys index semantic-ids), or dense_reward: codes")
    sid = SemanticIDs.load(config.semantic_ids)
    if sid.vectors is None:
        raise RecsysError(f"{config.semantic_ids}: no vectors.npy (built before they were saved); build the semantic "
                          "IDs again, or set dense_reward: codes")
    if len(sid.codes) != len(codes) - 1 or not np.array_equal(sid.codes[np.argsort(sid.item_ids)], codes[1:].cpu().numpy()):
        raise RecsysError(f"{config.semantic_ids}: its codes are not the ones the model {config.init} was trained on")
    vectors = torch.zeros(len(codes), sid.vectors.shape[1])
    vectors[torch.as_tensor(sid.item_ids, dtype=torch.long)] = torch.from_numpy(sid.vectors).float()
    return vectors


# ---------------------------------------------------------------------------------------------- jobs
def build_model(dataset: PreparedDataset, config: GenerativeTrainConfig) -> GenerativeRecommender:
    if config.algo != "sft":
        if not config.init:
            raise RecsysError(f"algo {config.algo!r} starts from an SFT model: set init to its model/ directory")
        return GenerativeRecommender.from_pretrained(config.init)
    if not config.semantic_ids:
        raise RecsysError("SFT needs semantic IDs: pass --semantic-ids (built by `recsys index semantic-ids`)")
    sid = SemanticIDs.load(config.semantic_ids)
    if len(sid.item_ids) != dataset.n_items or sid.item_ids.max() != dataset.n_items:
        raise RecsysError(f"{config.semantic_ids}: codes for {len(sid.item_ids)} items, dataset has {dataset.n_items}")
    return GenerativeRecommender.build(sid.codes, sid.item_ids, config.model, config.seed)


def _save(model: GenerativeRecommender, path: Path, meta: dict) -> None:
    model.save_pretrained(path)
    (path / "dataset.json").write_text(json.dumps(meta))


def train_generative(dataset: PreparedDataset, out, config: GenerativeTrainConfig = GenerativeTrainConfig(), *,
                     progress: bool = True, resume: bool = True, runtime: Runtime | None = None) -> Path:
    """Train (SFT or RL) and save the best model by validation NDCG@10 to ``out/model``.

    RL: the SFT start is validated too (step 0); when no RL checkpoint beats it, ``out/model`` is the start
    itself (``kept_start`` in ``train.json``), and the final RL weights go to ``out/last-model`` either way."""
    out = Path(out)
    defining = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("max_epochs", "max_minutes", "max_steps", "patience", "num_threads", "limit_train_batches",
                             "precision")}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint}, resume,
                             dataclasses.asdict(GenerativeTrainConfig()))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    L.seed_everything(config.seed, verbose=False)
    model = build_model(dataset, config)
    data = GenerativeData(dataset, model, config)
    sft = config.algo == "sft"
    module = GenerativeSFTModule(model, config) if sft else GenerativeRLModule(model, config)
    best, latest = checkpoint_callbacks(out / "checkpoints", "val/ndcg@10")
    timer = budget_timer(config.max_minutes)
    callbacks = [best, latest, RNGState(), timer]
    if sft:
        callbacks.append(early_stopping("val/ndcg@10", config.patience))
    epochs = config.max_epochs if sft else -(-config.max_steps // config.val_every)
    trainer = make_trainer(out, runtime, progress=progress, max_epochs=epochs, precision=config.precision,
                           callbacks=callbacks, log_every_n_steps=1 if not sft else 10,
                           limit_train_batches=config.limit_train_batches if sft else None)
    start_score = None
    if not sft:                                   # the SFT starting point is scored too: step 0
        if not last:
            trainer.validate(module, data.val_dataloader(), verbose=False)
            start_score = float(trainer.callback_metrics["val/ndcg@10"])
            (out / "start.json").write_text(json.dumps({"val/ndcg@10": start_score}))
        else:
            start_score = json.loads((out / "start.json").read_text())["val/ndcg@10"]
    start_state = None if sft else {k: v.detach().clone() for k, v in module.state_dict().items()}   # step 0
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    best_path, best_score = best_checkpoint(best)
    meta, kept_start = {"dataset_fingerprint": dataset.fingerprint}, None
    if not sft:                                   # the final weights, whatever validation says
        _save(module.model, out / "last-model", meta)
        kept_start = start_score >= best_score    # RL never beat its starting point on validation: keep it
        best_score = max(best_score, start_score)
    state = start_state if kept_start else torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    _save(module.model, out / "model", meta)
    (out / "train.json").write_text(json.dumps({
        "model_type": "generative", "algo": config.algo, "seconds": timer.time_elapsed("train"),
        "epochs": trainer.current_epoch, "steps": trainer.global_step, "start_val_ndcg@10": start_score,
        "best_val_ndcg@10": best_score, "kept_start": kept_start,
        "config": dataclasses.asdict(config),
        "dataset": str(dataset.directory), "dataset_fingerprint": dataset.fingerprint}, indent=2))
    return out / "model"


def load_for(dataset: PreparedDataset, directory) -> GenerativeRecommender:
    """A trained generative model, checked against the dataset it will score."""
    directory = Path(directory)
    meta = directory / "dataset.json"
    if meta.exists() and json.loads(meta.read_text())["dataset_fingerprint"] != dataset.fingerprint:
        raise RecsysError(f"{directory} was trained on another dataset than {dataset.directory}")
    return GenerativeRecommender.from_pretrained(directory)
