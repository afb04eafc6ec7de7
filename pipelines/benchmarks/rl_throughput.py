"""RL trainer throughput vs trl's ``GRPOTrainer``: same model, prompts, G and answer length, one run.

    pip install trl          # this benchmark's own dependency, not the project's
    python -m pipelines.benchmarks.rl_throughput --steps 8

Both run GRPO on the tiny listwise SFT reranker for ``--steps`` optimiser steps of P prompts x G
rollouts (P 8, G 8, the RL benchmark's setting), temperature 1, one optimiser step per batch of
rollouts, AdamW lr 1e-4, beta 1e-3 (a frozen reference model for the KL term), bf16 autocast on
CPU, the same validation prompts (SASRec top-20 windows, the tiny prompt). Answers are 41 tokens
on both sides: ours decodes under the listwise constraint (20 identifiers, separators, the end
token), trl samples with ``model.generate`` forced to exactly 41 new tokens (``min_new_tokens``; it
has no constrained decoding), its reward parsing the text into a ranking and scoring the held-out
item's reciprocal-log rank, as ours does with NDCG. Timed: the whole ``fit`` / ``train()`` call
after the models are loaded (ours includes one 16-user validation at its end).

``ratios["rollouts_per_s/trl"]`` = our rollouts per second / trl's; the same for optimiser steps.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from pipelines.benchmarks.common import Provenance, write_result


def trl_grpo(model_dir: Path, prompts: list[str], targets: list[int], steps: int, prompts_per_step: int,
             group_size: int, answer_tokens: int, seed: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from recsys.rerank.parse import parse_ranking

    def reward(completions, target, **_):
        out = []
        for text, t in zip(completions, target):
            order = parse_ranking(text, 20).generated
            out.append(1.0 / math.log2(order.index(t) + 2) if t in order else 0.0)
        return out

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": prompts, "target": targets})
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=prompts_per_step * group_size,
                          num_generations=group_size, max_completion_length=answer_tokens,
                          generation_kwargs={"min_new_tokens": answer_tokens}, temperature=1.0,
                          learning_rate=1e-4, beta=1e-3, num_iterations=1, max_steps=steps, logging_steps=1,
                          save_strategy="no", report_to=[], use_cpu=True, bf16=True, seed=seed,
                          dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "steps": steps, "rollouts": steps * prompts_per_step * group_size}


def ours_grpo(ds, candidates: Path, init: Path, out: Path, steps: int, prompts_per_step: int, group_size: int,
              seed: int) -> dict:
    from pipelines.rl import RLConfig, train_rl

    config = RLConfig(algo="grpo", init=str(init), group_size=group_size, prompts_per_step=prompts_per_step,
                      lr=1e-4, beta=1e-3, max_steps=steps, val_every=steps, val_users=16, seed=seed)
    train_rl(ds, candidates, out, config, progress=False, resume=False)
    summary = json.loads((out / "train.json").read_text())
    return {"seconds": summary["seconds"], "steps": summary["steps"],
            "rollouts": summary["steps"] * prompts_per_step * group_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="artifacts/bench/data/ml-1m")
    p.add_argument("--candidates", default="artifacts/rerankers/cands-sasrec50")
    p.add_argument("--init", default="artifacts/rerankers/listwise-sft-tiny/model")
    p.add_argument("--out", default="artifacts/rl-throughput")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    provenance = Provenance("pipelines.benchmarks.rl_throughput")

    import trl

    from pipelines.rerank import load_reranker
    from recsys.data import PreparedDataset
    from recsys.data.candidates import read_candidate_lists

    ds = PreparedDataset.load(a.data)
    scorer = load_reranker(a.init, ds)
    rows = [r.top(20) for r in read_candidate_lists(ds, a.candidates, "valid")[:a.steps * a.prompts_per_step]]
    prompts = scorer.prompts([r.history for r in rows], [r.window for r in rows])
    targets = [int(r.target_rank()) if r.has_target else -1 for r in rows]
    answer_tokens = 2 * 20 + 1                                   # 20 identifiers, each with its newline, then <eor>
    ours = ours_grpo(ds, Path(a.candidates), Path(a.init), Path(a.out) / "ours", a.steps, a.prompts_per_step,
                     a.group_size, a.seed)
    theirs = trl_grpo(Path(a.init), prompts, targets, a.steps, a.prompts_per_step, a.group_size, answer_tokens, a.seed)
    for x in (ours, theirs):
        x["rollouts_per_s"], x["steps_per_s"] = x["rollouts"] / x["seconds"], x["steps"] / x["seconds"]
    write_result("rl_throughput", provenance, {
        "model": f"tiny listwise SFT reranker ({a.init}); labelled tiny: a CPU experiment",
        "setting": {"prompts_per_step": a.prompts_per_step, "group_size": a.group_size, "answer_tokens": answer_tokens,
                    "steps": a.steps, "precision": "bf16 autocast", "trl": trl.__version__},
        "rows": [{"name": "recsys RL trainer (constrained decoding)", **ours},
                 {"name": f"trl {trl.__version__} GRPOTrainer (model.generate, 41 forced tokens)", **theirs}],
        "ratios": {"rollouts_per_s/trl": ours["rollouts_per_s"] / theirs["rollouts_per_s"],
                   "steps_per_s/trl": ours["steps_per_s"] / theirs["steps_per_s"]},
    })


if __name__ == "__main__":
    main()
