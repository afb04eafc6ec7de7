"""Time the README's main job: ``recsys quickstart`` with a preset, every stage, from scratch.

    python -m pipelines.benchmarks.quickstart --preset default --out artifacts/quickstart-bench
    python -m pipelines.benchmarks.quickstart --preset small --out artifacts/quickstart-small

Writes ``results/quickstart.json`` (``quickstart_<preset>.json`` for the other presets): one row per stage
with its seconds, the total, and the final test metrics. Targets on a 2-core CPU: the default preset (ML-1M) in
20 minutes, the small one (the bundled fixture) in 60 seconds. Pass a fresh ``--out`` (a re-run skips
up-to-date stages and would time nothing).
"""

from __future__ import annotations

import argparse
import os

from pipelines.benchmarks.common import Provenance, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=["small", "default", "full"])
    p.add_argument("--dataset", help="default: the bundled fixture for --preset small, else ml-1m")
    p.add_argument("--out", default="artifacts/quickstart-bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="conditions worth recording (e.g. other jobs on the machine)")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.quickstart")
    from pipelines.quickstart import FIXTURE, quickstart

    dataset = a.dataset or (os.path.relpath(FIXTURE) if a.preset == "small" else "ml-1m")
    target = {"default": 1200, "small": 60}.get(a.preset)
    summary = quickstart(a.out, dataset, a.preset, a.seed)
    write_result("quickstart" if a.preset == "default" else f"quickstart_{a.preset}", provenance, {
        "preset": a.preset, "dataset": dataset, "note": a.note,
        "rows": [{"stage": k, "seconds": v} for k, v in summary["seconds"].items()],
        "total_seconds": summary["total_seconds"], "target_seconds": target,
        "met": summary["total_seconds"] <= target if target else None,
        "results": summary["results"], "paired_ndcg@10": summary["paired_ndcg@10"],
        "candidate_recall": summary["candidate_recall"], "serve": summary["serve"],
    })


if __name__ == "__main__":
    main()
