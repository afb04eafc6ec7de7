"""Groupwise reranking (GroupRank): score candidates in groups of c, merge the scores, optionally
average over reshuffled groupings (test-time scaling).

Sun et al., "GroupRank: A Groupwise Reranking Paradigm Driven by Reinforcement Learning",
arXiv 2511.11653 (eq. 1: the groupwise paradigm). Departures: the paper's answer is JSON with 0-10 integer scores
after free-text reasoning; ours is one line per candidate, ``A: 7``, with single-digit scores 0..9
(single tokens in both vocabularies), and the score of a candidate is the *expected* digit under the
model, read right after its ``X:``, with the model's own greedy digits written for earlier lines
(one cached forward step per candidate). Random grouping is the paper's best setting.

Shapes: n candidates, c group size, R reshuffles.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.llm.backbone import LETTERS, Backbone
from recsys.portable.prompts import groupwise_prompt


def make_groups(n: int, c: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Split positions 0..n-1 into ceil(n / c) groups of at most c, in order or (with ``rng``) shuffled."""
    if c < 1:
        raise ValueError(f"group size must be >= 1, got {c}")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + c] for i in range(0, n, c)]


def expected_digit(digit_logits: torch.Tensor) -> torch.Tensor:
    """(..., 10) logits of the tokens 0..9 -> (...) expected score ``sum_d p(d) * d``."""
    return (torch.softmax(digit_logits.float(), -1) * torch.arange(10, dtype=torch.float32)).sum(-1)


def merge_scores(n: int, groupings: list[list[np.ndarray]], group_scores: list[list[np.ndarray]]) -> np.ndarray:
    """(n,) mean score of each candidate over the groupings it was scored in (each grouping covers all n)."""
    total, count = np.zeros(n), np.zeros(n)
    for groups, scores in zip(groupings, group_scores):
        for g, s in zip(groups, scores):
            total[g] += s
            count[g] += 1
    return total / np.maximum(count, 1)


def answer_ids(backbone: Backbone, scores: list[int]) -> list[int]:
    """Token ids of the answer for a group: ``A : 9 \\n B : 0 \\n ... <eor>``.

    Built from ids, not text: for BPE vocabularies the text ``A : 9`` tokenizes into space-prefixed
    variants, while scoring forces the bare identifier, ``:`` and digit tokens. Training targets must
    use the same ids the scorer reads."""
    ids = []
    for j, s in enumerate(scores):
        ids += [backbone.token_id(LETTERS[j]), backbone.token_id(":"), backbone.token_id(str(int(s))),
                backbone.separator_id]
    return ids + [backbone.end_id]


class GroupwiseReranker:
    """Scores every candidate of a group with one cached decoding step per candidate."""

    def __init__(self, backbone: Backbone, titles=None, group_size: int = 20, reshuffles: int = 1, seed: int = 0,
                 max_history: int = 20):
        self.bb, self.titles, self.c, self.R, self.seed = backbone, titles, group_size, reshuffles, seed
        self.max_history = max_history
        self.digit_ids = torch.tensor([backbone.token_id(str(d)) for d in range(10)])
        self.colon = backbone.token_id(":")

    @torch.no_grad()
    def score_group(self, history, group: list[int]) -> np.ndarray:
        """(len(group),) expected scores."""
        tok = self.bb.tokenizer
        ids = tok(groupwise_prompt(self.bb, history, group, self.titles, self.max_history), return_tensors="pt",
                  add_special_tokens=False)["input_ids"]
        out = self.bb.model(input_ids=ids, use_cache=True, logits_to_keep=1)       # lm_head on the last position
        scores = []
        for j in range(len(group)):
            forced = torch.tensor([[self.bb.token_id(LETTERS[j]), self.colon]])       # "X :"
            out = self.bb.model(input_ids=forced, past_key_values=out.past_key_values, use_cache=True)
            digit_logits = out.logits[0, -1, self.digit_ids]
            scores.append(float(expected_digit(digit_logits)))
            greedy = self.digit_ids[int(digit_logits.argmax())]
            out = self.bb.model(input_ids=torch.tensor([[int(greedy), self.bb.separator_id]]),
                                past_key_values=out.past_key_values, use_cache=True)
        return np.array(scores)

    def scores(self, history, candidates: list[int]) -> np.ndarray:
        """(n,) merged scores; grouping 0 keeps the given order, the others are seeded reshuffles."""
        self.bb.model.eval()
        rng = np.random.default_rng(self.seed)
        groupings = [make_groups(len(candidates), self.c, None if r == 0 else rng) for r in range(self.R)]
        group_scores = [[self.score_group(history, [candidates[i] for i in g]) for g in groups] for groups in groupings]
        return merge_scores(len(candidates), groupings, group_scores)

    def rerank(self, history, candidates: list[int]) -> list[int]:
        s = self.scores(history, candidates)
        return [candidates[i] for i in np.argsort(-s, kind="stable")]

    def _prompt_batch(self, histories, groups) -> dict[str, torch.Tensor]:
        texts = [groupwise_prompt(self.bb, list(h), list(g), self.titles, self.max_history)
                 for h, g in zip(histories, groups)]
        enc = self.bb.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"]
        return {"input_ids": enc["input_ids"], "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    @torch.no_grad()
    def sample(self, histories, groups: list[list[int]], temperature: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample a score for every candidate of B groups of equal size c (RL rollouts).

        Returns the prompt batch, the answer ids (B, 4c + 1): ``X : d \\n`` per candidate then the end
        token, with only the digits sampled (the rest is forced), the digits (B, c), and the expected
        digit at each step (B, c), which is the score :meth:`score_group` gives. ``temperature`` 0 =
        greedy digits."""
        self.bb.model.eval()
        batch = self._prompt_batch(histories, groups)
        B, c = len(groups), len(groups[0])
        out = self.bb.model(**batch, use_cache=True, logits_to_keep=1)       # only the cache is needed
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
        answer, digits, expected = [], [], []
        for j in range(c):
            forced = torch.tensor([[self.bb.token_id(LETTERS[j]), self.colon]]).expand(B, 2)
            mask = torch.cat([mask, torch.ones(B, 2, dtype=mask.dtype)], 1)
            out = self.bb.model(input_ids=forced, attention_mask=mask, position_ids=pos + torch.arange(1, 3),
                                past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[:, -1, self.digit_ids].float()
            expected.append(expected_digit(logits))
            if temperature > 0:
                d = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                d = logits.argmax(-1)
            digits.append(d)
            tail = torch.stack([self.digit_ids[d], torch.full((B,), self.bb.separator_id)], 1)
            answer += [forced, tail]
            mask = torch.cat([mask, torch.ones(B, 2, dtype=mask.dtype)], 1)
            out = self.bb.model(input_ids=tail, attention_mask=mask, position_ids=pos + torch.arange(3, 5),
                                past_key_values=out.past_key_values, use_cache=True)
            pos = pos + 4
        answer.append(torch.full((B, 1), self.bb.end_id))
        return batch, torch.cat(answer, 1), torch.stack(digits, 1), torch.stack(expected, 1)

    def rank_windows(self, histories, windows: list[list[int]], batch_size: int = 32) -> list[list[int]]:
        """Batched scoring of whole windows as one group each (len(window) == group size); the
        reordered windows, by expected score (ties: original order)."""
        orders = []
        for i in range(0, len(windows), batch_size):
            _, _, _, scores = self.sample(histories[i:i + batch_size], windows[i:i + batch_size], 0.0)
            orders += [[w[j] for j in np.argsort(-s.numpy(), kind="stable")]
                       for s, w in zip(scores, windows[i:i + batch_size])]
        return orders
