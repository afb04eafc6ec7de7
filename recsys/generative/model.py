"""A generative recommender: a causal LM that writes the next item as its semantic ID.

TIGER (Rajput et al., NeurIPS 2023, arXiv 2305.05065) with a decoder-only backbone, as in
MiniOneRec / V-STAR (arXiv 2602.10699): the user's history is the concatenation of its items'
semantic IDs (D tokens each: the residual k-means levels and the de-duplication level, see
:mod:`recsys.retrieval.semantic_ids`), and the model continues it with the D tokens of the next item.
Decoding is constrained by the code trie (:mod:`recsys.generative.decoding`), so every output names an
item of the catalog.

Sequence layout (B users, T tokens, left-padded)::

    <pad> ... <pad> <bos> c0(i1) c1(i1) c2(i1) c3(i1) c0(i2) ... c3(i_n)    -> next: c0(i_{n+1}) ...

Backbones: ``tiny`` (a small random-init Llama over the semantic-ID tokens only, labelled ``tiny`` in
every result), or any Hugging Face causal LM (``smollm2-135m`` or a local checkpoint) to which the
tokens ``<c{level}_{code}>`` are added with an embedding resize. Departure: titles are not added to
the history for text backbones (the history is semantic-ID tokens only).

Two layouts (``GenerativeConfig.layout``): ``token`` is the one above; ``item``
(:class:`ItemGenerativeRecommender`) gives the backbone one position per history item (its code embeddings
summed, optionally plus an item-ID embedding: a departure from semantic-ID-only inputs, labelled in every
result) and writes the next item's codes with small per-level heads on the last hidden state, so the
sequence is D times shorter, SFT trains on the next item at every position, and decoding runs the
backbone once per user.

The optional value head (V-STAR, arXiv 2602.10699, the value model of eqs. 11-12 and 15-16) reads the LM's last
hidden states through a small causal Transformer (``value_layers`` layers, ``value_heads`` heads,
dropout 0.1) and an MLP to one scalar per position. Departures, documented: its input is detached, so
the value loss does not move the policy (V-STAR trains both jointly with weight 1.0), and it reads only
a band of the last ``value_context`` (16) hidden states at each position (which already summarise the
history): value-guided decoding calls it once per tree node, and over the whole 200-token history it cost
10x the backbone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recsys.errors import RecsysError
from recsys.generative.trie import CodeTrie

LAYOUTS = ("token", "item")


@dataclass(frozen=True)
class GenerativeConfig:
    """Architecture of a generative recommender (the backbone's size applies to ``tiny`` only)."""

    backbone: str = "tiny"
    """``tiny``, ``smollm2-135m`` or a local Hugging Face checkpoint directory."""
    hidden_size: int = 128
    """Width of the tiny backbone built in code (ignored for a pretrained one)."""
    num_layers: int = 2
    """Decoder layers of the tiny backbone."""
    num_heads: int = 4
    """Attention heads of the tiny backbone."""
    max_items: int = 50
    """History items fed to the model (the most recent ones); the sequence is 1 + D * max_items tokens."""
    value_layers: int = 2
    """Transformer layers of the value head (0: an MLP on the hidden state only)."""
    value_heads: int = 4
    """Attention heads of the value head's layers."""
    value_dropout: float = 0.1
    """Dropout in the value head."""
    value_context: int = 16
    """The value head reads the last this many hidden states only (4 items of 4 codes)."""
    layout: str = "token"
    """``token``: the history is its items' code tokens, D positions per item (TIGER's layout), and the LM
    writes the next item's codes as tokens. ``item``: one position per history item (the sum of its D
    code-token embeddings) and a per-level code head on the last hidden state
    (:class:`ItemGenerativeRecommender`): D times shorter sequences, one backbone pass per user."""
    head_inner: int = 4
    """``item`` layout: hidden width of each level's code-head MLP, in multiples of the hidden size."""
    item_embeddings: bool = False
    """``item`` layout: add a learned embedding per item to each history item's input (a hybrid of
    semantic IDs and item IDs on the input side only; the output stays the semantic ID under the trie)."""
    dropout: float = 0.0
    """``item`` layout: dropout on the item input embeddings and inside the code-head MLPs (SASRec uses 0.2
    on ML-1M; the backbone itself has none)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise RecsysError(f"model.layout must be one of {LAYOUTS}, got {self.layout!r}")


class ValueHead(nn.Module):
    """V(s) for every prefix state: (B, T, H) hidden states -> (B, T) values (causal: position t sees <= t)."""

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float, context: int = 16):
        super().__init__()
        self.context = context
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) values; only the last ``context`` positions are computed (earlier ones are 0).

        Position t attends to the ``context`` positions ending at t (a causal band), so V at t depends on
        the hidden states at t - L * (context - 1) .. t alone (L layers), wherever the input window ends:
        TD training reads V(prefix) from a sequence ending at the full code, decoding from one ending at the
        prefix, and both get the same value. The input is cut to that receptive field before the last
        ``context`` positions."""
        full_T = hidden.shape[1]
        layers = len(self.encoder.layers) if self.encoder is not None else 0
        n = min(full_T, layers * (self.context - 1) + self.context)
        x = hidden[:, -n:].detach().float()
        attention_mask = attention_mask[:, -n:]
        if self.encoder is not None:
            i = torch.arange(n, device=x.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.context)
            # allowed: real tokens in the band, and oneself (a padded row sees only itself: no empty softmax)
            allowed = (band & attention_mask.bool()[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device)
            heads = self.encoder.layers[0].self_attn.num_heads
            x = self.encoder(x, mask=(~allowed).repeat_interleave(heads, 0))
        v = self.mlp(x[:, -self.context:])[..., 0]
        return torch.nn.functional.pad(v, (full_T - v.shape[1], 0))


class GenerativeRecommender(nn.Module):
    """Causal LM + semantic-ID token map + code trie (+ value head); see the module docstring.

    ``codes`` (N, D): the code of item row r, which is item index ``item_idx[r]`` of the dataset.
    """

    def __init__(self, lm, tokenizer, codes: np.ndarray, item_idx: np.ndarray, config: GenerativeConfig,
                 value_head: bool = True):
        super().__init__()
        self.lm, self.tokenizer, self.config = lm, tokenizer, config
        self.trie = CodeTrie(codes)
        self.depth = self.trie.depth
        sizes = [int(codes[:, level].max()) + 1 for level in range(self.depth)]
        token = torch.zeros(self.depth, self.trie.n_codes, dtype=torch.long)
        for level, size in enumerate(sizes):
            ids = tokenizer.convert_tokens_to_ids([f"<c{level}_{c}>" for c in range(size)])
            if tokenizer.unk_token_id in ids:
                raise RecsysError(f"tokenizer lacks semantic-ID tokens of level {level}")
            token[level, :size] = torch.tensor(ids)
        self.register_buffer("code_token", token, persistent=False)                 # (D, K)
        item_idx = np.asarray(item_idx, dtype=np.int64)
        self.register_buffer("item_idx", torch.from_numpy(item_idx), persistent=False)   # (N,) row -> idx
        by_idx = torch.zeros(int(item_idx.max()) + 1, self.depth, dtype=torch.long)
        by_idx[torch.from_numpy(item_idx)] = torch.from_numpy(np.asarray(codes, dtype=np.int64))
        self.register_buffer("idx_codes", by_idx, persistent=False)                 # (n_items + 1, D)
        self.codes_np = np.asarray(codes)
        self.value_head = self._value_head(lm.config.hidden_size) if value_head else None

    def _value_head(self, hidden: int) -> ValueHead:
        c = self.config
        return ValueHead(hidden, c.value_layers, c.value_heads, c.value_dropout, c.value_context)

    # ------------------------------------------------------------------ building and saving
    @classmethod
    def build(cls, codes: np.ndarray, item_idx: np.ndarray, config: GenerativeConfig = GenerativeConfig(),
              seed: int = 0) -> GenerativeRecommender:
        """A fresh model for these semantic IDs (``tiny``: random init; else the pretrained LM + new tokens)."""
        from recsys.llm.backbone import build_tiny, load_backbone

        sizes = [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])]
        per_item = codes.shape[1] if config.layout == "token" else 1
        max_position = 1 + per_item * (config.max_items + 1) + 8
        if config.backbone == "tiny":
            bb = build_tiny(0, sizes, config.hidden_size, config.num_layers, config.num_heads, max_position, seed)
        else:
            bb = load_backbone(config.backbone)
            words = [f"<c{level}_{c}>" for level, size in enumerate(sizes) for c in range(size)]
            bb.tokenizer.add_special_tokens({"additional_special_tokens": words})
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                bb.model.resize_token_embeddings(len(bb.tokenizer))
        torch.manual_seed(seed)
        return LAYOUT_CLASSES[config.layout](bb.model, bb.tokenizer, codes, item_idx, config)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        np.save(directory / "codes.npy", self.codes_np)
        np.save(directory / "item_idx.npy", self.item_idx.cpu().numpy())
        for name in ("value_head", "code_head", "item_embedding"):
            if getattr(self, name, None) is not None:
                torch.save(getattr(self, name).state_dict(), directory / f"{name}.pt")
        (directory / "generative.json").write_text(json.dumps({"model_type": "generative",
                                                               "config": dataclasses.asdict(self.config)}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GenerativeRecommender:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        if not (directory / "generative.json").exists():
            raise RecsysError(f"{directory}: not a generative recommender (no generative.json); "
                              "train one with `recsys train generative`")
        config = GenerativeConfig(**json.loads((directory / "generative.json").read_text())["config"])
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = LAYOUT_CLASSES[config.layout](lm, tokenizer, np.load(directory / "codes.npy"),
                                              np.load(directory / "item_idx.npy"), config)
        for name in ("value_head", "code_head", "item_embedding"):
            if (directory / f"{name}.pt").exists() and getattr(model, name, None) is not None:
                getattr(model, name).load_state_dict(torch.load(directory / f"{name}.pt", weights_only=True))
        return model

    # ------------------------------------------------------------------ tokens and forward passes
    def sequence(self, history, prefix=()) -> list[int]:
        """Token ids of one history (item indices) plus an optional code prefix of the next item."""
        items = torch.as_tensor(np.asarray(history, dtype=np.int64)[-self.config.max_items:])
        if len(items) and (items.min() < 1 or items.max() >= len(self.idx_codes)):
            raise RecsysError(f"history holds item indices outside 1..{len(self.idx_codes) - 1}")
        levels = torch.arange(self.depth)
        hist = self.code_token[levels, self.idx_codes[items]].reshape(-1).tolist()
        tail = [int(self.code_token[level, int(c)]) for level, c in enumerate(prefix)]
        return [self.tokenizer.bos_token_id] + hist + tail

    def batch(self, histories, prefixes=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` (B, T) for histories (+ code prefixes)."""
        rows = [self.sequence(h, prefixes[i] if prefixes is not None else ()) for i, h in enumerate(histories)]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        device = self.code_token.device
        return ids.to(device), mask.to(device)

    def forward(self, input_ids, attention_mask, past_key_values=None, position_ids=None, use_cache=False,
                output_hidden_states=False):
        if position_ids is None:
            position_ids = positions(attention_mask)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=use_cache,
                       output_hidden_states=output_hidden_states)

    def train_batch(self, sequences) -> dict:
        """An SFT batch of item sequences (each a window of at most ``max_items + 1`` items)."""
        ids, mask = self.batch(sequences)
        return {"input_ids": ids, "attention_mask": mask}

    def sft_loss(self, input_ids, attention_mask) -> torch.Tensor:
        """Next-token cross-entropy over every real token after ``<bos>`` (all items of the sequence)."""
        logits = self(input_ids, attention_mask).logits[:, :-1].float()
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)

    def vocab_to_codes(self, logits: torch.Tensor, levels: torch.Tensor | int) -> torch.Tensor:
        """Code logits (..., K) of ``levels`` (int or (...,) long) from vocabulary logits (..., V)."""
        index = self.code_token[levels]
        return logits.float().gather(-1, index.expand(*logits.shape[:-1], index.shape[-1]))

    def teacher_forced(self, histories, codes: torch.Tensor, values: bool = False):
        """Code logits (R, D, K) of every level of ``codes`` (R, D) after its history, one forward pass;
        with ``values`` also V(s_0..s_D) (R, D + 1) from the value head (else None)."""
        D = self.depth
        ids, mask = self.batch(histories, codes.tolist())
        out = self(ids, mask, output_hidden_states=values)
        logits = self.vocab_to_codes(out.logits[:, -D - 1:-1], torch.arange(D, device=ids.device))
        return logits, (self.value_head(out.hidden_states[-1], mask)[:, -D - 1:] if values else None)

    def first_logits(self, histories, end_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Level-0 code logits (B, K) after each history and, with ``end_id``, that token's logit (B,)."""
        ids, mask = self.batch(histories)
        logits = self(ids, mask).logits[:, -1].float()
        return self.vocab_to_codes(logits, 0), (logits[:, end_id] if end_id is not None else None)

    def level_log_probs(self, logits: torch.Tensor, level: int, nodes: torch.Tensor,
                        exclude: torch.Tensor | None = None, renormalise_bans: bool = True) -> torch.Tensor:
        """Log-probs (R, K) over the codes of ``level`` from its code logits (R, K) given the prefixes at
        ``nodes`` (R,); -inf for invalid codes. ``exclude`` (R, n_items + 1) bool bans items: at every level a code stays open
        only if some unbanned item lies below it (:meth:`CodeTrie.open_children`), so no search or
        sample reaches a dead end.

        ``renormalise_bans``: True renormalises over the open codes (the constrained *policy*: sampling,
        RL log-probs); False renormalises over the trie's children and only then closes the banned
        ones, so a path's sum is the model's own log-likelihood of the item (beam search ranks by it;
        renormalising would lift items that share a prefix with many banned ones)."""
        trie_valid = self.trie.valid(nodes)
        valid = trie_valid if exclude is None else self.trie.open_children(nodes, exclude.to(nodes.device)[:, self.item_idx])
        scores = logits.float()
        norm = valid if renormalise_bans else trie_valid
        # a row with nothing valid is all -inf (log_softmax would give nan); invalid codes stay exactly -inf
        return scores.masked_fill(~norm, -torch.inf).log_softmax(-1).masked_fill(~valid, -torch.inf)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        device = self.code_token.device
        for name in ("child", "item", "node_depth", "codes", "item_node", "path", "leaves"):
            setattr(self.trie, name, getattr(self.trie, name).to(device))
        return out


class CodeHead(nn.Module):
    """Per-level code head of the ``item`` layout: a query (..., H) -> the vector (..., H) whose dot products
    with the level's code-token embeddings are its logits.

    ``z = q + MLP_l(RMSNorm_l(q))``, then ``RMSNorm'_l(z)``; one pre-norm residual MLP (H -> inner -> H,
    GELU) per level, the output tied to the input embeddings (as the backbone's LM head is)."""

    def __init__(self, hidden: int, depth: int, inner: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout),
                                               nn.Linear(inner, hidden)) for _ in range(depth))
        self.out = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(depth))

    def forward(self, q: torch.Tensor, level: int) -> torch.Tensor:
        return self.out[level](q + self.mlp[level](self.norm[level](q)))


class ItemGenerativeRecommender(GenerativeRecommender):
    """The ``item`` layout: one backbone position per history item, a per-level code head for the next item.

    Input of history item i (RPG-style item-level input, Hou et al. 2025, arXiv 2506.05781, over TIGER's
    semantic IDs): ``x_i = sum_l E[token(l, c_l(i))]``, the sum of the embeddings of its D code tokens
    (the same tokens and table as the ``token`` layout), after ``<bos>``; so the sequence is 1 + n
    positions instead of 1 + D * n. The backbone's last hidden state h (after its final norm) is the
    user state; the next item is written level by level with the query
    ``q_l = h + sum_{j<l} E[token(j, c_j)]`` through :class:`CodeHead` level l, logits over the level's
    codes by the tied code-token embeddings. So ``p(item) = prod_l p(c_l | h, c_<l)`` as in TIGER, but
    every prefix after the first costs one small MLP, not a backbone pass, and SFT predicts the next
    item at every position of a sequence at once (as SASRec does). The value head (V-STAR) reads the
    detached query ``q_l`` of a prefix (an MLP: ``value_layers`` is ignored).

    Shapes: B histories, T items, D levels, K codes, H hidden.
    """

    def __init__(self, lm, tokenizer, codes: np.ndarray, item_idx: np.ndarray, config: GenerativeConfig,
                 value_head: bool = True):
        super().__init__(lm, tokenizer, codes, item_idx, config, value_head)
        hidden = lm.config.hidden_size
        self.code_head = CodeHead(hidden, self.depth, config.head_inner * hidden, config.dropout)
        self.dropout = config.dropout
        self.item_embedding = nn.Embedding(len(self.idx_codes), hidden, padding_idx=0) \
            if config.item_embeddings else None
        if self.item_embedding is not None:
            nn.init.normal_(self.item_embedding.weight[1:], std=lm.config.initializer_range)
        sizes = torch.tensor([int(codes[:, level].max()) + 1 for level in range(self.depth)])
        self.register_buffer("code_valid", torch.arange(self.trie.n_codes)[None] < sizes[:, None],
                             persistent=False)                                           # (D, K)

    def _value_head(self, hidden: int) -> ValueHead:
        return ValueHead(hidden, 0, 1, 0.0, context=1)

    def set_dropout(self, p: float) -> None:
        """Dropout of the inputs and code heads (RL sets 0: its log-prob ratios and KL compare
        deterministic policies)."""
        self.dropout = p
        for m in self.code_head.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    # ------------------------------------------------------------------ inputs
    def item_batch(self, histories, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded item indices (B, T) of the last ``window`` (default ``max_items``) items of each
        history (0: padding), and the mask (B, T); T >= 1."""
        window = window or self.config.max_items
        rows = [np.asarray(h, dtype=np.int64)[-window:] for h in histories]
        for r in rows:
            if len(r) and (r.min() < 1 or r.max() >= len(self.idx_codes)):
                raise RecsysError(f"history holds item indices outside 1..{len(self.idx_codes) - 1}")
        T = max(1, max(len(r) for r in rows))
        items = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            items[i, T - len(r):] = torch.from_numpy(r)
        items = items.to(self.code_token.device)
        return items, (items > 0).long()

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., D', H) of the code tokens of ``codes`` (..., D'), level j at position j."""
        levels = torch.arange(codes.shape[-1], device=codes.device)
        return self.lm.get_input_embeddings()(self.code_token[levels, codes])

    def encode(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T + 1, H) of ``<bos>`` + the left-padded item indices ``items`` (B, T), ``mask``
        (B, T). ``<bos>`` sits just before each row's first item, so column t holds the state after the
        items of columns < t (``<bos>`` alone at the first item's column): column T is the user state."""
        B, T = mask.shape
        x = self.code_embeddings(self.idx_codes[items]).sum(2)                            # (B, T, H)
        if self.item_embedding is not None:
            x = x + self.item_embedding(items)
        x = nn.functional.dropout(x, self.dropout, self.training)
        x = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], 1)                            # room for <bos>
        mask = torch.cat([mask.new_zeros(B, 1), mask], 1)
        first = T - mask.sum(1)                                                          # (B,) column of <bos>
        rows = torch.arange(B, device=mask.device)
        bos = self.lm.get_input_embeddings().weight[self.tokenizer.bos_token_id]
        x = x.index_put((rows, first), bos.expand(B, -1).to(x.dtype))
        mask = mask.index_put((rows, first), torch.ones_like(first))
        out = self.lm.model(inputs_embeds=x, attention_mask=mask, position_ids=positions(mask))
        return out.last_hidden_state

    def queries(self, state: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """Queries (..., l + 1, H) of the prefixes of length 0..l of ``prefixes`` (..., l); ``state`` (..., H)."""
        e = self.code_embeddings(prefixes)                                               # (..., l, H)
        cum = torch.cat([e.new_zeros(*e.shape[:-2], 1, e.shape[-1]), e.cumsum(-2)], -2)   # (..., l + 1, H)
        return state[..., None, :] + cum

    def code_logits(self, q: torch.Tensor, level: int, mask: bool = True) -> torch.Tensor:
        """Logits (..., K) of the codes of ``level`` for queries (..., H); -inf past the level's codebook
        (``mask=False``: left as computed, for export; no trie ever allows those codes)."""
        table = self.lm.get_input_embeddings()(self.code_token[level])                   # (K, H)
        logits = (self.code_head(q, level) @ table.T).float()
        return logits.masked_fill(~self.code_valid[level], -torch.inf) if mask else logits

    def values(self, q: torch.Tensor) -> torch.Tensor:
        """V(s) (...,) of the prefixes with queries ``q`` (..., H)."""
        flat = q.reshape(-1, 1, q.shape[-1])
        return self.value_head(flat, torch.ones(len(flat), 1, device=q.device))[:, 0].view(q.shape[:-1])

    # ------------------------------------------------------------------ the common interface
    def train_batch(self, sequences) -> dict:
        items, mask = self.item_batch(sequences, window=max(len(s) for s in sequences))
        return {"items": items, "mask": mask}

    def sft_loss(self, items, mask) -> torch.Tensor:
        """Cross-entropy of every level of every item after ``<bos>`` and the items before it, averaged over
        the real items and levels: (B, T) left-padded item indices, (B, T) mask."""
        state = self.encode(items, mask)[:, :-1]                # (B, T, H): column t predicts item t
        codes = self.idx_codes[items]                                                     # (B, T, D)
        q = self.queries(state, codes)                                                    # (B, T, D+1, H)
        loss, real = 0.0, mask.bool()
        for level in range(self.depth):
            logits = self.code_logits(q[..., level, :], level)                            # (B, T, K)
            loss = loss + nn.functional.cross_entropy(logits[real], codes[..., level][real])
        return loss / self.depth

    def teacher_forced(self, histories, codes: torch.Tensor, values: bool = False):
        # a group's rollouts repeat one history object: encode each distinct object once
        slot = {}
        for h in histories:
            slot.setdefault(id(h), (len(slot), h))
        index = torch.tensor([slot[id(h)][0] for h in histories], device=self.code_token.device)
        state = self.user_state([h for _, h in slot.values()])[index]                    # (R, H)
        q = self.queries(state, codes.to(state.device))                                   # (R, D+1, H)
        logits = torch.stack([self.code_logits(q[:, level], level) for level in range(self.depth)], 1)
        return logits, (self.values(q) if values else None)

    def first_logits(self, histories, end_id: int | None = None):
        state = self.user_state(histories)
        end = None
        if end_id is not None:
            end = (self.code_head(state, 0) @ self.lm.get_input_embeddings().weight[end_id]).float()
        return self.code_logits(state, 0), end

    def user_state(self, histories) -> torch.Tensor:
        """h (B, H): the last hidden state after each history (``<bos>`` alone for an empty one)."""
        items, mask = self.item_batch(histories)
        return self.encode(items, mask)[:, -1]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_generative(directory: str | Path) -> GenerativeRecommender:
    return GenerativeRecommender.from_pretrained(directory)


LAYOUT_CLASSES = {"token": GenerativeRecommender, "item": ItemGenerativeRecommender}
