"""Training jobs for the retrievers: ``train_popularity`` and ``train_sasrec``.

A run directory holds::

    model/             the best checkpoint's model, in Hugging Face layout (config.json, model.safetensors)
    checkpoints/       Lightning checkpoints: best.ckpt and last.ckpt (resume from it)
    logs/version_N/    CSV logs of each invocation (train loss, val metrics per epoch)
    run.json           what defines the run (config, dataset fingerprint): a resume must match it
    train.json         the config, seconds, epochs and best validation metrics
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.trainer import Runtime
from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.models import Popularity, SASRecConfig


@dataclass(frozen=True)
class SASRecTrainConfig:
    """Everything that defines a SASRec training run (model, optimisation, stopping)."""

    model: SASRecConfig = field(default_factory=SASRecConfig)
    """Architecture and loss (``n_items`` is filled in from the dataset)."""
    batch_size: int = 32
    """Users per batch (32 gives 4x the updates per epoch of 128 at the same cost, and converges faster)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (linear warmup, then cosine decay over ``max_epochs`` to ``lr_floor`` x lr)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warmup (``cosine`` only)."""
    lr_floor: float = 0.0
    """Final learning rate as a fraction of ``lr`` (``cosine`` only)."""
    max_epochs: int = 200
    """Upper bound on epochs."""
    patience: int = 8
    """Early stopping: validation checks without NDCG@10 improvement."""
    val_every: int = 1
    """Validate every this many epochs."""
    max_minutes: float | None = None
    """Stop training after this wall-clock time (the best checkpoint so far is kept)."""
    seed: int = 0
    """Seed of initialisation, dropout and batch order."""
    precision: str = "auto"
    """Lightning precision; ``auto`` = ``bf16-mixed`` where bf16 is fast (GPUs, AMX CPUs), else ``32-true``
    (:mod:`recsys.precision`). Not part of a run's identity: a run resumes on a machine of another kind."""
    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""

    def __post_init__(self):
        from pipelines.optim import SCHEDULES

        if self.lr_schedule not in SCHEDULES:
            raise RecsysError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")

    def model_config(self, n_items: int) -> SASRecConfig:
        return dataclasses.replace(self.model, n_items=n_items)


# Stopping rules and threads may change on resume; max_epochs too, unless a cosine schedule spans it.
RESUMABLE_CHANGES = ("max_epochs", "patience", "max_minutes", "num_threads", "precision")

PRESETS = {
    # What the main job (`recsys quickstart`, its default preset) trains: a few minutes on a 2-core CPU, below
    # the published numbers.
    "short": {"max_epochs": 10, "max_minutes": 7.0},
    # The benchmark recipe (pipelines/configs/sasrec_ml1m.yaml gives the measured result).
    "full": {},
}
"""``recsys train retriever --preset``: overrides of :class:`SASRecTrainConfig` (the quickstart reads them too)."""


def train_popularity(dataset: PreparedDataset, out: str | Path) -> Path:
    """Count training interactions; save the model to ``out/model``."""
    out = Path(out)
    start = time.time()
    Popularity.fit(dataset).save_pretrained(out / "model")
    (out / "train.json").write_text(json.dumps({"model_type": "popularity", "seconds": time.time() - start,
                                                "dataset": str(dataset.directory)}, indent=2))
    return out / "model"


def train_sasrec(dataset: PreparedDataset, out: str | Path, config: SASRecTrainConfig = SASRecTrainConfig(), *,
                 resume: bool | str = True, progress: bool = True, runtime: Runtime | None = None) -> Path:
    """Train SASRec with early stopping on validation NDCG@10; save the best model to ``out/model``.

    With ``resume`` and an existing ``out/checkpoints/last.ckpt`` whose config matches, training
    continues from it exactly.
    """
    import lightning as L

    from pipelines.callbacks import (
        RNGState,
        best_checkpoint,
        budget_timer,
        checkpoint_callbacks,
        early_stopping,
        resume_checkpoint,
    )
    from pipelines.sasrec import SASRecModule, SequenceDataModule
    from pipelines.trainer import make_trainer

    out = Path(out)
    # What defines the run; stopping rules and threads may change on resume (e.g. train for longer).
    resumable = RESUMABLE_CHANGES if config.lr_schedule == "constant" else tuple(
        k for k in RESUMABLE_CHANGES if k != "max_epochs")
    defining = {k: v for k, v in dataclasses.asdict(config).items() if k not in resumable}
    last = resume_checkpoint(out, {"config": defining, "dataset_fingerprint": dataset.fingerprint}, resume,
                             dataclasses.asdict(SASRecTrainConfig()))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    L.seed_everything(config.seed, verbose=False)
    model_config = config.model_config(dataset.n_items)
    module = SASRecModule(model_config, config.lr, config.weight_decay, dataset.fingerprint, config.lr_schedule,
                          config.warmup_steps, config.lr_floor)
    data = SequenceDataModule(dataset, model_config.max_len, config.batch_size, config.seed)
    best, latest = checkpoint_callbacks(out / "checkpoints", "val/ndcg@10")
    timer = budget_timer(config.max_minutes)
    callbacks = [best, latest, early_stopping("val/ndcg@10", config.patience), RNGState(), timer]
    # use_distributed_sampler off: the datamodule shards its own batches and validation users by rank
    trainer = make_trainer(out, runtime, progress=progress, max_epochs=config.max_epochs, precision=config.precision,
                           callbacks=callbacks, check_val_every_n_epoch=config.val_every, log_every_n_steps=10,
                           use_distributed_sampler=False)
    trainer.fit(module, data, ckpt_path=str(last) if last else None)
    if not trainer.is_global_zero:                    # data parallel: the first process writes the model
        return out / "model"
    seconds = timer.time_elapsed("train")
    best_path, best_score = best_checkpoint(best)
    best_module = SASRecModule.load_from_checkpoint(best_path, config=model_config, weights_only=False)
    best_module.model.save_pretrained(out / "model")
    summary = {"model_type": "sasrec", "seconds": seconds, "epochs": trainer.current_epoch,
               "best_val_ndcg@10": best_score, "dataset": str(dataset.directory),
               "dataset_fingerprint": dataset.fingerprint, "config": dataclasses.asdict(config)}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    return out / "model"
