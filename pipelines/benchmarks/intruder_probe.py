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

``--listwise NAME=MODEL_DIR`` probes an item-token listwise reranker (``pipelines/rerank.py: load_reranker``) the
same way, its FIRST logits alone (retriever prior 0), on windows made as its SFT makes them
(:func:`recsys.rerank.sft.teacher_example` with ``target_missing: insert``: the held-out item in place of the
20th candidate, the window shuffled).
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
    from recsys.portable.prompts import item_titles
    from recsys.rerank.first import first_order

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


def probe_listwise(model_dir: Path, dataset, valid, window: int = 20) -> dict:
    """:func:`probe` for a listwise reranker: its FIRST logits on natural and inserted windows."""
    import torch

    from pipelines.rerank import load_reranker
    from recsys.rerank.sft import teacher_example

    scorer = load_reranker(model_dir, dataset, window=window)
    scorer.retriever_prior = 0.0
    scores = {True: [], False: []}
    examples = [(r.top(window).has_target, teacher_example(r.history, r.candidates, r.target, window, True, seed=i,
                                                           target_missing="insert")) for i, r in enumerate(valid)]
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            batch = examples[start:start + 32]
            logits = scorer.first_scores([ex.history for _, ex in batch], [ex.presented for _, ex in batch])
            for (natural, ex), s in zip(batch, logits):
                at = ex.presented.index(ex.target)
                scores[natural].append(ndcg10(int((s > s[at]).sum())))
    return {"natural_cand_ndcg@10": round(float(np.mean(scores[True])), 4),
            "inserted_cand_ndcg@10": round(float(np.mean(scores[False])), 4),
            "natural_windows": len(scores[True]), "inserted_windows": len(scores[False])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="artifacts/strong", help="output directory of rerankers_strong")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=MODEL_DIR", help="hybrid model directories")
    p.add_argument("--listwise", nargs="*", default=[], metavar="NAME=MODEL_DIR",
                   help="item-token listwise reranker model directories")
    p.add_argument("--users", type=int, default=1000, help="last validation lists probed")
    p.add_argument("--result", default="intruder_probe", help="result file name (results/<name>.json)")
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
    for spec in a.listwise:
        name, _, model_dir = spec.partition("=")
        rows.append({"name": name, "model": model_dir, "metrics": probe_listwise(Path(model_dir), dataset, valid)})
        print(rows[-1], flush=True)
    path = write_result(a.result, provenance, {"users": a.users, "rows": rows})
    print(f"intruder_probe: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
