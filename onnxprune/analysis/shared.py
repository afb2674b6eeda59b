"""Constants read by several nodes: one tensor, one slice for every reader.

A weight several nodes read (ALBERT's shared layers, a recurrence unrolled
over time steps, a tied embedding table) stays one initializer
(ir/model_io.py: only small vectors are copied per reader).  The analysis
already couples its readers: a second layout on the same axis of a tensor
unites the units position by position (`AnalysisState.set_layout`), so any
plan removes the same units for every reader and the rewrite slices the
tensor once.

What coupling cannot see is a reader that takes an axis whole while another
reader slices it: a MatMul whose input has no prunable features, a node whose
rule ran before the slicing reader attached the layout.  Sliced, the tensor
would no longer fit that reader.  While each rule runs, the state records
which axes of a shared constant the rule read or sliced; afterwards, every
sliced axis some reader did not take up is blocked, naming the tensor and the
readers.
"""
from __future__ import annotations

from onnxprune.analysis.context import AnalysisState


def watch_shared_constants(state: AnalysisState) -> None:
    """Mark the initializers that several nodes read as explicit inputs (subgraph reads have
    their own rule: a tensor read inside a subgraph is frozen)."""
    view = state.view
    for name in list(view.initializers) + list(view.dequantized):  # a dequantized weight is one tensor too
        readers = {node.name for node, index in view.consumers.get(name, ()) if index >= 0}
        if len(readers) > 1:
            state.shared_constants.add(name)


def block_divergent_readers(state: AnalysisState) -> None:
    """Block every sliced axis of a shared constant that one of its readers takes whole."""
    view = state.view
    for name in sorted(state.shared_constants):
        readers: dict[str, str] = {}  # name -> "Op 'name'", in graph order
        for node, index in view.consumers.get(name, ()):
            if index >= 0:
                readers.setdefault(node.name, f"{node.op_type} '{node.name}'")
        for axis, layout in state.layouts_of(name).items():
            took = state.shared_uses.get((name, axis), set())
            whole = [label for node, label in readers.items() if node not in took]
            if not whole:
                continue
            sliced = [label for node, label in readers.items() if node in took]
            state.block(layout, (
                f"initializer '{name}' is one tensor read by {len(readers)} nodes ({_names(list(readers.values()))}); "
                f"axis {axis} would be sliced for {_names(sliced) or 'none of them'} but {_names(whole)} "
                "read(s) it whole: a shared tensor takes one slice for all its readers, so these units are kept"))


def _names(labels: list[str], limit: int = 4) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")
