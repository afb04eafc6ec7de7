"""A learned reranker over per-candidate features (retriever scores, side features, an LM's logits).

Each candidate's feature vector is standardised and scored by a small MLP (or a linear map); the list
is ordered by score. Training is listwise: a softmax over the list's scores and the cross-entropy of
the held-out item (Bruch et al., "An Analysis of the Softmax Cross Entropy Loss for Learning-to-Rank
with Binary Relevance", ICTIR 2019: it bounds NDCG from below), on lists that hold their target.

Train it on targets the retriever never trained on (the validation split): on its own training
targets a retriever's scores are overconfident and the scorer would learn to trust them too much.

Shapes: B lists, L candidates, F features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from recsys.errors import RecsysError
from recsys.metrics import ndcg


@dataclass(frozen=True)
class FusionConfig:
    hidden: int = 32
    """Width of the MLP's hidden layer; 0 = a linear scorer."""
    epochs: int = 60
    """Passes over the training lists; the epoch kept is the best on the held-out ones."""
    lr: float = 3e-3
    """AdamW's learning rate."""
    weight_decay: float = 1e-4
    batch_size: int = 256
    """Lists per step (each list's softmax over its candidates is one example)."""
    holdout: float = 0.1
    """Share of the training lists held out to choose the epoch (by NDCG@10 over them)."""
    seed: int = 0
    """Seeds the initial weights, the hold-out split and the batch order."""


class FusionRanker(torch.nn.Module):
    """(B, L, F) features -> (B, L) scores."""

    def __init__(self, names: list[str], mean: torch.Tensor, std: torch.Tensor, hidden: int = 32):
        super().__init__()
        self.names, self.hidden = list(names), hidden
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        n = len(names)
        self.net = (torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
                    if hidden else torch.nn.Linear(n, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        """(B, L) scores of (B, L, F) features, in evaluation mode."""
        self.eval()
        return self(torch.as_tensor(features, dtype=torch.float32)).numpy()

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "fusion.safetensors"))
        (directory / "fusion.json").write_text(json.dumps({"names": self.names, "hidden": self.hidden}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FusionRanker:
        directory = Path(directory)
        meta_path = directory / "fusion.json"
        if not meta_path.exists():
            raise RecsysError(f"{directory}: not a fusion reranker (no fusion.json)")
        meta = json.loads(meta_path.read_text())
        state = load_file(str(directory / "fusion.safetensors"))
        model = cls(meta["names"], state["mean"], state["std"], meta["hidden"])
        model.load_state_dict(state)
        return model


def list_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(R,) 0-based rank of the target when (R, L) ``scores`` order each list (ties: list position), ``inf``
    where the list lacks it (target -1). Example: scores [[0.1, 0.9, 0.5]], targets [2] -> [1.0]."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    t = np.clip(targets, 0, None)
    s_t = np.take_along_axis(scores, t[:, None], 1)
    pos = np.arange(scores.shape[1])[None]
    rank = ((scores > s_t) | ((scores == s_t) & (pos < t[:, None]))).sum(1).astype(np.float64)
    return np.where(targets >= 0, rank, np.inf)


def ndcg10(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean NDCG@10 of one target per list (:func:`list_ranks`, :func:`recsys.metrics.ndcg`)."""
    ranks = list_ranks(scores, targets)[:, None]
    return float(ndcg(ranks, np.ones_like(ranks), 10).mean())


def train_fusion(features: np.ndarray, targets: np.ndarray, names: list[str], config: FusionConfig = FusionConfig(),
                 log=None) -> tuple[FusionRanker, dict]:
    """Fit a :class:`FusionRanker` on (N, L, F) ``features`` and (N,) ``targets`` (the held-out item's
    position in each list, -1 if absent). Lists without their target teach nothing and are dropped;
    ``config.holdout`` of the lists (seeded) choose the epoch. Returns the model and a summary."""
    if features.ndim != 3 or features.shape[-1] != len(names) or len(targets) != len(features):
        raise RecsysError(f"features must be (N, L, {len(names)}) with N targets; got {features.shape} and "
                          f"{len(targets)} targets")
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    targets = np.asarray(targets)
    X, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.long)
    order = torch.randperm(len(X), generator=g)
    n_hold = round(config.holdout * len(X))
    hold, fit = order[:n_hold], order[n_hold:]
    fit = fit[y[fit] >= 0]
    if not len(fit) or not len(hold):
        raise RecsysError(f"fusion training needs lists that hold their target and a holdout; got {len(fit)} and "
                          f"{len(hold)} of {len(X)}")
    flat = X[fit].reshape(-1, X.shape[-1])
    model = FusionRanker(names, flat.mean(0), flat.std(0).clamp(min=1e-6), config.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_epoch, best_state, curve = -1.0, 0, None, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = fit[torch.randperm(len(fit), generator=g)]
        for i in range(0, len(perm), config.batch_size):
            j = perm[i:i + config.batch_size]
            loss = F.cross_entropy(model(X[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score = ndcg10(model(X[hold]).numpy(), targets[hold.numpy()])
        curve.append(round(score, 5))
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        if log:
            log(f"fusion epoch {epoch}: holdout ndcg@10 {score:.4f}")
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        retriever = ndcg10(-np.arange(X.shape[1], dtype=np.float64)[None].repeat(len(hold), 0), targets[hold.numpy()])
    return model, {"holdout_ndcg@10": best, "holdout_retriever_ndcg@10": retriever, "best_epoch": best_epoch,
                   "curve": curve, "lists": len(X), "fit_lists": len(fit), "holdout_lists": len(hold),
                   "config": asdict(config)}
