"""The one place that builds a Lightning ``Trainer`` for every training job.

:class:`Runtime` holds what changes *where* a job runs and *what it reports to*, never the result
of a single-device run: loggers, accelerator, devices, strategy. It is not part of a run's defining
config, so a run started on one machine resumes on another.

Loggers: ``csv`` is always on (the benchmarks and ``recsys report`` read ``OUT/logs/version_N/
metrics.csv``); ``tensorboard`` (needs ``tensorboard`` or ``tensorboardX``) writes ``OUT/tb``;
``mlflow`` (needs ``mlflow``) logs to ``$MLFLOW_TRACKING_URI``, else to ``OUT/mlruns``.

Scaling past one device is Lightning's job: ``Runtime(accelerator="gpu", devices=4,
strategy="ddp")``. The in-loop validation metrics of the modules are then computed per process on
that process's shard of the validation users (Lightning's DistributedSampler); the saved model
is evaluated afterwards on all users by ``recsys evaluate``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from recsys.errors import RecsysError

LOGGERS = ("csv", "tensorboard", "mlflow")


@dataclass(frozen=True)
class Runtime:
    """Where a job runs and what it reports to (not part of the run's identity)."""

    loggers: tuple[str, ...] = ("csv",)
    """Any of ``csv``, ``tensorboard``, ``mlflow``; ``csv`` is added when missing."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto``, ``cpu``, ``gpu``/``cuda``."""
    devices: int | str = 1
    """Devices per node (``auto`` = all)."""
    strategy: str = "auto"
    """Lightning strategy, e.g. ``ddp``, ``fsdp``, ``deepspeed_stage_2`` (when installed)."""

    def __post_init__(self):
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise RecsysError(f"unknown logger(s) {unknown}: expected any of {LOGGERS}")


def make_loggers(out: str | Path, names: tuple[str, ...] = ("csv",), run_name: str | None = None) -> list:
    """CSV first (always), then the requested optional loggers; a missing package is a clear error."""
    from lightning.pytorch.loggers import CSVLogger

    out = Path(out)
    loggers = [CSVLogger(out, name="logs")]                     # logs/version_N per invocation
    if "tensorboard" in names:
        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise RecsysError("logger 'tensorboard' needs the tensorboard package: pip install tensorboard")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="tb"))
    if "mlflow" in names:
        if not importlib.util.find_spec("mlflow"):
            raise RecsysError("logger 'mlflow' needs the mlflow package: pip install mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        loggers.append(MLFlowLogger(experiment_name="recsys", run_name=run_name or out.name, tracking_uri=uri))
    return loggers


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_libraries() -> None:
    """Drop Lightning's advertising tips and warnings that Lightning's own code triggers (its pytree helper on
    torch >= 2.10; its all_gather under data parallelism) or that do not apply (``sync_dist`` advice for
    validation metrics this project gathers itself): noise in every run's output that the user cannot act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_TIPS)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    warnings.filterwarnings("ignore", message=r".*distributed\.nn\.functional\.all_gather is deprecated")
    warnings.filterwarnings("ignore", message=r".*It is recommended to use `self\.log\('val/.*sync_dist=True")


def main_process() -> bool:
    """False in the extra processes Lightning starts for data parallelism (they must not report or write)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


_NO_TIPS = _NoTips()
PROGRESS_SECONDS = float(os.environ.get("RECSYS_PROGRESS_SECONDS", "30"))
"""Seconds between progress lines when output is not a terminal."""


def make_trainer(out: str | Path, runtime: Runtime | None, *, progress: bool, **kwargs):
    """``L.Trainer`` with the runtime's loggers and devices; ``kwargs`` are the job's own settings
    (epochs, precision, callbacks, ...) -> ``lightning.Trainer``. Model summaries and sanity validation are off."""
    import lightning as L

    from recsys.precision import lightning_precision

    quiet_libraries()
    runtime = runtime or Runtime()
    kwargs.setdefault("num_sanity_val_steps", 0)
    if "precision" in kwargs:
        kwargs["precision"] = lightning_precision(kwargs["precision"], runtime.accelerator)
    bar = progress and sys.stderr.isatty()
    if progress and not bar:                  # a log file or a pipe: a line every PROGRESS_SECONDS instead
        from pipelines.callbacks import TextProgress

        kwargs["callbacks"] = [*kwargs.get("callbacks", []), TextProgress(PROGRESS_SECONDS)]
    return L.Trainer(accelerator=runtime.accelerator, devices=runtime.devices, strategy=runtime.strategy,
                     logger=make_loggers(out, runtime.loggers), enable_progress_bar=bar,
                     enable_model_summary=False, **kwargs)
