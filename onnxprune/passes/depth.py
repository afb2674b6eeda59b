"""Depth pruning's rewrite: whole residual branches and layers go, their input passes through.

    result = DropLayers(units)(model)   # units chosen by onnxprune.strategy.depth

Rerouting is the one edit (`GraphEditor.reroute`): every reader of a dropped
unit's output reads its input instead. What only fed the dropped output
becomes dead code and is removed with it. Lossless elimination of all-zero
residual branches (`passes.lossless.BypassZeroBranches`) is the same rewrite.
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx

from onnxprune.ir.editor import GraphEditor, copy_model
from onnxprune.passes.cleanup import remove_dead_code
from onnxprune.passes.protocol import Pass, PassResult


class DropLayers(Pass):
    """Remove units: anything with `.name`, `.input` and `.output` tensor names (analysis.blocks.Unit)."""

    name = "drop_layers"

    def __init__(self, units: Iterable):
        self.units = list(units)

    def run(self, model: onnx.ModelProto) -> PassResult:
        if not self.units:
            return self.unchanged(model, "no unit to drop")
        out = copy_model(model)
        edit = GraphEditor(out)
        edit.reroute({u.output: u.input for u in self.units})
        dead = remove_dead_code(edit)
        names = [u.name for u in self.units]
        return self.changed(out, f"dropped {', '.join(names)} ({dead.dead_nodes} node(s))", units=names,
                            nodes=dead.dead_nodes, initializers=dead.unused_initializers)
