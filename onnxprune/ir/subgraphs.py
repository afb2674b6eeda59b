"""Names a node reads, its control-flow subgraphs' implicit reads included.

A subgraph of If/Loop/Scan may read a tensor of the enclosing graph by name
without listing it as an input; every def-use question (dead nodes, unused
initializers, renames, what a capture needs) must count those reads. This
module depends on onnx alone, so every layer of `ir` can use it.
"""
from __future__ import annotations

import onnx


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in `node`'s attributes (If branches, Loop and Scan bodies)."""
    graphs: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            graphs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(a.graphs)
    return graphs


def _defined_in(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: ONNX forbids a subgraph to shadow an outer name, so the rest is outer."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors of the enclosing scope that `node`'s subgraphs read by name (implicit inputs), first read first."""
    found: dict[str, None] = {}
    for graph in subgraphs(node):
        local = _defined_in(graph)
        for inner in graph.node:
            for name in list(inner.input) + outer_reads(inner):
                if name and name not in local:
                    found[name] = None
        for out in graph.output:  # a branch may return an outer tensor as it is
            if out.name not in local:
                found[out.name] = None
    return list(found)


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor `node` reads: its inputs, then what its subgraphs read from outside."""
    names = [i for i in node.input if i]
    return names + [n for n in outer_reads(node) if n not in names]


def rename_reads(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """`node` reads renames[t] wherever it read t, inside its subgraphs included."""
    for idx, name in enumerate(node.input):
        if name in renames:
            node.input[idx] = renames[name]
    for graph in subgraphs(node):
        local = _defined_in(graph)
        outer = {k: v for k, v in renames.items() if k not in local}
        if not outer:
            continue
        for inner in graph.node:
            rename_reads(inner, outer)
        for out in graph.output:
            if out.name in outer:
                out.name = outer[out.name]


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name in `graph` and its subgraphs: a new name must clash with none of them."""
    names = _defined_in(graph) | {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names |= all_names(sub)
    return names



def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors of `graph` that some node's subgraphs read by name."""
    return {name for node in graph.node for name in outer_reads(node)}
