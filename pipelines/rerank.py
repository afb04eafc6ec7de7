"""Trained rerankers at work: load one, rerank candidate files, choose its retriever prior, evaluate the
slate-then-rank task; a pretrained LM as a zero-shot reranker.

    recsys rerank --data D --model runs/listwise-sft/model --candidates C --out O

:func:`load_reranker` gives the inference-time scorer of a model directory written by the SFT
(:mod:`pipelines.reranker`) or RL (:mod:`pipelines.rl`) trainers: FIRST over sliding windows (listwise)
or GroupRank's expected digits (groupwise).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys.data import PreparedDataset
from recsys.data.candidates import (
    candidate_lists,
    candidates_path,
    read_candidate_lists,
    read_candidates,
)
from recsys.errors import RecsysError
from recsys.llm.backbone import Backbone, load_backbone
from recsys.metrics import compute_metrics, target_rank
from recsys.portable.prompts import item_titles
from recsys.portable.window import retriever_prior
from recsys.rerank.groupwise import GroupwiseReranker
from recsys.rerank.listwise import ListwiseReranker
from recsys.rerank.slate import SlateRankConstraint, slate_rank_positions
from recsys.types import CandidateList


def make_scorer(backbone: Backbone, kind: str, titles, window: int = 20, stride: int | None = None,
                group_size: int = 20, max_history: int = 20, bf16: bool | None = None, identifiers: str = "letters",
                retriever_prior: float = 0.0):
    """The inference-time reranker of a trained model: FIRST (listwise, sliding window with ``stride``,
    default window / 2) or GroupRank scoring (groupwise)."""
    if kind == "listwise":
        stride = stride or max(1, window // 2)
        return ListwiseReranker(backbone, titles, window, stride, max_history=max_history, bf16=bf16,
                                identifiers=identifiers, retriever_prior=retriever_prior)
    return GroupwiseReranker(backbone, titles, group_size, max_history=max_history)


PRIOR_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 1000.0)
"""retriever_prior values tried on validation (1000 reproduces the retriever's order)."""


@torch.no_grad()
def tune_retriever_prior(scorer: ListwiseReranker, rows: list[CandidateList], window: int,
                         grid=PRIOR_GRID) -> tuple[float, dict[float, float]]:
    """The beta of ``grid`` with the best candidate-set NDCG@10 of FIRST on the top ``window`` of each
    list of ``rows`` (lists without the target there are skipped; ties go to the smaller beta) and the
    NDCG@10 of every beta. One forward pass per window: the prior is added to the stored scores, not re-run."""
    rows = [r.top(window) for r in rows]
    rows = [r for r in rows if r.has_target]
    if not rows:
        raise RecsysError("no validation window holds its target: cannot choose the retriever prior")
    saved, scorer.retriever_prior = scorer.retriever_prior, 0.0
    scores = [s for i in range(0, len(rows), 64)
              for s in scorer.first_scores([r.history for r in rows[i:i + 64]], [r.window for r in rows[i:i + 64]])]
    scorer.retriever_prior = saved
    table = {}
    for beta in grid:
        blended = [s.numpy() + retriever_prior(len(s), beta) for s in scores]
        ranks = [float((b > b[int(r.target_rank())]).sum()) for b, r in zip(blended, rows)]
        ranks = np.array(ranks)[:, None]
        table[beta] = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10"])["ndcg@10"]
    best = max(grid, key=lambda b: (table[b], -b))
    return best, table


def zero_shot_reranker(dataset: PreparedDataset, out, source=None, candidates_dir=None, max_history: int = 20,
                       prior_users: int = 1000, window: int = 20) -> Path:
    """A pretrained causal LM as it is, not fine-tuned, as a listwise reranker directory ``out/model``
    (FIRST over its letter logits, text prompts). ``source``: a local Hugging Face checkpoint
    directory (default: SmolLM2-135M-Instruct as :func:`recsys.llm.backbone.smollm2_dir` converts it). With ``candidates_dir`` the
    retriever prior is chosen on the first ``prior_users`` validation windows, as :func:`train_reranker`
    does after SFT, so the two compare on equal terms; without, the prior is 0 (serving latency)."""
    import shutil

    from recsys.llm.backbone import smollm2_dir

    source = Path(source) if source else smollm2_dir()
    model = Path(out) / "model"
    shutil.copytree(source, model, dirs_exist_ok=True)
    meta = {"kind": "listwise", "prompt": "text", "window": window, "group_size": window, "max_history": max_history,
            "retriever_prior": 0.0, "dataset_fingerprint": dataset.fingerprint,
            "note": f"{source.name} as converted, not fine-tuned"}
    (model / "reranker.json").write_text(json.dumps(meta, indent=2))
    if candidates_dir is not None:
        valid = read_candidate_lists(dataset, candidates_dir, "valid")[:prior_users]
        prior, table = tune_retriever_prior(load_reranker(model, dataset, window), valid, window)
        meta |= {"retriever_prior": prior, "val_cand_ndcg@10_by_retriever_prior": table}
        (model / "reranker.json").write_text(json.dumps(meta, indent=2))
    return model


def load_reranker(model_dir, dataset: PreparedDataset, window: int = 20, stride: int = 10, reshuffles: int = 1):
    """The scorer of a model directory written by :func:`train_reranker` (checked against ``dataset``)."""
    meta_path = Path(model_dir) / "reranker.json"
    if not meta_path.exists():
        raise RecsysError(f"{model_dir}: no reranker.json; pass the model/ directory written by `recsys train reranker`")
    meta = json.loads(meta_path.read_text())
    if meta["dataset_fingerprint"] != dataset.fingerprint:
        raise RecsysError(f"{model_dir} was trained on dataset {meta['dataset_fingerprint']}, not {dataset.fingerprint}")
    bb = load_backbone(model_dir)
    bb.name = meta["prompt"] if meta["prompt"] == "tiny" else bb.name       # the prompt format it was trained on
    titles = item_titles(dataset, meta.get("domain")) if meta["prompt"] == "text" else None
    scorer = make_scorer(bb, meta.get("kind", "listwise"), titles, window, stride, meta.get("group_size", 20),
                         meta["max_history"], identifiers=meta.get("identifiers", "letters"),
                         retriever_prior=meta.get("retriever_prior", 0.0))
    if isinstance(scorer, GroupwiseReranker):
        scorer.R = reshuffles
    return scorer


def candidate_set_metrics(before: list[float], after: list[float],
                          names=("hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")) -> dict:
    """Pipeline and candidate-set metrics of 0-based target ranks (inf = not among the candidates)."""
    result = {}
    for label, ranks in (("retriever", np.array(before, dtype=float)), ("reranked", np.array(after, dtype=float))):
        full = compute_metrics(ranks[:, None], np.ones((len(ranks), 1)), list(names))
        found = np.isfinite(ranks)
        cand = compute_metrics(ranks[found][:, None], np.ones((int(found.sum()), 1)), list(names))
        result[label] = {**{m: full[m] for m in names}, **{f"cand_{m}": cand[m] for m in names},
                         "num_queries": full["num_queries"], "target_in_candidates": float(found.mean())}
    return result


def rerank_candidates(dataset: PreparedDataset, model_dir, candidates_dir, out, split: str = "test",
                      window: int = 20, stride: int = 10, limit: int | None = None, progress: bool = True,
                      mode: str = "first", depth: int | None = None, reshuffles: int = 1) -> dict:
    """Rerank ``candidates_<split>.parquet`` with a trained reranker and score both orders.

    ``mode``: ``first`` (listwise FIRST scoring, sliding window; groupwise models always score) or
    ``generate`` (listwise, constrained greedy generation of each window). ``depth`` reranks only the
    top ``depth`` candidates (default all). Writes ``reranked_<split>.parquet`` and
    ``rerank_metrics_<split>.json``. Two views, labelled: ``pipeline`` metrics rank the held-out item
    over the whole catalog (a target the retriever missed is a miss), ``cand_`` metrics only over
    the examples whose target is among the candidates. ``seconds`` is the reranking time alone.
    """
    from tqdm.auto import tqdm

    scorer = load_reranker(model_dir, dataset, window, stride, reshuffles)
    if mode not in ("first", "generate") or (mode == "generate" and not isinstance(scorer, ListwiseReranker)):
        raise RecsysError(f"mode {mode!r} is not available for this reranker (listwise: first|generate; groupwise: first)")
    df = read_candidates(candidates_dir, split)
    df = df.head(limit) if limit else df
    rows = [r.top(depth) for r in candidate_lists(dataset.user_sequences(), df, str(candidates_path(candidates_dir,
                                                                                                       split)))]
    lists = [r.window for r in rows]
    histories = [r.history for r in rows]
    size = scorer.window if isinstance(scorer, ListwiseReranker) else scorer.c
    one_window = len({len(c) for c in lists}) == 1 and len(lists[0]) <= size
    t = time.perf_counter()
    written: list[int] = []                          # generation: items each answer named before its end token
    if one_window:                                   # every list is one window: batched, 32 lists per call
        reranked = []
        for i in tqdm(range(0, len(lists), 32), desc=f"rerank {split} ({mode})", disable=not progress):
            args = (histories[i:i + 32], lists[i:i + 32])
            reranked += (scorer.rank_windows(*args, mode=mode, written=written) if isinstance(scorer, ListwiseReranker)
                         else scorer.rank_windows(*args))
    else:                                            # sliding windows / several groups: one list at a time
        rerank = scorer.rerank if mode == "first" else scorer.rerank_generate_window
        reranked = [rerank(h, c) for h, c in tqdm(list(zip(histories, lists)), desc=f"rerank {split} ({mode})",
                                                    disable=not progress)]
    seconds = time.perf_counter() - t
    before = [r.target_rank() for r in rows]
    after = [target_rank(n, r.target) for n, r in zip(reranked, rows)]
    result = candidate_set_metrics(before, after) | {"seconds": seconds, "mode": mode, "depth": len(lists[0]),
                                                      "batched": one_window}
    if written:
        result["list_items"] = float(np.mean(written))      # the mean length of the generated lists
    Path(out).mkdir(parents=True, exist_ok=True)
    df.with_columns(pl.Series("reranked", reranked, dtype=pl.List(pl.Int32))).write_parquet(
        Path(out) / f"reranked_{split}.parquet")
    (Path(out) / f"rerank_metrics_{split}.json").write_text(json.dumps(result, indent=2))
    return result


def slate_constraint(scorer: ListwiseReranker, windows: list[list[int]], slate_size: int,
                     rank_size: int) -> SlateRankConstraint:
    """The slate-then-rank decoding constraint for a batch of candidate windows, over the reranker's own
    identifiers (letters or item tokens). The retriever prior is not applied: the slate is the model's own
    choice, and on sampled pools (``recsys candidates --retriever pool-popularity``) the order is random."""
    bb = scorer.bb
    return SlateRankConstraint(torch.tensor([len(w) for w in windows]), slate_size, rank_size,
                               scorer.identifier_ids(windows), bb.separator_id, bb.rank_marker_id, bb.end_id)


def slate_items(scorer: ListwiseReranker, answer: torch.Tensor, window: list[int]) -> tuple[list[int], list[int]]:
    """The items (slate, ranking) a generated slate-then-rank answer (T,) names (-1 = padding)."""
    slate, ranking = slate_rank_positions(answer, scorer.identifier_ids([window])[0], scorer.bb.rank_marker_id)
    return [window[i] for i in slate], [window[i] for i in ranking]


def evaluate_slate_rank(dataset: PreparedDataset, model_dir, candidates_dir, split: str = "test", window: int = 20,
                        slate_size: int = 10, rank_size: int = 5, limit: int | None = None, batch_size: int = 32,
                        progress: bool = False, out=None) -> dict:
    """Greedy slate-then-rank answers of a listwise reranker on each user's top-``window`` candidates.

    Metrics over every user of ``split`` (the held-out item outside the final ranking of ``rank_size``
    items is a miss): ``recall@k`` / ``ndcg@k`` for k in 3 and ``rank_size``, ``slate_recall`` (the
    held-out item in the slate), and the same over the users whose item is among the candidates
    (``cand_`` prefix). With ``out``, each user's answer goes to ``out/slate_rank_<split>.parquet``
    (``user_id``, ``target``, ``slate``, ``ranking``: item idx), for paired comparisons."""
    from tqdm.auto import tqdm

    scorer = load_reranker(model_dir, dataset, window=window)
    lists = read_candidate_lists(dataset, candidates_dir, split)
    lists = [r.top(window) for r in (lists[:limit] if limit else lists)]
    rows = [(r.history, r.window, r.target) for r in lists]
    ranks, in_slate, answers_out = [], [], []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"slate-rank {split}", disable=not progress):
        hists, windows, targets = zip(*rows[i:i + batch_size])
        answers = scorer.generate(list(hists), list(windows), True, 0.0, return_tokens=True,
                                  constraint=slate_constraint(scorer, list(windows), slate_size, rank_size))[1]
        for a, w, t in zip(answers, windows, targets):
            slate, ranking = slate_items(scorer, a, w)
            ranks.append(target_rank(ranking, t))
            in_slate.append(t in slate)
            answers_out.append((slate, ranking))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"user_id": [r.user_id for r in lists], "target": [r.target for r in lists], "slate": [a[0] for a in answers_out],
                      "ranking": [a[1] for a in answers_out]}).write_parquet(Path(out) / f"slate_rank_{split}.parquet")
    ranks_a, found = np.array(ranks)[:, None], np.array([r[2] in r[1] for r in rows])
    names = sorted({3, rank_size})
    out = {}
    for prefix, sel in (("", np.ones(len(rows), dtype=bool)), ("cand_", found)):
        m = compute_metrics(ranks_a[sel], np.ones((int(sel.sum()), 1)), [f"{k}@{n}" for k in ("hr", "ndcg") for n in names])
        out |= {f"{prefix}recall@{n}": m[f"hr@{n}"] for n in names} | {f"{prefix}ndcg@{n}": m[f"ndcg@{n}"] for n in names}
        out[f"{prefix}slate_recall"] = float(np.mean(np.array(in_slate)[sel])) if sel.any() else 0.0
    return out | {"num_users": len(rows), "target_in_candidates": float(found.mean())}
