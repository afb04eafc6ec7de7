"""Generative recommender on ML-1M: SFT vs GRPO vs V-STAR against SASRec; VED vs beam; decoding speed.

    python -m pipelines.benchmarks.generative --seeds 0 1 --sft-minutes 25 --rl-steps 100

Semantic IDs: 3 residual k-means levels of 32 codes (+ de-duplication level) over the item embeddings
of the SASRec run passed as ``--sasrec`` (trained on the training split; ``cf`` source). Per seed
(seeds run in parallel, one process each): SFT from scratch on the training sequences (every window of
``--max-items`` + 1 items, consecutive windows sharing one item; ``--sft-minutes`` of one thread), then GRPO and
V-STAR from that SFT model with the same prompts, group size and steps (an RL row is the validation-selected
model, the SFT start itself when no RL checkpoint beat it on validation: ``kept_start``; ``last_metrics`` are
the final RL weights). SFT cuts its learning rate by
``--sft-lr-decay`` when validation NDCG@10 stalls (``ReduceLROnPlateau``) and stops after ``--sft-patience``
validations without a new best. A run that an earlier invocation finished with the same config is reused,
not retrained; one with other resumable settings (minutes, patience) resumes from its last checkpoint, and
the RL runs of a seed whose SFT model was (re)trained start over. Every row is evaluated on the
test split with full-ranking semantics: beam search of width 50 over the whole catalog, history
excluded, target rank = its position in the beam (a miss when absent). The ``sasrec`` row is the
same SASRec run, evaluated here by the library's full-ranking protocol on the same test users (one row per
run passed to ``--sasrec``, e.g. the seeds of the same recipe: the SFT target compares the means).

After the seeds: VED vs beam search at the same forward-call budget on the seed-0 V-STAR model
(``1 + 3 x 16 = 49`` calls per user: beam width 16 vs VED with ``init_beam 8``), and users per
second of beam search at widths 20 and 50 (this machine, nothing else running in this process), and the
seed-0 SFT model exported to ONNX and served by the torch-free runtime (one request per user) against torch.

Model (defaults): the ``item`` layout (one position per history item, per-level code heads; see
:class:`recsys.generative.model.ItemGenerativeRecommender`) reading the last 200 items, hidden 64, 2 layers,
2 heads, dropout 0.2 (SASRec's recipe size), with item-ID embeddings added to the history's inputs
(``--no-item-embeddings``: semantic IDs only). ``--layout token --max-items 50 --hidden-size 128 --num-heads 4``
is the earlier recorded configuration.
``--eval-only`` re-evaluates the models already in ``--out`` (after a change to decoding), training nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipelines.benchmarks.common import Provenance, write_result
from recsys.precision import autocast

METRICS = ["hr@5", "hr@10", "ndcg@5", "ndcg@10"]


def _test(ds, limit):
    ex = ds.eval_examples("test")
    n = limit or len(ex.users)
    return ex.histories[:n], [int(t[0]) for t in ex.targets[:n]]


def _seed(data: str, sid: str, out: str, seed: int, threads: int, sft: dict, rl: dict, limit,
          train: bool = True) -> list[dict]:
    import torch

    from pipelines.benchmarks.rl import reward_curve
    from pipelines.generative import (
        GenerativeTrainConfig,
        evaluate_generative,
        load_for,
        train_generative,
    )
    from recsys.data import PreparedDataset
    from recsys.generative.model import GenerativeConfig

    torch.set_num_threads(threads)
    ds = PreparedDataset.load(data)
    hist, targets = _test(ds, limit)
    rows, out = [], Path(out)

    per_user = {}

    def evaluate(model_dir: Path, name: str | None = None) -> dict:
        if not (model_dir / "generative.json").exists():
            raise SystemExit(f"--eval-only: {model_dir} holds no trained model")
        with autocast("cpu"):
            m, users = evaluate_generative(load_for(ds, model_dir), hist, targets, beam=50, progress=False, per_user=True)
        if name:
            per_user[name] = users
        return {k: m[k] for k in METRICS}

    model_cfg = GenerativeConfig(**sft.pop("model"))
    runs = [("generative-sft", GenerativeTrainConfig(model=model_cfg, semantic_ids=sid, seed=seed, **sft))]
    runs += [(f"generative-{algo}", GenerativeTrainConfig(algo=algo, model=model_cfg, init=str(out / "sft" / "model"),
                                                          semantic_ids=sid, seed=seed, **rl)) for algo in ("grpo", "vstar")]
    sft_trained = False
    for name, cfg in runs:
        run_dir = out / name.removeprefix("generative-")
        done = (run_dir / "train.json").exists() and json.loads((run_dir / "train.json").read_text())["config"] \
            == json.loads(json.dumps(dataclasses.asdict(cfg)))                # finished by an earlier invocation
        done &= cfg.algo == "sft" or (run_dir / "last-model").exists()       # RL runs from before the keep-start rule
        if train and cfg.algo != "sft" and sft_trained and run_dir.exists():
            shutil.rmtree(run_dir)                                            # RL from an SFT model that changed
            done = False
        if train and not done:
            train_generative(ds, run_dir, cfg, progress=False)
            sft_trained |= cfg.algo == "sft"
        model_dir = run_dir / "model"
        summary = json.loads((run_dir / "train.json").read_text())
        row = {"name": name, "seed": seed, "metrics": evaluate(model_dir, name),
               "seconds": round(summary["seconds"], 1), "epochs": summary["epochs"], "steps": summary["steps"],
               "start_val_ndcg@10": summary["start_val_ndcg@10"], "best_val_ndcg@10": summary["best_val_ndcg@10"],
               "curve": reward_curve(run_dir) if cfg.algo != "sft" else None}
        if cfg.algo != "sft":           # the validation-selected model may be the start: the final weights too
            row |= {"kept_start": summary["kept_start"], "last_metrics": evaluate(run_dir / "last-model")}
        rows.append(row)
    from recsys.metrics import paired_bootstrap

    for row in rows[1:]:                         # the RL rows against their own SFT start, the same test users
        row["ndcg10_vs_sft"] = paired_bootstrap(per_user["generative-sft"], per_user[row["name"]])
    return rows


def beam_vs_ved(model_dir: str, data: str, users: int, group: int = 16, init_beam: int = 8) -> list[dict]:
    """Candidate sets of ``group`` items per test user at the same forward-call budget."""
    import numpy as np
    import torch

    from pipelines.generative import load_for
    from recsys.data import PreparedDataset
    from recsys.generative.decoding import beam_calls, decode
    from recsys.generative.ved import VEDConfig, ved
    from recsys.rl.vstar import prefix_reward

    ds = PreparedDataset.load(data)
    model = load_for(ds, model_dir).eval()
    hist, targets = _test(ds, users)
    budget = beam_calls(model.depth, group)
    rows = []
    for name in ("beam", "ved"):
        hits, stds, distinct, calls, secs = [], [], [], [], 0.0
        for start in range(0, len(hist), 64):
            h, t = hist[start:start + 64], torch.tensor(targets[start:start + 64])
            exclude = torch.zeros(len(h), ds.n_items + 1, dtype=torch.bool)
            for i, x in enumerate(h):
                exclude[i, torch.as_tensor(x)] = True
            began = time.time()
            with autocast("cpu"):
                if name == "beam":
                    out, spent = decode(model, h, group, exclude=exclude), np.full(len(h), budget)
                else:
                    out, spent = ved(model, h, VEDConfig(group, init_beam), exclude=exclude, budget=budget, seed=start)
            secs += time.time() - began
            reward = prefix_reward(out.codes, model.idx_codes[t][:, None])
            hits += (out.items == t[:, None]).any(1).tolist()
            stds += reward.std(1, unbiased=False).tolist()
            distinct += [len(set(r.tolist()) - {0}) for r in out.items]
            calls += spent.tolist()
        rows.append({"name": name, "users": len(hist), "candidates": group, "budget_calls": budget,
                     "mean_calls": float(np.mean(calls)), "candidate_hit_rate": float(np.mean(hits)),
                     "within_group_reward_std": float(np.mean(stds)), "distinct_items": float(np.mean(distinct)),
                     "users_per_second": len(hist) / secs})
    return rows


def decoding_speed(model_dir: str, data: str, users: int) -> list[dict]:
    import torch

    from pipelines.generative import load_for
    from recsys.data import PreparedDataset
    from recsys.generative.decoding import recommend_batch

    ds = PreparedDataset.load(data)
    model = load_for(ds, model_dir).eval()
    hist, _ = _test(ds, users)
    rows = []
    for beam in (20, 50):
        with autocast("cpu"):
            recommend_batch(model, hist[:64], 10, beam)                     # warm-up
            began = time.time()
            recommend_batch(model, hist, 10, beam)
        rows.append({"beam": beam, "users": len(hist), "users_per_second": len(hist) / (time.time() - began),
                     "threads": torch.get_num_threads()})
    return rows


def onnx_serving(model_dir: str, data: str, users: int, out: str, beam: int = 20) -> dict:
    """The exported model served by :class:`serving.runtime.GenerativeRuntime` (numpy beam search, one request
    per user, 1 thread) vs torch beam search on the same users in batches of 20 (1 thread), timed in turns
    per slice of 20 users; and how many users get the same top 10 from both."""
    import numpy as np
    import torch

    from pipelines.generative import load_for
    from recsys.assets import sha256
    from recsys.data import PreparedDataset
    from recsys.generative.decoding import recommend_batch
    from serving.export import export_generative
    from serving.runtime import GenerativeRuntime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = PreparedDataset.load(data)
    model = load_for(ds, model_dir).eval()
    serve = Path(out)
    serve.mkdir(parents=True, exist_ok=True)
    entry = export_generative(model_dir, serve)
    files = {f.relative_to(serve).as_posix(): sha256(f) for f in sorted(serve.rglob("*"))
             if f.is_file() and f.name != "manifest.json"}
    (serve / "manifest.json").write_text(json.dumps({"version": entry["sha256"][:12], "files": files,
                                                     "models": {"generative": entry}}))
    runtime = GenerativeRuntime(serve, threads=1)
    hist, _ = _test(ds, users)
    torch_s = onnx_s = 0.0
    same = 0
    for start in range(0, len(hist), 20):
        part = hist[start:start + 20]
        began = time.perf_counter()
        want = recommend_batch(model, part, 10, beam).items.numpy()
        mid = time.perf_counter()
        got = np.concatenate([runtime.recommend([h], k=10, beam=beam)[0] for h in part])
        onnx_s += time.perf_counter() - mid
        torch_s += mid - began
        same += int((want == got).all(1).sum())
    torch.set_num_threads(threads)
    return {"users": len(hist), "beam": beam, "threads": 1, "graphs": [entry["file"], entry.get("head", {}).get("file")],
            "onnx_ms_per_user_one_request_each": 1000 * onnx_s / len(hist),
            "torch_ms_per_user_batches_of_20": 1000 * torch_s / len(hist), "same_top10_users": same}


def sasrec_row(data: str, run: str, limit) -> dict:

    from recsys.data import PreparedDataset
    from recsys.data.prepared import EvalExamples
    from recsys.evaluation import evaluate_full_ranking
    from recsys.models import load_model

    ds = PreparedDataset.load(data)
    ex = ds.eval_examples("test")
    n = limit or len(ex.users)
    ex = EvalExamples(ex.users[:n], ex.histories[:n], ex.targets[:n])
    with autocast("cpu"):
        m = evaluate_full_ranking(load_model(Path(run) / "model"), ex, METRICS, progress=False)
    return {"name": "sasrec", "seed": json.loads((Path(run) / "train.json").read_text())["config"]["seed"],
            "metrics": {k: m[k] for k in METRICS}, "source": run}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m")
    p.add_argument("--sasrec", nargs="+", default=["artifacts/bench/runs/sasrec-seed0"],
                   help="SASRec run(s): the first gives the semantic IDs; each gives a `sasrec` row, and the SFT "
                        "target compares against their mean")
    p.add_argument("--out", default="artifacts/generative")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sft-minutes", type=float, default=25.0)
    p.add_argument("--sft-lr-decay", type=float, default=0.3,
                   help="SFT: multiply the rate by this after --sft-lr-patience + 1 validations without a new best "
                        "(0: constant rate)")
    p.add_argument("--sft-lr-patience", type=int, default=2)
    p.add_argument("--sft-patience", type=int, default=10,
                   help="SFT: early stopping patience (validations); leave room for the decays")
    p.add_argument("--layout", choices=["token", "item"], default="item",
                   help="model layout (recsys.generative.model.GenerativeConfig.layout)")
    p.add_argument("--max-items", type=int, default=200, help="history items the model reads")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2, help="item layout: input and code-head dropout")
    p.add_argument("--item-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="item layout: add a learned item-ID embedding to each history item's input")
    p.add_argument("--rl-steps", type=int, default=100)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--vstar-reward", choices=["embeddings", "codes"], default="embeddings",
                   help="V-STAR's dense reward: the semantic IDs' source vectors (the paper's) or one-hot codes")
    p.add_argument("--sibling-credit", choices=["visits", "first"], default="visits",
                   help="Sibling-GRPO: a node's advantage on every candidate through it, or on the first only")
    p.add_argument("--sft-batches", type=int, help="SFT batches per epoch (smoke runs; default all)")
    p.add_argument("--test-users", type=int, help="first N test users only (default: all)")
    p.add_argument("--compare-users", type=int, default=1000, help="users for VED vs beam and the speed rows")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the models already in --out (after a decoding change) instead of training them")
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.generative")

    from pipelines.retrieval import build_semantic_ids
    from recsys.data import PreparedDataset
    from recsys.retrieval.semantic_ids import SemanticIDConfig

    out = Path(a.out)
    sid = out / "sid-cf"
    if not (sid / "vectors.npy").exists():      # deterministic: the same codes (V-STAR's reward checks them)
        build_semantic_ids(PreparedDataset.load(a.data), "cf", sid, SemanticIDConfig(levels=3, codebook_size=32),
                           a.sasrec[0])
    sid_stats = json.loads((sid / "semantic_ids.json").read_text())["stats"]
    model = {"hidden_size": a.hidden_size, "num_layers": 2, "num_heads": a.num_heads, "max_items": a.max_items,
             "layout": a.layout}
    if a.layout == "item":
        model |= {"dropout": a.dropout, "item_embeddings": a.item_embeddings}
    sft = {"model": model,
           "batch_size": 32, "lr": 1e-3, "max_epochs": 200, "patience": a.sft_patience, "max_minutes": a.sft_minutes,
           "lr_decay": a.sft_lr_decay or None, "lr_patience": a.sft_lr_patience,
           "val_users": 1000, "val_beam": 20, "limit_train_batches": a.sft_batches}
    rl = {"max_steps": a.rl_steps, "val_every": max(1, a.rl_steps // 4), "prompts_per_step": 16, "group_size": 16,
          "lr": a.rl_lr, "beta": 1e-3, "val_users": 1000, "val_beam": 20, "dense_reward": a.vstar_reward,
          "sibling_credit": a.sibling_credit}
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    rows = [sasrec_row(a.data, run, a.test_users) for run in a.sasrec]
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_seed, a.data, str(sid), str(out / f"seed{s}"), s, threads, json.loads(json.dumps(sft)),
                            rl, a.test_users, not a.eval_only) for s in a.seeds]
        for j in jobs:
            rows += j.result()
    vstar0 = str(out / f"seed{a.seeds[0]}" / "vstar" / "model")
    compare = beam_vs_ved(vstar0, a.data, a.compare_users)
    speed = decoding_speed(str(out / f"seed{a.seeds[0]}" / "sft" / "model"), a.data, a.compare_users)
    serving = onnx_serving(str(out / f"seed{a.seeds[0]}" / "sft" / "model"), a.data, min(a.compare_users, 500),
                           str(out / "serve-onnx"))

    def mean(name: str, metric: str) -> float | None:
        values = [r["metrics"][metric] for r in rows if r["name"] == name]
        return sum(values) / len(values) if values else None

    names = ["sasrec", "generative-sft", "generative-grpo", "generative-vstar"]
    means = {n: {m: mean(n, m) for m in METRICS} for n in names}
    write_result("generative", provenance, {
        "dataset": "ml-1m", "split": "test", "test_users": a.test_users or "all",
        "backbone": f"tiny (Llama architecture built in code, 2 layers, hidden {a.hidden_size}; random init)",
        "layout": a.layout,
        "semantic_ids": {"source": f"cf ({a.sasrec[0]})", "levels": 3, "codebook_size": 32, "stats": sid_stats},
        "evaluation": "beam search width 50 over the catalog, history excluded; miss = target not in the beam",
        "settings": {"sft": sft, "rl": rl, "seeds": a.seeds, "reward": "1 for the target, else 0.1 x matching "
                     "code prefix / 4", "vstar": {"init_beam": 8, "budget_multiplier": 2.0, "lam": 0.1, "ucb_beta": 1.0}},
        "rows": rows, "means": means,
        "models": "trained in this run" if not a.eval_only else
                  f"reused from {out} (--eval-only: trained by an earlier run of this benchmark, evaluated now)",
        "targets": {"sft_ndcg@10 >= sasrec": means["generative-sft"]["ndcg@10"] >= means["sasrec"]["ndcg@10"],
                    "vstar_ndcg@10 > grpo": means["generative-vstar"]["ndcg@10"] > means["generative-grpo"]["ndcg@10"]},
        "beam_vs_ved": compare, "speed": speed, "onnx_serving": serving,
    })


if __name__ == "__main__":
    main()
