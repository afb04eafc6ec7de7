"""SASRec: self-attentive sequential recommendation.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv 1808.09781).
Trained by default with full softmax cross-entropy over all items, following Klenitskiy & Vasilev,
"Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?", RecSys 2023: that loss is
what makes SASRec reach the published full-ranking numbers on ML-1M (arXiv 2309.07602).

Departures from the original paper, all deliberate:
- pre-LayerNorm blocks with a final LayerNorm (as in the pmixer reproduction), scaled dot-product
  attention, output scores tied to the item embedding table;
- loss ``"ce"`` (full softmax, default) or ``"sampled"`` (sampled softmax with uniform negatives
  shared across the batch) instead of binary cross-entropy with one negative;
- attention masks padding keys, so that results do not depend on how much a batch is padded;
- positions count back from the end of a window of ``max_len`` (the last item always has position
  ``max_len``), which equals the original's right-aligned window and lets batches be padded only to
  their own longest sequence.

Shapes: B = batch, T = sequence length (<= max_len), d = hidden size, N = n_items (+1 for padding 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.errors import RecsysError
from recsys.precision import autocast


@dataclass(frozen=True)
class SASRecConfig:
    """Architecture and loss of a SASRec model."""

    n_items: int = 0
    """Number of real items; embedding rows = n_items + 1 (row 0 is padding). Training fills it in
    from the dataset."""
    max_len: int = 200
    """Longest history the model reads (the most recent items are kept)."""
    hidden_size: int = 64
    """Width d of item embeddings and of every block."""
    num_layers: int = 2
    """Number of self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and feed-forward outputs."""
    loss: str = "ce"
    """``ce``: full softmax over all items; ``sampled``: sampled softmax."""
    num_negatives: int = 256
    """``sampled`` only: uniform negatives per batch, shared by every position."""
    ce_chunk: int = 256
    """``ce`` in fp32 training: positions per chunk of :func:`chunked_softmax_ce`, which forms the loss and its
    gradient chunk by chunk (the same maths, 2.3x faster on a 2-core CPU for ML-1M's 3,706 items); 0 = the
    plain ``cross_entropy`` over the whole (positions x items) logit matrix."""

    def __post_init__(self):
        if self.loss not in ("ce", "sampled"):
            raise RecsysError(f"SASRec loss must be 'ce' or 'sampled', got {self.loss!r}")
        if self.hidden_size % self.num_heads:
            raise RecsysError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy of ``h @ weight.T`` with its gradient formed in the forward pass, one chunk of
    positions at a time; see :func:`chunked_softmax_ce`."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        total = h.new_zeros(())
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        for start in range(0, h.shape[0], chunk):
            hs, ys = h[start:start + chunk], labels[start:start + chunk]
            logits = hs @ weight.T                                                 # (c, N), stays in cache
            total += (torch.logsumexp(logits, -1) - logits.gather(1, ys[:, None]).squeeze(1)).sum()
            g = torch.softmax(logits, -1)                                          # d loss / d logits, x P
            g[torch.arange(len(ys), device=g.device), ys] -= 1
            grad_h[start:start + chunk] = g @ weight
            grad_w.addmm_(g.T, hs)
        n = h.shape[0]
        ctx.save_for_backward(grad_h / n, grad_w / n)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def chunked_softmax_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, labels)`` (mean over positions) without the (P, N) logit matrix: each
    chunk of ``chunk`` positions gets its logits, log-sum-exp and softmax - one-hot gradient while they are in
    cache, and the gradients of ``h`` and ``weight`` are accumulated in the same pass (the fused linear
    cross-entropy of Liger-Kernel, arXiv 2410.10989, on the CPU). Equal to the plain loss and gradients up to
    float reduction order (tested); it always computes the gradient, so use it only where one is wanted.

    h: (P, d) float32 hidden states, weight: (N, d) output embeddings, labels: (P,) in [0, N) -> scalar."""
    return _ChunkedSoftmaxCE.apply(h, weight, labels, chunk)


class Block(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: (B, T, d); mask: (B, 1, T, T) bool, True where a query may attend to a key.

        Returns (B, T, d), or with ``last_only`` (B, 1, d): only the last position as query (keys and
        values still from every position), which is all a user vector needs from the final block.
        """
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(B, q.shape[2], d)), self.dropout, self.training)
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    """Causal transformer over item sequences; the score of item i is ``h_T . E_i``."""

    def __init__(self, config: SASRecConfig, dataset_fingerprint: str | None = None):
        super().__init__()
        if config.n_items < 1:
            raise RecsysError(f"SASRec needs n_items >= 1, got {config.n_items}")
        self.config, self.dataset_fingerprint = config, dataset_fingerprint
        d = config.hidden_size
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len + 1, d)
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.dropout) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(m.weight)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    @property
    def n_items(self) -> int:
        return self.config.n_items

    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """input_ids: (B, T) left-padded with 0, T <= max_len -> hidden states (B, T, d), or with
        ``last_only`` (B, 1, d) for the last position only (the final block skips the other queries)."""
        _B, T = input_ids.shape
        if T > self.config.max_len:
            raise RecsysError(f"sequence length {T} exceeds max_len {self.config.max_len}")
        valid = input_ids != 0                                                     # (B, T)
        positions = torch.arange(self.config.max_len - T + 1, self.config.max_len + 1, device=input_ids.device)
        x = self.item_emb(input_ids) * math.sqrt(self.config.hidden_size) + self.pos_emb(positions)
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        steps = torch.arange(T, device=input_ids.device)
        causal = steps[:, None] >= steps[None, :]              # comparisons, not tril/eye: ONNX Runtime runs them
        # A query may see earlier non-padding keys, and always itself (so padding rows are not all-masked).
        mask = (causal & valid[:, None, :]) | (steps[:, None] == steps[None, :])
        mask = mask.unsqueeze(1)                                                   # (B, 1, T, T)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, last) * (valid[:, -1:] if last else valid).unsqueeze(-1)
        return self.ln_f(x)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-item loss. input_ids, labels: (B, T); label 0 = no target at that position."""
        h = self(input_ids)[labels != 0]                                           # (P, d)
        y = labels[labels != 0]                                                    # (P,)
        if self.config.loss == "ce":
            weight = self.item_emb.weight[1:]                                      # (N, d)
            if self.config.ce_chunk and h.dtype == torch.float32 and torch.is_grad_enabled() \
                    and not torch.is_autocast_enabled(h.device.type):
                return chunked_softmax_ce(h, weight, y - 1, self.config.ce_chunk)
            return F.cross_entropy((h @ weight.T).float(), y - 1)                  # (P, N) logits
        neg = torch.randint(1, self.n_items + 1, (self.config.num_negatives,), device=h.device)
        pos_logit = (h * self.item_emb(y)).sum(-1, keepdim=True)                   # (P, 1)
        neg_logit = h @ self.item_emb(neg).T                                       # (P, K)
        neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], -torch.inf)  # a sampled positive is no negative
        logits = torch.cat([pos_logit, neg_logit], -1).float()
        return F.cross_entropy(logits, torch.zeros_like(y))

    def user_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, d) hidden state at the last position: the user vector for dot-product retrieval."""
        return self(input_ids, last_only=True)[:, -1]

    def pad_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Left-pad the last ``max_len`` items of each history into (B, T) input ids."""
        tails = [np.asarray(h, dtype=np.int64)[-self.config.max_len:] for h in histories]
        T = max(1, max(len(t) for t in tails))
        out = np.zeros((len(tails), T), dtype=np.int64)
        for row, t in zip(out, tails):
            if len(t):
                row[T - len(t):] = t
        return torch.from_numpy(out).to(self.item_emb.weight.device)

    @torch.no_grad()
    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(B, n_items + 1) scores of every item after each history; column 0 is ``-inf``."""
        was_training = self.training
        self.eval()
        device_type = self.item_emb.weight.device.type
        with autocast(device_type):
            u = self.user_embeddings(self.pad_histories(histories))
        scores = u.float() @ self.item_emb.weight.float().T
        scores[:, 0] = -torch.inf
        self.train(was_training)
        return scores

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the Hugging Face layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "sasrec", **dataclasses.asdict(self.config),
                  "dataset_fingerprint": self.dataset_fingerprint}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> SASRec:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.pop("model_type", None) != "sasrec":
            raise RecsysError(f"{directory}/config.json: not a SASRec model")
        fingerprint = config.pop("dataset_fingerprint", None)
        model = cls(SASRecConfig(**config), fingerprint)
        model.load_state_dict(load_file(str(directory / "model.safetensors"), device=map_location))
        return model.eval()
