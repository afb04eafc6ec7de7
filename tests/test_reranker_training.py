import json

import numpy as np
import polars as pl

from pipelines.reranker import RerankerSFTConfig, train_reranker
from recsys.llm.backbone import load_backbone
from recsys.metrics import compute_metrics
from recsys.retrieval.candidates import PopularityRetriever, generate_candidates


def test_listwise_sft_learns_to_beat_its_retriever(tiny_dataset, tmp_path):
    """On the ring data the held-out item is usually the successor of the last one watched. Popularity
    candidates do not know that; a tiny reranker trained by SFT (with FIRST's ranking loss) must learn it
    and order the validation windows better than the retriever did (candidate-set NDCG@10)."""
    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "cands", n=10, train_targets_per_user=8, progress=False)
    cfg = RerankerSFTConfig(window=10, max_epochs=8, batch_size=16, val_users=60, first_weight=10.0,
                            tiny_hidden_size=64, lr=3e-3, precision="32-true")
    model_dir = train_reranker(tiny_dataset, tmp_path / "cands", tmp_path / "rr", cfg, progress=False)
    hits = pl.read_parquet(tmp_path / "cands" / "candidates_valid.parquet")["hit_rank"].to_numpy().astype(float)
    ranks = hits[hits >= 0][:, None]                          # candidate-set metric: windows holding the target
    retriever = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10"])["ndcg@10"]
    summary = json.loads((tmp_path / "rr" / "train.json").read_text())
    assert summary["best_val_cand_ndcg@10"] > retriever + 0.02, (summary["best_val_cand_ndcg@10"], retriever)
    assert (tmp_path / "rr" / "checkpoints" / "last.ckpt").exists()
    reloaded = load_backbone(model_dir)                       # a plain Hugging Face checkpoint
    assert reloaded.token_id("<eor>") == reloaded.tokenizer.convert_tokens_to_ids("<eor>")


def test_listwise_sft_resume_is_exact(tiny_dataset, tmp_path):
    """3 epochs straight == 2 epochs, stop, resume to 3 (same weights, bit for bit)."""
    import torch

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, progress=False)
    base = {"window": 8, "batch_size": 16, "val_users": 10, "first_weight": 1.0, "tiny_hidden_size": 32, "precision": "32-true"}
    train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "a", RerankerSFTConfig(**base, max_epochs=3), progress=False)
    train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "b", RerankerSFTConfig(**base, max_epochs=2), progress=False)
    train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "b", RerankerSFTConfig(**base, max_epochs=3), progress=False)
    ca = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ca["epoch"] == cb["epoch"] == 2                    # last.ckpt is the final epoch, not the best one
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])


def test_reranker_resume_refuses_a_different_run(tiny_dataset, tmp_path):
    import pytest

    from recsys.errors import RecsysError

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, progress=False)
    base = {"window": 8, "batch_size": 16, "val_users": 10, "tiny_hidden_size": 32, "precision": "32-true", "max_epochs": 1}
    train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "r", RerankerSFTConfig(**base), progress=False)
    with pytest.raises(RecsysError, match="different config or dataset"):
        train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "r", RerankerSFTConfig(**base, lr=1e-4), progress=False)


def test_groupwise_sft_learns_to_beat_its_retriever(tiny_dataset, tmp_path):
    """The groupwise (GroupRank) scorer trained on 0-9 teacher scores must, like the listwise one, order
    the ring data's validation windows better than popularity did."""
    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "cands", n=10, train_targets_per_user=8, progress=False)
    cfg = RerankerSFTConfig(kind="groupwise", window=10, group_size=10, max_epochs=8, batch_size=16, val_users=60,
                            tiny_hidden_size=64, lr=3e-3, precision="32-true")
    train_reranker(tiny_dataset, tmp_path / "cands", tmp_path / "gw", cfg, progress=False)
    hits = pl.read_parquet(tmp_path / "cands" / "candidates_valid.parquet")["hit_rank"].to_numpy().astype(float)
    ranks = hits[hits >= 0][:, None]
    retriever = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10"])["ndcg@10"]
    summary = json.loads((tmp_path / "gw" / "train.json").read_text())
    assert summary["kind"] == "groupwise"
    assert summary["best_val_cand_ndcg@10"] > retriever + 0.02, (summary["best_val_cand_ndcg@10"], retriever)
    meta = json.loads((tmp_path / "gw" / "model" / "reranker.json").read_text())
    assert meta["kind"] == "groupwise" and meta["group_size"] == 10


def test_item_tokens_start_from_sasrec_embeddings(tiny_dataset, tmp_path):
    import torch

    from pipelines.reranker import init_item_embeddings
    from recsys.models.sasrec import SASRec, SASRecConfig

    sas = SASRec(SASRecConfig(n_items=tiny_dataset.n_items, max_len=10, hidden_size=8, num_layers=1))
    sas.save_pretrained(tmp_path / "sas")
    bb = load_backbone("tiny", n_items=tiny_dataset.n_items, hidden_size=16, num_layers=1)
    init_item_embeddings(bb, tmp_path / "sas")
    emb = bb.model.get_input_embeddings().weight
    items = sas.item_emb.weight[1:].detach()
    first = bb.token_id("<i1>")
    got = emb[first:first + tiny_dataset.n_items, :8]
    # same directions as SASRec's vectors (one global rescale)
    scale = got.norm() / items.norm()
    assert torch.allclose(got, items * scale, atol=1e-6)


def test_training_on_validation_targets_holds_out_the_selection_users(tiny_dataset, tmp_path):
    """train_split=valid: training windows come from validation targets, except the last val_users users,
    which only select the checkpoint."""
    from pipelines.reranker import RerankerDataModule

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, progress=False)
    cfg = RerankerSFTConfig(window=8, val_users=10, train_split="valid", tiny_hidden_size=16)
    bb = load_backbone("tiny", n_items=tiny_dataset.n_items, hidden_size=16, num_layers=1)
    dm = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, cfg, None)
    valid = pl.read_parquet(tmp_path / "c" / "candidates_valid.parquet")
    assert len(dm.rows) == valid.height - 10 and [r.uidx for r in dm.valid] == valid["uidx"].tail(10).to_list()
    assert [r.uidx for r in dm.unseen_valid] == valid["uidx"].tail(10).to_list()   # the retriever prior's users
    dm = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, RerankerSFTConfig(window=8, val_users=10), None)
    assert len(dm.unseen_valid) == valid.height and len(dm.valid) == 10              # train_split=train: all of them


def test_epochs_cut_shuffled_passes_without_dropping_or_repeating():
    """examples_per_epoch: the docstring's example, and every example once per pass."""
    from pipelines.callbacks import EpochShuffle

    s = EpochShuffle(5, seed=3, per_epoch=3)
    epochs = []
    for e in range(5):
        s.set_epoch(e)
        epochs.append(list(s))
    stream = [i for e in epochs for i in e]
    assert [len(e) for e in epochs] == [3] * 5 and len(s) == 3
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))      # two full passes
    assert stream[:5] == s._pass(0).tolist() and stream[5:10] == s._pass(1).tolist()
    full = EpochShuffle(5, seed=3)
    full.set_epoch(1)
    assert list(full) == s._pass(1).tolist()                                # per_epoch=None: one pass per epoch


def test_second_stage_continues_from_a_trained_tiny_reranker(tiny_dataset, tmp_path):
    """Stage 2 takes stage 1's model/ directory as its backbone: it keeps the tiny prompt format (no
    titles) and its weights, and writes a reranker that loads like any other."""
    from pipelines.rerank import load_reranker

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, train_targets_per_user=4, progress=False)
    base = {"window": 8, "batch_size": 16, "val_users": 10, "tiny_hidden_size": 16, "tiny_layers": 1,
            "precision": "32-true", "max_epochs": 1}
    first = train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "s1",
                           RerankerSFTConfig(**base, examples_per_epoch=40), progress=False)
    assert load_backbone(first).name == "tiny"
    second = train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "s2",
                            RerankerSFTConfig(**base, backbone=str(first), train_split="valid",
                                              shuffle_candidates=False, target_missing="keep"), progress=False)
    assert json.loads((second / "reranker.json").read_text())["prompt"] == "tiny"
    assert load_reranker(second, tiny_dataset).bb.name == "tiny"
    assert json.loads((tmp_path / "s1" / "train.json").read_text())["train_examples"] > 40


def test_teacher_reranker_orders_each_teacher_list_after_the_target(tiny_dataset, tmp_path):
    """With ``teacher_reranker``, every answer is the held-out item, then the rest of its window in the
    teacher's FIRST order (retriever prior included), not the retriever's: the answers are decoded from
    the encoded labels and compared with the teacher's own ranking of the same windows."""
    import dataclasses

    import pytest

    from pipelines.rerank import load_reranker
    from pipelines.reranker import RerankerDataModule
    from recsys.data.candidates import read_candidate_lists

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, train_targets_per_user=2, progress=False)
    base = {"window": 8, "batch_size": 16, "val_users": 10, "tiny_hidden_size": 16, "tiny_layers": 1,
            "precision": "32-true", "max_epochs": 1, "identifiers": "items", "target_missing": "skip"}
    teacher_dir = train_reranker(tiny_dataset, tmp_path / "c", tmp_path / "t",
                                 RerankerSFTConfig(**base, examples_per_epoch=32, retriever_prior=1.0), progress=False)
    cfg = RerankerSFTConfig(**base, backbone=str(teacher_dir), teacher_reranker=str(teacher_dir))
    bb = load_backbone(teacher_dir)
    data = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, cfg, None)
    teacher = load_reranker(teacher_dir, tiny_dataset, window=8)
    rows = [r.top(8) for r in read_candidate_lists(tiny_dataset, tmp_path / "c", "train")]
    rows = [r for r in rows if r.has_target]
    expected = teacher.rank_windows([r.history for r in rows], [r.window for r in rows])
    first_item = bb.token_id("<i1>")
    answers = [[t - first_item + 1 for t, label in zip(r["input_ids"], r["labels"]) if label != -100 and t >= first_item]
               for r in data.rows]
    assert len(answers) == len(rows) > 20
    assert answers == [[r.target] + [c for c in e if c != r.target] for r, e in zip(rows, expected)]
    assert any(a[1:] != [c for c in r.window if c != r.target] for a, r in zip(answers, rows))
    pure = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, dataclasses.replace(cfg, teacher_target="teacher"), None)
    assert [[t - first_item + 1 for t, label in zip(r["input_ids"], r["labels"]) if label != -100 and t >= first_item]
            for r in pure.rows] == [list(e) for e in expected]
    with pytest.raises(ValueError, match="random_negatives"):
        RerankerSFTConfig(teacher_reranker=str(teacher_dir), random_negatives=0.5)


def test_random_negative_windows_hold_the_target_and_unseen_items(tiny_dataset, tmp_path):
    import pytest

    from pipelines.reranker import RerankerDataModule, random_candidates

    rng = np.random.default_rng(0)
    got = random_candidates(rng, 30, history=[1, 2, 3], target=7, n=10)
    assert got[0] == 7 and len(set(got)) == 10 and not {1, 2, 3} & set(got) and max(got) <= 30
    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=8, progress=False)
    bb = load_backbone("tiny", n_items=tiny_dataset.n_items, hidden_size=16, num_layers=1)
    cfg = {"window": 8, "val_users": 10, "tiny_hidden_size": 16, "supervise": "target"}
    retriever = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, RerankerSFTConfig(**cfg), None)
    easy = RerankerDataModule(tiny_dataset, tmp_path / "c", bb, RerankerSFTConfig(**cfg, random_negatives=1.0), None)
    assert len(easy.rows) == len(retriever.rows)                       # every row, its window redrawn
    assert [r["input_ids"] for r in easy.rows] != [r["input_ids"] for r in retriever.rows]
    with pytest.raises(ValueError, match="shuffle"):
        RerankerSFTConfig(random_negatives=0.5, shuffle_candidates=False)


def test_item_identifier_sft_learns_and_tunes_its_retriever_prior(tiny_dataset, tmp_path):
    """The tiny reranker with item-token identifiers beats its retriever on the ring data; the retriever
    prior is chosen on validation and written, with the table it was chosen from, next to the model."""
    from pipelines.rerank import PRIOR_GRID, load_reranker

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "cands", n=10, train_targets_per_user=8, progress=False)
    cfg = RerankerSFTConfig(window=10, max_epochs=8, batch_size=16, val_users=60, first_weight=10.0,
                            tiny_hidden_size=64, lr=3e-3, precision="32-true", identifiers="items")
    model_dir = train_reranker(tiny_dataset, tmp_path / "cands", tmp_path / "rr", cfg, progress=False)
    hits = pl.read_parquet(tmp_path / "cands" / "candidates_valid.parquet")["hit_rank"].to_numpy().astype(float)
    ranks = hits[hits >= 0][:, None]
    retriever = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10"])["ndcg@10"]
    summary = json.loads((tmp_path / "rr" / "train.json").read_text())
    assert summary["best_val_cand_ndcg@10"] > retriever + 0.02, (summary["best_val_cand_ndcg@10"], retriever)
    table = {float(k): v for k, v in summary["val_cand_ndcg@10_by_retriever_prior"].items()}
    assert sorted(table) == sorted(PRIOR_GRID) and table[summary["retriever_prior"]] == max(table.values())
    meta = json.loads((model_dir / "reranker.json").read_text())
    assert meta["identifiers"] == "items" and meta["retriever_prior"] == summary["retriever_prior"]
    scorer = load_reranker(model_dir, tiny_dataset, window=10)
    assert scorer.identifiers == "items" and scorer.retriever_prior == summary["retriever_prior"]


def test_retriever_prior_is_tuned_by_hand():
    """Two windows, model scores fixed: window 1's target (position 2) wins on the model alone, window
    2's target (position 0) needs the prior. NDCG@10 by beta, computed by hand:
    beta 0: ranks (0, 1) -> (1 + 1/log2 3) / 2 = 0.8155; beta 1: scores - ln(1 + j) = [0, -0.69, 0.9] and
    [1.0, 1.31, -1.1] -> ranks (0, 1) again; beta 2: [0, -1.39, -0.2] and [1.0, 0.61, -2.2] -> ranks (1, 0)
    -> 0.8155; beta 3: [0, -2.08, -1.3] and [1.0, -0.08, -3.3] -> ranks (1, 0) -> 0.8155. Ties go to
    the smaller beta: 0. Window 2 alone: rank 1 up to beta 1, rank 0 from beta 2 -> beta 2."""
    import pytest
    import torch

    from pipelines.rerank import tune_retriever_prior

    class Fixed:
        retriever_prior = 0.5

        def first_scores(self, histories, windows):
            assert self.retriever_prior == 0.0                # the table is built from the model's own scores
            table = {(1, 2, 3): [0.0, 0.0, 2.0], (4, 5, 6): [1.0, 2.0, 0.0]}
            return [torch.tensor(table[tuple(w)]) for w in windows]

    from recsys.types import CandidateList

    rows = [CandidateList("u", 0, np.array([9]), np.array(c), np.zeros(3, np.float32), t)
            for c, t in (([1, 2, 3], 3), ([4, 5, 6], 4), ([7, 8, 9], 10))]   # the last window misses: skipped
    scorer = Fixed()
    best, table = tune_retriever_prior(scorer, rows, window=3, grid=(0.0, 1.0, 2.0, 3.0))
    assert table[0.0] == pytest.approx((1 + 1 / np.log2(3)) / 2) and best == 0.0 and scorer.retriever_prior == 0.5
    assert table[2.0] == pytest.approx(table[0.0]) and table[1.0] == pytest.approx(table[0.0])
    best, table = tune_retriever_prior(scorer, rows[1:], window=3, grid=(0.0, 1.0, 2.0))   # window 2 alone
    assert best == 2.0 and table[2.0] == 1.0 and table[1.0] == pytest.approx(1 / np.log2(3))


def test_sft_losses_read_the_same_logits_as_a_full_forward_pass():
    """The LM head runs only on the answer span; the losses must equal those computed from every
    position's logits (prompts of different lengths, so the left padding differs per row)."""
    import torch
    import torch.nn.functional as F

    from pipelines.reranker import RerankerSFTModule
    from recsys.rerank.first import first_scores, weighted_ranknet_loss
    from recsys.rerank.sft import collate, encode_example, teacher_example

    torch.manual_seed(0)
    bb = load_backbone("tiny", n_items=30, hidden_size=32, num_layers=1)
    cfg = RerankerSFTConfig(window=6, first_weight=10.0, max_history=8)
    module = RerankerSFTModule(bb, cfg)
    rows = [encode_example(bb, teacher_example(list(range(1, 2 + k)), [10, 11, 12, 13, 14, 15], 12, 6, seed=k), None,
                           cfg.max_history) for k in (1, 4, 7)]
    batch = collate(rows, bb.tokenizer.pad_token_id)
    lm, rank, _ = module.losses(batch)

    full = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits.float()
    ref_lm = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                             ignore_index=-100)
    at_first = full[torch.arange(3), batch["first_pos"]]
    ref_rank = weighted_ranknet_loss(first_scores(at_first, batch["identifier_ids"]), batch["ranks"], batch["ranks"] > 0)
    assert len({len(r["input_ids"]) for r in rows}) == 3
    torch.testing.assert_close(lm, ref_lm)
    torch.testing.assert_close(rank, ref_rank)


def test_history_lm_loss_is_next_item_cross_entropy_over_the_history():
    """With ``history_labels`` the LM head runs over the whole prompt: the answer loss is unchanged and
    the history loss equals cross-entropy of every history position's logits on the next history item."""
    import torch
    import torch.nn.functional as F

    from pipelines.reranker import RerankerSFTModule
    from recsys.rerank.sft import collate, encode_example, teacher_example

    torch.manual_seed(0)
    bb = load_backbone("tiny", n_items=30, hidden_size=32, num_layers=1)
    cfg = RerankerSFTConfig(window=6, first_weight=10.0, max_history=8, history_lm_weight=1.0, identifiers="items")
    module = RerankerSFTModule(bb, cfg)
    exs = [teacher_example(list(range(1, 2 + k)), [10, 11, 12, 13, 14, 15], 12, 6, seed=k) for k in (1, 4, 7)]
    rows = [encode_example(bb, ex, None, 8, identifiers="items", history_lm=True) for ex in exs]
    batch = collate(rows, bb.tokenizer.pad_token_id)
    lm, rank, hist = module.losses(batch)
    plain = collate([encode_example(bb, ex, None, 8, identifiers="items") for ex in exs], bb.tokenizer.pad_token_id)
    lm_plain, rank_plain, none = module.losses(plain)

    full = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits.float()
    targets = batch["history_labels"][:, 1:]
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), targets.reshape(-1), ignore_index=-100)
    assert none is None and int((targets != -100).sum()) == 1 + 4 + 7         # k+1 history items, k labels each
    torch.testing.assert_close(hist, ref)
    torch.testing.assert_close(lm, lm_plain)
    torch.testing.assert_close(rank, rank_plain)


def test_zero_shot_reranker_gets_its_retriever_prior_from_validation(tiny_dataset, tmp_path):
    """A pretrained checkpoint (a tiny stand-in: tests download nothing) becomes a text-prompt FIRST
    reranker directory whose prior is the best of the validation table, as after SFT."""
    from pipelines.rerank import PRIOR_GRID, load_reranker, zero_shot_reranker
    from recsys.llm.backbone import build_tiny

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "cands", n=10, progress=False)
    bb = build_tiny(n_items=tiny_dataset.n_items, hidden_size=32, num_layers=1)
    bb.model.save_pretrained(tmp_path / "pretrained")
    bb.tokenizer.save_pretrained(tmp_path / "pretrained")
    model = zero_shot_reranker(tiny_dataset, tmp_path / "zs", tmp_path / "pretrained", tmp_path / "cands",
                               max_history=5, prior_users=40, window=10)
    meta = json.loads((model / "reranker.json").read_text())
    table = {float(k): v for k, v in meta["val_cand_ndcg@10_by_retriever_prior"].items()}
    assert sorted(table) == sorted(PRIOR_GRID)
    assert meta["retriever_prior"] == max(PRIOR_GRID, key=lambda b: (table[b], -b))
    scorer = load_reranker(model, tiny_dataset, window=10)
    assert scorer.retriever_prior == meta["retriever_prior"] and scorer.titles is not None


def test_sft_module_trains_a_backbone_that_arrives_in_eval_mode(tmp_path):
    """A checkpoint read back with from_pretrained is in eval mode; Lightning keeps submodules in the mode
    it finds them at the start of fit, so the module must switch the model to train mode itself."""
    from pipelines.reranker import RerankerSFTModule
    from recsys.llm.backbone import load_local, save_converted

    bb = load_backbone("tiny", n_items=30, hidden_size=32, num_layers=1)
    save_converted(bb.model, bb.tokenizer, tmp_path / "ckpt")
    loaded = load_local(tmp_path / "ckpt")
    assert not loaded.model.training
    module = RerankerSFTModule(loaded, RerankerSFTConfig(window=6, max_history=8))
    assert all(m.training for m in module.model.modules())
