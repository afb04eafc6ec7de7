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

The optional value head (V-STAR section "value model", ALGORITHMS.md section 3) reads the LM's last
hidden states through a small causal Transformer (``value_layers`` layers, ``value_heads`` heads,
dropout 0.1) and an MLP to one scalar per position. Departures, documented: its input is detached, so
the value loss does not move the policy (V-STAR trains both jointly with weight 1.0), and it reads only
the last ``value_context`` (16) hidden states, which already summarise the history: value-guided
decoding calls it once per tree node, and over the whole 200-token history it cost 10x the backbone.
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


@dataclass(frozen=True)
class GenerativeConfig:
    """Architecture of a generative recommender (the backbone's size applies to ``tiny`` only)."""

    backbone: str = "tiny"
    """``tiny``, ``smollm2-135m`` or a local Hugging Face checkpoint directory."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_items: int = 50
    """History items fed to the model (the most recent ones); the sequence is 1 + D * max_items tokens."""
    value_layers: int = 2
    """Transformer layers of the value head (0: an MLP on the hidden state only)."""
    value_heads: int = 4
    value_dropout: float = 0.1
    value_context: int = 16
    """The value head reads the last this many hidden states only (4 items of 4 codes)."""


class ValueHead(nn.Module):
    """V(s) for every prefix state: (B, T, H) hidden states -> (B, T) values (causal: position t sees <= t)."""

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float, context: int = 16):
        super().__init__()
        self.context = context
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) values; only the last ``context`` positions are computed (earlier ones are 0)."""
        full_T = hidden.shape[1]
        x = hidden[:, -self.context:].detach().float()
        attention_mask = attention_mask[:, -self.context:]
        if self.encoder is not None:
            T = attention_mask.shape[1]
            # allowed: earlier real tokens and oneself (a padded row sees only itself: no empty softmax)
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            allowed = (~torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1) & attention_mask.bool()[:, None, :]) | eye
            heads = self.encoder.layers[0].self_attn.num_heads
            x = self.encoder(x, mask=(~allowed).repeat_interleave(heads, 0))
        v = self.mlp(x)[..., 0]
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
        hidden = lm.config.hidden_size
        self.value_head = ValueHead(hidden, config.value_layers, config.value_heads, config.value_dropout,
                                    config.value_context) \
            if value_head else None

    # ------------------------------------------------------------------ building and saving
    @classmethod
    def build(cls, codes: np.ndarray, item_idx: np.ndarray, config: GenerativeConfig = GenerativeConfig(),
              seed: int = 0) -> GenerativeRecommender:
        """A fresh model for these semantic IDs (``tiny``: random init; else the pretrained LM + new tokens)."""
        from recsys.llm.backbone import build_tiny, load_backbone

        sizes = [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])]
        max_position = 1 + codes.shape[1] * (config.max_items + 1) + 8
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
        return cls(bb.model, bb.tokenizer, codes, item_idx, config)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        np.save(directory / "codes.npy", self.codes_np)
        np.save(directory / "item_idx.npy", self.item_idx.cpu().numpy())
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), directory / "value_head.pt")
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
        model = cls(lm, tokenizer, np.load(directory / "codes.npy"), np.load(directory / "item_idx.npy"), config)
        if (directory / "value_head.pt").exists():
            model.value_head.load_state_dict(torch.load(directory / "value_head.pt", weights_only=True))
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

    def lm_loss(self, input_ids, attention_mask) -> torch.Tensor:
        """Next-token cross-entropy over every real token after ``<bos>`` (all items of the sequence)."""
        logits = self(input_ids, attention_mask).logits[:, :-1].float()
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)

    def level_log_probs(self, logits: torch.Tensor, level: int, nodes: torch.Tensor,
                        exclude: torch.Tensor | None = None, renormalise_bans: bool = True) -> torch.Tensor:
        """Log-probs (R, K) over the codes of ``level`` given the prefixes at ``nodes`` (R,); -inf for
        invalid codes. ``exclude`` (R, n_items + 1) bool bans items: at every level a code stays open
        only if some unbanned item lies below it (:meth:`CodeTrie.open_children`), so no search or
        sample reaches a dead end.

        ``renormalise_bans``: True renormalises over the open codes (the constrained *policy*: sampling,
        RL log-probs); False renormalises over the trie's children and only then closes the banned
        ones, so a path's sum is the model's own log-likelihood of the item (beam search ranks by it;
        renormalising would lift items that share a prefix with many banned ones)."""
        trie_valid = self.trie.valid(nodes)
        valid = trie_valid if exclude is None else self.trie.open_children(nodes, exclude.to(nodes.device)[:, self.item_idx])
        scores = logits.float().gather(1, self.code_token[level].expand(len(logits), -1))
        norm = valid if renormalise_bans else trie_valid
        # a row with nothing valid is all -inf (log_softmax would give nan); invalid codes stay exactly -inf
        return scores.masked_fill(~norm, -torch.inf).log_softmax(-1).masked_fill(~valid, -torch.inf)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        device = self.code_token.device
        for name in ("child", "item", "node_depth", "codes", "item_node", "path", "leaves"):
            setattr(self.trie, name, getattr(self.trie, name).to(device))
        return out


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_generative(directory: str | Path) -> GenerativeRecommender:
    return GenerativeRecommender.from_pretrained(directory)
