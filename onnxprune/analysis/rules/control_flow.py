"""If, Loop, Scan: their subgraphs are kept exactly as they are.

A subgraph reads tensors of the main graph as explicit inputs (Loop and Scan
state and scanned inputs) or by name from the outer scope (any of the three).
Channels removed from such a tensor would leave the subgraph's own weights and
shapes out of step, so every unit reaching a subgraph is kept; the outputs
open no units, and the layers after the node prune as usual.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, register, subgraph_reason
from onnxprune.ir.graph_view import reads


@register("If", "Loop", "Scan")
class ControlFlowRule(Rule):
    def propagate(self, node, s):
        for name in reads(node):
            s.freeze(name, subgraph_reason(node, name))
