"""A prefix trie over semantic-ID codes as tensors, so constrained decoding stays batched.

TIGER (Rajput et al., arXiv 2305.05065) decodes semantic IDs under a trie of the catalog's codes so
that every generated code names an item. :class:`recsys.retrieval.semantic_ids.PrefixTrie` answers
one prefix at a time in Python; here every prefix is a node id and the transitions are one table::

    child[node, code] -> node id of prefix + (code,), or -1 when no item has that prefix
    item[node]        -> item row for a full-depth node, or -1
    path[row, depth]  -> node id of item row's prefix of length ``depth`` (0 = the root)
    leaves[node]      -> number of items below the node

Banned items (the user's history, items already in a list) are propagated up the trie by
:meth:`CodeTrie.open_children`: a prefix stays open only while some unbanned item lies below it, so
neither beam search nor sampling can walk into a branch whose every leaf is banned.

Shapes: N items, D code levels (levels + de-duplication level), K = the largest code + 1.
Node 0 is the root (the empty prefix). Every valid path of D codes ends at exactly one item.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.errors import RecsysError


class CodeTrie:
    """Transitions of the code trie as tensors; see the module docstring."""

    def __init__(self, codes: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) == 0 or (codes < 0).any():
            raise RecsysError(f"codes must be a non-empty (N, D) array of non-negative ints, got {codes.shape}")
        if len({tuple(r) for r in codes.tolist()}) != len(codes):
            raise RecsysError("codes: two items share a full code; add a de-duplication level")
        self.depth, self.n_codes = codes.shape[1], int(codes.max()) + 1
        ids: dict[tuple, int] = {(): 0}
        edges, leaves = [], []
        for item, row in enumerate(map(tuple, codes.tolist())):
            for level in range(self.depth):
                prefix = row[:level + 1]
                if prefix not in ids:
                    ids[prefix] = len(ids)
                    edges.append((ids[row[:level]], row[level], ids[prefix]))
            leaves.append((ids[row], item))
        child = torch.full((len(ids), self.n_codes), -1, dtype=torch.long)
        e = torch.tensor(edges)
        child[e[:, 0], e[:, 1]] = e[:, 2]
        item = torch.full((len(ids),), -1, dtype=torch.long)
        leaf = torch.tensor(leaves)
        item[leaf[:, 0]] = leaf[:, 1]
        self.child, self.item = child, item
        node_depth = torch.zeros(len(ids), dtype=torch.long)
        for prefix, node in ids.items():
            node_depth[node] = len(prefix)
        self.node_depth = node_depth
        self.codes = torch.from_numpy(codes)
        self.item_node = torch.as_tensor([ids[tuple(r)] for r in codes.tolist()])
        self.path = torch.as_tensor([[ids[tuple(r[:d])] for d in range(self.depth + 1)] for r in codes.tolist()])
        self.leaves = torch.zeros(len(ids), dtype=torch.long).index_add_(
            0, self.path.flatten(), torch.ones(self.path.numel(), dtype=torch.long))

    @property
    def n_nodes(self) -> int:
        return self.child.shape[0]

    def valid(self, nodes: torch.Tensor) -> torch.Tensor:
        """(..., K) bool: which codes may follow each node of ``nodes`` (...)."""
        return self.child[nodes.clamp(min=0)] >= 0

    def open_children(self, nodes: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
        """(R, K) bool: codes that may follow ``nodes`` (R,) and still reach an item not in ``banned``.

        ``banned`` (R, N) bool over item rows. A child is open when it exists and the number of banned
        items below it is smaller than its number of items: the count is a scatter of every banned item
        whose path passes through ``nodes[r]`` onto its next code, O(banned pairs), not O(R * nodes).
        """
        R = len(nodes)
        counts = torch.zeros(R, self.n_codes, dtype=torch.long, device=nodes.device)
        r, b = banned.nonzero(as_tuple=True)
        if len(r):
            depth = self.node_depth[nodes.clamp(min=0)][r]                                  # (P,)
            through = (self.path[b, depth] == nodes[r]) & (depth < self.depth)
            r, b, depth = r[through], b[through], depth[through]
            counts.index_put_((r, self.codes[b, depth]), torch.ones_like(r), accumulate=True)
        children = self.child[nodes.clamp(min=0)]                                           # (R, K)
        return (children >= 0) & (self.leaves[children.clamp(min=0)] > counts)

    def advance(self, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Nodes reached by appending ``codes`` to ``nodes`` (same shape); -1 where invalid."""
        return torch.where(nodes >= 0, self.child[nodes.clamp(min=0), codes.clamp(0, self.n_codes - 1)], -1)

    def node_of(self, prefix) -> int:
        """Node id of a code prefix (sequence of ints); -1 if no item starts with it."""
        node = 0
        for c in prefix:
            if node < 0 or not 0 <= c < self.n_codes:
                return -1
            node = int(self.child[node, c])
        return node

    def __len__(self) -> int:
        return len(self.codes)
