"""Reranker SFT with Lightning (listwise and groupwise): training examples, datamodule, module, and the
``train_reranker`` job; loading and running a trained reranker is :mod:`pipelines.rerank`.

The module adds nothing to the maths: the language-model loss is cross-entropy on the answer tokens
(labels from :mod:`recsys.rerank.sft`), the optional ranking term is
:func:`recsys.rerank.first.weighted_ranknet_loss` on the first-token logits (weight ``first_weight``,
FIRST's lambda; 0 = off). Validation: FIRST reranking of each validation user's candidate window,
scored by candidate-set NDCG@10 of the held-out item (over the windows that contain it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipelines.callbacks import (
    EpochShuffle,
    RNGState,
    ShardedBatches,
    best_checkpoint,
    budget_timer,
    checkpoint_callbacks,
    gather_rows,
    process_rank,
    resume_checkpoint,
)
from pipelines.rerank import load_reranker, make_scorer, tune_retriever_prior
from pipelines.trainer import Runtime, make_trainer
from recsys.data import PreparedDataset
from recsys.data.candidates import (
    hold_out,
    read_candidate_lists,
)
from recsys.errors import RecsysError
from recsys.llm.backbone import Backbone, load_backbone
from recsys.metrics import compute_metrics, target_rank
from recsys.portable.prompts import IDENTIFIERS, domain_words, item_titles
from recsys.rerank.first import first_scores, weighted_ranknet_loss
from recsys.rerank.listwise import ListwiseReranker
from recsys.rerank.sft import (
    collate,
    encode_example,
    encode_group_examples,
    reorder_teacher,
    teacher_example,
)
from recsys.types import CandidateList


@dataclass(frozen=True)
class RerankerSFTConfig:
    """A reranker SFT run (listwise or groupwise)."""

    kind: str = "listwise"
    """``listwise`` (answer: identifiers best first) or ``groupwise`` (answer: a 0-9 score per candidate)."""
    backbone: str = "tiny"
    """``tiny``, ``smollm2-135m`` or a checkpoint directory."""
    window: int = 20
    """Candidates per prompt (identifiers A..)."""
    group_size: int = 20
    """``groupwise`` only: candidates scored per prompt (GroupRank's c)."""
    max_history: int = 20
    """Most recent history items in the prompt."""
    domain: str | None = None
    """The words text prompts use for the items (a ``domains`` key of ``recsys/portable/templates.yaml``:
    ``items``, ``movies``, ``products``, ``music``, ``books``, ``news``); None = the dataset's own."""
    first_weight: float = 0.0
    """Weight of FIRST's weighted RankNet loss on first-token logits (paper: 10; 0 = off)."""
    supervise: str = "list"
    """``list``: learn the whole teacher list (LM loss on every answer token, FIRST pairs from the teacher
    order); ``target``: learn only where the held-out item goes (LM loss on the first answer token, FIRST
    pairs target-vs-others). ``target`` is the pretraining objective: next-item prediction against the
    retriever's hard negatives, with no pressure to reproduce the retriever's order. ``auto_stop``: the
    teacher list up to where no next item could improve the served ranking, then the end token
    (SCASRec's learnt EOR: the list stops when the model says so; start ``--algo scasrec`` from it)."""
    random_negatives: float = 0.0
    """Share of training windows whose other candidates are drawn uniformly from the catalogue (items
    outside the history) instead of the retriever's list: easy negatives make the relevance signal
    strong enough for a model trained from scratch to learn to point at a candidate by its identifier
    (its loss otherwise sits at log(window) for thousands of steps); the rest keep the hard ones."""
    teacher_reranker: str | None = None
    """``listwise`` only: a trained listwise reranker directory (``RUN/model``) whose FIRST ranking of each
    window (with its retriever prior) orders the teacher list after the held-out item, instead of the
    retriever's order (:func:`recsys.rerank.sft.reorder_teacher`): distils a reranker's whole ranking into
    the list the model writes, so that generation ranks every position (with ``supervise: list``)."""
    teacher_target: str = "first"
    """With ``teacher_reranker``: ``first`` (the held-out item leads the teacher list) or ``teacher`` (it stays
    where the teacher ranks it: pure distillation of the teacher's ranking)."""
    shuffle_candidates: bool = True
    """Present candidates in a seeded random order (True) or in the retriever's order (False)."""
    target_missing: str = "insert"
    """When the retriever missed the held-out item: ``insert`` it (replacing the last candidate),
    ``skip`` the example, or ``keep`` the list (the teacher is then the retriever's order). ``skip``
    keeps only windows like the test-time ones, where the target is among the retriever's own items."""
    train_split: str = "train"
    """Whose candidates teach: ``train`` (each user's last training item, history before it),
    ``valid`` (the validation item: targets the retriever never trained on) or ``train+valid``. The
    last ``val_users`` validation users are held out for model selection either way."""
    identifiers: str = "letters"
    """``letters`` (FIRST's ``A``..``T``) or, ``tiny`` only, ``items``: each candidate's own item token is
    its identifier (departure from FIRST). Letters ask a model trained from scratch to point at a
    candidate through its label, which the tiny model never learned (loss at ln(window) for 400k
    examples, ``listwise_pretrain_tiny.yaml``); an item token's logit scores the item directly."""
    retriever_prior: float | None = None
    """beta of FIRST's blend with the retriever's order, ``logit - beta * ln(1 + position)``
    (:mod:`recsys.rerank.listwise`); None = chosen from ``PRIOR_GRID`` after training (stored in
    ``reranker.json``) on every validation window no training example came from: all validation users
    when ``train_split`` is ``train``, else the ``val_users`` held out; 0 = the model alone."""
    prior_users: int | None = None
    """Choose the retriever prior on the first N of those validation windows only (None = all of them;
    a pretrained backbone on CPU scores about two windows a second)."""
    history_lm_weight: float = 0.0
    """``tiny`` only: weight of next-item cross-entropy at every history position of the prompt
    (SASRec's objective, on the same forward pass) added to the answer's losses; 0 = off. Under
    ``supervise: target`` a window teaches one label; this adds ``max_history - 1`` more."""
    init_items_from: str | None = None
    """``tiny`` only: a SASRec model directory whose item embeddings initialise the item tokens."""
    train_users: int | None = None
    """Use only the first N training examples (CPU budgets); None = all."""
    examples_per_epoch: int | None = None
    """Validate and checkpoint every N training examples (None = once per pass over the data); the
    epochs walk through successive shuffles, so every example is still seen once per pass."""
    val_users: int = 500
    """Validation examples scored each epoch (the last N users of the validation split)."""
    batch_size: int = 16
    """Training examples (windows) per step."""
    lr: float = 1e-3
    """AdamW learning rate (1e-3 suits tiny; use ~5e-5 for pretrained backbones)."""
    max_epochs: int = 3
    """At most this many epochs (passes, or ``examples_per_epoch`` chunks)."""
    max_minutes: float | None = None
    """Stop after this many minutes (the best checkpoint is kept); None: no cap."""
    seed: int = 0
    """Seeds the weights (tiny), the example order and the shuffles."""
    precision: str = "auto"
    """``auto``, ``32-true`` or ``bf16-mixed``; not part of a run's identity."""
    tiny_hidden_size: int = 128
    """``tiny`` only: width of the model built from config."""
    tiny_layers: int = 2
    """``tiny`` only: number of layers."""

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, ("listwise", "groupwise")),
                                     ("train_split", self.train_split, ("train", "valid", "train+valid")),
                                     ("target_missing", self.target_missing, ("insert", "skip", "keep")),
                                     ("supervise", self.supervise, ("list", "target", "auto_stop")),
                                     ("teacher_target", self.teacher_target, ("first", "teacher")),
                                     ("identifiers", self.identifiers, IDENTIFIERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.random_negatives <= 1.0:
            raise ValueError(f"random_negatives must be in [0, 1], got {self.random_negatives}")
        if self.domain is not None:
            domain_words(self.domain)
        if self.random_negatives and not self.shuffle_candidates:
            raise ValueError("random_negatives needs shuffle_candidates: the target leads a random window")
        if self.identifiers == "items" and (self.kind != "listwise" or self.backbone == "smollm2-135m"):
            raise ValueError("identifiers='items' is for the listwise reranker on the tiny backbone (item tokens)")
        if self.teacher_reranker and (self.kind != "listwise" or self.random_negatives):
            raise ValueError("teacher_reranker orders listwise windows from the retriever (random_negatives 0): "
                             "its retriever prior reads the window's order, which a random window does not have")
        if self.history_lm_weight and (self.kind != "listwise" or self.backbone == "smollm2-135m"):
            raise ValueError("history_lm_weight is for the listwise reranker on the tiny backbone (item-token history)")
        if self.supervise != "list" and self.kind != "listwise":
            raise ValueError(f"supervise={self.supervise!r} is a listwise objective; groupwise examples score "
                             "every candidate")


def random_candidates(rng: np.random.Generator, n_items: int, history, target: int, n: int) -> list[int]:
    """``target`` and ``n - 1`` distinct items drawn uniformly from 1..n_items outside ``history``."""
    seen = {int(h) for h in history} | {int(target)}
    out = [int(target)]
    while len(out) < n:
        item = int(rng.integers(1, n_items + 1))
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def teacher_orders(teacher: ListwiseReranker, examples: list, batch_size: int = 64, progress: bool = True,
                   target: str = "first") -> list:
    """``examples`` with the teacher reranker's FIRST ranking of each window (in the retriever's order,
    so its prior applies) after the held-out item (:func:`recsys.rerank.sft.reorder_teacher`)."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc="teacher reranker", disable=not progress):
        chunk = examples[i:i + batch_size]
        ranked = teacher.rank_windows([ex.history for ex in chunk], [list(ex.retriever_order) for ex in chunk],
                                      batch_size=batch_size)
        out += [reorder_teacher(ex, r, target) for ex, r in zip(chunk, ranked)]
    return out


def build_examples(rows: list[CandidateList], backbone: Backbone, config: RerankerSFTConfig, titles, seed: int,
                   n_items: int = 0, teacher: ListwiseReranker | None = None) -> list[dict]:
    """Encoded training examples (one per window, or per group for ``groupwise``) from candidate lists;
    a ``config.random_negatives`` share of them with random catalogue items as the other candidates;
    with a ``teacher`` reranker, its ranking orders each teacher list after the held-out item."""
    examples = []
    rng = np.random.default_rng([seed, 17])
    for i, r in enumerate(rows):
        cands = r.candidates
        if config.random_negatives and rng.random() < config.random_negatives:
            cands = random_candidates(rng, n_items, r.history, r.target, config.window)
        ex = teacher_example(r.history, cands, r.target, config.window, config.shuffle_candidates,
                             seed=seed * 1_000_003 + i, target_missing=config.target_missing)
        if ex is not None and (config.supervise != "target" or ex.target is not None):
            examples.append(ex)
    if teacher is not None:
        examples = teacher_orders(teacher, examples, target=config.teacher_target)
    out = []
    for ex in examples:
        if config.kind == "listwise":
            out.append(encode_example(backbone, ex, titles, config.max_history, config.supervise, config.identifiers,
                                      history_lm=config.history_lm_weight > 0))
        else:
            out += encode_group_examples(backbone, ex, config.group_size, titles, config.max_history)
    return out


class RerankerDataModule(L.LightningDataModule):
    """Training windows from ``config.train_split``; validation = the last ``val_users`` validation rows."""

    def __init__(self, dataset: PreparedDataset, candidates_dir, backbone: Backbone, config: RerankerSFTConfig,
                 titles: dict[int, str] | None):
        super().__init__()
        self.bb, self.cfg, self.titles = backbone, config, titles
        valid = read_candidate_lists(dataset, candidates_dir, "valid")
        rest, held_out = hold_out(valid, config.val_users)
        self.valid = held_out
        # Validation lists no training example came from: all of them unless validation targets teach.
        self.unseen_valid = valid if config.train_split == "train" else held_out
        train = []
        if config.train_split in ("train", "train+valid"):
            train += read_candidate_lists(dataset, candidates_dir, "train")
        if config.train_split in ("valid", "train+valid"):
            train += rest
        if config.train_users:
            train = train[:config.train_users]
        teacher = load_reranker(config.teacher_reranker, dataset, config.window) if config.teacher_reranker else None
        self.rows = build_examples(train, backbone, config, titles, config.seed, dataset.n_items, teacher)
        if not self.rows:
            raise RecsysError(f"{candidates_dir}: no training examples for split {config.train_split!r}")

    def train_dataloader(self):
        """Under data parallelism each process takes its share of each epoch's batches (:class:`ShardedBatches`)."""
        batches = ShardedBatches(EpochShuffle(len(self.rows), self.cfg.seed, self.cfg.examples_per_epoch),
                                 self.cfg.batch_size, *process_rank(self))
        return DataLoader(self.rows, batch_sampler=batches,
                          collate_fn=lambda rows: collate(rows, self.bb.tokenizer.pad_token_id))

    def val_dataloader(self):
        """Each process's validation rows: every ``world_size``-th (all of them in one process)."""
        rank, world = process_rank(self)
        return DataLoader(self.valid[rank::world], batch_size=self.cfg.batch_size, collate_fn=lambda rows: rows)


class RerankerSFTModule(L.LightningModule):
    """Language-model loss on the answer (+ FIRST's ranking loss for listwise); validation reranks
    each held-out user's window and reports candidate-set NDCG@10 of the held-out item."""

    def __init__(self, backbone: Backbone, config: RerankerSFTConfig, titles=None):
        super().__init__()
        self.bb, self.cfg = backbone, config
        # from_pretrained leaves a model in eval mode, and Lightning keeps each submodule's mode as it
        # finds it at the start of fit: without this, dropout would stay off for the whole run.
        self.model = backbone.model.train()
        self.scorer = make_scorer(backbone, config.kind, titles, config.window, group_size=config.group_size,
                                  max_history=config.max_history, bf16=False, identifiers=config.identifiers)
        self._ranks: list[float] = []

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(language-model loss on the answer, FIRST ranking loss or None, history next-item loss or None)
        of a collated batch.

        The LM head runs only from the earliest ``first_pos`` of the batch onwards (from the start when
        the batch has ``history_labels``): with left padding every answer label lies there, and the
        (T, vocabulary) logits of the prompt, which carry no label, would otherwise dominate the step
        for a 49k-token vocabulary (SmolLM2)."""
        T = batch["input_ids"].shape[1]
        history = batch.get("history_labels")
        start = 0 if history is not None else int(batch["first_pos"].min())
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], logits_to_keep=T - start)
        logits = out.logits.float()                                                    # (B, T - start, V)
        V = logits.shape[-1]
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, start + 1:].reshape(-1), ignore_index=-100)
        hist = None if history is None else F.cross_entropy(logits[:, :-1].reshape(-1, V), history[:, 1:].reshape(-1),
                                                            ignore_index=-100)
        if self.cfg.kind != "listwise" or self.cfg.first_weight <= 0:
            return lm, None, hist
        n = batch["ranks"].shape[1]
        at_first = logits[torch.arange(len(logits)), batch["first_pos"] - start]          # (B, V)
        scores = first_scores(at_first, batch["identifier_ids"][:, :n])                   # (B, n)
        return lm, weighted_ranknet_loss(scores, batch["ranks"], batch["ranks"] > 0), hist

    def training_step(self, batch, batch_idx):
        lm, rank_loss, hist = self.losses(batch)
        B = batch["input_ids"].shape[0]
        self.log("train/lm_loss", lm, prog_bar=True, batch_size=B)
        loss = lm
        if rank_loss is not None:
            self.log("train/first_loss", rank_loss, batch_size=B)
            loss = loss + self.cfg.first_weight * rank_loss
        if hist is not None:
            self.log("train/history_lm_loss", hist, prog_bar=True, batch_size=B)
            loss = loss + self.cfg.history_lm_weight * hist
        return loss

    def validation_step(self, rows: list[CandidateList], batch_idx):
        rows = [r.top(self.cfg.window) for r in rows]
        rows = [r for r in rows if r.has_target]
        if rows:
            for r, ranked in zip(rows, self.scorer.rank_windows([r.history for r in rows], [r.window for r in rows])):
                self._ranks.append(target_rank(ranked, r.target))

    def on_validation_epoch_end(self):
        # Candidate-set metrics, as `recsys rerank` defines them: only windows that hold the target; the
        # ranks of every process's rows (data parallelism), so the metric is one process's evaluation
        ranks = gather_rows(self, np.array(self._ranks, dtype=np.float64).reshape(-1, 1))
        self._ranks.clear()
        m = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10", "hr@1"]) if len(ranks) else {"ndcg@10": 0.0,
                                                                                                  "hr@1": 0.0}
        self.log("val/cand_ndcg@10", m["ndcg@10"], prog_bar=True)
        self.log("val/cand_hr@1", m["hr@1"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=0.0)


def init_item_embeddings(backbone: Backbone, sasrec_dir: str | Path) -> None:
    """Warm-start the ``tiny`` item tokens from a SASRec model's item embeddings.

    The (n_items, d) SASRec vectors fill the first d dimensions of the ``<i{idx}>`` rows (tied input and
    output embeddings), rescaled to the embedding's init std; the other dimensions keep their init.
    The reranker then starts knowing which items are alike, instead of learning it from a few
    thousand lists."""
    from recsys.models.sasrec import SASRec

    items = SASRec.from_pretrained(sasrec_dir).item_emb.weight[1:].detach().float()          # (n_items, d)
    emb = backbone.model.get_input_embeddings().weight
    first = backbone.token_id("<i1>")
    if backbone.token_id(f"<i{len(items)}>") != first + len(items) - 1:
        raise RecsysError(f"{sasrec_dir}: {len(items)} items do not match the backbone's item tokens")
    d = min(items.shape[1], emb.shape[1])
    with torch.no_grad():
        emb[first:first + len(items), :d] = items[:, :d] / items.std() * emb.std()


def train_reranker(dataset: PreparedDataset, candidates_dir, out, config: RerankerSFTConfig = RerankerSFTConfig(),
                   progress: bool = True, resume: bool | str = True, runtime: Runtime | None = None) -> Path:
    """SFT of a reranker on a candidates directory; saves the best model (HF layout) to ``out/model``."""
    out = Path(out)
    defining = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("max_epochs", "max_minutes", "precision")}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint,
                                   "candidates": str(Path(candidates_dir).resolve())}, resume,
                            dataclasses.asdict(RerankerSFTConfig()))
    L.seed_everything(config.seed, verbose=False)
    tiny = {"hidden_size": config.tiny_hidden_size, "num_layers": config.tiny_layers}
    backbone = load_backbone(config.backbone, n_items=dataset.n_items, **(tiny if config.backbone == "tiny" else {}))
    if config.init_items_from:
        init_item_embeddings(backbone, config.init_items_from)
    titles = None if backbone.name == "tiny" else item_titles(dataset, config.domain)
    data = RerankerDataModule(dataset, candidates_dir, backbone, config, titles)
    module = RerankerSFTModule(backbone, config, titles)
    best, latest = checkpoint_callbacks(out / "checkpoints", "val/cand_ndcg@10")
    timer = budget_timer(config.max_minutes)
    callbacks = [best, latest, RNGState(), timer]
    # use_distributed_sampler off: the datamodule shards its own batches and validation rows by rank
    trainer = make_trainer(out, runtime, progress=progress, max_epochs=config.max_epochs, precision=config.precision,
                           callbacks=callbacks, log_every_n_steps=5, use_distributed_sampler=False)
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    if not trainer.is_global_zero:                    # data parallel: the first process writes the model
        return out / "model"
    best_path, best_score = best_checkpoint(best)
    module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"])
    prior, prior_table = config.retriever_prior or 0.0, None
    if config.kind == "listwise" and config.retriever_prior is None:
        unseen = data.unseen_valid if config.prior_users is None else data.unseen_valid[:config.prior_users]
        prior, prior_table = tune_retriever_prior(module.scorer, unseen, config.window)
    backbone.model.save_pretrained(out / "model")
    backbone.tokenizer.save_pretrained(out / "model")
    (out / "model" / "reranker.json").write_text(json.dumps({
        "kind": config.kind, "prompt": "tiny" if backbone.name == "tiny" else "text", "window": config.window,
        "group_size": config.group_size, "max_history": config.max_history, "identifiers": config.identifiers,
        "retriever_prior": prior, "dataset_fingerprint": dataset.fingerprint}
        | ({"domain": titles.domain} if titles is not None else {}), indent=2))
    (out / "train.json").write_text(json.dumps({
        "kind": config.kind, "algo": "sft", "seconds": timer.time_elapsed("train"), "epochs": trainer.current_epoch,
        "best_val_cand_ndcg@10": best_score, "retriever_prior": prior,
        "val_cand_ndcg@10_by_retriever_prior": prior_table, "config": dataclasses.asdict(config),
        "dataset_fingerprint": dataset.fingerprint, "train_examples": len(data.rows)}, indent=2))
    return out / "model"


