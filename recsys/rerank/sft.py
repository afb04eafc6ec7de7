"""Supervised fine-tuning examples for the listwise reranker (behaviour cloning of teacher lists).

Teacher list (DESIGN.md, ALGORITHMS.md §5): the held-out item first, then the other candidates in
the retriever's order. If the retriever missed the held-out item, it replaces the last candidate
(``target_missing="insert"``) or the example is skipped (``"skip"``).

The candidates are *presented* in a shuffled order (``shuffle=True``, seeded per example): a model
trained on lists presented in retriever order with the target first can learn "answer A" instead of
reading the items. The answer lists the identifiers in teacher order.

Token labels: -100 on the prompt, the answer's ids on the answer (identifiers, newlines, end token),
so the language-model loss covers exactly what the model must write. ``first_ranks`` gives each
presented candidate's 1-based teacher rank for FIRST's ranking loss on first-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.llm.backbone import Backbone
from recsys.rerank.prompts import answer_text, listwise_prompt


@dataclass(frozen=True)
class SFTExample:
    """One training window: what the model reads, and its teacher answer."""

    history: list[int]
    presented: list[int]
    """Candidates (item idx) in the order shown in the prompt."""
    teacher_order: list[int]
    """Positions into ``presented``, best first."""


def teacher_example(history, candidates, target: int, window: int = 20, shuffle: bool = True, seed: int = 0,
                    target_missing: str = "insert") -> SFTExample | None:
    """Build one example from a retriever's candidate list (item idx, best first) and the held-out item."""
    cands = [int(c) for c in candidates[:window]]
    if target not in cands:
        if target_missing == "skip":
            return None
        cands = cands[:window - 1] + [int(target)]
    teacher = [int(target)] + [c for c in cands if c != target]            # target first, then retriever order
    presented = list(cands)
    if shuffle:
        np.random.default_rng(seed).shuffle(presented)
    position = {c: p for p, c in enumerate(presented)}
    return SFTExample([int(h) for h in history], presented, [position[c] for c in teacher])


def first_ranks(example: SFTExample) -> list[int]:
    """1-based teacher rank of each presented candidate."""
    ranks = [0] * len(example.presented)
    for rank, pos in enumerate(example.teacher_order, 1):
        ranks[pos] = rank
    return ranks


def encode_example(backbone: Backbone, example: SFTExample, titles=None, max_history: int = 20) -> dict:
    """``input_ids`` (prompt + answer), ``labels`` (-100 on the prompt) and ``answer_start``."""
    prompt = listwise_prompt(backbone, example.history, example.presented, titles, max_history)
    p_ids = backbone.tokenizer.encode(prompt, add_special_tokens=False)
    a_ids = backbone.tokenizer.encode(answer_text(example.teacher_order), add_special_tokens=False)
    return {"input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + a_ids, "answer_start": len(p_ids),
            "ranks": first_ranks(example)}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of encoded examples; ``first_pos`` is the index of the last prompt token (whose
    logits predict the first answer token)."""
    T = max(len(r["input_ids"]) for r in rows)
    n = max(len(r["ranks"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    ranks = torch.zeros((len(rows), n), dtype=torch.long)
    first_pos = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        L = len(r["input_ids"])
        ids[i, T - L:], labels[i, T - L:], mask[i, T - L:] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        ranks[i, :len(r["ranks"])] = torch.tensor(r["ranks"])
        first_pos[i] = T - L + r["answer_start"] - 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "ranks": ranks, "first_pos": first_pos}
