"""What an LM's reading of the item texts knows about behaviour: a ridge probe from its text states to SASRec's
item vectors, pretrained weights against the same architecture at random initialisation.

    python -m pipelines.benchmarks.text_state_probe --out artifacts/strong

Reads the strong pipeline's prepared ML-1M and SASRec (``python -m pipelines.benchmarks.rerankers_strong --out
artifacts/strong``). For each LM (SmolLM2-135M as converted, and the same config with random weights, seed 0) and
each text (the catalogue's ``text``: title, year, genres; or ``Title (year)`` alone), the states of
:func:`recsys.rerank.hybrid.text_states` after ``--layers`` decoder layers (what ``text_layers`` feeds the hybrid
reranker's projector). A ridge regression (``--ridge``) from them to SASRec's item vectors is fitted on 3,000 items
and scored on the other 706 (seeded split): R^2 over all dimensions. Genres one-hot is the reference row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, write_result


def ridge_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, lam: float) -> float:
    """R^2 on ``test`` rows of a ridge fit (with intercept) of ``y`` on ``x`` over ``train`` rows."""
    x = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(x[train].T @ x[train] + lam * np.eye(x.shape[1]), x[train].T @ y[train])
    residual = ((x[test] @ w - y[test]) ** 2).sum()
    return float(1 - residual / ((y[test] - y[train].mean(0)) ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/strong", help="the strong pipeline's directory")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ridge", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.text_state_probe")
    import torch
    from transformers import AutoModelForCausalLM

    from recsys.data import PreparedDataset
    from recsys.llm.backbone import Backbone, load_backbone
    from recsys.models.sasrec import SASRec
    from recsys.rerank.hybrid import text_states

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    ds = PreparedDataset.load(out / "data" / "ml-1m")
    y = SASRec.from_pretrained(out / "runs" / "sasrec-seed0" / "model").item_emb.weight.detach().numpy()[1:]
    catalog = ds.catalog.sort("idx")
    texts = {"text": catalog["text"].to_list(),
             "title": [f"{t} ({yr})" if yr is not None else t for t, yr in catalog.select("title", "year").iter_rows()]}
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:3000], perm[3000:]
    genres = catalog["genres"].to_list()
    names = sorted({g for row in genres for g in row})
    rows = [{"name": "genres-one-hot", "metrics": {"r2": round(ridge_r2(
        np.array([[n in row for n in names] for row in genres], float), y, train, test, a.ridge), 4)}}]
    pretrained = load_backbone("smollm2-135m")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        scratch = Backbone(AutoModelForCausalLM.from_config(pretrained.model.config, dtype=torch.float32),
                           pretrained.tokenizer, "smollm2-135m-scratch")
    for lm_name, bb in (("smollm2-135m", pretrained), ("random-init", scratch)):
        for text_name, values in texts.items():
            x = text_states(bb, values, a.layers).numpy()
            rows.append({"name": f"{lm_name}-{text_name}", "metrics": {"r2": round(ridge_r2(x, y, train, test, a.ridge), 4)}})
            print(rows[-1], flush=True)
    write_result("text_state_probe", provenance, {
        "dataset": "ml-1m", "layers": a.layers, "ridge": a.ridge, "split": "3,000 items fit, 706 scored (seed 0)",
        "target": "SASRec's item vectors (runs/sasrec-seed0 of the strong pipeline)", "rows": rows})


if __name__ == "__main__":
    main()
