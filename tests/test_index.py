import numpy as np
import pytest

from recsys.errors import RecsysError
from recsys.retrieval import ItemIndex, brute_force_topk


def data(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return np.arange(100, 100 + n), rng.standard_normal((n, d)).astype(np.float32), \
        rng.standard_normal((20, d)).astype(np.float32)


def test_brute_force_by_hand():
    """Items (1,0), (0,1), (1,1); query (2,1): ip scores 2, 1, 3 -> order [2, 0, 1].
    l2 scores -(1+1), -(4+0), -(1+0) -> order [2, 0, 1]; excluding item 2 gives [0, 1]."""
    x, q = np.array([[1, 0], [0, 1], [1, 1]], np.float32), np.array([[2, 1]], np.float32)
    s, p = brute_force_topk(q, x, 3, "ip")
    assert p.tolist() == [[2, 0, 1]] and s.tolist() == [[3, 2, 1]]
    s, p = brute_force_topk(q, x, 2, "l2", exclude=[[2]])
    assert p.tolist() == [[0, 1]] and np.allclose(s, [[-2, -4]])


@pytest.mark.parametrize("factory, params", [("Flat", {}), ("HNSW32,Flat", {"ef_search": 512}),
                                             ("IVF8,Flat", {"nprobe": 8})])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_search_equals_brute_force(factory, params, metric):
    """With exhaustive settings every index returns the exact top-k (ties allowed: compare the scores,
    and check that each returned id really has the returned score)."""
    ids, x, q = data()
    index = ItemIndex.build(ids, x, factory, metric).set_params(**params)
    s, got = index.search(q, 10)
    ref_s, _ref_p = brute_force_topk(q, x, 10, metric)
    np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-4)
    for row in range(len(q)):
        s_row, p_row = brute_force_topk(q[row:row + 1], x, len(x), metric)
        full = dict(zip(ids[p_row[0]].tolist(), s_row[0].tolist()))
        np.testing.assert_allclose([full[i] for i in got[row]], s[row], rtol=1e-4, atol=1e-4)


def test_ties_are_allowed():
    """Four identical items: any 2 of them are a correct top-2."""
    x = np.ones((4, 3), np.float32)
    s, got = ItemIndex.build(["a", "b", "c", "d"], x).search(np.ones((1, 3), np.float32), 2)
    assert s.tolist() == [[3.0, 3.0]] and len(set(got[0])) == 2


def test_exclusion_and_always_k():
    ids, x, q = data()
    exclude = [ids[:50].tolist()] * len(q)
    _, got = ItemIndex.build(ids, x, "Flat").search(q, 20, exclude=exclude)
    assert not set(got.ravel()) & set(ids[:50]) and got.shape == (20, 20)
    # Clustered items and an IVF probing a single list: the probe holds too few items, the exact scan answers.
    rng = np.random.default_rng(1)
    clustered = np.concatenate([rng.normal(c, 0.01, (10, 4)) for c in np.eye(4) * 10]).astype(np.float32)
    index = ItemIndex.build(np.arange(40), clustered, "IVF4,Flat", "l2").set_params(nprobe=1)
    s, got = index.search(clustered[:1], 30)
    ref_s, _ = brute_force_topk(clustered[:1], clustered, 30, "l2")
    assert len(set(got[0])) == 30
    np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-3)


def test_save_load_round_trip_and_refusals(tmp_path):
    ids, x, q = data()
    index = ItemIndex.build(ids.astype(str), x, "HNSW16,Flat", "cosine", embedding_model="sasrec:abc")
    index.save(tmp_path / "idx")
    loaded = ItemIndex.load(tmp_path / "idx", embedding_model="sasrec:abc")
    assert loaded.meta == index.meta
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(RecsysError, match="built from 'sasrec:abc', expected 'text:xyz'"):
        ItemIndex.load(tmp_path / "idx", embedding_model="text:xyz")
    np.save(tmp_path / "idx" / "vectors.npy", x * 2)
    with pytest.raises(RecsysError, match="files do not match meta.json.*vectors hash"):
        ItemIndex.load(tmp_path / "idx")
    with pytest.raises(RecsysError, match="not a saved index"):
        ItemIndex.load(tmp_path)


def test_bad_input_errors():
    ids, x, q = data(n=30)
    index = ItemIndex.build(ids, x)
    with pytest.raises(RecsysError, match="dimension 8, the index has 16"):
        index.search(q[:, :8], 5)
    with pytest.raises(RecsysError, match="zero items"):
        ItemIndex.build([], np.empty((0, 16), np.float32))
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(RecsysError, match="row 7 contains NaN"):
        ItemIndex.build(ids, bad)
    with pytest.raises(RecsysError, match="k=31 is more than the 30 items left"):
        index.search(q, 31)
    with pytest.raises(RecsysError, match="k=25 is more than the 20 items left"):
        index.search(q, 25, exclude=[ids[:10].tolist()] * len(q))
    with pytest.raises(RecsysError, match="metric must be one of"):
        ItemIndex.build(ids, x, metric="manhattan")
    with pytest.raises(RecsysError, match="FAISS cannot build 'IVF4,PQ5'"):
        ItemIndex.build(ids, x, "IVF4,PQ5")
    with pytest.raises(RecsysError, match="nprobe applies to IVF"):
        index.set_params(nprobe=3)


def test_mips_to_l2_reduction_by_hand():
    """Items (3, 4) and (1, 0), M = 5: augmented (3, 4, 0) and (1, 0, sqrt 24). Query (1, 0, 0):
    squared L2 = |q|^2 + M^2 - 2 q.x = 26 - 6 = 20 and 26 - 2 = 24, so the nearest item (0) is the one
    with the largest inner product (3 > 1)."""
    from recsys.retrieval.index import augment_items

    xa = augment_items(np.array([[3, 4], [1, 0]], np.float32), 5.0)
    np.testing.assert_allclose(xa, [[3, 4, 0], [1, 0, np.sqrt(24)]], rtol=1e-6)
    qa = np.array([1, 0, 0], np.float32)
    np.testing.assert_allclose(((xa - qa) ** 2).sum(1), [20, 24], rtol=1e-6)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8"])
def test_ivf_takes_the_l2_reduction_when_asked_and_survives_a_reload(factory, tmp_path):
    """``mips=True`` on IVF (and IVF-PQ: the augmented width padded to a multiple of its 8 sub-quantizers):
    with every list probed a Flat store returns the exact top-20 with their true inner products, PQ a part of
    it; the same after save and load. ``auto`` leaves IVF in inner product."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 32)).astype(np.float32) * rng.uniform(0.5, 3.5, (4000, 1)).astype(np.float32)
    q = x[rng.integers(4000, size=50)] + 0.3 * rng.standard_normal((50, 32)).astype(np.float32)
    assert ItemIndex.build(np.arange(4000), x, factory, "ip").meta.mips_norm is None
    index = ItemIndex.build(np.arange(4000), x, factory, "ip", mips=True).set_params(nprobe=16)   # every list
    assert index.meta.mips_norm is not None and index.index.d == (33 if "PQ" not in factory else 40)
    s, got = index.search(q, 20)
    if "PQ" not in factory:
        np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[got]), rtol=1e-3, atol=1e-3)
    _, ref = brute_force_topk(q, x, 20, "ip")
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got.tolist(), ref.tolist())])
    assert recall > (0.99 if "PQ" not in factory else 0.25)        # every list probed: exact, or PQ's error
    index.save(tmp_path / "ix")
    _, again = ItemIndex.load(tmp_path / "ix").set_params(nprobe=16).search(q, 20)
    np.testing.assert_array_equal(again, got)


def test_hnsw_inner_product_returns_exact_inner_products():
    """Inner product on HNSW goes through the reduction; the scores it returns are the true inner
    products of the returned items, and with a wide search it finds the exact top-k."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32) * rng.uniform(0.5, 3.5, (3000, 1)).astype(np.float32)
    q = rng.standard_normal((100, 32)).astype(np.float32)
    index = ItemIndex.build(np.arange(3000), x, "HNSW32,Flat", "ip").set_params(ef_search=1024)
    assert index.meta.mips_norm == pytest.approx(np.linalg.norm(x, axis=1).max())          # norms differ 7x: on
    even = ItemIndex.build(np.arange(3000), rng.standard_normal((3000, 32)).astype(np.float32), "HNSW32,Flat", "ip")
    assert even.meta.mips_norm is None                                                      # even norms: off
    s, got = index.search(q, 50)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[got]), rtol=1e-3, atol=1e-3)
    _, ref = brute_force_topk(q, x, 50, "ip")
    assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(got.tolist(), ref.tolist())]) > 0.99
