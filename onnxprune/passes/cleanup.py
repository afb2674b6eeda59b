"""Graph cleanup after a rewrite: dead nodes, unused initializers, copies to merge, node order.

Subgraphs (If branches, Loop and Scan bodies) are left exactly as they are;
what they read from the main graph by name counts as read (the editor's index).

* `RemoveDeadNodes`: drop the nodes no graph output depends on and the
  initializers nothing reads, then sort the nodes topologically.
* `DropUnusedInitializers`: only the initializers nothing reads.
* `ReshareInitializers`: copies of one tensor that still hold equal values
  (`ir.model_io.reshare_renames`) become that tensor again.
* `CLEANUP`: what the pipeline runs on every pruned model (reshare, then drop
  what no longer has a reader).

`remove_dead_code` does the same as `RemoveDeadNodes` in place, for a pass
that already works on its own copy (a layer drop, a residual bypass).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import onnx

from onnxprune.ir.editor import GraphEditor, copy_model, rebuilt
from onnxprune.ir.model_io import reshare_renames
from onnxprune.passes.protocol import Pass, PassResult, Sequence


@dataclass
class DeadCode:
    """What dead-code removal keeps of one model."""

    nodes: list[onnx.NodeProto]           # the live nodes, sorted topologically
    initializers: list[onnx.TensorProto]  # the initializers something reads
    value_info: list[onnx.ValueInfoProto]  # entries of tensors still read or produced for a reader
    dead_nodes: int
    unused_initializers: int
    changes: bool                         # False: the model is already clean and sorted


def find_dead_code(edit: GraphEditor) -> DeadCode:
    """What of `edit`'s model no graph output depends on (graph inputs all stay)."""
    graph = edit.graph
    live: dict[int, onnx.NodeProto] = {}
    stack = [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = edit.producer(name)
        if node is not None and id(node) not in live:
            live[id(node)] = node
            stack.extend(edit.reads(node))
    nodes = sort_nodes([n for n in edit.nodes if id(n) in live], edit)
    inits = [t for t in graph.initializer if t.name in seen]  # seen: what live nodes read, and the outputs
    present = seen | {i.name for i in graph.input}
    value_info = [vi for vi in graph.value_info if vi.name in present]
    dead, unused = len(edit.nodes) - len(nodes), len(graph.initializer) - len(inits)
    changes = bool(dead or unused or len(value_info) != len(graph.value_info)
                   or any(a is not b for a, b in zip(nodes, edit.nodes)))
    return DeadCode(nodes, inits, value_info, dead, unused, changes)


def remove_dead_code(edit: GraphEditor) -> DeadCode:
    """`find_dead_code`, applied to `edit`'s model in place (a model the caller owns); the editor is
    not usable afterwards."""
    dead = find_dead_code(edit)
    graph = edit.graph
    for field, kept in (("node", dead.nodes), ("initializer", dead.initializers), ("value_info", dead.value_info)):
        items = list(kept)
        del getattr(graph, field)[:]
        getattr(graph, field).extend(items)
    return dead


def sort_nodes(nodes: list[onnx.NodeProto], edit: GraphEditor) -> list[onnx.NodeProto]:
    """Topological order, stable: a node moves only to follow what it reads (subgraph reads too).

    Nodes in a cycle, or reading a tensor no node produces, keep their place at the end.
    """
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for p in {producer[t] for t in edit.reads(node) if t in producer and producer[t] != i}:
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


class RemoveDeadNodes(Pass):
    name = "remove_dead_nodes"

    def run(self, model: onnx.ModelProto) -> PassResult:
        dead = find_dead_code(GraphEditor(model))
        if not dead.changes:
            return self.unchanged(model)
        out = rebuilt(model, node=dead.nodes, initializer=dead.initializers, value_info=dead.value_info)
        return self.changed(out, f"removed {dead.dead_nodes} dead node(s) and {dead.unused_initializers} "
                                 "unused initializer(s); nodes in topological order", nodes=dead.dead_nodes,
                            initializers=dead.unused_initializers)


class DropUnusedInitializers(Pass):
    """Remove initializers no node reads (inside subgraphs included) and no graph output names."""

    name = "drop_unused_initializers"

    def run(self, model: onnx.ModelProto) -> PassResult:
        edit = GraphEditor(model)
        outputs = {o.name for o in model.graph.output}
        used = [t for t in model.graph.initializer if edit.reader_count(t.name) or t.name in outputs]
        dropped = len(model.graph.initializer) - len(used)
        if not dropped:
            return self.unchanged(model)
        return self.changed(rebuilt(model, initializer=used), f"dropped {dropped} unused initializer(s)",
                            initializers=dropped)


class ReshareInitializers(Pass):
    """Readers of a copy of a tensor (`<tensor>__...`) that still holds the same values read the
    tensor again, and the copy goes: shared vectors copied per reader on load, whose readers all
    kept the same units (ALBERT's shared biases), are one tensor again."""

    name = "reshare_initializers"

    def run(self, model: onnx.ModelProto) -> PassResult:
        renames = reshare_renames(model)
        if not renames:
            return self.unchanged(model)
        out = copy_model(model)
        edit = GraphEditor(out)
        for copy, original in renames.items():
            for node, index in edit.readers(copy):
                if index >= 0:  # a subgraph never reads a merged copy: those are pinned
                    edit.set_input(node, index, original)
        kept = [t for t in out.graph.initializer if t.name not in renames]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        return self.changed(out, f"merged {len(renames)} equal copies into the tensor they copy",
                            merged=len(renames))


# the pipeline's last rewrite: copies of a shared vector that kept the same units are one again,
# then what lost its last reader goes
CLEANUP = Sequence("cleanup", [ReshareInitializers(), DropUnusedInitializers()])
