"""Supervised fine-tuning examples for the listwise reranker (behaviour cloning of teacher lists).

Teacher list (DESIGN.md, ALGORITHMS.md §5): the held-out item first, then the other candidates in
the retriever's order. If the retriever missed the held-out item, it replaces the last candidate
(``target_missing="insert"``), the example is skipped (``"skip"``), or the list is kept and the
teacher is the retriever's order (``"keep"``: the model learns when not to move anything).

The candidates are *presented* in a shuffled order (``shuffle=True``, seeded per example): a model
trained on lists presented in retriever order with the target first can learn "answer A" instead of
reading the items. With ``shuffle=False`` they are presented in the retriever's order, as FIRST
does at inference, and the retriever's rank becomes an input the model may use; then insert a
missed target at a random slot or, better, ``keep``. The answer lists the identifiers in teacher order.

A hypothesis that did not hold up (SmolLM2, 2026-11-23): ``insert`` puts an item the retriever did
*not* rank into a list of items it did, so shuffled windows could teach "pick the odd one out", which
ranks against the retriever at test time. After ~480 windows the validation cand_ndcg@10 was 0.130 with
``insert`` and 0.151 with ``skip`` (a random order gives 0.227, the model before SFT 0.370): both fall
below chance, so the insertion is not the main cause. ``skip`` still matches the test-time distribution.

Groupwise (GroupRank) examples score every candidate of a group 0..9: the held-out item 9, the others
a prior from the retriever's rank (``prior_max`` for the first candidate down to 0 for the last),
so the scores carry both the label and the retriever's opinion (our stand-in for the paper's
teacher pseudo-labels, ALGORITHMS.md section 4).

Token labels: -100 on the prompt, the answer's ids on the answer (identifiers, newlines, end token),
so the language-model loss covers exactly what the model must write. ``first_ranks`` gives each
presented candidate's 1-based teacher rank for FIRST's ranking loss on first-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.llm.backbone import Backbone
from recsys.rerank.prompts import answer_text, identifier_ids, listwise_prompt


@dataclass(frozen=True)
class SFTExample:
    """One training window: what the model reads, and its teacher answer."""

    history: list[int]
    presented: list[int]
    """Candidates (item idx) in the order shown in the prompt."""
    teacher_order: list[int]
    """Positions into ``presented``, best first."""
    retriever_order: list[int] = ()
    """The window's items in the retriever's order (after any insertion)."""
    target: int | None = None
    """The held-out item, if it is in the window."""


def teacher_example(history, candidates, target: int, window: int = 20, shuffle: bool = True, seed: int = 0,
                    target_missing: str = "insert") -> SFTExample | None:
    """Build one example from a retriever's candidate list (item idx, best first) and the held-out item."""
    cands = [int(c) for c in candidates[:window]]
    rng = np.random.default_rng(seed)
    if target not in cands:
        if target_missing == "skip":
            return None
        if target_missing == "insert":
            cands = cands[:window - 1]
            cands.insert(int(rng.integers(len(cands) + 1)) if not shuffle else len(cands), int(target))
    teacher = [int(target)] + [c for c in cands if c != target] if target in cands else list(cands)
    presented = list(cands)
    if shuffle:
        rng.shuffle(presented)
    position = {c: p for p, c in enumerate(presented)}
    return SFTExample([int(h) for h in history], presented, [position[c] for c in teacher], list(cands),
                      int(target) if target in cands else None)


def first_ranks(example: SFTExample) -> list[int]:
    """1-based teacher rank of each presented candidate."""
    ranks = [0] * len(example.presented)
    for rank, pos in enumerate(example.teacher_order, 1):
        ranks[pos] = rank
    return ranks


def encode_example(backbone: Backbone, example: SFTExample, titles=None, max_history: int = 20,
                   supervise: str = "list", identifiers: str = "letters") -> dict:
    """``input_ids`` (prompt + answer), ``labels`` (-100 on the prompt), ``answer_start``, FIRST's
    ``ranks`` and the window's ``identifier_ids`` (letters, or the candidates' item tokens).

    ``supervise="list"``: the whole teacher answer is labelled and FIRST's ranks are the teacher order.
    ``"target"``: only the held-out item is taught: the first answer token alone is labelled (a softmax
    over the window's identifiers, i.e. next-item prediction against the window's hard negatives) and
    the ranks put the target at 1 and tie the rest at 2, so FIRST's pairs are target-vs-others only."""
    prompt = listwise_prompt(backbone, example.history, example.presented, titles, max_history, identifiers)
    p_ids = backbone.tokenizer.encode(prompt, add_special_tokens=False)
    answer = answer_text(example.teacher_order, example.presented if identifiers == "items" else None)
    a_ids = backbone.tokenizer.encode(answer, add_special_tokens=False)
    labels, ranks = list(a_ids), first_ranks(example)
    if supervise == "target":
        if example.target is None:
            raise ValueError("supervise='target' needs an example whose window holds the target")
        labels = a_ids[:1] + [-100] * (len(a_ids) - 1)
        ranks = [1 if r == 1 else 2 for r in ranks]
    return {"input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + labels, "answer_start": len(p_ids),
            "ranks": ranks, "identifier_ids": identifier_ids(backbone, example.presented, identifiers).tolist()}


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
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask,
           "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "ranks": ranks, "first_pos": first_pos}
    if "identifier_ids" in rows[0]:       # (B, n); a shorter window repeats its first id (its ranks are 0 there)
        out["identifier_ids"] = torch.tensor([r["identifier_ids"] + r["identifier_ids"][:1] * (n - len(r["identifier_ids"]))
                                              for r in rows])
    return out


def teacher_scores(example: SFTExample, prior_max: int = 5) -> list[int]:
    """0..9 score of each presented candidate: 9 for the held-out item, a retriever-rank prior for the rest.

    Example (retriever order [b, c, a], presented [a, b, c], target c, prior_max 5): prior
    int(5 * (1 - r / 3)) for retriever rank r: b 5, a 1; c 9 -> scores [1, 5, 9]."""
    rank = {c: r for r, c in enumerate(example.retriever_order)}
    n = len(example.presented)
    return [9 if c == example.target else int(prior_max * (1 - rank[c] / n)) for c in example.presented]


def encode_group_examples(backbone: Backbone, example: SFTExample, group_size: int, titles=None,
                          max_history: int = 20, prior_max: int = 5) -> list[dict]:
    """One encoded example per group of ``group_size`` presented candidates (answer ``A : 9 \\n ...``)."""
    from recsys.rerank.groupwise import answer_ids, groupwise_prompt

    scores = teacher_scores(example, prior_max)
    out = []
    for g in range(0, len(example.presented), group_size):
        group, group_scores = example.presented[g:g + group_size], scores[g:g + group_size]
        p_ids = backbone.tokenizer.encode(groupwise_prompt(backbone, example.history, group, titles, max_history),
                                          add_special_tokens=False)
        a_ids = answer_ids(backbone, group_scores)
        ranks = [1 + sorted(group_scores, reverse=True).index(s) for s in group_scores]
        out.append({"input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + a_ids, "answer_start": len(p_ids),
                    "ranks": ranks})
    return out
