"""Rule protocol and registry: one small rule per op type.

A rule answers three questions about one node:
  propagate  - which units flow from its inputs to its outputs, which initializer
               slices follow them, and what it cannot allow (block);
  rewrite    - which attributes or shape constants must change once units are gone;
  zeros      - (lossless mode) which units are provably all-zero in its outputs.
Adding an op means adding a rule (and its test), never editing a central if-chain.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.ir.graph_view import outer_reads

if TYPE_CHECKING:
    from onnxprune.analysis.context import AnalysisState
    from onnxprune.analysis.zeros import ZeroState
    from onnxprune.analysis.rewriter import Rewriter

RULES: dict[str, "Rule"] = {}


def register(*op_types: str):
    """Class decorator: the rule for these op types ("Conv", "com.microsoft.Attention").
    An op type has one rule: a second registration is a bug to fix, not an import order to rely on."""

    def wrap(cls):
        instance = cls()
        for op in op_types:
            if op in RULES:
                raise RuntimeError(f"op type '{op}' already has a rule ({type(RULES[op]).__name__}); "
                                   f"{cls.__name__} cannot register it too")
            RULES[op] = instance
        return cls

    return wrap


def rule_for(node: onnx.NodeProto) -> "Rule":
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""
    key = f"{domain}.{node.op_type}" if domain else node.op_type
    return RULES.get(key, UNSUPPORTED)


class Rule:
    #: units pass through unchanged in value: zero stays zero (Relu, pooling, Reshape...)
    preserves_zeros = False
    #: follows units on a folded axis (heads merged into a dynamic batch axis, see rules/reshape.py)
    reads_folded_axes = False

    def propagate(self, node: onnx.NodeProto, s: "AnalysisState") -> None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: "Rewriter") -> None:
        """Most rules need nothing: initializer slicing is generic."""

    def zeros(self, node: onnx.NodeProto, z: "ZeroState") -> None:
        if self.preserves_zeros:
            z.pass_through(node)


class Unsupported(Rule):
    """No rule: keep every unit that reaches this node."""

    def propagate(self, node, s):
        for name in node.input:
            if name:
                s.block_tensor(
                    name,
                    f"{node.op_type} '{node.name}' has no pruning rule; channels reaching it are kept "
                    "(add a rule in onnxprune/analysis/rules/ to prune through it)",
                )
        for name in outer_reads(node):  # a custom op with a graph attribute
            s.freeze(name, subgraph_reason(node, name))


UNSUPPORTED = Unsupported()


# -- helpers shared by several rules ----------------------------------------------

def subgraph_reason(node: onnx.NodeProto, tensor: str) -> str:
    return (f"'{tensor}' is read inside the subgraph of {node.op_type} '{node.name}': channels cannot change "
            "there (subgraphs are never rewritten)")


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def pass_axes(s: "AnalysisState", node: onnx.NodeProto, src: str, dst: str, axis_map: dict[int, int]) -> None:
    """Move src's layouts to dst through `axis_map`; unmapped layout axes block."""
    for axis, layout in s.layouts_of(src).items():
        if axis in axis_map:
            s.set_layout(dst, axis_map[axis], layout)
        else:
            s.block(layout, f"{node.op_type} '{node.name}' removes or mixes axis {axis} of '{src}'")


def identity_map(rank: int | None) -> dict[int, int]:
    return {a: a for a in range(rank or 0)}


def const_ints(s: "AnalysisState", node: onnx.NodeProto, attr: str, input_index: int) -> list[int] | None:
    """An int list given either as an attribute (old opsets) or a constant input."""
    value = s.view.attr(node, attr)
    if value is not None:
        return [int(v) for v in np.atleast_1d(value)]
    if s.view.has_input(node, input_index):
        arr = s.view.const_input(node, input_index)
        return None if arr is None else [int(v) for v in np.atleast_1d(arr)]
    return None
