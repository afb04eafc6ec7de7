import numpy as np
import polars as pl
import pytest
import torch

from recsys.errors import RecsysError
from recsys.models import SASRec, SASRecConfig
from recsys.retrieval.candidates import (
    HybridRetriever,
    PopularityRetriever,
    SASRecRetriever,
    TextRetriever,
    candidate_examples,
    generate_candidates,
    pool_candidates,
    recall_at,
    sample_pool,
)


def test_training_targets_see_only_their_past(tiny_dataset):
    ex = candidate_examples(tiny_dataset, "train", train_targets_per_user=2)
    seqs = tiny_dataset.train_sequences()
    assert len(ex.users) == 2 * tiny_dataset.n_users
    for u, h, t in zip(ex.users, ex.histories, ex.targets):
        seq = seqs[u]
        np.testing.assert_array_equal(h, seq[:len(h)])          # the history is a prefix...
        assert t[0] == seq[len(h)]                                # ...and the target comes right after it


def test_popularity_by_hand():
    """Counts [_, 5, 9, 1, 7]; a user who saw item 2 gets [4, 1, 3]."""
    s, idx = PopularityRetriever(np.array([0, 5, 9, 1, 7])).retrieve([np.array([2])], 3)
    assert idx.tolist() == [[4, 1, 3]] and s.tolist() == [[7, 5, 1]]


class Fixed:
    def __init__(self, lists):
        self.lists = np.array(lists)

    def retrieve(self, histories, n):
        return np.zeros((1, n)), self.lists[:, :n]


def test_reciprocal_rank_fusion_by_hand():
    """Lists [1, 2, 3] and [3, 1, 4], c = 60: item 1 gets 1/61 + 1/62, item 3 1/63 + 1/61,
    item 2 1/62, item 4 1/63 -> order 1, 3, 2, 4."""
    s, idx = HybridRetriever([Fixed([[1, 2, 3]]), Fixed([[3, 1, 4]])], depth=3).retrieve([np.array([])], 4)
    assert idx.tolist() == [[1, 3, 2, 4]]
    assert s[0, 0] == pytest.approx(1 / 61 + 1 / 62)


def test_sasrec_retriever_matches_full_ranking(tiny_dataset):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=tiny_dataset.n_items, max_len=20, hidden_size=16)).eval()
    ex = tiny_dataset.eval_examples("test")
    s, idx = SASRecRetriever(model).retrieve(ex.histories[:10], 5)
    full = model.score(ex.histories[:10])
    for row, h in enumerate(ex.histories[:10]):
        full[row, torch.from_numpy(h)] = -torch.inf
    ref = torch.topk(full, 5).values.numpy()
    np.testing.assert_allclose(s, ref, atol=0.05)             # bf16 user vectors vs fp32 reference
    assert not any(set(i) & set(h.tolist()) for i, h in zip(idx.tolist(), ex.histories))


def test_text_retriever_uses_recent_history():
    vectors = np.eye(4, dtype=np.float32)                     # idx 1..4 -> axis 0..3
    s, idx = TextRetriever(vectors, "test", window=1).retrieve([np.array([1, 3])], 2)
    assert idx[0, 0] not in (1, 3) and s.shape == (1, 2)      # history excluded even when most similar


def test_generate_candidates_files(tiny_dataset, tmp_path):
    counts = tiny_dataset.item_popularity("train")
    summary = generate_candidates(tiny_dataset, PopularityRetriever(counts), "popularity", tmp_path / "c", n=15,
                                  progress=False)
    test = pl.read_parquet(tmp_path / "c" / "candidates_test.parquet")
    assert test.height == 60 and test["candidates"].to_numpy().shape == (60, 15)
    hits = test["hit_rank"].to_numpy()
    assert summary["recall"]["test"]["recall@15"] == pytest.approx((hits >= 0).mean())
    row = test.row(0, named=True)
    assert row["hit_rank"] == -1 or list(row["candidates"])[row["hit_rank"]] == row["target"]
    assert set(summary["recall"]) == {"train", "valid", "test"}


@pytest.mark.parametrize("negatives", ["popularity", "uniform"])
def test_pool_candidates_hold_the_target_once_among_unseen_negatives(tiny_dataset, tmp_path, negatives):
    summary = pool_candidates(tiny_dataset, tmp_path / "p", n=6, negatives=negatives, seed=3, progress=False)
    assert summary["retriever"] == f"pool-{negatives}" and summary["recall"]["test"] == {"recall@6": 1.0}
    test = pl.read_parquet(tmp_path / "p" / "candidates_test.parquet")
    ex = tiny_dataset.eval_examples("test")
    cands = test["candidates"].to_numpy()
    for row, hist, t in zip(cands, ex.histories, ex.targets):
        others = set(row.tolist()) - {int(t[0])}           # (the ring data's targets may repeat a history item)
        assert len(set(row.tolist())) == 6 and (row == t[0]).sum() == 1 and not others & set(hist.tolist())
    assert (cands[np.arange(len(cands)), test["hit_rank"].to_numpy()] == test["target"].to_numpy()).all()
    assert len(set(test["hit_rank"].to_list())) > 1                       # shuffled: the target is not always first
    pool_candidates(tiny_dataset, tmp_path / "q", n=6, negatives=negatives, seed=3, progress=False)
    assert pl.read_parquet(tmp_path / "q" / "candidates_test.parquet").equals(test)     # seeded


def test_popularity_pools_never_draw_an_item_nobody_trained_on():
    """Weight 0 for items 1 and 2, history [3], target 4: only item 5 can be a negative, so a pool of 2
    is {4, 5} and a pool of 3 cannot be filled, which the error says."""
    weights = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    assert sorted(sample_pool(rng, weights, [3], 4, 2).tolist()) == [4, 5]
    with pytest.raises(RecsysError, match="only 1 items are left"):
        sample_pool(rng, weights, [3], 4, 3)


def test_recall_at_by_hand():
    """Hit ranks [0, 25, -1, 60]: recall@20 = 1/4, @50 = 2/4, @100 = 3/4."""
    r = recall_at(np.array([0, 25, -1, 60]), (20, 50, 100))
    assert r == {"recall@20": 0.25, "recall@50": 0.5, "recall@100": 0.75}


def test_candidate_lists_read_back_what_was_written_with_each_history(tiny_dataset, tmp_path):
    """Every split's lists come back with the history the retriever saw (a prefix of the user's sequence
    followed by the target), the candidates and scores as written, and the target's position."""
    from recsys.data.candidates import read_candidate_lists

    generate_candidates(tiny_dataset, PopularityRetriever(tiny_dataset.item_popularity("train")), "popularity",
                        tmp_path / "c", n=6, train_targets_per_user=2, progress=False)
    sequences = tiny_dataset.user_sequences()
    for split in ("train", "valid", "test"):
        frame = pl.read_parquet(tmp_path / "c" / f"candidates_{split}.parquet")
        lists = read_candidate_lists(tiny_dataset, tmp_path / "c", split)
        assert len(lists) == frame.height > 0
        for r, row in zip(lists, frame.iter_rows(named=True)):
            seq = sequences[r.uidx]
            np.testing.assert_array_equal(r.history, seq[:row["history_length"]])
            assert r.target == seq[len(r.history)] == row["target"] and r.user_id == row["user_id"]
            assert r.window == list(row["candidates"]) and np.allclose(r.scores, row["scores"])
            assert r.target_rank() == (row["hit_rank"] if row["hit_rank"] >= 0 else np.inf)
    test = tiny_dataset.eval_examples("test")        # the test history is everything before the test item
    np.testing.assert_array_equal(read_candidate_lists(tiny_dataset, tmp_path / "c", "test")[0].history,
                                  test.histories[0])


def test_candidate_list_cut_and_target_rank_by_hand():
    from recsys.types import CandidateList

    r = CandidateList("u", 0, np.array([1, 2]), np.array([7, 5, 9, 4]), np.array([4.0, 3.0, 2.0, 1.0], np.float32), 9)
    assert r.target_rank() == 2.0 and r.has_target and r.window == [7, 5, 9, 4]
    top = r.top(2)
    assert top.window == [7, 5] and top.scores.tolist() == [4.0, 3.0] and top.target_rank() == np.inf
    assert not top.has_target and r.top(None) is r


def test_a_bad_candidates_file_is_named_with_what_is_wrong(tiny_dataset, tmp_path):
    from recsys.data.candidates import read_candidate_lists, read_candidates
    from recsys.errors import DataError

    with pytest.raises(DataError, match=r"candidates_valid\.parquet: no candidates for split 'valid'; run `recsys"):
        read_candidates(tmp_path, "valid")
    with pytest.raises(DataError, match="split must be one of train, valid, test, got 'dev'"):
        read_candidates(tmp_path, "dev")
    (tmp_path / "candidates_valid.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"candidates_valid\.parquet: not a readable parquet file"):
        read_candidates(tmp_path, "valid")
    pl.DataFrame({"uidx": [0], "candidates": [[1, 2]]}).write_parquet(tmp_path / "candidates_valid.parquet")
    with pytest.raises(DataError, match=r"candidates_valid\.parquet: missing column\(s\) user_id, target, "):
        read_candidates(tmp_path, "valid")
    longest = max(len(s) for s in tiny_dataset.user_sequences())
    pl.DataFrame({"user_id": ["x"], "uidx": [0], "target": [1], "target_item_id": ["1"], "history_length": [longest + 1],
                  "candidates": [[1, 2]], "scores": [[0.5, 0.4]], "hit_rank": [0]}).write_parquet(
        tmp_path / "candidates_valid.parquet")
    with pytest.raises(DataError, match=r"candidates_valid\.parquet, row 0 \(user 'x'\): history_length .* another dataset"):
        read_candidate_lists(tiny_dataset, tmp_path, "valid")
