"""Slate-then-rank answers (F-GRPO's task): choose a slate of S candidates, then rank R of them.

The answer is one completion in two phases (F-GRPO, arXiv 2605.12995; :mod:`recsys.rl.f_grpo`)::

    C\\nA\\nQ\\n ... (S identifiers)  <rank>  A\\nC\\n ... (R identifiers of the slate)  <eor>

:class:`SlateRankConstraint` masks each step so that every completion is well formed: S distinct
identifiers of the window, the rank marker, R distinct identifiers taken from the slate, the end
token. It drives generation (:meth:`recsys.rerank.listwise.ListwiseReranker.generate` with
``constraint=``) and the replay of the same masks for log-probabilities
(:func:`recsys.rerank.first.replay_log_probs`), so the policy a gradient sees is the one sampled.
A window with fewer than S candidates gets a slate of all of them (and R is capped by the slate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.rerank.parse import parse_ranking


class SlateRankConstraint:
    """Decoding state for a batch of slate-then-rank answers.

    sizes (B,): candidates per window; identifier_ids (n,): token ids of ``A``.. shared by every row
    (n >= max size), or (B, n) per row (item-token identifiers; padded beyond a row's size with any of
    its own ids, as :meth:`recsys.rerank.listwise.ListwiseReranker.identifier_ids` pads).
    """

    def __init__(self, sizes: torch.Tensor, slate_size: int, rank_size: int, identifier_ids: torch.Tensor,
                 separator_id: int, marker_id: int, end_id: int):
        if not 1 <= rank_size <= slate_size:
            raise ValueError(f"need 1 <= rank_size <= slate_size, got rank {rank_size}, slate {slate_size}")
        B, n = len(sizes), identifier_ids.shape[-1]
        self.ids = identifier_ids.expand(B, n).cpu()                                # (B, n)
        self.sep, self.marker, self.end = separator_id, marker_id, end_id
        self.valid = torch.arange(n)[None, :] < sizes[:, None]                        # (B, n) real candidates
        self.slate_size = sizes.clamp(max=slate_size)                                 # (B,)
        self.rank_size = self.slate_size.clamp(max=rank_size)
        self.in_slate = torch.zeros(B, n, dtype=torch.bool)
        self.in_rank = torch.zeros(B, n, dtype=torch.bool)
        self.ranking = torch.zeros(B, dtype=torch.bool)                               # past the marker
        self.count = torch.zeros(B, dtype=torch.long)                                 # identifiers in this phase
        self.after = torch.zeros(B, dtype=torch.bool)                                 # last token an identifier
        self.max_tokens = 2 * slate_size + 1 + 2 * rank_size + 1

    def allowed(self) -> torch.Tensor:
        """(B, n + 3) bool: which identifiers, then separator, marker, end, may come next."""
        choosing = ~self.after
        slate_open = choosing & ~self.ranking & (self.count < self.slate_size)
        rank_open = choosing & self.ranking & (self.count < self.rank_size)
        ids = (slate_open[:, None] & self.valid & ~self.in_slate) | (rank_open[:, None] & self.in_slate & ~self.in_rank)
        marker = choosing & ~self.ranking & (self.count >= self.slate_size)
        end = choosing & self.ranking & (self.count >= self.rank_size)
        return torch.cat([ids, self.after[:, None], marker[:, None], end[:, None]], 1)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> the same with every token that would break the format at -inf. A finished
        row (after the end token) may only repeat the end, which the decoder discards."""
        allowed = self.allowed()
        finished = ~allowed.any(1)
        # scatter_add, not scatter: a padded position repeats an id of its row and must not un-allow it
        ids = self.ids.to(logits.device)
        keep = torch.zeros(logits.shape, device=logits.device).scatter_add_(1, ids, allowed[:, :-3].float().to(logits.device)) > 0
        keep[:, self.sep], keep[:, self.marker] = allowed[:, -3], allowed[:, -2]
        keep[:, self.end] = allowed[:, -1] | finished
        return logits.masked_fill(~keep, float("-inf"))

    def update(self, tokens: torch.Tensor) -> None:
        """Record the tokens (B,) just written (-1 for finished rows)."""
        tokens = tokens.cpu()
        is_id = tokens[:, None] == self.ids
        self.in_slate |= is_id & ~self.ranking[:, None]
        self.in_rank |= is_id & self.ranking[:, None]
        self.count += is_id.any(1).long()
        self.after = is_id.any(1)
        to_rank = tokens == self.marker
        self.ranking |= to_rank
        self.count[to_rank] = 0
        if (tokens == self.end).any():
            self.after = self.after & (tokens != self.end)


@dataclass(frozen=True)
class SlateRank:
    """A parsed slate-then-rank answer: positions into the window."""

    slate: list[int]
    ranking: list[int]
    valid: bool
    """Both phases parse as rankings of distinct in-window identifiers, the ranking inside the slate."""


def slate_rank_positions(answer: torch.Tensor, identifier_ids: torch.Tensor, marker_id: int) -> tuple[list[int], list[int]]:
    """(slate, ranking): the window positions a generated answer names before and after the marker.

    answer (T,): token ids (-1 = padding); identifier_ids (n,): this row's identifier token ids (padding
    beyond the window repeats an earlier id, so the first match is the real position). Token-level, so
    it reads letter and item-token identifiers alike."""
    slate, ranking = [], []
    ids = identifier_ids.tolist()
    first = {}
    for j, t in enumerate(ids):
        first.setdefault(t, j)
    phase = slate
    for t in answer.tolist():
        if t == marker_id:
            phase = ranking
        elif t in first:
            phase.append(first[t])
    return slate, ranking


def parse_slate_rank(text: str, n: int, marker: str, end: str) -> SlateRank:
    """Split an answer at the first ``marker`` and parse each side with :func:`parse_ranking`."""
    slate_text, found, rank_text = text.partition(marker)
    slate = parse_ranking(slate_text + end, n, end)
    ranking = parse_ranking(rank_text, n, end)
    inside = set(ranking.generated) <= set(slate.generated)
    return SlateRank(slate.generated, ranking.generated, bool(found) and slate.valid and ranking.valid and inside)
