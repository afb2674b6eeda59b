"""One editor for a model's main graph: who makes and who reads each tensor, fresh names,
copy-on-write of shared constants, node inputs, attributes and new nodes.

    edit = GraphEditor(model)          # edits `model` itself: passes give it their own copy
    edit.readers("w")                  # [(node, input index)]; index -1: read inside its subgraphs
    edit.write_const(node, 1, w)       # in place when `node` is the only reader, else a private copy
    edit.add_node(gather, before=node.name)
    edit.commit()                      # places the anchored new nodes; the index is rebuilt

Every rewrite goes through here (the rules' `analysis.rewriter.Rewriter`, the
reconstruction passes, cleanup, lossless elimination, layer drops), so the
def-use index, the naming and the copy-on-write rules exist once.

* Index: reads count subgraph reads (an If branch or Loop body reading an
  outer tensor by name, `ir.subgraphs.reads`), so a constant a branch reads is
  shared and is copied, not changed in place, and dead-code removal keeps
  what only a branch reads.
* Names: a new name clashes with no tensor of the graph or of any subgraph
  (a subgraph must not shadow an outer name).
* Node objects: those of `nodes` (or iterated from the graph) until the next
  `commit` that moves nodes; the graph's node list is rebuilt there.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.ir.graph_view import tensor_values
from onnxprune.ir.model_io import add_tensor, copy_fields
from onnxprune.ir.subgraphs import all_names, outer_reads, rename_reads

Reader = tuple[onnx.NodeProto, int]  # (node, input index); -1: read inside the node's subgraphs


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class GraphEditor:
    """Edits `model` in place (the caller owns it: a pass edits its own copy) and keeps the index,
    the names taken and the copies true through its own edits. An edit made around the editor
    (a node's input set directly) is not seen by the index."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self._taken = all_names(self.graph)
        self._before: dict[str, list[onnx.NodeProto]] = {}  # anchor node name -> new nodes placed before it
        self._after: dict[str, list[onnx.NodeProto]] = {}
        self._copies: dict[tuple[str, str], onnx.NodeProto] = {}  # (node, reader) -> the reader's own copy
        self._index()

    # -- the def-use index --------------------------------------------------------------------------
    def _index(self) -> None:
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self._by_name = {n.name: n for n in self.nodes}
        self._producer: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, list[Reader]] = {}
        self._reads: dict[int, list[str]] = {}  # id(node) -> what it reads (the node objects are held in `nodes`)
        for node in self.nodes:
            self._index_node(node)

    def _index_node(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if o:
                self._producer[o] = node
        self._index_reads(node)

    def _index_reads(self, node: onnx.NodeProto) -> None:
        names = [i for i in node.input if i]
        for idx, name in enumerate(node.input):
            if name:
                self._readers.setdefault(name, []).append((node, idx))
        outer = [n for n in outer_reads(node) if n not in names]
        for name in outer:
            self._readers.setdefault(name, []).append((node, -1))
        self._reads[id(node)] = names + outer

    def _unindex_reads(self, node: onnx.NodeProto) -> None:
        for name in set(self._reads.pop(id(node), ())):
            entries = self._readers.get(name, [])
            entries[:] = [(n, i) for n, i in entries if n is not node]

    def _held(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The indexed object for `node` (another wrapper of the same graph node is matched by name);
        None for a node not in the index yet (one placed at the next commit)."""
        if id(node) in self._reads:
            return node
        held = self._by_name.get(node.name)
        return held if held is not None and list(held.output) == list(node.output) else None

    def node(self, name: str) -> onnx.NodeProto:
        """The node called `name` (KeyError if none)."""
        return self._by_name[name]

    def get_node(self, name: str) -> onnx.NodeProto | None:
        return self._by_name.get(name)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self._producer.get(tensor)

    def readers(self, tensor: str) -> list[Reader]:
        return list(self._readers.get(tensor, ()))

    def reader_count(self, tensor: str) -> int:
        """How many reads of `tensor` there are (a node reading it twice counts twice)."""
        return len(self._readers.get(tensor, ()))

    def reads(self, node: onnx.NodeProto) -> list[str]:
        """Every tensor `node` reads: its inputs, then what its subgraphs read from outside."""
        held = self._held(node)
        if held is None:
            raise KeyError(f"node '{node.name}' is not in this editor's index")
        return self._reads[id(held)]

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def value(self, name: str) -> np.ndarray:
        """A writable copy of initializer `name`'s values."""
        return np.array(tensor_values(self.initializers[name]))

    # -- names ------------------------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`...: no tensor of the graph or its subgraphs has it; taken from now on."""
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    # -- inputs and constants ---------------------------------------------------------------------------
    def set_input(self, node: onnx.NodeProto, index: int, tensor: str) -> None:
        """Input `index` of `node` reads `tensor` (skipped optional inputs before it become '')."""
        held = self._held(node)
        if held is not None:
            self._unindex_reads(held)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = tensor
        if held is not None:
            self._index_reads(held)

    def rename_output(self, node: onnx.NodeProto, index: int, tensor: str) -> None:
        held = self._held(node)
        if held is not None and self._producer.get(node.output[index]) is held:
            del self._producer[node.output[index]]
        node.output[index] = tensor
        if held is not None:
            self._producer[tensor] = held

    def add_initializer(self, value: np.ndarray, base: str) -> str:
        """A new initializer holding `value`, named `base` or a fresh variant of it; returns the name."""
        name = self.fresh_name(base)
        self.initializers[name] = add_tensor(self.graph.initializer, np.asarray(value), name)
        return name

    def remove_initializers(self, names: set[str]) -> None:
        """Delete these initializers from the graph in place (meant for small ones, such as replaced shape
        constants: protobuf keeps a deleted message's bytes until the model is freed)."""
        if not names:
            return
        for index in reversed([i for i, t in enumerate(self.graph.initializer) if t.name in names]):
            del self.graph.initializer[index]
        for name in names:
            self.initializers.pop(name, None)

    def attach_const(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str) -> str:
        """Input `index` of `node` reads a new initializer holding `value` (named after `base`);
        the constant it read before is left as it is for its other readers. Returns the new name."""
        name = self.add_initializer(value, base)
        self.set_input(node, index, name)
        return name

    def write_const(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str | None = None) -> str:
        """Copy-on-write: input `index` of `node` holds `value` from now on. The initializer is
        rewritten in place when `node` is its only reader; a shared one (or an empty input) gets a new
        initializer for `node` alone, named after `base` (default `<old name>__<node>`). Returns its name."""
        name = node.input[index] if index < len(node.input) else ""
        if name and name in self.initializers and self.reader_count(name) == 1:
            self.initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return name
        return self.attach_const(node, index, value, base or f"{name}__{node.name}")

    def write_shared(self, name: str, value: np.ndarray) -> None:
        """Initializer `name` holds `value` from now on, for every reader: the caller vouches that each
        of them wants the change (a weight tied across the steps of an unrolled recurrence)."""
        self.initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))

    # -- attributes ---------------------------------------------------------------------------------------
    @staticmethod
    def set_attr(node: onnx.NodeProto, name: str, value) -> None:
        GraphEditor.remove_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    @staticmethod
    def remove_attr(node: onnx.NodeProto, name: str) -> None:
        keep = [a for a in node.attribute if a.name != name]
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)

    # -- nodes ------------------------------------------------------------------------------------------
    def add_node(self, node: onnx.NodeProto, *, before: str | None = None, after: str | None = None) -> None:
        """Add `node`: at the end of the graph now, or (with an anchor node's name) right before or after
        the anchor at the next `commit` (it is indexed then)."""
        self._taken.update(o for o in node.output if o)
        if before is not None:
            self._before.setdefault(before, []).append(node)
        elif after is not None:
            self._after.setdefault(after, []).append(node)
        else:
            self.graph.node.append(node)
            added = self.graph.node[-1]
            self.nodes.append(added)
            self._by_name[added.name] = added
            self._index_node(added)

    def own_copy(self, node: onnx.NodeProto, reader: onnx.NodeProto, input_index: int) -> onnx.NodeProto:
        """Copy-on-write for a node's output: input `input_index` of `reader` reads the output of a
        private copy of `node` (placed after it at `commit`), which may then change without changing
        what `node`'s other readers see. One copy per (node, reader)."""
        key = (node.name, reader.name)
        if key not in self._copies:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self.fresh_name(f"{node.name}__{reader.name}")
            del copy.output[:]
            copy.output.append(self.fresh_name(f"{node.output[0]}__{reader.name}"))
            self.set_input(reader, input_index, copy.output[0])
            self.add_node(copy, after=node.name)
            self._copies[key] = copy
        return self._copies[key]

    def reroute(self, routes: dict[str, str]) -> None:
        """Readers of each key read its value instead (chains resolved: a -> b -> c reads c), inside
        subgraphs too. A key that is a graph output keeps its name: an Identity of the value produces
        it, and its old producer's output is renamed `<name>__dropped` (dead code from then on)."""
        def resolve(name: str) -> str:
            seen = set()
            while name in routes and name not in seen:
                seen.add(name)
                name = routes[name]
            return name

        resolved = {name: resolve(name) for name in routes}
        affected = {id(n): n for name in resolved for n, _ in self._readers.get(name, ())}
        for node in affected.values():
            self._unindex_reads(node)
            rename_reads(node, resolved)
            self._index_reads(node)
        for out in self.graph.output:
            if out.name not in routes:
                continue
            producer = self._producer.get(out.name)
            if producer is not None:
                for idx, name in enumerate(producer.output):
                    if name == out.name:
                        self.rename_output(producer, idx, self.fresh_name(f"{name}__dropped"))
            self.add_node(helper.make_node("Identity", [resolve(out.name)], [out.name],
                                           name=f"{out.name}__passthrough"))

    def commit(self) -> None:
        """Place the anchored new nodes (before / after their anchors) and rebuild the index."""
        if not self._before and not self._after:
            return
        nodes = []
        for n in self.graph.node:
            nodes.extend(self._before.get(n.name, []))
            nodes.append(n)
            nodes.extend(self._after.get(n.name, []))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._before, self._after, self._copies = {}, {}, {}
        self._index()


def rebuilt(model: onnx.ModelProto, **graph_parts) -> onnx.ModelProto:
    """A new model equal to `model` but for the main-graph fields given, e.g.
    rebuilt(model, node=live_nodes, initializer=used): only what is kept is copied, and the
    dropped parts' bytes are not carried along in the new message."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    for field, value in model.graph.ListFields():
        if field.name in graph_parts:
            continue
        if hasattr(value, "extend"):
            getattr(out.graph, field.name).extend(value)
        elif field.message_type:
            getattr(out.graph, field.name).CopyFrom(value)
        else:
            setattr(out.graph, field.name, value)
    for name, items in graph_parts.items():
        getattr(out.graph, name).extend(items)
    return out
