"""Retrieval benchmark: ANN vs exact search, candidate recall on ML-1M, semantic-ID statistics.

    python -m pipelines.benchmarks.retrieval --sasrec artifacts/bench/runs/sasrec-seed0

1. ANN vs exact, in one run: for each index config, recall@100 against the exact (Flat) top-100 and
   queries per second (all queries in one batched call, all cores), on (a) ML-1M SASRec item
   embeddings with the test users' vectors as queries and (b) a synthetic set of 1,000,000 x 64
   vectors drawn from a mixture of 1,000 Gaussians (clustered, like real embeddings; uniform noise
   has no neighbourhoods to find), queries from the same mixture. ``ratios["<row> qps/Flat"]``.
2. Candidate recall@{20,50,100,200} of the held-out test item for sasrec, text-minilm, hybrid,
   popularity (history excluded).
3. Statistics of the default semantic IDs (text embeddings, 3 levels x 32 codes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipelines.benchmarks.common import Provenance, topk_overlap, write_result

CONFIGS = {  # factory -> list of search settings
    "ml1m": [("Flat", {}), ("HNSW32,Flat", {"ef_search": 64}), ("HNSW32,Flat", {"ef_search": 128}),
             ("IVF64,Flat", {"nprobe": 4}), ("IVF64,Flat", {"nprobe": 16}), ("IVF64,PQ16", {"nprobe": 16})],
    "synthetic1m": [("Flat", {}), ("HNSW32,Flat", {"ef_search": 128}), ("HNSW32,Flat", {"ef_search": 256}),
                    ("IVF1024,Flat", {"nprobe": 8}), ("IVF1024,Flat", {"nprobe": 32}),
                    ("IVF1024,PQ16", {"nprobe": 32})],
}


def synthetic(n: int, d: int = 64, clusters: int = 1000, queries: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    def draw(m):
        return centres[rng.integers(clusters, size=m)] + 0.35 * rng.standard_normal((m, d)).astype(np.float32)
    return draw(n), draw(queries)


def ann_rows(name: str, items: np.ndarray, queries: np.ndarray, k: int = 100) -> tuple[list[dict], dict]:
    from recsys.retrieval.index import ItemIndex

    rows, ratios, exact, flat_qps, built = [], {}, None, None, {}
    for factory, params in CONFIGS[name]:
        t = time.time()
        if factory not in built:
            built[factory] = (ItemIndex.build(np.arange(len(items)), items, factory, "ip"), time.time() - t)
        index, build_seconds = built[factory]
        index.set_params(**params)
        index.search(queries[:10], k)                                   # warm-up
        t = time.time()
        _, found = index.search(queries, k)
        seconds = time.time() - t
        if exact is None:
            exact, flat_qps = found, len(queries) / seconds
        recall = topk_overlap(found, exact)
        setting = ",".join(f"{key}={v}" for key, v in params.items())
        row = f"{factory}{f'({setting})' if setting else ''}-{name}"
        rows.append({"name": row, "metrics": {"recall@100": recall, "qps": len(queries) / seconds},
                     "build_seconds": round(build_seconds, 2), "items": len(items), "queries": len(queries)})
        ratios[f"{row} qps/Flat"] = (len(queries) / seconds) / flat_qps
        print(f"{row:45s} recall@100 {recall:.4f}  qps {len(queries) / seconds:10.1f}  build {build_seconds:6.1f}s",
              flush=True)
    return rows, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m", help="prepared ML-1M")
    p.add_argument("--sasrec", default="artifacts/bench/runs/sasrec-seed0", help="trained SASRec run")
    p.add_argument("--synthetic-n", type=int, default=1_000_000)
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.retrieval")

    from pipelines.retrieval import load_sasrec, make_retriever, text_vectors
    from recsys.data import PreparedDataset
    from recsys.retrieval.candidates import (
        SASRecRetriever,
        hit_ranks,
        recall_at,
        retrieve_examples,
    )
    from recsys.retrieval.semantic_ids import SemanticIDConfig, SemanticIDs

    ds = PreparedDataset.load(a.data)
    test = ds.eval_examples("test")
    model = load_sasrec(ds, a.sasrec)
    sas = SASRecRetriever(model)
    rows, ratios = ann_rows("ml1m", sas.index.vectors, sas.user_vectors(test.histories))
    items, queries = synthetic(a.synthetic_n)
    more_rows, more_ratios = ann_rows("synthetic1m", items, queries)
    rows += more_rows
    ratios |= more_ratios

    for name in ("sasrec", "text-minilm", "hybrid", "popularity"):
        t = time.time()
        retriever = make_retriever(name, ds, a.sasrec)
        _, idx = retrieve_examples(retriever, test, 200, progress=False)
        recall = recall_at(hit_ranks(idx, test))
        rows.append({"name": name, "metrics": recall, "seconds": round(time.time() - t, 1)})
        print(name, recall, flush=True)

    vectors, version = text_vectors(ds)
    sid = SemanticIDs.fit(np.arange(1, ds.n_items + 1), vectors, SemanticIDConfig(), source="text")
    write_result("retrieval", provenance, {
        "dataset": "ml-1m (+ synthetic 1M x 64 Gaussian mixture)",
        "protocol": "ANN: recall@100 vs Flat top-100, batched queries, all cores; candidates: recall of the held-out "
                    "test item among each retriever's top-N, history excluded",
        "rows": rows, "ratios": ratios,
        "semantic_ids": {"source": f"text ({version})", "config": SemanticIDConfig().__dict__, "stats": sid.stats},
    })


if __name__ == "__main__":
    main()
