"""SASRec training with Lightning: the datamodule, the module, and the ``train_sasrec`` job.

The module is thin: the loss is :meth:`recsys.models.SASRec.loss`, validation is the library's
full-ranking protocol (:func:`recsys.evaluation.full_ranking_ranks`) on the validation split.

Exact resume: batches are drawn by :class:`LengthBucketSampler` from a generator seeded by
(seed, epoch), and :class:`pipelines.callbacks.RNGState` stores the RNG states in every checkpoint,
so a run resumed from an epoch-end checkpoint continues bit-for-bit like the uninterrupted run.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipelines.callbacks import gather_rows, process_rank, shard_batches
from pipelines.optim import lr_scheduler
from recsys.data import PreparedDataset
from recsys.evaluation import full_ranking_ranks, tie_order
from recsys.metrics import compute_metrics
from recsys.models import SASRec, SASRecConfig


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in an order fixed by (seed, epoch).

    Users are shuffled, cut into chunks of 50 batches, sorted by length within a chunk, batched,
    and the batches shuffled again. Under data parallelism (``world_size`` processes) every process builds
    the same batches and keeps every ``world_size``-th from its ``rank``; the batches left over at the end
    are pooled and split into one per process, so that each process takes as many steps as the others and
    together they see every sequence once.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.seed, self.epoch = np.asarray(lengths), batch_size, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> LengthBucketSampler:
        """Itself: Lightning sets the epoch at the start of every epoch on ``dataloader.sampler`` and on
        ``dataloader.batch_sampler.sampler``, and this batch sampler is its own."""
        return self

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * 50
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return shard_batches(batches, self.rank, self.world_size)

    def __iter__(self):
        # a generator: the batches are drawn at the first one, after Lightning has set the epoch (it may create
        # the iterator before, e.g. when it resumes a run)
        yield from self._batches()

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size) if len(self.lengths) else 0
        return n // self.world_size + (n % self.world_size > 0)


def left_pad(rows: list[np.ndarray]) -> torch.Tensor:
    """(B, T) left-padded with 0, T = the longest row."""
    T = max(len(r) for r in rows)
    out = np.zeros((len(rows), T), dtype=np.int64)
    for row, r in zip(out, rows):
        row[T - len(r):] = r
    return torch.from_numpy(out)


class SequenceDataModule(L.LightningDataModule):
    """Training pairs (input = items[:-1], labels = items[1:], last ``max_len``) and validation
    examples (history -> held-out item, history masked) from a prepared dataset."""

    def __init__(self, dataset: PreparedDataset, max_len: int, batch_size: int, seed: int,
                 eval_batch_size: int = 256):
        super().__init__()
        self.dataset, self.max_len, self.batch_size, self.seed = dataset, max_len, batch_size, seed
        self.eval_batch_size = eval_batch_size
        self.train_seqs = [s[-(max_len + 1):] for s in dataset.train_sequences() if len(s) >= 2]
        self.valid = dataset.eval_examples("valid")

    def _collate_train(self, idx: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.train_seqs[i] for i in idx]
        return {"input_ids": left_pad([s[:-1] for s in seqs]), "labels": left_pad([s[1:] for s in seqs])}

    def _collate_eval(self, idx: list[int]) -> dict[str, torch.Tensor]:
        hist = [self.valid.histories[i] for i in idx]
        exclude = torch.zeros(len(idx), self.dataset.n_items + 1, dtype=torch.bool)
        for row, h in enumerate(hist):
            exclude[row, torch.from_numpy(h)] = True
        targets = torch.as_tensor(np.stack([self.valid.targets[i][:1] for i in idx]))
        return {"input_ids": left_pad([h[-self.max_len:] for h in hist]), "targets": targets, "exclude": exclude}

    def train_dataloader(self) -> DataLoader:
        sampler = LengthBucketSampler(np.array([len(s) for s in self.train_seqs]), self.batch_size, self.seed,
                                      *process_rank(self))
        return DataLoader(range(len(self.train_seqs)), batch_sampler=sampler, collate_fn=self._collate_train)

    def val_dataloader(self) -> DataLoader:
        """Each process's validation users: every ``world_size``-th (all of them in one process)."""
        rank, world = process_rank(self)
        return DataLoader(range(rank, len(self.valid.users), world), batch_size=self.eval_batch_size,
                          collate_fn=self._collate_eval)


class SASRecModule(L.LightningModule):
    """Trains :class:`SASRec` with its own loss; logs ``val/ndcg@10`` and ``val/hr@10`` (full ranking)."""

    def __init__(self, config: SASRecConfig, lr: float = 1e-3, weight_decay: float = 0.0,
                 dataset_fingerprint: str | None = None, lr_schedule: str = "constant", warmup_steps: int = 0,
                 lr_floor: float = 0.0):
        super().__init__()
        self.save_hyperparameters({"config": config.__dict__, "lr": lr, "weight_decay": weight_decay,
                                   "dataset_fingerprint": dataset_fingerprint, "lr_schedule": lr_schedule,
                                   "warmup_steps": warmup_steps, "lr_floor": lr_floor})
        self.model = SASRec(config, dataset_fingerprint)
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_schedule, self.warmup_steps, self.lr_floor = lr_schedule, warmup_steps, lr_floor
        self.register_buffer("order", tie_order(config.n_items), persistent=False)
        self._val_ranks: list[np.ndarray] = []

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(batch["input_ids"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        u = self.model.user_embeddings(batch["input_ids"]).float()
        scores = u @ self.model.item_emb.weight.float().T
        self._val_ranks.append(full_ranking_ranks(scores.cpu(), batch["targets"].cpu(), batch["exclude"].cpu(),
                                                  self.order.cpu()))

    def on_validation_epoch_end(self):
        ranks = gather_rows(self, np.concatenate(self._val_ranks))
        self._val_ranks.clear()
        m = compute_metrics(ranks, np.isfinite(ranks).astype(np.float64), ["ndcg@10", "hr@10"])
        self.log("val/ndcg@10", m["ndcg@10"], prog_bar=True)
        self.log("val/hr@10", m["hr@10"], prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=self.weight_decay)
        # The cosine spans max_epochs: early stopping or a time cap before then ends it above the floor.
        scheduler = lr_scheduler(optimizer, self.lr_schedule, self.trainer.estimated_stepping_batches,
                                 self.warmup_steps, self.lr_floor)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer
