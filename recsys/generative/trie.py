"""A prefix trie over semantic-ID codes as tensors, so constrained decoding stays batched.

TIGER (Rajput et al., arXiv 2305.05065) decodes semantic IDs under a trie of the catalog's codes so
that every generated code names an item. :class:`recsys.retrieval.semantic_ids.PrefixTrie` answers
one prefix at a time in Python; here every prefix is a node id and the transitions are one table::

    child[node, code] -> node id of prefix + (code,), or -1 when no item has that prefix
    item[node]        -> item row for a full-depth node, or -1
    path[row, depth]  -> node id of item row's prefix of length ``depth`` (0 = the root)
    leaves[node]      -> number of items below the node

(built in numpy by :class:`recsys.portable.trie_tables.TrieTables`, which serving uses without torch).

Banned items (the user's history, items already in a list) are propagated up the trie by
:meth:`CodeTrie.open_children`: a prefix stays open only while some unbanned item lies below it, so
neither beam search nor sampling can walk into a branch whose every leaf is banned.

Shapes: N items, D code levels (levels + de-duplication level), K = the largest code + 1.
Node 0 is the root (the empty prefix). Every valid path of D codes ends at exactly one item.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.portable.trie_tables import TrieTables


class CodeTrie:
    """Transitions of the code trie as tensors; see the module docstring."""

    def __init__(self, codes: np.ndarray):
        t = TrieTables.build(codes)
        self.depth, self.n_codes = t.depth, t.n_codes
        self.child, self.item, self.node_depth = (torch.from_numpy(x) for x in (t.child, t.item, t.node_depth))
        self.codes, self.path, self.leaves = (torch.from_numpy(x) for x in (t.codes, t.path, t.leaves))
        self.item_node = self.path[:, -1]

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
