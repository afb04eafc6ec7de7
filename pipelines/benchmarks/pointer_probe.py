"""Can a `tiny` backbone learn to answer a candidate's identifier at all? A synthetic copy probe.

    python -m pipelines.benchmarks.pointer_probe --batch-size 128 --steps 6000

The listwise prompt of the rerankers (``history: ... candidates: A <i..> B <i..> ... answer:``) with
random items, where the answer is the candidate equal to the *last history item*: an exact match,
so the only thing to learn is the pointer (find the candidate, answer the identifier next to it).
Loss: cross-entropy over the window's identifier logits at the last prompt position (FIRST's
read-out). Prints loss and batch accuracy every ``--every`` steps; chance is 1 / window.

Measured 2026-11-22 on the 2-core CPU (hidden 64, 2 layers, 100 items, window 8, lr 1e-3): batch
32 stays at chance for 3,000 steps; batch 128 leaves chance after ~3,000 steps and reaches accuracy
~0.4 by 5,800. This is why the listwise pretraining runs at batch 32 (`listwise_pretrain_tiny.yaml`)
never learned anything.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from recsys.llm.backbone import build_tiny
from recsys.rerank.sft import collate, encode_example, teacher_example


def copy_batch(bb, rng: np.random.Generator, n_items: int, window: int, size: int, history: int = 5) -> dict:
    """``size`` prompts whose target is the last of ``history`` random items, among ``window`` shuffled candidates."""
    rows = []
    for _ in range(size):
        items = rng.choice(np.arange(1, n_items + 1), history + window - 1, replace=False)
        hist, target = [int(i) for i in items[:history]], int(items[history - 1])
        cands = [target] + [int(i) for i in items[history:]]
        ex = teacher_example(hist, cands, target, window, shuffle=True, seed=int(rng.integers(1 << 30)))
        rows.append(encode_example(bb, ex, None, history, supervise="target"))
    return collate(rows, bb.tokenizer.pad_token_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    bb = build_tiny(n_items=a.items, hidden_size=a.hidden, num_layers=a.layers)
    opt = torch.optim.AdamW(bb.model.parameters(), lr=a.lr)
    ids = bb.identifier_ids(a.window)
    print(f"chance: loss {np.log(a.window):.3f}, accuracy {1 / a.window:.3f}")
    t = time.time()
    for step in range(a.steps):
        b = copy_batch(bb, rng, a.items, a.window, a.batch_size)
        out = bb.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        logits = out.logits[torch.arange(len(b["first_pos"])), b["first_pos"]][:, ids]      # (B, window)
        gold = (b["ranks"] == 1).float().argmax(-1)
        loss = torch.nn.functional.cross_entropy(logits, gold)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0 or step == a.steps - 1:
            acc = (logits.argmax(-1) == gold).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, accuracy {acc:.3f} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
