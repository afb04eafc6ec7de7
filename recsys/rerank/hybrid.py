"""Hybrid item tokens for pretrained LMs: the retriever's knowledge of an item, inside the prompt.

LLaRA (Liao et al., "LLaRA: Large Language-Recommendation Assistant", SIGIR 2024, arXiv 2312.02445, §3.2):
every item in a prompt is its title tokens followed by one soft token, a learned projection of the item's
embedding from a sequential recommender into the LM's input embedding space. The LM reads the title as text and
the soft token as what the retriever learned from behaviour, which the title does not carry.

Here: the placeholder token ``<item>`` is added to the tokenizer; :func:`encode` renders the listwise prompt of
:mod:`recsys.portable.prompts` with each item as ``{title} <item>`` (the title capped at ``title_words`` words,
or dropped with 0: the soft token then carries the item alone) and records, per position, which item each
placeholder stands for. :class:`HybridFirst` replaces the placeholders' input embeddings by
``ItemProjector(retriever vectors)`` and scores the window FIRST-style (arXiv 2406.15657) from the last prompt
position's hidden state only (no (B, T, V) logits): against the candidates' identifier tokens (letters,
:meth:`HybridFirst.first_scores`) or against the candidates' own soft tokens (:meth:`HybridFirst.item_scores`). ``keep_layers`` keeps the first N decoder layers (SmolLM2-135M has 30), the cheap way to
train on a CPU; the projector trains in full, the LM through LoRA (:func:`recsys.llm.backbone.apply_lora`) or in
full. Departures: LLaRA's curriculum (text-only prompts first, then hybrid) and its next-item generation target
are not used; the target is the FIRST ranking of the window, optionally with a next-item cross-entropy at every
history ``<item>`` against the whole catalogue's soft tokens (:meth:`HybridFirst.history_loss`; SASRec's
objective, arXiv 1808.09781 §3, on the same forward pass: ``max_history - 1`` labels per window instead of one).

The LM's own reading of each item (:func:`text_states`): with titles dropped from the prompt, the only way the
language pretraining reaches a soft token is through its input. ``text_states`` runs every item's catalogue
text (title, year, categories) once through the LM's first layers and mean-pools the hidden states; the
projector then maps ``[retriever vector, text state]`` (one soft token per item still). It plays the part of
LLaRA's title tokens at no cost per prompt; with random weights (the ``-scratch`` control) the same states carry
no knowledge of the items (a ridge probe from the states to SASRec's ML-1M item vectors, held-out items: R^2
0.14 from SmolLM2's first 8 layers, 0.00 from the same layers at random init;
``python -m pipelines.benchmarks.text_state_probe``).

Shapes: B prompts, T tokens, d_r retriever width, D LM width, n candidates per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.errors import RecsysError
from recsys.llm.backbone import Backbone
from recsys.portable.prompts import Titles, domain_words, listwise_prompt, templates

ITEM_TOKEN = "<item>"
PROMPTS = ("listwise", "compact")


def add_item_token(backbone: Backbone) -> int:
    """Add ``<item>`` to the tokenizer (and an embedding row) if it is not a single token yet; returns its id."""
    tokenizer = backbone.tokenizer
    ids = tokenizer.encode(ITEM_TOKEN, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [ITEM_TOKEN]})
        with torch.random.fork_rng():
            torch.manual_seed(0)
            backbone.model.resize_token_embeddings(len(tokenizer))
    return backbone.token_id(ITEM_TOKEN)


def hybrid_titles(titles: dict[int, str] | None, items: list[int], title_words: int | None) -> Titles:
    """idx -> ``"{title} <item>"`` for ``items``: the title cut to its first ``title_words`` words (None: whole;
    0 or no titles: the soft token alone), in the titles' domain (:class:`recsys.portable.prompts.Titles`)."""
    out = {}
    for i in items:
        words = (titles or {}).get(i, "").split()
        if title_words is not None:
            words = words[:title_words]
        out[i] = " ".join([*words, ITEM_TOKEN])
    return Titles(out, getattr(titles, "domain", "items"))


def compact_prompt(history: list[int], window: list[int], titles: Titles, max_history: int = 20) -> str:
    """The ``hybrid_compact`` prompt of ``recsys/portable/templates.yaml``: the history's last ``max_history``
    items then the window, each as its ``titles`` entry (``"{title words} <item>"``), in one line each and
    without the chat frame or identifiers (the window is scored against its own soft tokens). Items are joined
    without a separator: ``<item>`` is a token of its own, so a soft token alone costs one position."""
    t = templates()["hybrid_compact"]
    hist = "".join(t["history_item"].format(title=titles[i]) for i in history[-max_history:])
    cands = "".join(t["candidate"].format(title=titles[i]) for i in window)
    return t["user"].format(history=hist, candidates=cands, **domain_words(titles.domain))


@dataclass
class HybridBatch:
    """A left-padded batch: ``input_ids``, ``attention_mask``, ``position_ids`` (B, T), ``item_idx`` (B, T),
    the retriever item index at each ``<item>`` position and 0 elsewhere, and ``next_item`` (B, T), at each
    history ``<item>`` but the last the history item that follows it, 0 elsewhere."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    item_idx: torch.Tensor
    next_item: torch.Tensor


def encode(backbone: Backbone, histories: list[list[int]], windows: list[list[int]], titles: dict[int, str] | None,
           max_history: int = 20, title_words: int | None = 8, prompt: str = "listwise") -> HybridBatch:
    """Hybrid prompts of (history, window) pairs, tokenized and aligned with their items: ``listwise`` (the
    chat prompt of :func:`recsys.portable.prompts.listwise_prompt`, candidates with identifiers) or ``compact``
    (:func:`compact_prompt`). The prompt lists ``history[-max_history:]`` then the window, so the k-th
    ``<item>`` of a row stands for the k-th item of that sequence; a title that itself tokenizes into
    ``<item>`` breaks the alignment and is an error."""
    if prompt not in PROMPTS:
        raise RecsysError(f"hybrid prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    item_id = backbone.token_id(ITEM_TOKEN)
    rows, items, nexts = [], [], []
    for history, window in zip(histories, windows):
        recent = list(history[-max_history:])
        shown = recent + list(window)
        shown_titles = hybrid_titles(titles, shown, title_words)
        text = (compact_prompt(list(history), list(window), shown_titles, max_history) if prompt == "compact"
                else listwise_prompt(backbone, list(history), list(window), shown_titles, max_history))
        ids = backbone.tokenizer.encode(text, add_special_tokens=False)
        slots = [k for k, t in enumerate(ids) if t == item_id]
        if len(slots) != len(shown):
            raise RecsysError(f"hybrid prompt: {len(slots)} {ITEM_TOKEN} tokens for {len(shown)} items; "
                              "an item title must not contain the placeholder")
        rows.append(ids)
        items.append(dict(zip(slots, shown)))
        nexts.append(dict(zip(slots[:len(recent) - 1], recent[1:])))
    T = max(len(r) for r in rows)
    pad = backbone.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    item_idx = torch.zeros((len(rows), T), dtype=torch.long)
    next_item = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (ids, slots, follow) in enumerate(zip(rows, items, nexts)):
        offset = T - len(ids)                                         # left padding: the last position is real
        input_ids[b, offset:], mask[b, offset:] = torch.tensor(ids), 1
        for k, i in slots.items():
            item_idx[b, offset + k] = i
        for k, i in follow.items():
            next_item[b, offset + k] = i
    return HybridBatch(input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), item_idx, next_item)


class _Enough(Exception):
    """Raised by :func:`text_states`' hook once the layer it reads has run."""


@torch.no_grad()
def text_states(backbone: Backbone, texts: list[str], layers: int, batch_size: int = 64) -> torch.Tensor:
    """(N, D) each text's hidden states after the backbone's first ``layers`` decoder layers (the residual
    stream; only those layers run), averaged over its tokens; then standardised per dimension over the N texts
    and scaled to unit length per row.

    Read before :class:`HybridFirst` drops layers (``layers`` may exceed ``keep_layers``). Deterministic: the
    same weights and texts give the same states, so a trained model's are recomputed at load, not saved."""
    model = backbone.model
    decoder = model.model
    if not 1 <= layers <= len(decoder.layers):
        raise RecsysError(f"text state layers must be in 1..{len(decoder.layers)}, got {layers}")
    tokenizer = backbone.tokenizer
    was_training = model.training
    model.eval()
    rows = []
    captured = []

    def stop(_module, _inputs, output):            # the layers after the ``layers``-th are never run
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Enough

    handle = decoder.layers[layers - 1].register_forward_hook(stop)
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer.encode(t or " ", add_special_tokens=False) for t in texts[start:start + batch_size]]
            T = max(len(i) for i in ids)
            input_ids = torch.zeros((len(ids), T), dtype=torch.long)
            mask = torch.zeros((len(ids), T), dtype=torch.long)
            for b, i in enumerate(ids):                 # right padding: positions start at 0 for every text
                input_ids[b, :len(i)], mask[b, :len(i)] = torch.tensor(i), 1
            try:
                decoder(input_ids=input_ids, attention_mask=mask)
            except _Enough:
                pass
            hidden = captured.pop()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * m).sum(1) / m.sum(1))
    finally:
        handle.remove()
        model.train(was_training)
    x = torch.cat(rows).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6) if len(x) > 1 else x
    return nn.functional.normalize(x, dim=-1)


class ItemProjector(nn.Module):
    """Retriever item vectors (frozen, (N + 1, d_r), row 0 = padding) -> LM input embeddings (D,) through a
    two-layer MLP (LLaRA's projector)."""

    def __init__(self, item_vectors: torch.Tensor, lm_width: int, hidden: int | None = None):
        super().__init__()
        if item_vectors.ndim != 2:
            raise RecsysError(f"item vectors must be (n_items + 1, d), got shape {tuple(item_vectors.shape)}")
        self.register_buffer("items", item_vectors.detach().float().clone(), persistent=True)
        d = item_vectors.shape[1]
        hidden = hidden or lm_width
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, lm_width))

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(...) item indices -> (..., D)."""
        return self.mlp(self.items[item_idx])


class HybridFirst(nn.Module):
    """A causal LM whose ``<item>`` inputs are projected retriever vectors, scoring windows FIRST-style."""

    def __init__(self, backbone: Backbone, item_vectors: torch.Tensor, keep_layers: int | None = None,
                 n_items: int | None = None, item_texts: list[str] | None = None, text_layers: int | None = None,
                 retriever_input: bool = True):
        """``item_vectors`` (N + 1, d_r); ``item_texts`` (N, in item order) with ``text_layers``: the projector
        also reads each item's :func:`text_states`, scaled to the retriever vectors' mean row norm.
        ``retriever_input=False`` (needs the text states): the projector reads the text states alone, so an
        item's soft token holds only what the LM makes of its text, none of the retriever's behaviour signal
        (a content reranker over the retriever's candidates)."""
        super().__init__()
        if n_items is not None and item_vectors.shape[0] != n_items + 1:
            raise RecsysError(f"retriever item vectors have {item_vectors.shape[0]} rows; the catalog needs "
                              f"{n_items + 1} ({n_items} items + padding row 0)")
        if not (retriever_input or text_layers):
            raise RecsysError("a soft token without the retriever's vector needs the items' text states "
                              "(text_layers)")
        if text_layers:
            if item_texts is None or len(item_texts) != item_vectors.shape[0] - 1:
                raise RecsysError(f"text states need one text per item: {item_vectors.shape[0] - 1} items, "
                                  f"{0 if item_texts is None else len(item_texts)} texts")
            states = text_states(backbone, item_texts, text_layers) * item_vectors[1:].norm(dim=-1).mean()
            text = torch.cat([torch.zeros(1, states.shape[1]), states])
            item_vectors = torch.cat([item_vectors.float(), text], dim=1) if retriever_input else text
        self.backbone = backbone
        self.item_token_id = add_item_token(backbone)
        self.lm = backbone.model
        if keep_layers is not None:
            layers = self.lm.model.layers
            if not 1 <= keep_layers <= len(layers):
                raise RecsysError(f"keep_layers must be in 1..{len(layers)}, got {keep_layers}")
            self.lm.model.layers = layers[:keep_layers]
            self.lm.config.num_hidden_layers = keep_layers
        self.projector = ItemProjector(item_vectors, self.lm.get_input_embeddings().embedding_dim)

    def lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05) -> HybridFirst:
        """Adapt the LM with LoRA on every linear layer (peft): its own weights freeze, the adapters and the
        projector train."""
        from recsys.llm.backbone import apply_lora

        self.lm = apply_lora(self.backbone, r=r, alpha=alpha, dropout=dropout).model
        return self

    def _decoder(self):
        return (self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm).model

    def embed(self, input_ids: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, D): the token embeddings, with each ``<item>`` position's replaced by its item's
        projected retriever vector."""
        text = self.lm.get_input_embeddings()(input_ids)
        soft = self.projector(item_idx).to(text.dtype)
        return torch.where((input_ids == self.item_token_id).unsqueeze(-1), soft, text)

    def hidden(self, batch: HybridBatch) -> torch.Tensor:
        """(B, T, D) the decoder's final hidden states."""
        return self._decoder()(inputs_embeds=self.embed(batch.input_ids, batch.item_idx),
                               attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids).last_hidden_state

    def last_hidden(self, batch: HybridBatch) -> torch.Tensor:
        """(B, D) the decoder's final hidden state at the last prompt position."""
        return self.hidden(batch)[:, -1]

    def window_and_history_scores(self, batch: HybridBatch, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: (B, n) :meth:`item_scores` of the window and (M, N + 1) scores of the whole catalogue
        (row 0, padding, at -inf) at the M history positions that have a next item (``batch.next_item > 0``)."""
        h = self.hidden(batch)
        catalogue = self.projector(torch.arange(self.projector.items.shape[0], device=h.device)).to(h.dtype)
        window = torch.einsum("bd,bnd->bn", h[:, -1], catalogue[items])
        at = batch.next_item > 0
        history = h[at] @ catalogue.T
        history[:, 0] = float("-inf")
        return window, history

    @staticmethod
    def history_loss(history_scores: torch.Tensor, batch: HybridBatch) -> torch.Tensor:
        """Mean next-item cross-entropy over the history positions (:meth:`window_and_history_scores`)."""
        return nn.functional.cross_entropy(history_scores.float(), batch.next_item[batch.next_item > 0])

    def first_scores(self, batch: HybridBatch, identifier_ids: torch.Tensor) -> torch.Tensor:
        """(B, n) logits of the n identifier tokens at the last position (the first answer token)."""
        head = self.lm.get_output_embeddings()
        scores = self.last_hidden(batch) @ head.weight[identifier_ids].T
        return scores + head.bias[identifier_ids] if getattr(head, "bias", None) is not None else scores

    def item_scores(self, batch: HybridBatch, items: torch.Tensor) -> torch.Tensor:
        """(B, n) scores of the window's items (B, n) as the next item: the last hidden state against each
        item's soft token, the same projected vector the prompt shows it by. FIRST with item identifiers:
        an item's own embedding is its output row, as with tied item tokens, so the model need not learn to
        point from a letter back to the item it labels."""
        return torch.einsum("bd,bnd->bn", self.last_hidden(batch), self.projector(items).to(self.lm.dtype))
