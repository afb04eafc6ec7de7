"""Does a hybrid reranker rank the held-out item, or spot the item its retriever did not propose?

    python -m pipelines.benchmarks.rerankers_strong --out artifacts/strong       # trains the hybrid rows
    python -m pipelines.benchmarks.intruder_probe --out artifacts/strong \
        --models hybrid-smollm2=artifacts/strong/runs/hybrid-smollm2-seed0/model

The last ``--users`` validation lists of the strong pipeline's candidates (``runs/candidates-t30-seed0``) are
made into windows of the retriever's top 20 as the hybrid trainer makes them with ``target_missing: insert``:
when the retriever missed the held-out item, it takes the 20th candidate's place, then the window is shuffled.
Per model: candidate-set NDCG@10 of the held-out item on the windows that held it by themselves (``natural``:
what evaluation sees) and on those it was inserted into (``inserted``: there it is the one item the retriever
did not propose), and the retriever's own order on the natural windows. A model far better on inserted windows
than on natural ones has learnt to spot the intruder rather than to rank.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, write_result


def ndcg10(rank: int) -> float:
    return 1.0 / np.log2(rank + 2) if rank < 10 else 0.0


def probe(model_dir: Path, dataset, valid) -> dict:
    import torch

    from pipelines.hybrid import load_hybrid, window_scores, windows
    from recsys.rerank.first import first_order
    from recsys.rerank.prompts import item_titles

    model, config = load_hybrid(model_dir, dataset)
    inserting = dataclasses.replace(config, target_missing="insert")
    natural = [r.top(config.window).has_target for r in valid]
    ws = windows(valid, inserting, dataset.n_items, config.seed + 1, 0.0)
    titles = item_titles(dataset, config.domain)
    scores = {True: [], False: []}
    with torch.no_grad():
        for start in range(0, len(ws), 32):
            batch = ws[start:start + 32]
            for k, (w, order) in enumerate(zip(batch, first_order(window_scores(model, batch, titles, config).float()).tolist())):
                scores[natural[start + k]].append(ndcg10(order.index(w.target)))
    return {"natural_cand_ndcg@10": round(float(np.mean(scores[True])), 4),
            "inserted_cand_ndcg@10": round(float(np.mean(scores[False])), 4),
            "natural_windows": len(scores[True]), "inserted_windows": len(scores[False]),
            "target_missing_in_training": config.target_missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="artifacts/strong", help="output directory of rerankers_strong")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL_DIR", help="hybrid model directories")
    p.add_argument("--users", type=int, default=1000, help="last validation lists probed")
    a = p.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.intruder_probe")
    from recsys.data import PreparedDataset
    from recsys.data.candidates import read_candidate_lists

    out = Path(a.out)
    dataset = PreparedDataset.load(out / "data" / "ml-1m")
    valid = read_candidate_lists(dataset, out / "runs" / "candidates-t30-seed0", "valid")[-a.users:]
    retriever = [ndcg10(int(r.top(20).target_rank())) for r in valid if r.top(20).has_target]
    rows = [{"name": "retriever-order", "metrics": {"natural_cand_ndcg@10": round(float(np.mean(retriever)), 4),
                                                    "natural_windows": len(retriever)}}]
    for spec in a.models:
        name, _, model_dir = spec.partition("=")
        rows.append({"name": name, "model": model_dir, "metrics": probe(Path(model_dir), dataset, valid)})
        print(rows[-1], flush=True)
    path = write_result("intruder_probe", provenance, {"users": a.users, "rows": rows})
    print(f"intruder_probe: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
