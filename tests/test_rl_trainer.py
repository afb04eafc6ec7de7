"""The RL trainer end to end on the ring data: rollouts, rewards, updates, validation, exact resume."""

import json

import pytest
import torch

from pipelines.reranker import RerankerSFTConfig, train_reranker
from pipelines.rl import RLConfig, StreamSampler, train_rl
from recsys.retrieval.candidates import PopularityRetriever, generate_candidates

SFT = {"window": 8, "batch_size": 16, "val_users": 10, "tiny_hidden_size": 32, "precision": "32-true",
       "max_epochs": 2, "lr": 3e-3, "train_split": "train"}
RL = {"window": 8, "group_size": 4, "prompts_per_step": 4, "val_users": 10, "val_every": 2, "max_steps": 4,
      "precision": "32-true", "train_split": "train"}


@pytest.fixture
def sft_models(tiny_dataset, tmp_path):
    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, train_targets_per_user=2, progress=False)
    lw = train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "lw", RerankerSFTConfig(**SFT), progress=False)
    gw = train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "gw",
                        RerankerSFTConfig(kind="groupwise", group_size=8, **SFT), progress=False)
    return tmp_path / "c", lw, gw


@pytest.mark.parametrize("algo", ["grpo", "rank-grpo", "grouprank"])
def test_rl_runs_and_writes_a_model(tiny_dataset, tmp_path, sft_models, algo):
    cands, lw, gw = sft_models
    cfg = RLConfig(algo=algo, init=str(gw if algo == "grouprank" else lw), **RL)
    model = train_rl(tiny_dataset, cands, tmp_path / algo, cfg, progress=False)
    summary = json.loads((tmp_path / algo / "train.json").read_text())
    assert summary["steps"] == 4 and summary["algo"] == algo and (model / "reranker.json").exists()
    assert 0 <= summary["best_val_cand_ndcg@10"] <= 1
    import polars as pl
    logs = pl.read_csv(next((tmp_path / algo / "logs").glob("version_*/metrics.csv")))
    assert logs["train/reward"].drop_nulls().len() == 4 and logs["train/kl"].drop_nulls().min() >= 0


def test_rl_algo_must_fit_the_model(tiny_dataset, tmp_path, sft_models):
    from recsys.errors import RecsysError

    cands, lw, _ = sft_models
    with pytest.raises(RecsysError, match="does not fit a listwise model"):
        train_rl(tiny_dataset, cands, tmp_path / "x", RLConfig(algo="grouprank", init=str(lw), **RL), progress=False)


def test_rl_resume_is_exact(tiny_dataset, tmp_path, sft_models):
    """4 steps straight == 2 steps, stop, resume to 4 (same weights, bit for bit)."""
    cands, lw, _ = sft_models
    base = {**RL, "algo": "rank-grpo", "init": str(lw)}
    train_rl(tiny_dataset, cands, tmp_path / "a", RLConfig(**base), progress=False)
    train_rl(tiny_dataset, cands, tmp_path / "b", RLConfig(**{**base, "max_steps": 2}), progress=False)
    train_rl(tiny_dataset, cands, tmp_path / "b", RLConfig(**base), progress=False)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_sampler_walks_the_data_without_repeats():
    s = StreamSampler(10, 4, seed=1)
    seen = []
    for e in range(5):
        s.set_epoch(e)
        seen += list(s)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
