import numpy as np
import polars as pl
import pytest
import torch

from recsys.data import EvalExamples
from recsys.errors import DataError, RecsysError
from recsys.evaluation import evaluate_full_ranking, evaluate_run, full_ranking_ranks


def test_full_ranking_ranks_by_hand():
    """Items 1..5 scored [.., 0.9, 0.5, 0.7, 0.5, 0.1]; history {1} masked; target 4.
    Above 4: item 3 (0.7); item 1 is masked. Tied with 4: item 2 (0.5). With tie priority
    order = [_, _, 0, _, 1, _] item 2 wins the tie, so the target's rank is 2 (0-based);
    with the priorities swapped, it is 1."""
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.5, 0.1]])
    exclude = torch.tensor([[False, True, False, False, False, False]])
    targets = torch.tensor([[4]])
    order = torch.tensor([5, 4, 0, 3, 1, 2])
    assert full_ranking_ranks(scores, targets, exclude, order).tolist() == [[2.0]]
    order = torch.tensor([5, 4, 1, 3, 0, 2])
    assert full_ranking_ranks(scores, targets, exclude, order).tolist() == [[1.0]]


def test_target_in_history_is_not_masked_and_padding_is_inf():
    scores = torch.tensor([[0.0, 0.1, 0.9]])
    exclude = torch.tensor([[False, True, True]])       # item 2 was seen before, and is the target again
    r = full_ranking_ranks(scores, torch.tensor([[2, 0]]), exclude, torch.arange(3))
    assert r[0, 0] == 0 and np.isinf(r[0, 1])


class Constant:
    """Scores every item the same: must get chance-level results, not 1 (optimistic ties) or 0."""
    n_items = 1000

    def score(self, histories):
        s = torch.zeros(len(histories), self.n_items + 1)
        s[:, 0] = -torch.inf
        return s


def test_constant_scores_get_chance_level():
    rng = np.random.default_rng(0)
    ex = EvalExamples(np.arange(2000), [np.array([], dtype=np.int64)] * 2000,
                      [np.array([t]) for t in rng.integers(1, 1001, 2000)])
    hr = evaluate_full_ranking(Constant(), ex, ["hr@100"], progress=False)["hr@100"]
    assert 0.07 < hr < 0.13                               # expected 100 / 1000


def test_evaluate_rejects_targets_outside_the_model():
    ex = EvalExamples(np.arange(1), [np.array([1])], [np.array([5000])])
    with pytest.raises(DataError, match="outside the model's 1000 items"):
        evaluate_full_ranking(Constant(), ex, ["hr@1"], progress=False)
    with pytest.raises(RecsysError, match="unknown metric"):
        evaluate_full_ranking(Constant(), ex, ["auc"], progress=False)


RUN = """q1 Q0 d1 1 3.0 t
q1 Q0 d2 2 2.0 t
q1 Q0 d3 3 1.0 t
q2 Q0 d5 1 9.0 t
q2 Q0 d4 2 9.0 t
q3 Q0 d1 1 1.0 t
"""
QRELS = """q1 0 d2 1
q1 0 d9 1
q2 0 d4 1
q3 0 d1 0
q4 0 d1 1
"""


def test_evaluate_run_by_hand(tmp_path):
    """q1: relevant d2 (rank 1) and d9 (absent): recall@10 = 0.5, mrr = 0.5,
    ndcg@10 = (1/log2 3) / (1 + 1/log2 3) = 0.3869.
    q2: d5 and d4 tie at 9.0; trec_eval orders ties by docno descending, so d5 first, d4 at rank 1:
    recall@10 = 1, mrr = 0.5, ndcg@10 = 1/log2 3 = 0.6309.
    q3 has no relevant item (skipped); q4 is not in the run (missing).
    Means: recall@10 = 0.75, mrr = 0.5, ndcg@10 = 0.5089."""
    (tmp_path / "run").write_text(RUN)
    (tmp_path / "qrels").write_text(QRELS)
    out = evaluate_run(tmp_path / "run", tmp_path / "qrels", ["ndcg@10", "recall@10", "mrr"])
    assert out["recall@10"] == pytest.approx(0.75) and out["mrr"] == pytest.approx(0.5)
    assert out["ndcg@10"] == pytest.approx((0.3869 + 0.6309) / 2, abs=1e-4)
    assert (out["num_queries"], out["num_skipped_no_relevant"], out["num_missing_in_run"]) == (2, 1, 1)
    complete = evaluate_run(tmp_path / "run", tmp_path / "qrels", ["recall@10"], complete=True)
    assert complete["recall@10"] == pytest.approx(1.5 / 3) and complete["num_queries"] == 3


def test_evaluate_run_parquet_equals_text(tmp_path):
    (tmp_path / "run").write_text(RUN)
    (tmp_path / "qrels").write_text(QRELS)
    rows = [line.split() for line in RUN.splitlines()]
    pl.DataFrame({"query_id": [r[0] for r in rows], "item_id": [r[2] for r in rows],
                  "score": [float(r[4]) for r in rows]}).write_parquet(tmp_path / "run.parquet")
    q = [line.split() for line in QRELS.splitlines()]
    pl.DataFrame({"query_id": [r[0] for r in q], "item_id": [r[2] for r in q],
                  "relevance": [int(r[3]) for r in q]}).write_parquet(tmp_path / "qrels.parquet")
    m = ["ndcg@10", "map@10", "precision@2"]
    assert evaluate_run(tmp_path / "run.parquet", tmp_path / "qrels.parquet", m) == \
        evaluate_run(tmp_path / "run", tmp_path / "qrels", m)


def test_evaluate_run_bad_files(tmp_path):
    (tmp_path / "qrels").write_text(QRELS)
    (tmp_path / "run").write_text("q1 Q0 d1 1 3.0\n")
    with pytest.raises(DataError, match="line 1 has 5 fields; a TREC run line has 6"):
        evaluate_run(tmp_path / "run", tmp_path / "qrels", ["mrr"])
    (tmp_path / "run").write_text("q1 Q0 d1 1 high t\n")
    with pytest.raises(DataError, match="line 1 field 'score' is 'high'"):
        evaluate_run(tmp_path / "run", tmp_path / "qrels", ["mrr"])
    (tmp_path / "run").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        evaluate_run(tmp_path / "run", tmp_path / "qrels", ["mrr"])
    pl.DataFrame({"query_id": ["q1"], "doc": ["d1"]}).write_parquet(tmp_path / "run.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['item_id', 'score'\]"):
        evaluate_run(tmp_path / "run.parquet", tmp_path / "qrels", ["mrr"])


def test_trec_eval_measure_names_are_ours_under_their_names(tmp_path):
    (tmp_path / "run").write_text(RUN)
    (tmp_path / "qrels").write_text(QRELS)
    ours = evaluate_run(tmp_path / "run", tmp_path / "qrels", ["ndcg@10", "mrr", "precision@2", "recall@10",
                                                                "map@10", "hr@1", "map"])
    trec = evaluate_run(tmp_path / "run", tmp_path / "qrels", ["ndcg_cut_10", "recip_rank", "P_2", "recall_10",
                                                                "map_cut_10", "success_1", "map"])
    assert [trec[t] for t in ("ndcg_cut_10", "recip_rank", "P_2", "recall_10", "map_cut_10", "success_1")] == \
        [ours[o] for o in ("ndcg@10", "mrr", "precision@2", "recall@10", "map@10", "hr@1")]
    with pytest.raises(RecsysError, match="unknown metric 'ndcg_cutoff_10'.*trec_eval's ndcg_cut_10"):
        evaluate_run(tmp_path / "run", tmp_path / "qrels", ["ndcg_cutoff_10"])


def test_a_run_listing_a_document_twice_is_refused_as_trec_eval_does(tmp_path):
    (tmp_path / "qrels").write_text(QRELS)
    (tmp_path / "run").write_text("q1 Q0 d1 1 3.0 t\nq1 Q0 d2 2 2.0 t\nq1 Q0 d1 3 1.0 t\n")
    with pytest.raises(DataError, match=r"query 'q1' lists document 'd1' more than once"):
        evaluate_run(tmp_path / "run", tmp_path / "qrels", ["mrr"])
