"""The RL trainer end to end on the ring data: rollouts, rewards, updates, validation, exact resume."""

import json

import pytest
import torch

from pipelines.callbacks import StreamSampler
from pipelines.reranker import RerankerSFTConfig, train_reranker
from pipelines.rl import RLConfig, train_rl
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


def test_rl_trains_an_item_identifier_reranker(tiny_dataset, tmp_path, sft_models, monkeypatch):
    """Rank-GRPO on a listwise model whose identifiers are item tokens: rollouts name the window's items
    (per-row constraint), the written model keeps its identifiers and, being RL'd weights (validation is
    made to prefer later steps here), gets its retriever prior chosen again; the slate task runs on it too,
    its answers naming the window's own item tokens."""
    from pipelines.rl import RerankerRLModule

    def later_is_better(self):
        self._val.clear()
        self.log(self.cfg.val_metric, float(self.global_step))

    monkeypatch.setattr(RerankerRLModule, "on_validation_epoch_end", later_is_better)

    cands, _, _ = sft_models
    lw = train_reranker(tiny_dataset, cands, tmp_path / "items", RerankerSFTConfig(identifiers="items", **SFT),
                        progress=False)
    model = train_rl(tiny_dataset, cands, tmp_path / "rl", RLConfig(algo="rank-grpo", init=str(lw), **RL), progress=False)
    import polars as pl
    logs = pl.read_csv(next((tmp_path / "rl" / "logs").glob("version_*/metrics.csv")))
    assert logs["train/validity"].drop_nulls().min() == 1.0
    meta, summary = json.loads((model / "reranker.json").read_text()), json.loads((tmp_path / "rl" / "train.json").read_text())
    assert meta["identifiers"] == "items" and meta["retriever_prior"] == summary["retriever_prior"]
    assert summary["kept_start"] is False and len(summary["val_cand_ndcg@10_by_retriever_prior"]) > 1
    train_rl(tiny_dataset, cands, tmp_path / "slate", RLConfig(algo="f-grpo", init=str(lw), slate_size=4, rank_size=2,
                                                               **RL), progress=False)
    logs = pl.read_csv(next((tmp_path / "slate" / "logs").glob("version_*/metrics.csv")))
    assert logs["train/length"].drop_nulls().unique().to_list() == [14.0]      # 4 + 2 items, separators, marker, end
    assert logs["train/slate_reward"].drop_nulls().is_between(0, 1).all()


@pytest.mark.parametrize("algo", ["grpo", "rank-grpo", "grouprank", "f-grpo", "slate-grpo", "lipo", "dpo"])
def test_rl_runs_and_writes_a_model(tiny_dataset, tmp_path, sft_models, algo):
    cands, lw, gw = sft_models
    slate = {"slate_size": 4, "rank_size": 2} if algo in ("f-grpo", "slate-grpo") else {}
    cfg = RLConfig(algo=algo, init=str(gw if algo in ("grouprank", "dpo") else lw), **RL, **slate)
    model = train_rl(tiny_dataset, cands, tmp_path / algo, cfg, progress=False)
    summary = json.loads((tmp_path / algo / "train.json").read_text())
    assert summary["steps"] == 4 and summary["algo"] == algo and (model / "reranker.json").exists()
    from recsys.llm.backbone import load_backbone

    last = torch.load(tmp_path / algo / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    written = load_backbone(tmp_path / algo / "last-model").model.state_dict()      # the last step's weights
    assert all(torch.equal(last[f"model.{k}"], v) for k, v in written.items())
    metric = "val_cand_ndcg@2" if slate else "val_cand_ndcg@10"
    assert summary["val_metric"] == metric.replace("_", "/", 1) and 0 <= summary[f"best_{metric}"] <= 1
    import polars as pl
    logs = pl.read_csv(next((tmp_path / algo / "logs").glob("version_*/metrics.csv")))
    assert logs["train/reward"].drop_nulls().len() == 4 and logs["train/kl"].drop_nulls().min() >= 0
    assert logs["train/adv_abs"].drop_nulls().len() == 4 and logs["train/adv_abs"].drop_nulls().min() >= 0
    if slate:
        assert logs["train/slate_signal"].drop_nulls().is_between(0, 1).all()   # 4 slate identifiers + separators + marker + 2 ranked + separators + end = 14 tokens
        assert logs["train/length"].drop_nulls().unique().to_list() == [14.0]
        joint = logs["train/slate_reward"] + logs["train/rank_reward"]
        assert ((joint - logs["train/reward"]).drop_nulls().abs() < 1e-5).all()


def test_off_policy_rank_grpo_updates_twice_per_rollout_batch_and_its_per_rank_clip_engages(tiny_dataset, tmp_path,
                                                                                          sft_models):
    """mu = 2 with the paper's clip (0.06 / 0.08): the second update's ratio differs from 1, so some ranks clip;
    with mu = 1 the ratio is 1 and nothing ever clips."""
    import polars as pl

    cands, lw, _ = sft_models
    clip = {"eps_low": 0.06, "eps_high": 0.08, "lr": 3e-3}
    fractions = {}
    for mu in (1, 2):
        cfg = RLConfig(algo="rank-grpo", init=str(lw), mu=mu, **RL, **clip)
        train_rl(tiny_dataset, cands, tmp_path / f"mu{mu}", cfg, progress=False)
        logs = pl.read_csv(next((tmp_path / f"mu{mu}" / "logs").glob("version_*/metrics.csv")))
        fractions[mu] = logs["train/clip_fraction"].drop_nulls()
        assert json.loads((tmp_path / f"mu{mu}" / "train.json").read_text())["steps"] == 4   # rollout batches
    assert fractions[1].max() == 0.0 and fractions[2].max() > 0.0


def test_scasrec_learns_from_an_auto_stop_sft_and_logs_its_list_lengths(tiny_dataset, tmp_path, sft_models):
    """SCASRec end to end: an SFT taught to stop (``supervise: auto_stop``) writes short lists (at most one
    item before the end token, greedy), the RL run logs the lists' length, and its rollouts' per-rank returns
    are SCASRec's: the trainer's rollouts give the same returns as :func:`recsys.rl.scasrec.step_returns` of
    their parsed lists."""
    import polars as pl

    from pipelines.rerank import load_reranker
    from pipelines.rl import PromptData, RerankerRLModule
    from recsys.rl.scasrec import step_returns

    cands, _, _ = sft_models
    sft = train_reranker(tiny_dataset, cands, tmp_path / "stop", RerankerSFTConfig(supervise="auto_stop", **SFT),
                         progress=False)
    cfg = RLConfig(algo="scasrec", init=str(sft), **RL)
    train_rl(tiny_dataset, cands, tmp_path / "scasrec", cfg, progress=False)
    logs = pl.read_csv(next((tmp_path / "scasrec" / "logs").glob("version_*/metrics.csv")))
    assert logs["train/list_items"].drop_nulls().len() == 4 and logs["train/list_items"].drop_nulls().max() <= 8
    scorer = load_reranker(sft, tiny_dataset, window=8)
    rows = PromptData(tiny_dataset, cands, cfg).train_rows[:4]
    greedy = scorer.generate([r.history for r in rows], [r.window for r in rows], True, 0.0, return_tokens=True)[1]
    module = RerankerRLModule(scorer, cfg)
    assert max(len(module.parse(a, r.window).generated) for a, r in zip(greedy, rows)) <= 1
    roll = module.rollouts(rows, torch.Generator().manual_seed(0))
    parsed = [module.parse(a, w) for a, w in zip(roll["answer"], roll["windows"])]
    targets = [r.window.index(r.target) for r in rows for _ in range(cfg.group_size)]
    assert torch.equal(roll["returns"], step_returns([list(p.generated) for p in parsed], targets, 8))
    with pytest.raises(ValueError, match="needs complete_lists"):
        RLConfig(algo="scasrec", complete_lists=False)


def test_f_grpo_rollouts_credit_each_phase_with_its_own_advantage(tiny_dataset, tmp_path, sft_models):
    """A rollout batch through the module: slate tokens (4 identifiers, 4 separators, the marker) end at
    the marker, the rank phase has 2 identifiers, 2 separators and the end; each phase's advantages are
    centred within every group of G rollouts; log-probs are 0 on padding and never positive."""
    from pipelines.rerank import load_reranker
    from pipelines.rl import PromptData, RerankerRLModule
    from recsys.rl.f_grpo import phase_advantages, phase_masks

    cands, lw, _ = sft_models
    cfg = RLConfig(algo="f-grpo", init=str(lw), slate_size=4, rank_size=2, **RL)
    module = RerankerRLModule(load_reranker(lw, tiny_dataset, window=8), cfg)
    rows = PromptData(tiny_dataset, cands, cfg).train_rows[:4]
    roll = module.rollouts(rows, torch.Generator().manual_seed(0))
    slate_mask, rank_mask = phase_masks(roll["answer"], roll["mask"], module.bb.rank_marker_id)
    assert slate_mask.sum(1).tolist() == [9] * 16 and rank_mask.sum(1).tolist() == [5] * 16
    slate_adv, rank_adv = phase_advantages(roll["slate_reward"], roll["rank_reward"], 4)
    assert torch.allclose(slate_adv.reshape(4, 4).sum(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(rank_adv.reshape(4, 4).sum(1), torch.zeros(4), atol=1e-5)
    logp, _ = module.log_probs(module.model, roll)
    assert torch.all(logp[~roll["mask"]] == 0) and torch.all(logp <= 0)


def test_rl_prompts_hold_their_item_unless_asked_otherwise(tiny_dataset, tmp_path, sft_models):
    """reachable_only (default) keeps the training prompts whose held-out item is in the window; the
    validation prompts are never filtered (their metric counts only such windows anyway)."""
    from pipelines.rl import PromptData

    cands, lw, _ = sft_models
    every = PromptData(tiny_dataset, cands, RLConfig(init=str(lw), reachable_only=False, **RL))
    kept = PromptData(tiny_dataset, cands, RLConfig(init=str(lw), **RL))
    def key(rows):
        return [(list(r.history), r.window, r.target) for r in rows]

    assert key(kept.train_rows) == key(r for r in every.train_rows if r.has_target)
    assert 0 < len(kept.train_rows) < len(every.train_rows) and key(kept.valid_rows) == key(every.valid_rows)


@pytest.mark.parametrize("complete,depth", [(True, None), (False, None), (True, 3)])
def test_listwise_rewards_score_the_served_ranking(tiny_dataset, sft_models, complete, depth):
    """complete_lists: a rollout's reward is the DCG of its completed ranking (generated items, then the
    rest of the window in its given order, what evaluation serves) over every rank (grpo_reward_depth None)
    or the first ``depth``; otherwise of the generated items only."""
    import math

    from pipelines.rerank import load_reranker
    from pipelines.rl import PromptData, RerankerRLModule

    cands, lw, _ = sft_models
    cfg = RLConfig(algo="grpo", init=str(lw), complete_lists=complete, grpo_reward_depth=depth, **RL)
    module = RerankerRLModule(load_reranker(lw, tiny_dataset, window=8), cfg)
    rows = PromptData(tiny_dataset, cands, cfg).train_rows[:4]
    roll = module.rollouts(rows, torch.Generator().manual_seed(0))
    deep = []
    for answer, window, row, reward in zip(roll["answer"], roll["windows"], [r for r in rows for _ in range(4)],
                                           roll["reward"]):
        parsed = module.parse(answer, window)
        ranked = [window[i] for i in (parsed.order if complete else parsed.generated)][:depth or len(window)]
        want = 1 / math.log2(ranked.index(row.target) + 2) if row.target in ranked else 0.0
        assert reward.item() == pytest.approx(want, abs=1e-6)
        deep.append(row.target in ranked and ranked.index(row.target) >= 3)
    if complete and depth is None:                 # the whole-list reward reached past rank 3 at least once
        assert any(deep)


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


def test_rl_that_never_beats_its_start_keeps_the_start(tiny_dataset, tmp_path, sft_models):
    """lr 0: every checkpoint scores what the start scored, so the saved model is the SFT model itself,
    bit for bit, and train.json says so."""
    from recsys.llm.backbone import load_backbone

    cands, lw, _ = sft_models
    model = train_rl(tiny_dataset, cands, tmp_path / "flat", RLConfig(**{**RL, "algo": "grpo", "init": str(lw), "lr": 0.0}),
                     progress=False)
    summary = json.loads((tmp_path / "flat" / "train.json").read_text())
    assert summary["kept_start"] is True
    assert summary["best_val_cand_ndcg@10"] == json.loads((tmp_path / "flat" / "start.json").read_text())["val/cand_ndcg@10"]
    start, saved = load_backbone(lw).model.state_dict(), load_backbone(model).model.state_dict()
    assert all(torch.equal(start[k], saved[k]) for k in start)
    assert json.loads((model / "reranker.json").read_text()) == json.loads((lw / "reranker.json").read_text())


def test_stream_sampler_walks_the_data_without_repeats():
    s = StreamSampler(10, 4, seed=1)
    seen = []
    for e in range(5):
        s.set_epoch(e)
        seen += list(s)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_grouprank_reward_reads_the_sft_teacher_scores_and_random_ties(tiny_dataset, tmp_path, sft_models, monkeypatch):
    """The distribution term's targets are the groupwise SFT's own: 9 for the held-out item, the retriever-rank
    prior int(5 (1 - j / 8)) = 5 4 3 3 2 1 1 0 for window position j (windows arrive in retriever order)."""
    import pipelines.rl as prl

    cands, _, gw = sft_models
    seen, reward = [], prl.grouprank_reward

    def spy(pred, teacher, relevant, **kw):
        seen.append((teacher, relevant, kw))
        return reward(pred, teacher, relevant, **kw)

    monkeypatch.setattr(prl, "grouprank_reward", spy)
    train_rl(tiny_dataset, cands, tmp_path / "gr", RLConfig(algo="grouprank", init=str(gw), **RL), progress=False)
    teacher, relevant, kw = seen[0]
    prior = torch.tensor([5.0, 4, 3, 3, 2, 1, 1, 0]).expand_as(teacher)
    assert kw["ties"] == "random" and relevant.any(1).all()
    assert torch.equal(teacher[relevant], torch.full((int(relevant.sum()),), 9.0))
    assert torch.equal(teacher[~relevant], prior[~relevant])
    with pytest.raises(ValueError, match="grouprank_teacher"):
        RLConfig(algo="grouprank", grouprank_teacher="uniform")
