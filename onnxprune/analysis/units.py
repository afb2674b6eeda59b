"""Prunable units and their equivalences.

A *unit* is the smallest thing pruning can remove: one output channel of a Conv,
one neuron of a Gemm, or a coarser block when coupling forces it (a head, a
channel index shared by every group of a grouped Conv).  Every tensor axis that
carries units has a *layout*: an int array with one entry per position along
that axis, the unit id owning that position, or -1 for positions no unit owns
(e.g. the RGB channels of the network input).

Coupling two positions means their units must be kept or removed together:
a union in this union-find.  Layout arrays keep raw ids; `find` resolves them.
"""
from __future__ import annotations

import numpy as np

NO_UNIT = -1


class UnitTable:
    def __init__(self) -> None:
        self._parent: list[int] = []
        self.source_of: list[int] = []  # unit id -> index of the source that created it

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int, source: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self.source_of.extend([source] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, u: int) -> int:
        parent = self._parent
        root = u
        while parent[root] != root:
            root = parent[root]
        while parent[u] != root:  # path compression
            parent[u], u = root, parent[u]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        # the older unit stays the representative: groups keep their first source's name
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        return ra

    def roots(self, layout: np.ndarray) -> np.ndarray:
        """Resolve a layout to root ids (NO_UNIT stays)."""
        out = layout.copy()
        for i, u in enumerate(layout.tolist()):
            if u != NO_UNIT:
                out[i] = self.find(u)
        return out

    def root_array(self) -> np.ndarray:
        return np.array([self.find(u) for u in range(len(self._parent))], dtype=np.int64)
