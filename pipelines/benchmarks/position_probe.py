"""Does a listwise reranker read the candidates, or their positions? FIRST scores under three orders.

    python -m pipelines.benchmarks.position_probe --data artifacts/quickstart/data/ml-1m \\
        --candidates artifacts/quickstart/runs/default-seed0/candidates --users 300

The model alone (retriever prior 0) ranks each validation window that holds its held-out item three
times: candidates in the retriever's order, in a seeded random order, and reversed. A model that reads
the items scores about the same under all three; one that prefers an identifier (``A``) follows
whatever order it is shown. Beside each row, "position only" ranks the candidates by where they are
shown (first shown = best) over the same windows. ``letter_bias``: each identifier's mean first-token
logit minus the mean over the window, per order. Writes ``results/position_probe_<name>.json``.

Default model: SmolLM2-135M-Instruct as converted (zero-shot); ``--model RUN/model`` probes a trained
listwise reranker directory instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, write_result

ORDERS = ("retriever", "shuffled", "reversed")


def permutation(order: str, n: int, rng: np.random.Generator) -> list[int]:
    """Positions of the retriever's list in the order shown: identity, a seeded shuffle, or reversed."""
    if order == "retriever":
        return list(range(n))
    return [int(i) for i in rng.permutation(n)] if order == "shuffled" else list(range(n - 1, -1, -1))


def ndcg_of_ranks(ranks: list[float]) -> float:
    from recsys.metrics import compute_metrics

    r = np.asarray(ranks, dtype=float)[:, None]
    return compute_metrics(r, np.ones_like(r), ["ndcg@10"])["ndcg@10"]


def probe(scorer, rows: list, window: int, seed: int = 0, batch: int = 16) -> dict:
    """``{order: {"model_cand_ndcg@10", "position_only_cand_ndcg@10", "letter_bias", "seconds"}}`` over
    ``rows`` (:class:`recsys.types.CandidateList`; each window holds its target)."""
    rng = np.random.default_rng(seed)
    out = {}
    for order in ORDERS:
        shown = []
        for r in rows:
            w = r.top(window).window
            shown.append([w[i] for i in permutation(order, len(w), rng)])
        t = time.perf_counter()
        scores = np.stack([s.float().numpy() for i in range(0, len(rows), batch)
                           for s in scorer.first_scores([r.history for r in rows[i:i + batch]], shown[i:i + batch])])
        pos = [w.index(r.target) for w, r in zip(shown, rows)]
        model = [float((s > s[p]).sum()) for s, p in zip(scores, pos)]
        out[order] = {"model_cand_ndcg@10": ndcg_of_ranks(model), "position_only_cand_ndcg@10": ndcg_of_ranks(pos),
                      "letter_bias": np.round(scores.mean(0) - scores.mean(), 3).tolist(),
                      "seconds": round(time.perf_counter() - t, 1)}
        print(f"{order:9s} model alone {out[order]['model_cand_ndcg@10']:.4f}  position only "
              f"{out[order]['position_only_cand_ndcg@10']:.4f}  ({out[order]['seconds']} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared ML-1M directory")
    p.add_argument("--candidates", required=True, help="a `recsys candidates` directory (its validation split)")
    p.add_argument("--model", default=None, help="a listwise reranker RUN/model directory (default: SmolLM2 zero-shot)")
    p.add_argument("--users", type=int, default=300, help="the first N validation users")
    p.add_argument("--max-history", type=int, default=10)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--name", default="smollm2")
    a = p.parse_args()
    prov = Provenance("pipelines.benchmarks.position_probe")

    import torch

    from pipelines.rerank import load_reranker
    from recsys.data import PreparedDataset
    from recsys.data.candidates import read_candidate_lists
    from recsys.llm.backbone import load_backbone, smollm2_dir
    from recsys.portable.prompts import item_titles
    from recsys.rerank.listwise import ListwiseReranker

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = PreparedDataset.load(a.data)
    if a.model:
        scorer = load_reranker(a.model, ds, a.window)
        scorer.retriever_prior = 0.0
    else:
        scorer = ListwiseReranker(load_backbone(smollm2_dir()), item_titles(ds), a.window, a.window // 2,
                                  max_history=a.max_history, bf16=False)
    rows = [r.top(a.window) for r in read_candidate_lists(ds, a.candidates, "valid")[:a.users]]
    rows = [r for r in rows if r.has_target]
    with torch.no_grad():
        result = probe(scorer, rows, a.window)
    path = write_result(f"position_probe_{a.name}", prov, {
        "model": a.model or f"{Path(smollm2_dir()).name} (zero-shot)", "split": "valid",
        "users": a.users, "windows": len(rows), "window": a.window,
        "protocol": "model alone (retriever prior 0), FIRST first-token logits; windows holding their target; "
                    "position only = first shown ranked first", "orders": result})
    print(path)


if __name__ == "__main__":
    main()
