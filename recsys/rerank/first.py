"""FIRST: single-token listwise reranking, and constrained decoding of listwise answers.

Reddy et al., "FIRST: Faster Improved Listwise Reranking with Single Token Decoding", EMNLP 2024
(arXiv 2406.15657); Chen, Pradeep, Lin, "An Early FIRST Reproduction...", arXiv 2411.05508.

- :func:`first_scores`: the logits of the candidates' identifier tokens at the first output position;
  candidates are ranked by them (one forward pass instead of generating the whole list).
- :func:`weighted_ranknet_loss`: ``sum_{r_i < r_j} 1/(r_i + r_j) * log(1 + exp(s_j - s_i))``, averaged over
  pairs as the official code does (``BCEWithLogits(s_i - s_j, 1)`` weighted, mean reduction).
- :func:`constrain_logits`: only identifiers not used yet, the separator after an identifier, and the
  end token are allowed, so constrained generation always yields a valid list.

Shapes: B batch, V vocabulary, n candidates in the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.portable.prompts import check_identifiers


def identifier_ids(backbone, candidates: list[int], identifiers: str = "letters") -> torch.Tensor:
    """(n,) token ids that name the window's candidates: ``A``.. or the candidates' item tokens."""
    check_identifiers(backbone, identifiers)
    if identifiers == "letters":
        return backbone.identifier_ids(len(candidates))
    return torch.tensor([backbone.token_id(f"<i{int(c)}>") for c in candidates])


def first_scores(logits: torch.Tensor, identifier_ids: torch.Tensor) -> torch.Tensor:
    """logits (B, V) at the first answer position -> (B, n) scores of the n identifiers; identifier_ids
    (n,) shared by every row (letters) or (B, n) per row (item-token identifiers)."""
    return logits.gather(-1, identifier_ids.expand(len(logits), -1))


def first_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, n) scores -> (B, n) candidate positions, best first; ties keep the original order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def weighted_ranknet_loss(scores: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """FIRST's ranking loss on first-token logits.

    scores (B, n); ranks (B, n) 1-based gold rank of each candidate; mask (B, n) True for real
    candidates. Example (one list): s = [2, 0, 1], r = [1, 2, 3] ->
    pairs (0,1): 1/3 * log(1 + e^-2) = 0.04231, (0,2): 1/4 * log(1 + e^-1) = 0.07832,
    (1,2): 1/5 * log(1 + e^1) = 0.26265; mean = 0.12776.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    r = ranks.float()
    pair = (r.unsqueeze(-1) < r.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)     # (B, n, n): i above j
    weight = 1.0 / (r.unsqueeze(-1) + r.unsqueeze(-2))
    loss = weight * F.softplus(scores.unsqueeze(-2) - scores.unsqueeze(-1))                  # s_j - s_i
    n_pairs = pair.sum()
    return (loss * pair).sum() / n_pairs.clamp(min=1)


def constrain_logits(logits: torch.Tensor, used: torch.Tensor, after_identifier: torch.Tensor,
                     identifier_ids: torch.Tensor, separator_id: int, end_id: int) -> torch.Tensor:
    """Mask logits (B, V) so the next token keeps the answer valid.

    used (B, n) bool: identifiers already written; after_identifier (B,) bool: the last token was an
    identifier (so a separator or the end comes next). Otherwise an unused identifier or the end is
    allowed; once every identifier is used only the end is. identifier_ids: (n,) the same for every
    row (letters), or (B, n) per row (item-token identifiers).
    """
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    allowed[:, end_id] = True
    ids_ok = ~used & ~after_identifier.unsqueeze(-1)                                          # (B, n)
    # scatter_add: a token listed twice in a row (padding) is allowed if any of its copies is
    allowed |= torch.zeros_like(logits).scatter_add_(1, identifier_ids.expand_as(used), ids_ok.to(logits.dtype)) > 0
    allowed[:, separator_id] = after_identifier & ~used.all(-1)
    return logits.masked_fill(~allowed, float("-inf"))


class ListConstraint:
    """The state of constrained listwise decoding for a batch (the mask of :func:`constrain_logits`).

    sizes (B,): candidates per window; identifiers beyond a window's size count as used; identifier_ids
    (n,) shared by every row, or (B, n) per row (padded beyond a row's size with any of its ids). ``mask``
    constrains the next token's logits (B, V); ``update`` records the tokens (B,) just written (-1 =
    finished). The same object drives generation and the replay of :func:`replay_log_probs`.

    ``bias`` (B, n) or (n,), optional: added to each identifier's logit before masking (the listwise
    reranker's retriever prior, ``-beta * ln(1 + position)``), so generation, its replay and FIRST all
    follow the same scores. Positions beyond a row's size get no bias.
    """

    def __init__(self, sizes: torch.Tensor, identifier_ids: torch.Tensor, separator_id: int, end_id: int,
                 bias: torch.Tensor | None = None):
        n = identifier_ids.shape[-1]
        self.separator_id, self.end_id = separator_id, end_id
        self.used = torch.arange(n, device=sizes.device)[None, :] >= sizes[:, None]          # (B, n)
        self.ids = identifier_ids.expand_as(self.used)                                        # (B, n)
        self.bias = None if bias is None else bias.expand_as(self.used).masked_fill(self.used, 0.0)
        self.after = torch.zeros(len(sizes), dtype=torch.bool, device=sizes.device)
        self.max_tokens = 2 * n + 1

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            logits = logits.scatter_add(1, self.ids, self.bias.to(logits.dtype))
        return constrain_logits(logits, self.used, self.after, self.ids, self.separator_id, self.end_id)

    def update(self, tokens: torch.Tensor) -> None:
        is_id = tokens[:, None] == self.ids                                                  # (B, n)
        self.used = self.used | is_id
        self.after = is_id.any(-1)


def replay_log_probs(logits: torch.Tensor, tokens: torch.Tensor, constraint,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (B, T) of generated answers under the *constrained* policy, and its entropy
    (B, T): the decoder's masking (``constraint``: :class:`ListConstraint` or
    :class:`recsys.rerank.slate.SlateRankConstraint`, fresh) replayed position by position.

    logits (B, T, V): the model's logits that predict each answer token; tokens (B, T): the answer,
    -1 after the end. Positions after the end get 0. ``temperature``: the rollouts' sampling
    temperature, applied after the constraint as in generation (``softmax(masked / T)``). This is the
    distribution the rollouts were sampled from, so it is the one a policy gradient must differentiate.
    """
    logps, entropies = [], []
    for t in range(tokens.shape[1]):
        tok = tokens[:, t]
        lp = torch.log_softmax(constraint.mask(logits[:, t].float()) / temperature, -1)
        p = lp.exp()
        entropies.append(-(p * lp.masked_fill(p == 0, 0)).sum(-1))
        logps.append(torch.where(tok >= 0, lp.gather(1, tok.clamp(min=0)[:, None])[:, 0], torch.zeros_like(lp[:, 0])))
        constraint.update(tok)
    valid = (tokens >= 0).float()
    return torch.stack(logps, 1) * valid, torch.stack(entropies, 1) * valid


def constrained_log_probs(logits: torch.Tensor, tokens: torch.Tensor, identifier_ids: torch.Tensor,
                          separator_id: int, end_id: int, sizes: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`replay_log_probs` of listwise answers; ``sizes`` (B,) candidates per window (default all n)."""
    ids = identifier_ids.to(logits.device)
    if sizes is None:
        sizes = torch.full((len(logits),), len(ids), device=logits.device)
    return replay_log_probs(logits, tokens, ListConstraint(sizes.to(logits.device), ids, separator_id, end_id))
