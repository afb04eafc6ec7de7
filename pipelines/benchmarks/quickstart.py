"""Time the README's main job: ``recsys quickstart`` with a preset, every stage, from scratch.

    python -m pipelines.benchmarks.quickstart --preset default --out artifacts/quickstart-bench

Writes ``results/quickstart.json``: one row per stage with its seconds, the total, and the final test
metrics. Target: the default preset in 20 minutes or less on a 2-core CPU. Pass a fresh ``--out`` (a
re-run skips up-to-date stages and would time nothing).
"""

from __future__ import annotations

import argparse

from pipelines.benchmarks.common import Provenance, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=["small", "default", "full"])
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--out", default="artifacts/quickstart-bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="conditions worth recording (e.g. other jobs on the machine)")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.quickstart")
    from pipelines.quickstart import quickstart

    summary = quickstart(a.out, a.dataset, a.preset, a.seed)
    write_result("quickstart", provenance, {
        "preset": a.preset, "dataset": a.dataset, "note": a.note,
        "rows": [{"stage": k, "seconds": v} for k, v in summary["seconds"].items()],
        "total_seconds": summary["total_seconds"], "target_seconds": 1200 if a.preset == "default" else None,
        "met": summary["total_seconds"] <= 1200 if a.preset == "default" else None,
        "results": summary["results"], "paired_ndcg@10": summary["paired_ndcg@10"],
        "candidate_recall": summary["candidate_recall"], "serve": summary["serve"],
    })


if __name__ == "__main__":
    main()
