"""The listwise reranker: FIRST single-token scoring and (constrained) generation over one backbone.

    >>> rr = ListwiseReranker(load_backbone("tiny", n_items=3706))          # doctest: +SKIP
    >>> order = rr.rerank(history, candidates)                               # FIRST, sliding window
    >>> texts = rr.generate([history], [candidates[:20]], constrained=True)  # full generation

Batches are left-padded; position ids follow the attention mask, so a padded prompt gives the same
logits as the prompt alone (tested).

``retriever_prior`` beta blends in the order the candidates arrive in (the retriever's): FIRST's score
of the candidate at 0-based position j is ``logit_j - beta * ln(1 + j)``, the interpolation of a
reranker's scores with the first-stage rank common in IR reranking. beta = 0 is the model alone and a
large beta the retriever's order; :func:`pipelines.rerank.tune_retriever_prior` picks it on
validation windows. Generation adds the same prior to the identifiers' logits at every step
(:meth:`ListwiseReranker.list_constraint`), so FIRST and generation rank with one set of scores and an
RL policy is the reranker as it serves.
"""

from __future__ import annotations

import torch

from recsys.llm.backbone import Backbone
from recsys.portable.prompts import items_as_letters, listwise_prompt
from recsys.portable.window import retriever_prior, sliding_window_rerank
from recsys.precision import autocast
from recsys.rerank.first import ListConstraint, first_scores, identifier_ids
from recsys.rerank.parse import ParsedList, parse_ranking


class ListwiseReranker:
    """Ranks windows of up to ``window`` candidates with a causal LM."""

    def __init__(self, backbone: Backbone, titles: dict[int, str] | None = None, window: int = 20, stride: int = 10,
                 max_history: int = 20, bf16: bool | None = None, identifiers: str = "letters", retriever_prior: float = 0.0):
        self.bb, self.titles, self.window, self.stride, self.max_history = backbone, titles, window, stride, max_history
        self.bf16, self.identifiers, self.retriever_prior = bf16, identifiers, retriever_prior

    def prompts(self, histories, candidate_lists) -> list[str]:
        return [listwise_prompt(self.bb, list(h), list(c), self.titles, self.max_history, self.identifiers)
                for h, c in zip(histories, candidate_lists)]

    def identifier_ids(self, candidate_lists) -> torch.Tensor:
        """(B, n) identifier token ids of each window, n = the longest; shorter rows repeat their first id."""
        n = max(len(c) for c in candidate_lists)
        rows = [identifier_ids(self.bb, list(c), self.identifiers) for c in candidate_lists]
        return torch.stack([torch.cat([r, r[:1].expand(n - len(r))]) for r in rows])

    def prior_bias(self, n: int) -> torch.Tensor:
        """(n,) the retriever prior added to the identifier at each window position: -beta ln(1 + j)."""
        return torch.from_numpy(retriever_prior(n, self.retriever_prior))

    def list_constraint(self, candidate_lists) -> ListConstraint:
        """The constraint of a constrained ranking of each window, carrying the retriever prior."""
        ids = self.identifier_ids(candidate_lists)
        bias = self.prior_bias(ids.shape[-1]) if self.retriever_prior else None
        return ListConstraint(torch.tensor([len(c) for c in candidate_lists]), ids, self.bb.separator_id,
                              self.bb.end_id, bias)

    def parse(self, text: str, candidates: list[int]) -> ParsedList:
        """The ranking (positions into ``candidates``) and validity flags of a generated answer."""
        if self.identifiers == "items":
            text = items_as_letters(text, candidates)
        return parse_ranking(text, len(candidates), self.bb.tokenizer.decode([self.bb.end_id]))

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.bb.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"]
        return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def _forward(self, **batch):
        device = next(self.bb.model.parameters()).device
        with autocast(device.type, self.bf16):
            return self.bb.model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})

    @torch.no_grad()
    def first_scores(self, histories, candidate_lists) -> list[torch.Tensor]:
        """One forward pass per prompt batch: (n_q,) identifier logits at the first answer position
        (minus the retriever prior, see the module docstring)."""
        self.bb.model.eval()
        batch = self._batch(self.prompts(histories, candidate_lists))
        logits = self._forward(**batch, logits_to_keep=1).logits[:, -1].float()   # lm_head on the last position only
        scores = first_scores(logits, self.identifier_ids(candidate_lists).to(logits.device)).cpu()
        scores = scores + self.prior_bias(scores.shape[1])
        return [s[:len(c)] for s, c in zip(scores, candidate_lists)]

    def rerank(self, history, candidates: list[int]) -> list[int]:
        """FIRST reranking of any number of candidates (sliding window, back to front)."""
        def rank_window(chunk):
            s = self.first_scores([history], [chunk])[0]
            return torch.sort(s, descending=True, stable=True).indices.tolist()

        return sliding_window_rerank(candidates, rank_window, self.window, self.stride)

    @torch.no_grad()
    def generate(self, histories, candidate_lists, constrained: bool = True, temperature: float = 0.0,
                 generator: torch.Generator | None = None, return_tokens: bool = False, constraint=None):
        """Write each answer token by token (KV cache). ``temperature`` 0 = greedy. ``constraint``: the
        decoding state that masks each step (default :class:`ListConstraint`, a ranking of the whole
        window, with the retriever prior; :class:`recsys.rerank.slate.SlateRankConstraint` for
        slate-then-rank answers); unused when ``constrained`` is False. Returns the texts (and, with ``return_tokens``, the (B, T)
        generated ids with ``-1`` after the end)."""
        self.bb.model.eval()
        batch = self._batch(self.prompts(histories, candidate_lists))
        if constraint is None:
            constraint = self.list_constraint(candidate_lists)
        done = torch.zeros(len(candidate_lists), dtype=torch.bool)
        out = self._forward(**batch, use_cache=True, logits_to_keep=1)
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1]
        tokens = []
        for _ in range(constraint.max_tokens):
            logits = out.logits[:, -1].float().cpu()
            if constrained:
                logits = constraint.mask(logits)
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = logits.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, -1), tok)
            tokens.append(tok)
            constraint.update(tok)
            done |= tok == self.bb.end_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(len(tok), 1, dtype=mask.dtype)], 1)
            pos = pos + 1
            out = self._forward(input_ids=tok.clamp(min=0)[:, None], attention_mask=mask, position_ids=pos[:, None],
                                past_key_values=out.past_key_values, use_cache=True)
        generated = torch.stack(tokens, 1)
        texts = [self.bb.tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=False)
                 for row in generated]
        return (texts, generated) if return_tokens else texts

    def rerank_generate(self, history, candidates: list[int], constrained: bool = True):
        """Full-generation reranking of one window; returns the order and the parse (validity flags)."""
        parsed = self.parse(self.generate([history], [candidates], constrained)[0], candidates)
        return [candidates[i] for i in parsed.order], parsed

    def rerank_generate_window(self, history, candidates: list[int], constrained: bool = True) -> list[int]:
        """Full-generation reranking of any number of candidates (the same sliding window as FIRST)."""
        def rank_window(chunk):
            return self.parse(self.generate([history], [chunk], constrained)[0], chunk).order

        return sliding_window_rerank(candidates, rank_window, self.window, self.stride)

    def rank_windows(self, histories, windows: list[list[int]], mode: str = "first",
                     batch_size: int = 32, written: list | None = None) -> list[list[int]]:
        """Batched reranking of single windows (len <= window): FIRST scores or constrained greedy
        generation (unnamed candidates appended in their given order). Returns the reordered windows;
        ``written`` (generation), if given, receives how many items each answer named before its end token."""
        orders = []
        for i in range(0, len(windows), batch_size):
            h, w = histories[i:i + batch_size], windows[i:i + batch_size]
            if mode == "first":
                orders += [[c[j] for j in torch.sort(s, descending=True, stable=True).indices.tolist()]
                           for s, c in zip(self.first_scores(h, w), w)]
            else:
                parsed = [self.parse(text, c) for text, c in zip(self.generate(h, w, constrained=True), w)]
                orders += [[c[j] for j in p.order] for p, c in zip(parsed, w)]
                if written is not None:
                    written += [len(p.generated) for p in parsed]
        return orders
