"""Value-guided decoding's forward-call budget and widening, against beam search at the same calls.

    python -m pipelines.benchmarks.ved_budget --quickstart artifacts

V-STAR (``generative_vstar_tiny.yaml``, ``--rl-steps`` steps) is trained from the quickstart's generative SFT
model, so that VED reads a trained value head; then, on the first ``--users`` validation users (validation:
the default is chosen here, not on test), every decoder returns ``--candidates`` items per user:

- ``beam-<calls>``: trie-constrained beam search as wide as a multiplier's calls allow (``1 + (D - 1) * width``
  calls) but at least ``--candidates`` wide, its ``--candidates`` likeliest items (at small multipliers the
  narrowest such beam spends more calls than VED: ``mean_calls`` says so);
- ``ved-<widen>[-by-logp]-x<m>``: VED with ``init_beam`` 8 and budget multiplier m (``round((1 + (D - 1) * 8) *
  m)`` calls), widening ``gated`` (V-STAR) or ``complete``, returning the highest-valued leaves (V-STAR) or, with
  ``-by-logp``, the likeliest (:class:`recsys.generative.ved.VEDConfig`).

Each row: ``candidate_hit_rate`` (the held-out item among the candidates: what an RL rollout group can
reward), ``distinct_items``, ``mean_calls``, ``users_per_s``. The multipliers run 1 (the official code's), 1.5,
2 (this project's default) and 3. Labelled tiny: the model is built in code and trained here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, write_result

MULTIPLIERS = (1.0, 1.5, 2.0, 3.0)
INIT_BEAM = 8


def train_vstar(quickstart: Path, out: Path, steps: int, seed: int = 0) -> Path:
    """The final weights of a V-STAR run (resumed when ``out`` holds it) from the quickstart's generative SFT model
    (not the validation-selected ones, which may be the start, whose value head SFT did not train)."""
    from pipelines.config import load_config
    from pipelines.generative import GenerativeTrainConfig, train_generative
    from recsys.data import PreparedDataset

    run = quickstart / "runs" / f"default-seed{seed}"
    ds = PreparedDataset.load(quickstart / "data" / "ml-1m")
    cfg = load_config(GenerativeTrainConfig, Path(__file__).parents[1] / "configs" / "generative_vstar_tiny.yaml",
                      {"init": str(run / "generative-sft" / "model"), "semantic_ids": str(run / "semantic-ids"),
                       "max_steps": steps, "val_every": max(1, steps // 2), "val_users": 500, "seed": seed})
    train_generative(ds, out, cfg, progress=False)
    return out / "last-model"                      # the final weights: their value head is trained


def decoders(depth: int, n: int) -> list[tuple[str, dict]]:
    """(name, settings) of every decoder compared: per multiplier, the beam as wide as its calls allow but at
    least ``n`` (a narrower beam returns fewer candidates; its calls are then more than VED's), once per width,
    and VED with each widening."""
    rows, widths = [], set()
    for m in MULTIPLIERS:
        calls = round((1 + (depth - 1) * INIT_BEAM) * m)
        width = max(n, (calls - 1) // (depth - 1))
        if width not in widths:
            widths.add(width)
            rows.append((f"beam-{1 + (depth - 1) * width}", {"kind": "beam", "width": width, "multiplier": m}))
        for widen, rank_by in (("gated", "value"), ("complete", "value"), ("complete", "logp")):
            name = f"ved-{widen}" + ("-by-logp" if rank_by == "logp" else "") + f"-x{m:g}"
            rows.append((name, {"kind": "ved", "widen": widen, "rank_by": rank_by, "multiplier": m}))
    return rows


def sweep(model_dir: Path, data: Path, users: int, n: int) -> list[dict]:
    import torch

    from pipelines.generative import load_for
    from recsys.data import PreparedDataset
    from recsys.generative.decoding import decode
    from recsys.generative.ved import VEDConfig, ved

    ds = PreparedDataset.load(data)
    model = load_for(ds, model_dir).eval()
    ex = ds.eval_examples("valid")
    hist, targets = ex.histories[:users], np.array([int(t[0]) for t in ex.targets[:users]])
    rows = []
    for name, spec in decoders(model.depth, n):
        hits, distinct, calls, secs = [], [], [], 0.0
        for start in range(0, len(hist), 64):
            h, t = hist[start:start + 64], targets[start:start + 64]
            exclude = torch.zeros(len(h), ds.n_items + 1, dtype=torch.bool)
            for i, x in enumerate(h):
                exclude[i, torch.as_tensor(x)] = True
            began = time.perf_counter()
            with torch.no_grad():
                if spec["kind"] == "beam":
                    items = decode(model, h, spec["width"], exclude=exclude).items[:, :n]
                    spent = np.full(len(h), 1 + (model.depth - 1) * spec["width"])
                else:
                    cfg = VEDConfig(n, INIT_BEAM, spec["multiplier"], widen=spec["widen"], rank_by=spec["rank_by"])
                    out, spent = ved(model, h, cfg, exclude=exclude, seed=start)
                    items = out.items
            secs += time.perf_counter() - began
            items = items.numpy()
            hits += (items == t[:, None]).any(1).tolist()
            distinct += [len(set(r.tolist()) - {0}) for r in items]
            calls += list(spent)
        rows.append({"name": name, **{k: v for k, v in spec.items() if k != "kind"},
                     "metrics": {"candidate_hit_rate": round(float(np.mean(hits)), 4),
                                 "distinct_items": round(float(np.mean(distinct)), 2),
                                 "mean_calls": round(float(np.mean(calls)), 1),
                                 "users_per_s": round(len(hist) / secs, 1)}})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quickstart", default="artifacts", help="output directory of `recsys quickstart`")
    p.add_argument("--rl-steps", type=int, default=60, help="V-STAR steps from the quickstart's SFT model")
    p.add_argument("--users", type=int, default=1000, help="validation users decoded")
    p.add_argument("--candidates", type=int, default=16, help="items per user (V-STAR's rollouts per prompt)")
    p.add_argument("--out", default="artifacts/ved-budget")
    a = p.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.ved_budget")
    quickstart = Path(a.quickstart)
    began = time.time()
    model_dir = train_vstar(quickstart, Path(a.out) / "vstar", a.rl_steps)
    trained = json.loads((Path(a.out) / "vstar" / "train.json").read_text())
    train_seconds = round(time.time() - began, 1)
    rows = sweep(model_dir, quickstart / "data" / "ml-1m", a.users, a.candidates)
    path = write_result("ved_budget", provenance, {
        "model": "tiny generative recommender (built in code), V-STAR from the quickstart's SFT model",
        "v_star": {"steps": a.rl_steps, "kept_start": trained.get("kept_start"), "seconds": train_seconds},
        "split": "valid", "users": a.users, "candidates": a.candidates, "init_beam": INIT_BEAM, "rows": rows})
    print(f"ved_budget: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
