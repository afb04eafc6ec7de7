"""The code trie's transition tables in numpy, without torch: built once here, used by
:class:`recsys.generative.trie.CodeTrie` (as tensors, for training and decoding in torch) and by the
torch-free serving runtime (:class:`serving.runtime.GenerativeRuntime`).

Shapes: N items, D code levels, K = the largest code + 1, M trie nodes (node 0 = the root)::

    child[node, code] -> node id of prefix + (code,), or -1 when no item has that prefix   (M, K)
    item[node]        -> item row of a full-depth node, or -1                              (M,)
    node_depth[node]  -> length of the node's prefix                                       (M,)
    path[row, depth]  -> node id of item row's prefix of length ``depth`` (0 = the root)   (N, D + 1)
    leaves[node]      -> number of items below the node                                    (M,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.errors import RecsysError


@dataclass(frozen=True)
class TrieTables:
    codes: np.ndarray
    child: np.ndarray
    item: np.ndarray
    node_depth: np.ndarray
    path: np.ndarray
    leaves: np.ndarray

    @property
    def depth(self) -> int:
        return self.codes.shape[1]

    @property
    def n_codes(self) -> int:
        return self.child.shape[1]

    @classmethod
    def build(cls, codes) -> TrieTables:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) == 0 or (codes < 0).any():
            raise RecsysError(f"codes must be a non-empty (N, D) array of non-negative ints, got {codes.shape}")
        if len({tuple(r) for r in codes.tolist()}) != len(codes):
            raise RecsysError("codes: two items share a full code; add a de-duplication level")
        N, D = codes.shape
        ids: dict[tuple, int] = {(): 0}
        path = np.zeros((N, D + 1), dtype=np.int64)
        for row, code in enumerate(map(tuple, codes.tolist())):
            for level in range(1, D + 1):
                path[row, level] = ids.setdefault(code[:level], len(ids))
        child = np.full((len(ids), int(codes.max()) + 1), -1, dtype=np.int64)
        for level in range(D):
            child[path[:, level], codes[:, level]] = path[:, level + 1]
        item = np.full(len(ids), -1, dtype=np.int64)
        item[path[:, D]] = np.arange(N)
        node_depth = np.zeros(len(ids), dtype=np.int64)
        node_depth[path] = np.arange(D + 1)
        leaves = np.bincount(path.ravel(), minlength=len(ids)).astype(np.int64)
        return cls(codes, child, item, node_depth, path, leaves)

    def open_children(self, nodes: np.ndarray, banned: np.ndarray) -> np.ndarray:
        """(R, K) bool: codes that may follow ``nodes`` (R,) and still reach an item not in ``banned``
        (R, N) bool over item rows (see :meth:`recsys.generative.trie.CodeTrie.open_children`)."""
        counts = np.zeros((len(nodes), self.n_codes), dtype=np.int64)
        r, b = np.nonzero(banned)
        if len(r):
            depth = self.node_depth[np.maximum(nodes, 0)][r]
            through = (depth < self.depth) & (self.path[b, np.minimum(depth, self.depth)] == nodes[r])
            r, b, depth = r[through], b[through], depth[through]
            np.add.at(counts, (r, self.codes[b, depth]), 1)
        children = self.child[np.maximum(nodes, 0)]
        return (children >= 0) & (nodes[:, None] >= 0) & (self.leaves[np.maximum(children, 0)] > counts)
