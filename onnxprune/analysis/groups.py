"""Pruning groups: the result of dependency analysis, as plain data.

A group is every unit that coupling ties together, with every parameter slice
that must be cut with them.  Unit index i of a group is what plans refer to;
units are numbered in the order of the group's first source's channels, so
"keep [0, 3, 5]" of a Conv group means output channels 0, 3 and 5.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis.context import AnalysisState, ParamSlice, Source
from onnxprune.analysis.units import NO_UNIT


# ops whose output units a Reshape (or the op itself) can split into attention heads
HEAD_SOURCES = ("MatMul", "Gemm", "Attention", "MultiHeadAttention", "GroupQueryAttention")


@dataclass
class Group:
    id: int
    name: str
    sources: list[Source]
    roots: np.ndarray  # root unit id of unit index i
    params: list[ParamSlice] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    channels_per_unit: int = 1  # a head is head_dim channels; a grouped-conv unit one per group
    head_dim: int | None = None  # set when a Reshape split the units into heads of this width
    heads_per_unit: dict[str, int] = field(default_factory=dict)  # source node -> heads it has in one unit
    hidden: bool = False  # the residual-stream width, pruned through norms (opt-in, not lossless)
    kv_groups: int | None = None  # grouped-query attention by slot: a unit is one query head of each kv group
    slot_kv: bool = False  # the KV heads of grouped-query attention by slot: they stay, the slots' group counts them
    unit_heads: tuple[int, int] | None = None  # (query, KV) heads in one unit, as the attention op states them

    @property
    def size(self) -> int:
        return len(self.roots)

    @property
    def prunable(self) -> bool:
        return not self.blocked


    @property
    def kind(self) -> str:
        """channels (convolutions), neurons (FC), heads, kv groups (grouped-query attention),
        or hidden (the residual-stream width, through norms: opt-in)."""
        if self.hidden:
            return "hidden"
        if self.head_dim is not None and self.unit_heads is not None:
            return "kv groups" if self.unit_heads[0] != self.unit_heads[1] else "heads"
        if self.head_dim is not None and self.heads_per_unit:
            return "kv groups" if len(set(self.heads_per_unit.values())) > 1 else "heads"
        if all(s.op_type in ("Conv", "ConvTranspose") for s in self.sources):
            return "channels"
        return "neurons"

    def describe_units(self) -> str:
        """'4 heads x 16', '2 kv groups (2 query + 1 kv heads x 16)', '256 neurons'."""
        kind = self.kind
        if kind == "heads" and self.kv_groups:  # grouped-query attention by slot
            return f"{self.size} query heads in each of {self.kv_groups} kv groups x {self.head_dim}"
        if kind == "heads":
            return f"{self.size} heads x {self.head_dim}"
        if kind == "kv groups":
            query, kv = self._kv_group_heads()
            return f"{self.size} kv groups ({query} query + {kv} kv heads x {self.head_dim})"
        return f"{self.size} {kind}"

    def head_counts(self, units: int | None = None) -> tuple[int, int] | None:
        """(query heads, KV heads) of the attention this group's units are, with `units` of them kept
        (default: all); None when its units are not attention heads. What a runtime config calls
        num_attention_heads and num_key_value_heads for this layer."""
        kind = self.kind
        units = self.size if units is None else units
        if self.slot_kv:
            return None
        if kind == "heads" and self.kv_groups:  # a unit is one query head of each kv group; the kv heads stay
            return units * self.kv_groups, self.kv_groups
        if kind == "heads":  # one head a unit (a fused QKV projection's unit spans its Q, K and V columns)
            return units, units
        if kind == "kv groups":
            query, kv = self._kv_group_heads()
            return units * query, units * kv
        return None

    def _kv_group_heads(self) -> tuple[int, int]:
        """(query heads, KV heads) in one KV group: as the attention op states them, else the widest and the
        narrowest source (q_proj, k_proj)."""
        if self.unit_heads is not None:
            return self.unit_heads
        return max(self.heads_per_unit.values()), min(self.heads_per_unit.values())

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "units": self.describe_units(),
            "head_dim": self.head_dim,
            "heads_per_unit": self.heads_per_unit,
            "sources": [f"{s.op_type} {s.node}" for s in self.sources],
            "params": [f"{p.tensor}[axis {p.axis}] ({p.role})" for p in self.params],
            "blocked": self.blocked,
            "inexact": self.inexact,
        }


def _root_array(units) -> np.ndarray:
    """units.root_array() (unit id -> root id), for every unit at once: parent links are followed by
    pointer jumping until each points at its root (a root is its own parent), instead of one find()
    per unit (220k units on BERT-base)."""
    parent = np.asarray(getattr(units, "_parent", None) or units.root_array(), dtype=np.int64)
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def build_groups(state: AnalysisState) -> tuple[list[Group], np.ndarray]:
    """Returns the groups and root_of (unit id -> root id)."""
    root_of = _root_array(state.units)
    groups, gid_of_unit = _coupled_sources(state, root_of)
    _annotate(state, groups, gid_of_unit)
    return groups, root_of


def _coupled_sources(state: AnalysisState, root_of: np.ndarray) -> tuple[list["Group"], np.ndarray]:
    """The groups: sources whose units share roots, joined (union-find); and unit id -> group id (-1 for
    a fill's unit that met no real source's: it is never removed)."""
    n_sources = len(state.sources)
    parent = list(range(n_sources))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # each (source, root's source) pair once, as one number; a set's representative is its smallest
    # source, whatever the order of the unions. In place: a large model has millions of units.
    width = max(n_sources, 1)
    source_of = np.asarray(state.units.source_of, dtype=np.int64)
    key = source_of[root_of]
    source_of *= width
    key += source_of
    del source_of
    key.sort()
    distinct = np.ones(len(key), dtype=bool)
    np.not_equal(key[1:], key[:-1], out=distinct[1:])
    pairs = key[distinct]
    del key, distinct
    for first, second in zip((pairs // width).tolist(), (pairs % width).tolist()):
        a, b = find(first), find(second)
        if a != b:
            parent[max(a, b)] = min(a, b)

    members: dict[int, list[int]] = {}
    for i in range(n_sources):
        members.setdefault(find(i), []).append(i)

    groups: list[Group] = []
    gid_of_root = np.full(len(root_of), -1, dtype=np.int32)  # indexed by root id (a unit id)
    for source_ids in members.values():
        # fills (passive sources) prune only with a real source: they neither name nor number a group
        source_ids = [i for i in source_ids if not state.sources[i].passive]
        if not source_ids:
            continue
        roots: list[int] = []
        seen: set[int] = set()
        for sid in source_ids:
            for r in root_of[state.source_units[sid]].tolist():
                if r not in seen:
                    seen.add(r)
                    roots.append(r)
        gid = len(groups)
        first = state.sources[source_ids[0]]
        groups.append(Group(gid, first.node, [state.sources[i] for i in source_ids], np.array(roots, dtype=np.int64)))
        gid_of_root[roots] = gid
    return groups, gid_of_root[root_of]


def _annotate(state: AnalysisState, groups: list["Group"], gid_of_unit: np.ndarray) -> None:
    """What each group carries: block and inexact reasons, parameter slices, head and KV layout."""

    def group_of(unit: int) -> Group | None:
        """None for a fill's unit that met no real source's (it is never removed)."""
        gid = int(gid_of_unit[unit])
        return None if gid < 0 else groups[gid]

    def groups_of(units) -> list[Group | None]:
        """group_of for many units at once."""
        gids = gid_of_unit[np.fromiter(units, dtype=np.int64, count=len(units))].tolist()
        return [None if gid < 0 else groups[gid] for gid in gids]

    for reasons, g in zip(state.block_reasons.values(), groups_of(state.block_reasons)):
        if g is not None:
            g.blocked.extend(r for r in reasons if r not in g.blocked)
    for reasons, g in zip(state.inexact_reasons.values(), groups_of(state.inexact_reasons)):
        if g is not None:
            g.inexact.extend(r for r in reasons if r not in g.inexact)

    seen_params: set[tuple] = set()
    for p in state.params:
        key = (p.tensor, p.axis, p.role, p.node)
        if key in seen_params:
            continue
        seen_params.add(key)
        layout = state.layout(p.tensor, p.axis)
        gids = np.unique(gid_of_unit[layout[layout != NO_UNIT]])
        for gid in gids[gids >= 0].tolist():  # ascending, as np.unique returns them
            groups[gid].params.append(p)
    for unit in state.hidden_units:
        if (g := group_of(unit)) is not None:
            g.hidden = True
    for unit, kv in state.query_slots.items():
        if (g := group_of(unit)) is not None:
            g.kv_groups = kv
    for unit in state.slot_kv_units:
        if (g := group_of(unit)) is not None:
            g.slot_kv = True
    for unit, heads in state.unit_heads.items():
        if (g := group_of(unit)) is not None:
            g.unit_heads = heads
    for unit, width in state.splits:
        if (g := group_of(unit)) is None:
            continue
        g.head_dim = width if g.head_dim is None else min(g.head_dim, width)
    for g in groups:
        first = g.sources[0]
        g.channels_per_unit = max(1, len(state.layout(first.tensor, first.axis)) // max(g.size, 1))
        if g.head_dim is not None and all(s.op_type in HEAD_SOURCES for s in g.sources):
            per_unit = {s.node: len(state.layout(s.tensor, s.axis)) // max(g.size, 1) for s in g.sources}
            if all(c % g.head_dim == 0 for c in per_unit.values()):
                g.heads_per_unit = {node: c // g.head_dim for node, c in per_unit.items()}
        if g.size < 2 and not g.blocked:
            channels = max(len(state.layout(s.tensor, s.axis)) for s in g.sources)
            if channels > 1:
                g.blocked.append(
                    f"its {channels} channels are coupled into a single unit (grouped convolutions or channel "
                    "shuffles force equal removal in every group); removing it would remove the layer")
            else:
                g.blocked.append("a single unit: removing it would remove the layer")
