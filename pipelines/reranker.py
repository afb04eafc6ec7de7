"""Listwise reranker SFT with Lightning: datamodule, module, and the ``train_reranker`` job.

The module adds nothing to the maths: the language-model loss is cross-entropy on the answer tokens
(labels from :mod:`recsys.rerank.sft`), the optional ranking term is
:func:`recsys.rerank.first.weighted_ranknet_loss` on the first-token logits (weight ``first_weight``,
FIRST's lambda; 0 = off). Validation: FIRST reranking of each validation user's candidate window,
scored by candidate-set NDCG@10 of the held-out item (over the windows that contain it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipelines.callbacks import EpochShuffle, RNGState, checkpoint_callbacks, resume_checkpoint
from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.llm.backbone import Backbone, load_backbone
from recsys.metrics import compute_metrics
from recsys.rerank.first import first_scores, weighted_ranknet_loss
from recsys.rerank.listwise import ListwiseReranker
from recsys.rerank.sft import collate, encode_example, teacher_example


@dataclass(frozen=True)
class RerankerSFTConfig:
    """A listwise reranker SFT run."""

    backbone: str = "tiny"
    """``tiny``, ``smollm2-135m`` or a checkpoint directory."""
    window: int = 20
    """Candidates per prompt (identifiers A..)."""
    max_history: int = 20
    """Most recent history items in the prompt."""
    first_weight: float = 0.0
    """Weight of FIRST's weighted RankNet loss on first-token logits (paper: 10; 0 = off)."""
    shuffle_candidates: bool = True
    """Present candidates in a seeded random order during training."""
    train_users: int | None = None
    """Use only the first N training examples (CPU budgets); None = all."""
    val_users: int = 500
    """Validation examples scored each epoch."""
    batch_size: int = 16
    lr: float = 1e-3
    """AdamW learning rate (1e-3 suits tiny; use ~5e-5 for pretrained backbones)."""
    max_epochs: int = 3
    max_minutes: float | None = None
    seed: int = 0
    precision: str = "bf16-mixed"
    tiny_hidden_size: int = 128
    """``tiny`` only: width of the model built from config."""
    tiny_layers: int = 2
    """``tiny`` only: number of layers."""


def load_candidates(directory: str | Path, split: str) -> pl.DataFrame:
    path = Path(directory) / f"candidates_{split}.parquet"
    if not path.exists():
        raise RecsysError(f"{path}: no candidates for split {split!r}; run `recsys candidates` first")
    return pl.read_parquet(path)


class RerankerDataModule(L.LightningDataModule):
    def __init__(self, dataset: PreparedDataset, candidates_dir, backbone: Backbone, config: RerankerSFTConfig,
                 titles: dict[int, str] | None):
        super().__init__()
        self.bb, self.cfg, self.titles = backbone, config, titles
        train = load_candidates(candidates_dir, "train")
        if config.train_users:
            train = train.head(config.train_users)
        self.valid = load_candidates(candidates_dir, "valid").head(config.val_users)
        histories = dataset.train_sequences()
        self.rows = []
        for i, r in enumerate(train.iter_rows(named=True)):
            hist = histories[r["uidx"]][:r["history_length"]]
            ex = teacher_example(hist, r["candidates"], r["target"], config.window, config.shuffle_candidates,
                                 seed=config.seed * 1_000_003 + i)
            self.rows.append(encode_example(backbone, ex, titles, config.max_history))
        self.valid_histories = dataset.eval_examples("valid").histories

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.cfg.batch_size, sampler=EpochShuffle(len(self.rows), self.cfg.seed),
                          collate_fn=lambda rows: collate(rows, self.bb.tokenizer.pad_token_id))

    def val_dataloader(self):
        return DataLoader(list(self.valid.iter_rows(named=True)), batch_size=self.cfg.batch_size,
                          collate_fn=lambda rows: rows)


class ListwiseSFTModule(L.LightningModule):
    def __init__(self, backbone: Backbone, config: RerankerSFTConfig, titles=None, valid_histories=None):
        super().__init__()
        self.bb, self.cfg = backbone, config
        self.model = backbone.model
        self.reranker = ListwiseReranker(backbone, titles, config.window, max_history=config.max_history, bf16=False)
        self.valid_histories = valid_histories
        self._ranks: list[float] = []

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"])
        logits = out.logits[:, :-1].float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss = lm
        if self.cfg.first_weight > 0:
            n = batch["ranks"].shape[1]
            at_first = out.logits[torch.arange(len(logits)), batch["first_pos"]].float()        # (B, V)
            scores = first_scores(at_first, self.bb.identifier_ids(n).to(at_first.device))   # (B, n)
            rank_loss = weighted_ranknet_loss(scores, batch["ranks"], batch["ranks"] > 0)
            self.log("train/first_loss", rank_loss, batch_size=len(logits))
            loss = lm + self.cfg.first_weight * rank_loss
        self.log("train/lm_loss", lm, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, rows, batch_idx):
        windows = [list(r["candidates"][:self.cfg.window]) for r in rows]
        hists = [self.valid_histories[r["uidx"]] for r in rows]
        for r, cands, s in zip(rows, windows, self.reranker.first_scores(hists, windows)):
            order = torch.sort(s, descending=True, stable=True).indices.tolist()
            ranked = [cands[i] for i in order]
            self._ranks.append(float(ranked.index(r["target"])) if r["target"] in ranked else np.inf)

    def on_validation_epoch_end(self):
        # Candidate-set metrics, as `recsys rerank` defines them: only windows that hold the target.
        ranks = np.array(self._ranks)
        self._ranks.clear()
        ranks = ranks[np.isfinite(ranks)][:, None]
        m = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10", "hr@1"]) if len(ranks) else {"ndcg@10": 0.0,
                                                                                                  "hr@1": 0.0}
        self.log("val/cand_ndcg@10", m["ndcg@10"], prog_bar=True)
        self.log("val/cand_hr@1", m["hr@1"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=0.0)


def item_titles(dataset: PreparedDataset) -> dict[int, str]:
    cat = dataset.catalog
    return {int(i): f"{t} ({y})" if y is not None else t for i, t, y in cat.select("idx", "title", "year").iter_rows()}


def train_reranker(dataset: PreparedDataset, candidates_dir, out, config: RerankerSFTConfig = RerankerSFTConfig(),
                   progress: bool = True, resume: bool = True) -> Path:
    """SFT of a listwise reranker on a candidates directory; saves the best model (HF layout) to ``out/model``."""
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.loggers import CSVLogger

    out = Path(out)
    defining = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("max_epochs", "max_minutes")}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint,
                                   "candidates": str(Path(candidates_dir).resolve())}, resume)
    L.seed_everything(config.seed, verbose=False)
    tiny = dict(hidden_size=config.tiny_hidden_size, num_layers=config.tiny_layers)
    backbone = load_backbone(config.backbone, n_items=dataset.n_items, **(tiny if config.backbone == "tiny" else {}))
    titles = None if backbone.name == "tiny" else item_titles(dataset)
    data = RerankerDataModule(dataset, candidates_dir, backbone, config, titles)
    module = ListwiseSFTModule(backbone, config, titles, data.valid_histories)
    best, latest = checkpoint_callbacks(out / "checkpoints", "val/cand_ndcg@10")
    callbacks = [best, latest, RNGState()] + ([Timer(duration={"minutes": config.max_minutes})] if config.max_minutes else [])
    trainer = L.Trainer(max_epochs=config.max_epochs, precision=config.precision, accelerator="auto", devices=1,
                        callbacks=callbacks, logger=CSVLogger(out, name="logs"), num_sanity_val_steps=0,
                        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=5)
    start = time.time()
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    backbone.model.save_pretrained(out / "model")
    backbone.tokenizer.save_pretrained(out / "model")
    (out / "model" / "reranker.json").write_text(json.dumps({
        "kind": "listwise", "prompt": "tiny" if backbone.name == "tiny" else "text", "window": config.window,
        "max_history": config.max_history, "dataset_fingerprint": dataset.fingerprint}, indent=2))
    (out / "train.json").write_text(json.dumps({
        "kind": "listwise", "algo": "sft", "seconds": time.time() - start, "epochs": trainer.current_epoch,
        "best_val_cand_ndcg@10": float(best.best_model_score), "config": dataclasses.asdict(config),
        "dataset_fingerprint": dataset.fingerprint, "train_examples": len(data.rows)}, indent=2))
    return out / "model"


def rerank_candidates(dataset: PreparedDataset, model_dir, candidates_dir, out, split: str = "test",
                      window: int = 20, stride: int = 10, limit: int | None = None, progress: bool = True) -> dict:
    """Rerank ``candidates_<split>.parquet`` with a trained listwise reranker (FIRST, sliding window).

    Writes ``reranked_<split>.parquet`` and ``rerank_metrics_<split>.json``. Two views, labelled:
    ``pipeline`` metrics rank the held-out item over the whole catalog (a target the retriever missed
    is a miss), ``cand_`` metrics only over the examples whose target is among the candidates.
    """
    from tqdm.auto import tqdm

    meta_path = Path(model_dir) / "reranker.json"
    if not meta_path.exists():
        raise RecsysError(f"{model_dir}: no reranker.json; pass the model/ directory written by `recsys train reranker`")
    meta = json.loads(meta_path.read_text())
    if meta["dataset_fingerprint"] != dataset.fingerprint:
        raise RecsysError(f"{model_dir} was trained on dataset {meta['dataset_fingerprint']}, not {dataset.fingerprint}")
    bb = load_backbone(model_dir)
    bb.name = meta["prompt"] if meta["prompt"] == "tiny" else bb.name       # the prompt format it was trained on
    titles = item_titles(dataset) if meta["prompt"] == "text" else None
    rr = ListwiseReranker(bb, titles, window, stride, max_history=meta["max_history"])
    df = load_candidates(candidates_dir, split)
    df = df.head(limit) if limit else df
    examples = dataset.eval_examples(split)
    histories = dict(zip(examples.users.tolist(), examples.histories))
    reranked, before, after = [], [], []
    for r in tqdm(df.iter_rows(named=True), total=df.height, desc=f"rerank {split}", disable=not progress):
        cands = list(r["candidates"])
        new = rr.rerank(histories[r["uidx"]], cands)
        reranked.append(new)
        before.append(cands.index(r["target"]) if r["target"] in cands else np.inf)
        after.append(new.index(r["target"]) if r["target"] in new else np.inf)
    names = ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"]
    result = {}
    for label, ranks in (("retriever", np.array(before)), ("reranked", np.array(after))):
        full = compute_metrics(ranks[:, None], np.ones((len(ranks), 1)), names)
        found = np.isfinite(ranks)
        cand = compute_metrics(ranks[found][:, None], np.ones((int(found.sum()), 1)), names)
        result[label] = {**{m: full[m] for m in names}, **{f"cand_{m}": cand[m] for m in names},
                         "num_queries": full["num_queries"], "target_in_candidates": float(found.mean())}
    Path(out).mkdir(parents=True, exist_ok=True)
    df.with_columns(pl.Series("reranked", reranked, dtype=pl.List(pl.Int32))).write_parquet(
        Path(out) / f"reranked_{split}.parquet")
    (Path(out) / f"rerank_metrics_{split}.json").write_text(json.dumps(result, indent=2))
    return result
