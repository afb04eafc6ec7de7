import math

import numpy as np
import pytest

from recsys.errors import RecsysError
from recsys.metrics import (
    average_precision,
    compute_metrics,
    hit_rate,
    intra_list_diversity,
    item_coverage,
    list_validity,
    mrr,
    ndcg,
    parse_metric,
    precision,
    recall,
    relevant_ranks,
)

INF = np.inf


def test_docstring_example():
    """q0: list [a, b, c], relevant {b} -> rank 1: hr@1 = 0, hr@2 = 1, ndcg@2 = 1/log2(3) = 0.6309.
    q1: list [x, y], relevant {y, z} -> ranks (1, inf): recall@2 = 0.5, mrr = 0.5,
    ndcg@2 = (1/log2 3) / (1 + 1/log2 3) = 0.3869."""
    ranked = np.array([[1, 2, 3], [4, 5, -1]])
    relevant = np.array([[2, -1], [5, 6]])
    ranks = relevant_ranks(ranked, relevant)
    np.testing.assert_array_equal(ranks, [[1, INF], [1, INF]])
    gains = (relevant != -1).astype(float)
    assert hit_rate(ranks, gains, 1).tolist() == [0, 0]
    assert hit_rate(ranks, gains, 2).tolist() == [1, 1]
    assert recall(ranks, gains, 2).tolist() == [1.0, 0.5]
    assert mrr(ranks, gains).tolist() == [0.5, 0.5]
    np.testing.assert_allclose(ndcg(ranks, gains, 2), [1 / math.log2(3), (1 / math.log2(3)) / (1 + 1 / math.log2(3))])
    np.testing.assert_allclose(ndcg(ranks, gains, 2), [0.6309, 0.3869], atol=1e-4)


def test_several_relevant_and_precision_map():
    """List [a, b, c, d], relevant {a, c}: ranks (0, 2).
    precision@2 = 1/2, precision@4 = 2/4; AP = (1/1 + 2/3) / 2 = 0.8333; map@2 = (1/1) / 2 = 0.5;
    ndcg@4 = (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.6309 = 0.9197."""
    ranks, gains = np.array([[0.0, 2.0]]), np.ones((1, 2))
    assert precision(ranks, gains, 2)[0] == 0.5
    assert precision(ranks, gains, 4)[0] == 0.5
    assert average_precision(ranks, gains)[0] == pytest.approx(5 / 6)
    assert average_precision(ranks, gains, 2)[0] == pytest.approx(0.5)
    assert ndcg(ranks, gains, 4)[0] == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


def test_k_larger_than_list_and_empty_list():
    """A list of 2 items with the relevant one at rank 1: hr@100 = 1, precision@100 = 1/100.
    An empty list (all padding) finds nothing: every metric is 0."""
    ranks = relevant_ranks(np.array([[7, 8], [-1, -1]]), np.array([[8], [8]]))
    gains = np.ones((2, 1))
    assert hit_rate(ranks, gains, 100).tolist() == [1, 0]
    assert precision(ranks, gains, 100).tolist() == [0.01, 0]
    assert ndcg(ranks, gains, 100)[1] == 0 and mrr(ranks, gains)[1] == 0


def test_duplicates_count_at_first_occurrence():
    """[b, a, a, c] with relevant {a}: a is at rank 1 (its repeat at 2 is ignored)."""
    assert relevant_ranks(np.array([[2, 1, 1, 3]]), np.array([[1]])).tolist() == [[1.0]]


def test_graded_relevance():
    """Relevant a (gain 3) at rank 1, b (gain 1) at rank 0.
    DCG@2 = 1/log2 2 + 3/log2 3 = 2.8928; ideal = 3 + 1/log2 3 = 3.6309; ndcg@2 = 0.7967."""
    ranks, gains = np.array([[1.0, 0.0]]), np.array([[3.0, 1.0]])
    expected = (1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3))
    assert ndcg(ranks, gains, 2)[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.7967, abs=1e-4)


def test_mrr_cutoff():
    """First relevant at rank 4: mrr = 1/5, mrr@3 = 0."""
    ranks, gains = np.array([[4.0]]), np.ones((1, 1))
    assert mrr(ranks, gains)[0] == pytest.approx(0.2) and mrr(ranks, gains, 3)[0] == 0


def test_compute_metrics_skips_queries_without_relevant_items():
    """Query 2 has no relevant item: it is left out of the mean and counted."""
    ranks = np.array([[0.0], [INF], [INF]])
    gains = np.array([[1.0], [1.0], [0.0]])
    out = compute_metrics(ranks, gains, ["hr@1", "mrr"])
    assert out == {"hr@1": 0.5, "mrr": 0.5, "num_queries": 2, "num_skipped": 1}


def _slow_metrics(ranked: list[list[int]], relevant: list[dict[int, float]], k: int) -> dict[str, list[float]]:
    """Per-query reference written from the definitions, one loop per query."""
    out = {"hr": [], "recall": [], "ndcg": [], "mrr": [], "map": [], "precision": []}
    for lst, rel in zip(ranked, relevant):
        seen, first = set(), {}
        for pos, item in enumerate(lst):
            if item not in seen:
                seen.add(item)
                first[item] = pos
        found = sorted(first[i] for i in rel if i in first and first[i] < k)
        out["hr"].append(float(bool(found)))
        out["recall"].append(len(found) / len(rel))
        out["precision"].append(len(found) / k)
        dcg = sum(rel[i] / math.log2(first[i] + 2) for i in rel if i in first and first[i] < k)
        ideal = sorted(rel.values(), reverse=True)[:k]
        out["ndcg"].append(dcg / sum(g / math.log2(j + 2) for j, g in enumerate(ideal)))
        out["mrr"].append(1 / (found[0] + 1) if found else 0.0)
        out["map"].append(sum((j + 1) / (r + 1) for j, r in enumerate(found)) / len(rel))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_metrics_match_reference(seed):
    rng = np.random.default_rng(seed)
    Q, L, R, N = 40, 12, 4, 30
    ranked = rng.integers(0, N, (Q, L))
    lengths = rng.integers(0, L + 1, Q)                      # lists of any length, padded at the end
    ranked[np.arange(L)[None, :] >= lengths[:, None]] = -1
    relevant = np.stack([rng.choice(N, R, replace=False) for _ in range(Q)])
    n_rel = rng.integers(1, R + 1, Q)
    relevant[np.arange(R)[None, :] >= n_rel[:, None]] = -1
    gains = np.where(relevant >= 0, rng.integers(1, 4, (Q, R)), 0).astype(float)
    ranks = relevant_ranks(ranked, relevant)
    for k in (1, 5, 12, 20):
        ref = _slow_metrics([[i for i in row if i >= 0] for row in ranked],
                            [{int(i): g for i, g in zip(r, gr) if i >= 0} for r, gr in zip(relevant, gains)], k)
        fast = {"hr": hit_rate, "recall": recall, "ndcg": ndcg, "mrr": mrr, "map": average_precision,
                "precision": precision}
        for name, fn in fast.items():
            np.testing.assert_allclose(fn(ranks, gains, k), ref[name], err_msg=f"{name}@{k}")


def test_parse_metric_errors():
    assert parse_metric("NDCG@10") == ("ndcg", 10) and parse_metric("mrr") == ("mrr", None)
    for bad, msg in [("foo@3", "unknown metric"), ("ndcg", "needs a cut-off"), ("hr@0", "positive"), ("hr@x", "positive")]:
        with pytest.raises(RecsysError, match=msg):
            parse_metric(bad)


def test_coverage_diversity_validity():
    """Lists {1,2} and {2,3} over 4 items cover 3/4. Orthogonal item vectors: every pair has cosine 0,
    so diversity is 1; two identical items give 0."""
    assert item_coverage(np.array([[1, 2], [2, 3]]), 4) == 0.75
    eye = np.eye(4)
    assert intra_list_diversity(np.array([[0, 1, 2]]), eye) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[0, 0, -1]]), eye) == pytest.approx(0.0)
    v = list_validity([["a", "b", "a"], ["a", None, "zzz"], ["b"]], catalog={"a", "b"})
    assert v == {"malformed": pytest.approx(1 / 7), "out_of_catalog": pytest.approx(1 / 7),
                 "duplicate": pytest.approx(1 / 7), "valid_lists": pytest.approx(1 / 3)}


def test_paired_bootstrap_by_hand_and_a_constant_shift():
    from recsys.metrics import paired_bootstrap

    r = paired_bootstrap(np.array([0.0, 1, 0, 1]), np.array([1.0, 1, 0, 1]))
    assert r["mean_diff"] == 0.25 and (r["better"], r["worse"], r["queries"]) == (1, 0, 4)
    assert 0.0 <= r["ci_low"] <= 0.25 <= r["ci_high"] <= 1.0
    rng = np.random.default_rng(1)
    a = rng.random(200)
    shifted = paired_bootstrap(a, a + 0.1)                  # every query moves by exactly 0.1: no spread
    assert shifted["ci_low"] == pytest.approx(0.1) and shifted["ci_high"] == pytest.approx(0.1)
    noisy = paired_bootstrap(a, a + rng.normal(0.0, 0.5, 200))
    assert noisy["ci_low"] < noisy["mean_diff"] < noisy["ci_high"]
    with pytest.raises(RecsysError, match="same queries"):
        paired_bootstrap(a, a[:10])


def test_target_rank_is_the_0_based_position_or_inf_like_relevant_ranks():
    from recsys.metrics import relevant_ranks, target_rank

    lists, targets = [[5, 3, 9], [5, 3, 9], [7]], [9, 4, 7]
    assert [target_rank(lst, t) for lst, t in zip(lists, targets)] == [2.0, float("inf"), 0.0]
    assert target_rank(np.array([5, 3, 9]), 3) == 1.0 and target_rank([], 3) == float("inf")
    padded = np.array([[5, 3, 9], [5, 3, 9], [7, -1, -1]])
    assert relevant_ranks(padded, np.array(targets)[:, None])[:, 0].tolist() == [2.0, float("inf"), 0.0]
