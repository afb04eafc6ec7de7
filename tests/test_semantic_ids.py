import numpy as np
import pytest

from recsys.errors import RecsysError
from recsys.retrieval.semantic_ids import (
    SemanticIDConfig,
    SemanticIDs,
    _assign,
    perplexity,
)


def test_two_level_codes_by_hand():
    """1-D points 0, 1, 10, 11 with K = 2: level 1 splits {0, 1} from {10, 11} (centroids 0.5, 10.5);
    residuals are -0.5, 0.5, -0.5, 0.5, so level 2 splits by sign. All four codes differ: no collision,
    and the de-duplication level is 0 everywhere."""
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    sid = SemanticIDs.fit(["a", "b", "c", "d"], x, SemanticIDConfig(levels=2, codebook_size=2))
    c = sid.codes
    assert c[0, 0] == c[1, 0] != c[2, 0] == c[3, 0]
    assert c[0, 1] == c[2, 1] != c[1, 1] == c[3, 1]
    assert (c[:, 2] == 0).all() and sid.stats["collision_rate"] == 0
    assert sid.stats["relative_reconstruction_error"] < 1e-6


def test_collisions_are_deduplicated():
    """Three identical items must collide on every level; the extra level numbers them 0, 1, 2."""
    x = np.concatenate([np.zeros((3, 4)), np.random.default_rng(0).standard_normal((20, 4))])
    sid = SemanticIDs.fit(np.arange(23), x, SemanticIDConfig(levels=2, codebook_size=4))
    assert sorted(sid.codes[:3, 2].tolist()) == [0, 1, 2]
    assert len({tuple(r) for r in sid.codes.tolist()}) == 23
    assert sid.stats["collision_rate"] >= 2 / 23 and sid.stats["max_collisions"] >= 3


def test_trie_reaches_every_item_and_every_prefix_leads_somewhere():
    rng = np.random.default_rng(0)
    sid = SemanticIDs.fit(np.arange(300), rng.standard_normal((300, 8)), SemanticIDConfig(levels=3, codebook_size=8))
    trie = sid.trie
    assert len(trie) == 300
    for row, code in enumerate(sid.codes.tolist()):           # every item is reachable code by code
        for level in range(len(code)):
            assert code[level] in trie.next_codes(code[:level])
        assert trie.item(code) == row

    def walk(prefix):                                         # every valid prefix ends at an item
        nxt = trie.next_codes(prefix)
        if len(prefix) == trie.depth:
            assert trie.item(prefix) is not None and len(nxt) == 0
            return 1
        assert len(nxt) > 0
        return sum(walk(prefix + (int(c),)) for c in nxt)

    assert walk(()) == 300
    assert len(trie.next_codes((99,))) == 0


def test_balanced_assignment_respects_capacity():
    """6 points all nearest to centroid 0, capacity ceil(6/3) = 2: two go to each centroid."""
    x = np.zeros((6, 2))
    centroids = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert np.bincount(_assign(x, centroids, balanced=True)).tolist() == [2, 2, 2]
    assert _assign(x, centroids, balanced=False).tolist() == [0] * 6


def test_perplexity_by_hand():
    """Codes uniform over 4 values -> 4; a single value -> 1."""
    assert perplexity(np.array([0, 1, 2, 3])) == pytest.approx(4)
    assert perplexity(np.array([2, 2, 2])) == pytest.approx(1)


def test_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    sid = SemanticIDs.fit(np.array(["x", "y", "z", "w", "v"]), rng.standard_normal((5, 3)),
                          SemanticIDConfig(levels=2, codebook_size=2), source="text:minilm")
    loaded = SemanticIDs.load(sid.save(tmp_path / "sid"))
    np.testing.assert_array_equal(loaded.codes, sid.codes)
    assert loaded.stats == sid.stats and loaded.source == "text:minilm" and loaded.item_ids.tolist() == ["x", "y", "z", "w", "v"]
    with pytest.raises(RecsysError, match="codebook_size 8 exceeds the 5 items"):
        SemanticIDs.fit(np.arange(5), rng.standard_normal((5, 3)), SemanticIDConfig(codebook_size=8))
    bad = rng.standard_normal((5, 3))
    bad[2, 0] = np.inf
    with pytest.raises(RecsysError, match="row 2 contains NaN or inf"):
        SemanticIDs.fit(np.arange(5), bad)
    with pytest.raises(RecsysError, match="no semantic_ids.json"):
        SemanticIDs.load(tmp_path)
