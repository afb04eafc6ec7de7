"""Jobs the CLI runs, callable from Python: evaluate a saved model, format a table.

The quickstart pipeline lives in :mod:`pipelines.quickstart`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import resolve_model_dir
from recsys.data import PreparedDataset
from recsys.errors import RecsysError
from recsys.evaluation import DEFAULT_METRICS, evaluate_full_ranking
from recsys.models import load_model


def read_model_meta(model_dir: str | Path, filename: str, dataset: PreparedDataset, what: str) -> dict:
    """The JSON ``filename`` of a saved model directory (``RUN/model``), checked to belong to ``dataset``'s
    fingerprint; errors name the directory and what it should have been (``what``: e.g. "a fusion reranker")."""
    import json

    model_dir = Path(model_dir)
    path = model_dir / filename
    if not path.exists():
        raise RecsysError(f"{model_dir}: not {what} (no {filename}); pass the model/ directory of its run")
    meta = json.loads(path.read_text())
    if meta["dataset_fingerprint"] != dataset.fingerprint:
        raise RecsysError(f"{model_dir} was trained on dataset {meta['dataset_fingerprint']}, not {dataset.fingerprint}")
    return meta


def evaluate_model(dataset: PreparedDataset, model_path: str | Path, split: str = "test",
                   metrics: list[str] = DEFAULT_METRICS, users: list[str] | None = None,
                   progress: bool = True) -> dict:
    """Full-ranking evaluation of a saved model on ``split``, optionally on a subset of user ids."""
    model_dir = resolve_model_dir(model_path, holds="config.json")
    model = load_model(model_dir)
    if model.dataset_fingerprint not in (None, dataset.fingerprint):
        raise RecsysError(f"{model_dir} was trained on dataset {model.dataset_fingerprint}, but {dataset.directory} "
                          f"is dataset {dataset.fingerprint}; evaluate it on the data it was trained on")
    if model.n_items != dataset.n_items:
        raise RecsysError(f"{model_dir} scores {model.n_items} items, {dataset.directory} has {dataset.n_items}")
    examples = dataset.eval_examples(split)
    if users is not None:
        wanted = set(dataset.user_index(users).tolist())
        keep = [i for i, u in enumerate(examples.users.tolist()) if u in wanted]
        examples = type(examples)(examples.users[keep], [examples.histories[i] for i in keep],
                                  [examples.targets[i] for i in keep])
    return evaluate_full_ranking(model, examples, metrics, progress=progress)


def format_table(rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    """A fixed-width text table: one row per model, one column per metric."""
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(10, len(m) + 2) for m in metrics]
    lines = ["model".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))]
    lines += [name.ljust(width) + "".join(f"{r.get(m, float('nan')):{c}.4f}" for m, c in zip(metrics, cols))
              for name, r in rows]
    return "\n".join(lines)
