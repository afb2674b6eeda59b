"""Depth pruning: whole residual branches and layers go, their input passes through.

`reroute` is the one rewrite: every reader of a tensor reads another one
instead (the dropped unit's output -> its input). What only fed the dropped
output becomes dead code and `remove_dead_nodes` deletes it. Lossless
elimination of all-zero residual branches (`passes.lossless.bypass`) is the
same rewrite.
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

from onnxprune.ir.graph_view import rename_reads
from onnxprune.passes.cleanup import remove_dead_nodes


def reroute(model: onnx.ModelProto, routes: dict[str, str]) -> None:
    """Readers of each key read its value instead (chains resolved: a -> b -> c reads c).

    A key that is a graph output keeps its name: an Identity of the value produces it, and
    its old producer, renamed, is left to dead-code removal.
    """
    def resolve(name: str) -> str:
        seen = set()
        while name in routes and name not in seen:
            seen.add(name)
            name = routes[name]
        return name

    resolved = {name: resolve(name) for name in routes}
    for node in model.graph.node:
        rename_reads(node, resolved)  # subgraphs read outer tensors by name: they follow too
    for out in model.graph.output:
        if out.name not in routes:
            continue
        for node in model.graph.node:
            for idx, name in enumerate(node.output):
                if name == out.name:
                    node.output[idx] = f"{name}__dropped"
        model.graph.node.append(helper.make_node("Identity", [resolve(out.name)], [out.name],
                                                 name=f"{out.name}__passthrough"))


def drop(model: onnx.ModelProto, units: Iterable) -> onnx.ModelProto:
    """Remove units (anything with `.input` and `.output` tensor names, e.g. analysis.blocks.Unit)."""
    routes = {u.output: u.input for u in units}
    if not routes:
        return model
    reroute(model, routes)
    return remove_dead_nodes(model)
