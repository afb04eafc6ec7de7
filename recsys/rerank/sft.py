"""Supervised fine-tuning examples for the listwise reranker (behaviour cloning of teacher lists).

Teacher list (FIRST, arXiv 2406.15657, trains on teacher rankings): the held-out item first, then the other candidates in
the retriever's order. If the retriever missed the held-out item, it replaces the last candidate
(``target_missing="insert"``), the example is skipped (``"skip"``), or the list is kept and the
teacher is the retriever's order (``"keep"``: the model learns when not to move anything).

The candidates are *presented* in a shuffled order (``shuffle=True``, seeded per example): a model
trained on lists presented in retriever order with the target first can learn "answer A" instead of
reading the items. With ``shuffle=False`` they are presented in the retriever's order, as FIRST
does at inference, and the retriever's rank becomes an input the model may use; then insert a
missed target at a random slot or, better, ``keep``. The answer lists the identifiers in teacher order.

What the SmolLM2 zero-shot signal was (measured 2026-11-23, 94 validation windows holding their target,
the model alone): candidate-set NDCG@10 0.370 with the candidates in the retriever's order, 0.246 shuffled,
0.155 reversed, against 0.404 / 0.220 / 0.107 for "letter A first" on the same orders. Its mean first-token
logit is +3.5 for ``A`` over the mean of the 20 letters, the same in all three orders: the zero-shot score
is a letter bias towards ``A`` that the retriever's order turns into its own ranking, not a reading of
the titles. SFT on shuffled windows (below) unlearns that bias, which is why the model alone fell from
0.370 to about chance (0.197 on ~100 windows, within two standard errors of 0.227): it did not rank
against the retriever. ``insert`` vs ``skip`` made no difference; ``skip`` matches the test windows.

Groupwise (GroupRank) examples score every candidate of a group 0..9: the held-out item 9, the others
a prior from the retriever's rank (``prior_max`` for the first candidate down to 0 for the last),
so the scores carry both the label and the retriever's opinion (our stand-in for the paper's
teacher pseudo-labels, GroupRank arXiv 2511.11653).

Token labels: -100 on the prompt, the answer's ids on the answer (identifiers, newlines, end token),
so the language-model loss covers exactly what the model must write. ``first_ranks`` gives each
presented candidate's 1-based teacher rank for FIRST's ranking loss on first-token logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from recsys.llm.backbone import Backbone
from recsys.portable.prompts import answer_text, listwise_prompt
from recsys.rerank.first import identifier_ids


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


def reorder_teacher(example: SFTExample, ranked: list[int], target: str = "first") -> SFTExample:
    """The same example with a teacher reranker's order after the held-out item: the target first (if in
    the window), then the other candidates in the order of ``ranked`` (the window's items, best first,
    e.g. FIRST's ranking by a trained reranker) instead of the retriever's. Distillation of a reranker's
    whole ranking into the list the model writes: with the retriever's order as the rest of the teacher
    list, greedy generation is "the model's top pick, then the retriever's order".

    ``target="teacher"`` leaves the held-out item where the teacher ranks it (pure distillation: every
    prefix the model is taught is one it would write itself, no exposure bias from a target it has not
    written, but the label no longer pulls the target up).

    Example: presented [7, 3, 9, 5], target 9, ranked [5, 9, 7, 3] -> teacher [9, 5, 7, 3] = positions [2, 3, 0, 1];
    with ``target="teacher"``: [5, 9, 7, 3] = positions [3, 2, 0, 1]."""
    if sorted(ranked) != sorted(example.presented):
        raise ValueError(f"ranked {ranked} is not an order of the window {example.presented}")
    if target not in ("first", "teacher"):
        raise ValueError(f"target must be 'first' or 'teacher', got {target!r}")
    first = [example.target] if example.target is not None and target == "first" else []
    position = {c: p for p, c in enumerate(example.presented)}
    order = [position[c] for c in first + [int(c) for c in ranked if not first or c != example.target]]
    return dataclasses.replace(example, teacher_order=order)


def first_ranks(example: SFTExample) -> list[int]:
    """1-based teacher rank of each presented candidate."""
    ranks = [0] * len(example.presented)
    for rank, pos in enumerate(example.teacher_order, 1):
        ranks[pos] = rank
    return ranks


def encode_example(backbone: Backbone, example: SFTExample, titles=None, max_history: int = 20,
                   supervise: str = "list", identifiers: str = "letters", history_lm: bool = False) -> dict:
    """``input_ids`` (prompt + answer), ``labels`` (-100 on the prompt), ``answer_start``, FIRST's
    ``ranks`` and the window's ``identifier_ids`` (letters, or the candidates' item tokens).

    ``history_lm`` (``tiny`` only): also ``history_labels``, the prompt's history item tokens from the
    second on (-100 elsewhere): next-item prediction at every history position, SASRec's objective,
    as an auxiliary signal (one label per window is all the answer gives under ``supervise="target"``).

    ``supervise="list"``: the whole teacher answer is labelled and FIRST's ranks are the teacher order.
    ``"target"``: only the held-out item is taught: the first answer token alone is labelled (a softmax
    over the window's identifiers, i.e. next-item prediction against the window's hard negatives) and
    the ranks put the target at 1 and tie the rest at 2, so FIRST's pairs are target-vs-others only.
    ``"auto_stop"``: the teacher list ends, with the end token, at the first step after which no next item
    could improve the list the presented order completes (SCASRec's learnable EOR, arXiv 2602.03324;
    :func:`recsys.rl.scasrec.auto_stop_length`): ``C\\n<eor>`` when the held-out item C is not already first,
    ``<eor>`` alone when it is first or absent; every answer token is labelled, FIRST's ranks stay the teacher
    order."""
    prompt = listwise_prompt(backbone, example.history, example.presented, titles, max_history, identifiers)
    p_ids = backbone.tokenizer.encode(prompt, add_special_tokens=False)
    order = example.teacher_order
    if supervise == "auto_stop":
        from recsys.rl.scasrec import auto_stop_length

        target = example.presented.index(example.target) if example.target is not None else None
        order = order[:auto_stop_length(list(order), target)]
    answer = answer_text(order, example.presented if identifiers == "items" else None)
    a_ids = backbone.tokenizer.encode(answer, add_special_tokens=False)
    labels, ranks = list(a_ids), first_ranks(example)
    if supervise == "target":
        if example.target is None:
            raise ValueError("supervise='target' needs an example whose window holds the target")
        labels = a_ids[:1] + [-100] * (len(a_ids) - 1)
        ranks = [1 if r == 1 else 2 for r in ranks]
    out = {"input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + labels, "answer_start": len(p_ids),
           "ranks": ranks, "identifier_ids": identifier_ids(backbone, example.presented, identifiers).tolist()}
    if history_lm:
        out["history_labels"] = history_labels(backbone, out["input_ids"], len(example.history[-max_history:]))
    return out


def history_labels(backbone: Backbone, input_ids: list[int], n_history: int) -> list[int]:
    """-100 except at the 2nd..last history item of a ``tiny`` prompt (``history: <i..> <i..> candidates:``),
    labelled with its own id, so the position before each history item predicts it (HF's label shift).

    Example: ids [history:, <i4>, <i9>, <i2>, candidates:, ...], 3 history items -> [-100, -100, <i9>, <i2>, -100, ...]."""
    if backbone.name != "tiny" or input_ids[:1] != [backbone.token_id("history:")]:
        raise ValueError("history labels need a tiny-backbone prompt that opens with 'history:'")
    return [i if 2 <= p <= n_history else -100 for p, i in enumerate(input_ids)]


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
    history = torch.full((len(rows), T), -100) if "history_labels" in rows[0] else None
    for i, r in enumerate(rows):
        L = len(r["input_ids"])
        ids[i, T - L:], labels[i, T - L:], mask[i, T - L:] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        if history is not None:
            history[i, T - L:] = torch.tensor(r["history_labels"])
        ranks[i, :len(r["ranks"])] = torch.tensor(r["ranks"])
        first_pos[i] = T - L + r["answer_start"] - 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask,
           "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "ranks": ranks, "first_pos": first_pos}
    if history is not None:
        out["history_labels"] = history
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
