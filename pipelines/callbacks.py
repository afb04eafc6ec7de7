"""Lightning callbacks shared by the training modules."""

from __future__ import annotations

import random
import sys
import time

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler

from recsys.errors import RecsysError


class EpochShuffle(Sampler[int]):
    """Shuffled passes over 0..n-1, fixed by (seed, pass): a resumed run replays the same epochs.
    Lightning calls ``set_epoch`` at the start of every epoch.

    ``per_epoch`` (None = n) cuts the passes into epochs of that many examples, so a large training
    set is validated and checkpointed every ``per_epoch`` examples while every example is still
    seen once per pass. Example: n = 5, per_epoch = 3: epoch 0 = pass 0 [0:3], epoch 1 = pass 0
    [3:5] + pass 1 [0:1], epoch 2 = pass 1 [1:4]."""

    def __init__(self, n: int, seed: int, per_epoch: int | None = None):
        self.n, self.seed, self.epoch, self.per_epoch = n, seed, 0, per_epoch or n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pass(self, p: int) -> np.ndarray:
        return np.random.default_rng([self.seed, p]).permutation(self.n)

    def __iter__(self):
        start, out = self.epoch * self.per_epoch, []
        while len(out) < self.per_epoch:
            p, offset = divmod(start + len(out), self.n)
            out += self._pass(p)[offset:offset + self.per_epoch - len(out)].tolist()
        return iter(out)

    def __len__(self) -> int:
        return self.per_epoch


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Process ``rank``'s share of ``batches``: every ``world_size``-th batch, then its part of the leftover
    batches' items pooled and split ``world_size`` ways (as evenly as possible). Disjoint across ranks, their
    union every item; each rank gets the same number of batches while the leftover items are at least
    ``world_size``; fewer go one each onto the last batch of the first ranks, so that every rank still takes the
    same number of steps (data-parallel steps wait for each other). An epoch with fewer items than processes
    cannot give each one a step: an error, not a run whose processes wait for each other forever."""
    if world_size == 1:
        return batches
    whole = len(batches) - len(batches) % world_size
    mine = [list(b) for b in batches[rank:whole:world_size]]
    rest = [i for b in batches[whole:] for i in b]
    if not whole and len(rest) < world_size:
        raise RecsysError(f"an epoch of {len(rest)} example(s) cannot give each of {world_size} processes a step; "
                          "use fewer processes or more examples per epoch")
    if len(rest) >= world_size:
        mine.append(np.array_split(np.asarray(rest, dtype=np.int64), world_size)[rank].tolist())
    elif rank < len(rest):
        if mine:
            mine[-1].append(rest[rank])
        else:
            mine.append([rest[rank]])
    return mine


def gather_rows(module: L.LightningModule, rows: np.ndarray) -> np.ndarray:
    """(N, ...) float rows of every process, concatenated (this process's alone without data parallelism),
    so that a validation metric is computed on all users, equal to one process's evaluation of the same
    weights. Processes may hold different row counts: padded with NaN rows for the gather, then dropped."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(len(rows)))
    width = int(counts.max())
    padded = np.full((width, *rows.shape[1:]), np.nan)
    padded[:len(rows)] = rows
    everything = module.all_gather(torch.from_numpy(padded))                  # (world_size, width, ...)
    return np.concatenate([everything[r, :int(n)].cpu().numpy() for r, n in enumerate(counts)])


class ShardedBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` consecutive indices of ``sampler`` (an :class:`EpochShuffle`), and of them this
    process's share under data parallelism (:func:`shard_batches`): disjoint across the ``world_size``
    processes, together every index, the same number of batches in each. Lightning sets the epoch on
    ``sampler``."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def _batches(self, indices: list[int]) -> list[list[int]]:
        return shard_batches([indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)],
                             self.rank, self.world_size)

    def __iter__(self):
        # a generator: the sampler is read at the first batch, after Lightning has set the epoch (it may
        # create the iterator before, e.g. when it resumes a run), as a DataLoader's own batching does
        yield from self._batches(list(self.sampler))

    def __len__(self) -> int:
        return len(self._batches(list(range(len(self.sampler)))))


def process_rank(module: L.LightningModule | L.LightningDataModule) -> tuple[int, int]:
    """(rank, world size) of this process in the module's trainer; (0, 1) outside one."""
    trainer = module._trainer if isinstance(module, L.LightningModule) else module.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def early_stopping(monitor: str, patience: int, mode: str = "max"):
    """Lightning's ``EarlyStopping`` whose ``patience`` is the one configured now, also on resume.

    Lightning restores the patience saved in the checkpoint, so a run resumed with a larger patience (a
    resumable change of every training config here) would stop at the old one. The counters (validations
    since the best, the best score) are still restored."""
    from lightning.pytorch.callbacks import EarlyStopping

    class _EarlyStopping(EarlyStopping):
        @property
        def state_key(self) -> str:             # Lightning's own key: checkpoints of either class restore
            return "EarlyStopping" + repr({"monitor": self.monitor, "mode": self.mode})

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict({**state_dict, "patience": self.patience})

    return _EarlyStopping(monitor, mode=mode, patience=patience)


def budget_timer(max_minutes: float | None):
    """A Lightning ``Timer`` that stops training after ``max_minutes`` (None: never).

    Its elapsed time is saved in the checkpoints, so a resumed run keeps the budget it had left and
    ``timer.time_elapsed("train")`` is the run's training time over every invocation (what
    ``train.json`` reports as ``seconds``)."""
    from lightning.pytorch.callbacks import Timer

    return Timer(duration={"minutes": max_minutes} if max_minutes else None, verbose=False)


class TextProgress(L.Callback):
    """Progress for logs and pipes, where a live progress bar cannot draw: one line every ``every_s`` seconds
    during training (epoch, step, the logged training metrics) and one after each validation."""

    def __init__(self, every_s: float = 30.0, stream=None):
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.last = 0.0

    def _line(self, trainer, text: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("train/", "val/")))
        print(f"epoch {trainer.current_epoch} step {trainer.global_step}{text} {shown}".rstrip(), file=self.stream,
              flush=True)

    def on_train_start(self, trainer, pl_module):
        self.last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            total = trainer.num_training_batches
            self._line(trainer, f" ({batch_idx + 1}/{total} batches)" if isinstance(total, int) else "")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._line(trainer, " validated:")


class RNGState(L.Callback):
    """Save the torch / numpy / python RNG states in every checkpoint and restore them on resume, so a
    run resumed from an epoch-end checkpoint continues exactly like the uninterrupted run. Under data
    parallelism every process's states are gathered into the checkpoint (``ranks``) and each process
    restores its own. Plain lists and tensors only: checkpoints load with ``torch.load(weights_only=True)``."""

    @staticmethod
    def _mine() -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, gauss_next = random.getstate()
        return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                "python": [version, list(state), gauss_next]}

    def state_dict(self) -> dict:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._mine()
        ranks = [None] * dist.get_world_size()            # every process takes part in a checkpoint's dump
        dist.all_gather_object(ranks, self._mine())
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        import torch.distributed as dist

        if "ranks" in state:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            state = state["ranks"][rank]
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, values, gauss_next = state["python"]
        random.setstate((version, tuple(values), gauss_next))


def checkpoint_callbacks(directory, monitor: str, mode: str = "max"):
    """``best.ckpt`` (best ``monitor``) and ``last.ckpt`` written after *every* epoch.

    Lightning's ``save_last=True`` rewrites ``last.ckpt`` only when the monitored metric improves
    (2.6), so after a non-improving epoch it would be stale and a resumed run would repeat epochs.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(directory, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           enable_version_counter=False)
    last = ModelCheckpoint(directory, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)
    return best, last


def best_checkpoint(best) -> tuple[str, float]:
    """Path and score of the checkpoint kept by the ``best`` callback of :func:`checkpoint_callbacks`,
    with a clear error when there is none or when its score was not restored on resume."""
    if not best.best_model_path:
        raise RecsysError(f"{best.dirpath}: training produced no checkpoint (no validation ran); raise max_epochs "
                          "or max_steps, or lower val_every")
    if best.best_model_score is None:       # Lightning restores it only into the directory it was written to
        raise RecsysError(f"{best.dirpath}: the best checkpoint's score was not restored on resume (was the run "
                          "directory moved since its checkpoints were written?); run it where it was written, "
                          "or start over with --no-resume")
    return best.best_model_path, float(best.best_model_score)


def same_run(previous: dict, record: dict, defaults: dict) -> bool:
    """Whether ``record`` describes the run saved as ``previous``: equal, except that config fields
    added to the code since (absent from ``previous["config"]``) may hold their ``defaults``."""
    old, new = previous.get("config", {}), record.get("config", {})
    if set(old) - set(new) or any(k not in defaults or new[k] != defaults[k] for k in set(new) - set(old)):
        return False
    return {**previous, "config": old} == {**record, "config": {k: new[k] for k in old}}


def resume_checkpoint(out, record: dict, resume: bool | str = True, defaults: dict | None = None):
    """Path of ``out/checkpoints/last.ckpt`` to resume from, or None to start fresh.

    ``record`` (the run's defining config and dataset fingerprint) is written to ``out/run.json``; a
    directory holding a different run is refused rather than silently continued (``resume="auto"``: started
    over instead, for pipelines whose stage settings changed). ``defaults`` (the config class's defaults) lets
    a run saved before a config field existed resume when the new field is left at its default.
    """
    import json
    import shutil
    from pathlib import Path

    from recsys.errors import RecsysError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path, last = out / "run.json", out / "checkpoints" / "last.ckpt"
    if resume and last.exists():
        previous = json.loads(path.read_text()) if path.exists() else None
        if previous is None or not same_run(previous, json.loads(json.dumps(record)),
                                            json.loads(json.dumps(defaults or {}))):
            if resume != "auto":
                raise RecsysError(f"{out}: holds a run with a different config or dataset; "
                                  "use another --out or pass --no-resume to start over")
            shutil.rmtree(out / "checkpoints")       # the other run's; none of them may be taken as this one's best
            resume = False
    path.write_text(json.dumps(record, indent=2))
    return last if resume and last.exists() else None


class StreamSampler(Sampler[int]):
    """Epoch e yields items [e*size, (e+1)*size) of an endless stream of seeded permutations of 0..n-1,
    so short "epochs" walk through the data without repeats and a resumed run replays nothing."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size, self.seed, self.epoch = n, size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        start = self.epoch * self.size
        cycle, offset, out = start // self.n, start % self.n, []
        while len(out) < self.size:
            out += np.random.default_rng([self.seed, cycle]).permutation(self.n)[offset:].tolist()
            cycle, offset = cycle + 1, 0
        return iter(out[:self.size])

    def __len__(self) -> int:
        return self.size
