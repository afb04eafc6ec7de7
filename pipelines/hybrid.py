"""The hybrid-token FIRST reranker job (:mod:`recsys.rerank.hybrid`, LLaRA's soft item tokens in a pretrained
LM): Lightning training on retriever windows, and the scorer it saves.

Each training window is a user's history (its last ``max_history`` items) and ``window`` candidates in a
seeded random order: the retriever's list at one of the user's last training items, or, for a
``random_negatives`` share, the held-out item among catalogue items drawn uniformly. The loss is the
cross-entropy of the held-out item's identifier among the window's (FIRST's first-token target,
arXiv 2406.15657). Validation: candidate-set NDCG@10 of the model's FIRST order on the last ``val_users``
validation windows that hold their target; the best checkpoint is kept.

A run directory holds::

    model/hybrid.safetensors   the trained weights (projector, and the LM's trained layers or adapters)
    model/hybrid.json          what rebuilds the model: the config, the retriever, the dataset fingerprint
    checkpoints/, logs/        Lightning's (a rerun resumes from checkpoints/last.ckpt)
    train.json                 seconds, epochs, examples, the best validation score

``pretrained: false`` builds the same architecture with random weights (the ``-scratch`` control: does the
language pretraining help, or only the architecture and the soft tokens?).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from pipelines.callbacks import (
    EpochShuffle,
    RNGState,
    best_checkpoint,
    budget_timer,
    checkpoint_callbacks,
    resume_checkpoint,
)
from pipelines.trainer import Runtime, make_trainer
from recsys.data import PreparedDataset
from recsys.data.candidates import hold_out, read_candidate_lists
from recsys.errors import RecsysError
from recsys.rerank.first import first_order
from recsys.types import CandidateList


@dataclass(frozen=True)
class HybridTrainConfig:
    """A hybrid-token reranker run."""

    retriever: str = ""
    """SASRec model directory whose item embeddings the projector maps into the LM (required)."""
    backbone: str = "smollm2-135m"
    """``smollm2-135m`` or a local Hugging Face causal-LM checkpoint directory."""
    pretrained: bool = True
    """False: the same architecture with random weights (the ``-scratch`` control)."""
    keep_layers: int | None = 4
    """Keep the first N decoder layers (None = all)."""
    title_words: int | None = 0
    """Title words before each soft token (0 = the soft token alone, None = whole titles)."""
    lora_r: int = 0
    """LoRA rank on every linear layer (peft); 0 = train the kept layers in full."""
    text_layers: int | None = None
    """Give the projector each item's catalogue text as the LM reads it: hidden states after its first N layers,
    mean-pooled (:func:`recsys.rerank.hybrid.text_states`; the pretrained knowledge's way in when
    ``title_words`` is 0). None = the retriever vector alone."""
    soft_token_input: str | None = None
    """What the projector maps into each soft token: None = the retriever's item vector (and the text state with
    ``text_layers``); ``text`` = the text state alone (needs ``text_layers``): a content reranker whose only
    knowledge of an item is the LM's reading of its text, so its pretraining is the only source of what it knows
    about items beyond the training windows."""
    domain: str | None = None
    """The prompt's words for the items (a ``domains`` key of ``recsys/portable/templates.yaml``); None = the
    dataset's own."""
    prompt: str = "listwise"
    """``listwise``: the chat prompt with the candidates' identifiers; ``compact``: the items' soft tokens with a
    few words around them (:func:`recsys.rerank.hybrid.compact_prompt`, about a fifth of the tokens; needs
    ``identifiers: items``)."""
    identifiers: str = "items"
    """How FIRST names a candidate: ``items`` (its own soft token is its output row; the last hidden state is
    scored against it) or ``letters`` (A, B, ...: the model must first learn to point from a letter to the
    item, which SmolLM2's first 4 layers had not after 4,000 windows)."""
    window: int = 20
    """Candidates per prompt (the FIRST window)."""
    max_history: int = 20
    """Most recent history items in the prompt."""
    random_negatives: float = 0.5
    """Share of training windows whose other candidates are random catalogue items."""
    target_missing: str = "insert"
    """A retriever window without the held-out item (training and validation): ``insert`` it in place of the
    window's last candidate, or ``skip`` the window. Inserted, it is the one item the retriever did not put
    there, which a model can learn to spot; evaluation windows never hold such an intruder."""
    history_lm_weight: float = 0.0
    """Weight of a next-item cross-entropy at every history ``<item>`` of the prompt against the whole
    catalogue (:meth:`recsys.rerank.hybrid.HybridFirst.history_loss`, SASRec's objective on the same forward
    pass), added to the window's loss; 0 = off. Needs ``identifiers: items``."""
    train_users: int | None = None
    """Use only the first N training rows (CPU budgets); None = all."""
    examples_per_epoch: int | None = 4000
    """Validate and checkpoint every N training windows."""
    val_users: int = 300
    """Validation windows (the last validation rows that hold their target)."""
    batch_size: int = 8
    """Training windows per step."""
    lr: float = 1e-4
    """AdamW learning rate of the LM's trainable weights."""
    projector_lr: float = 1e-3
    """AdamW learning rate of the projector (and its text-state input)."""
    max_epochs: int = 100
    """At most this many epochs of ``examples_per_epoch`` windows."""
    max_minutes: float | None = 20.0
    """Stop after this many minutes of training (the best checkpoint is kept); None: no cap."""
    seed: int = 0
    """Seeds the window order and, with ``pretrained: false``, the random weights."""
    precision: str = "32-true"
    """Lightning precision; not part of a run's identity."""

    def __post_init__(self):
        if self.domain is not None:
            from recsys.portable.prompts import domain_words

            domain_words(self.domain)
        if self.identifiers not in ("items", "letters"):
            raise RecsysError(f"identifiers must be 'items' or 'letters', got {self.identifiers!r}")
        if self.prompt not in ("listwise", "compact") or (self.prompt == "compact" and self.identifiers != "items"):
            raise RecsysError(f"prompt must be 'listwise' or 'compact' (which needs identifiers 'items'), got "
                              f"{self.prompt!r} with identifiers {self.identifiers!r}")
        if self.target_missing not in ("insert", "skip"):
            raise RecsysError(f"target_missing must be 'insert' or 'skip', got {self.target_missing!r}")
        if not 0.0 <= self.random_negatives <= 1.0:
            raise RecsysError(f"random_negatives must be in [0, 1], got {self.random_negatives}")
        if self.soft_token_input not in (None, "text") or (self.soft_token_input and not self.text_layers):
            raise RecsysError(f"soft_token_input must be None (the retriever's vector) or 'text' (which needs "
                              f"text_layers), got {self.soft_token_input!r} with text_layers {self.text_layers}")
        if self.history_lm_weight < 0 or (self.history_lm_weight and self.identifiers != "items"):
            raise RecsysError(f"history_lm_weight must be >= 0 and needs identifiers 'items' (got "
                              f"{self.history_lm_weight}, {self.identifiers!r})")


def item_vectors(dataset: PreparedDataset, retriever: str | Path) -> torch.Tensor:
    """(n_items + 1, d) the retriever's item embeddings; a catalogue of another size is an error naming both."""
    from recsys.models.sasrec import SASRec

    if not retriever:
        raise RecsysError("a hybrid reranker needs retriever: the SASRec model directory of its item vectors")
    vectors = SASRec.from_pretrained(retriever).item_emb.weight.detach().float()
    if vectors.shape[0] != dataset.n_items + 1:
        raise RecsysError(f"{retriever}: {vectors.shape[0] - 1} item embeddings, but dataset {dataset.name} has "
                          f"{dataset.n_items} items; train the retriever on this dataset")
    return vectors


def build_model(config: HybridTrainConfig, dataset: PreparedDataset):
    """The :class:`recsys.rerank.hybrid.HybridFirst` of ``config`` (untrained projector)."""
    from recsys.llm.backbone import Backbone, load_backbone
    from recsys.rerank.hybrid import HybridFirst

    bb = load_backbone(config.backbone)
    if not config.pretrained:                           # the same config and vocabulary, fresh random weights
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            lm = AutoModelForCausalLM.from_config(bb.model.config, dtype=torch.float32)
        bb = Backbone(lm, bb.tokenizer, f"{bb.name}-scratch")
    texts = dataset.catalog.sort("idx")["text"].to_list() if config.text_layers else None
    model = HybridFirst(bb, item_vectors(dataset, config.retriever), keep_layers=config.keep_layers,
                        n_items=dataset.n_items, item_texts=texts, text_layers=config.text_layers,
                        retriever_input=config.soft_token_input is None)
    if config.lora_r:
        model.lora(r=config.lora_r, alpha=2 * config.lora_r)
    return model


@dataclass
class Window:
    history: list[int]
    candidates: list[int]
    target: int
    """Position of the held-out item in ``candidates`` (-1 if the window lacks it)."""


def windows(rows: list[CandidateList], config: HybridTrainConfig, n_items: int, seed: int,
            random_share: float) -> list[Window]:
    """A shuffled :class:`Window` per candidate list; a ``random_share`` of them with uniformly drawn negatives
    instead of the retriever's list; a retriever list without the held-out item as ``config.target_missing``
    says."""
    from pipelines.reranker import random_candidates

    rng = np.random.default_rng([seed, 29])
    out = []
    for r in rows:
        cands = r.top(config.window).window
        if rng.random() < random_share:
            cands = random_candidates(rng, n_items, r.history, r.target, config.window)
        elif r.target not in cands:
            if config.target_missing == "skip":
                continue
            cands[-1] = r.target
        rng.shuffle(cands)
        out.append(Window([int(h) for h in r.history[-config.max_history:]], cands, cands.index(r.target)))
    return out


class HybridDataModule(L.LightningDataModule):
    def __init__(self, dataset: PreparedDataset, candidates_dir, config: HybridTrainConfig):
        super().__init__()
        self.cfg = config
        train = read_candidate_lists(dataset, candidates_dir, "train")
        train = train[:config.train_users] if config.train_users else train
        self.train = windows(train, config, dataset.n_items, config.seed, config.random_negatives)
        _, valid = hold_out(read_candidate_lists(dataset, candidates_dir, "valid"), config.val_users)
        self.valid = [w for w in windows(valid, config, dataset.n_items, config.seed + 1, 0.0) if w.target >= 0]

    def train_dataloader(self):
        sampler = EpochShuffle(len(self.train), self.cfg.seed, self.cfg.examples_per_epoch)
        return DataLoader(self.train, batch_size=self.cfg.batch_size, sampler=sampler, collate_fn=list)

    def val_dataloader(self):
        return DataLoader(self.valid, batch_size=16, collate_fn=list)


def encode_windows(model, windows_: list[Window], titles, config):
    """The :class:`recsys.rerank.hybrid.HybridBatch` of the windows' prompts."""
    from recsys.rerank.hybrid import encode

    return encode(model.backbone, [w.history for w in windows_], [w.candidates for w in windows_], titles,
                  config.max_history, config.title_words, config.prompt)


def window_scores(model, windows_: list[Window], titles, config) -> torch.Tensor:
    """(B, n) FIRST scores of each window's candidates, in presentation order (``config.identifiers``)."""
    batch = encode_windows(model, windows_, titles, config)
    if config.identifiers == "items":
        items = torch.tensor([w.candidates for w in windows_], device=batch.input_ids.device)
        return model.item_scores(batch, items)
    return model.first_scores(batch, model.backbone.identifier_ids(len(windows_[0].candidates)))


class HybridModule(L.LightningModule):
    def __init__(self, model, config: HybridTrainConfig, titles):
        super().__init__()
        self.model, self.cfg, self.titles = model, config, titles
        self.model.train()                         # a loaded checkpoint comes in eval mode

    def training_step(self, batch: list[Window], batch_idx):
        target = torch.tensor([w.target for w in batch])
        if not self.cfg.history_lm_weight:
            scores = window_scores(self.model, batch, self.titles, self.cfg)
            loss = F.cross_entropy(scores.float(), target.to(scores.device))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
            return loss
        encoded = encode_windows(self.model, batch, self.titles, self.cfg)
        items = torch.tensor([w.candidates for w in batch])
        scores, history = self.model.window_and_history_scores(encoded, items)
        first = F.cross_entropy(scores.float(), target.to(scores.device))
        history_loss = self.model.history_loss(history, encoded)
        self.log("train/loss", first, prog_bar=True, batch_size=len(batch))
        self.log("train/history_lm_loss", history_loss, prog_bar=True, batch_size=len(batch))
        return first + self.cfg.history_lm_weight * history_loss

    def validation_step(self, batch: list[Window], batch_idx):
        order = first_order(window_scores(self.model, batch, self.titles, self.cfg).float())
        target = torch.tensor([w.target for w in batch], device=order.device)
        rank = (order == target[:, None]).float().argmax(1)
        ndcg = torch.where(rank < 10, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
        self.log("val/cand_ndcg@10", ndcg.mean(), prog_bar=True, batch_size=len(batch))

    def configure_optimizers(self):
        projector = list(self.model.projector.parameters())
        ids = {id(p) for p in projector}
        lm = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        return torch.optim.AdamW([{"params": projector, "lr": self.cfg.projector_lr},
                                  {"params": lm, "lr": self.cfg.lr}])


def trained_state(model) -> dict[str, torch.Tensor]:
    """The model's weights without the retriever vectors (``build_model`` reloads them) and with each tied
    tensor once (the LM head shares the input embedding)."""
    out, seen = {}, set()
    for k, v in model.state_dict(keep_vars=False).items():
        if k.startswith("projector.items") or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous()
    return out


def train_hybrid(dataset: PreparedDataset, candidates_dir, out, config: HybridTrainConfig, progress: bool = True,
                 resume: bool | str = True, runtime: Runtime | None = None) -> Path:
    """Train; save the best model to ``out/model``; return that directory."""
    from recsys.portable.prompts import item_titles

    out = Path(out)
    defining = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("max_epochs", "max_minutes")}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint,
                                   "candidates": str(Path(candidates_dir).resolve())}, resume,
                              dataclasses.asdict(HybridTrainConfig()))
    L.seed_everything(config.seed, verbose=False)
    start = time.time()
    model = build_model(config, dataset)
    titles = item_titles(dataset, config.domain)   # the words are dropped with title_words 0; the domain stays
    data = HybridDataModule(dataset, candidates_dir, config)
    module = HybridModule(model, config, titles)
    best, latest = checkpoint_callbacks(out / "checkpoints", "val/cand_ndcg@10")
    timer = budget_timer(config.max_minutes)
    trainer = make_trainer(out, runtime, progress=progress, max_epochs=config.max_epochs, precision=config.precision,
                           callbacks=[best, latest, RNGState(), timer], log_every_n_steps=10)
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    best_path, best_score = best_checkpoint(best)
    module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"])
    (out / "model").mkdir(parents=True, exist_ok=True)
    save_file(trained_state(module.model), str(out / "model" / "hybrid.safetensors"))
    (out / "model" / "hybrid.json").write_text(json.dumps({"config": dataclasses.asdict(config),
                                                           "dataset_fingerprint": dataset.fingerprint}, indent=2))
    (out / "train.json").write_text(json.dumps({
        "seconds": round(time.time() - start, 1), "train_seconds": timer.time_elapsed("train"),
        "epochs": trainer.current_epoch, "best_val_cand_ndcg@10": best_score, "train_windows": len(data.train),
        "config": dataclasses.asdict(config), "dataset_fingerprint": dataset.fingerprint}, indent=2))
    return out / "model"


def load_hybrid(model_dir, dataset: PreparedDataset):
    """(the trained model in eval mode, its config) from ``RUN/model``."""
    from pipelines.jobs import read_model_meta

    model_dir = Path(model_dir)
    config = HybridTrainConfig(**read_model_meta(model_dir, "hybrid.json", dataset, "a hybrid reranker")["config"])
    model = build_model(config, dataset)
    saved = load_file(str(model_dir / "hybrid.safetensors"))
    missing, unexpected = model.load_state_dict(saved, strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in saved}
    if unexpected or [k for k in missing if not k.startswith("projector.items") and state[k].data_ptr() not in loaded]:
        raise RecsysError(f"{model_dir}: weights do not match the model ({len(missing)} missing, {len(unexpected)} "
                          "unexpected)")
    return model.eval(), config
