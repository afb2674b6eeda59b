"""Graph cleanup after a rewrite: dead nodes, unused initializers, order.

Subgraphs (If branches, Loop and Scan bodies) are left exactly as they are;
what they read from the main graph by name counts as read (`graph_view.reads`).
"""
from __future__ import annotations

import heapq

import onnx

from onnxprune.ir.graph_view import reads


def remove_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the nodes no graph output depends on and the initializers nothing reads, then sort
    the nodes topologically. Edits `model` in place and returns it; graph inputs all stay."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        i = producer.get(name)
        if i is not None and i not in live:
            live.add(i)
            stack.extend(reads(graph.node[i]))
    nodes = sort_nodes([n for i, n in enumerate(graph.node) if i in live])
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    present = seen | {i.name for i in graph.input}
    kept = [vi for vi in graph.value_info if vi.name in present]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return model


def sort_nodes(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Topological order, stable: a node moves only to follow what it reads (subgraph reads too).

    Nodes in a cycle, or reading a tensor no node produces, keep their place at the end.
    """
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for p in {producer[t] for t in reads(node) if t in producer and producer[t] != i}:
            waiting[i] += 1
            readers.setdefault(p, []).append(i)
    placed: list[int] = []
    done = [False] * len(nodes)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        placed.append(i)
        done[i] = True
        for r in readers.get(i, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    placed += [i for i in range(len(nodes)) if not done[i]]
    return [nodes[i] for i in placed]


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node reads (inside subgraphs included) and no graph output names."""
    graph = model.graph
    used = {t for n in graph.node for t in reads(n)} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(live)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(live)
    return dropped
