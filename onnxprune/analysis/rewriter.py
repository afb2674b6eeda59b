"""The toolbox rules use to rewrite attributes and shape constants.

It knows the keep mask of every (tensor, axis) that loses positions and the
static shapes from before the rewrite, so a rule can ask "what is this
tensor's new shape" and patch a Reshape target or Split sizes accordingly.
Constant inputs are never patched in place: the node gets its own copy, so a
shape constant shared by several nodes stays right for the others.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.ir.graph_view import GraphView, all_names, fresh_name, reads


class Rewriter:
    def __init__(self, model: onnx.ModelProto, view: GraphView, masks: dict[tuple[str, int], np.ndarray]):
        self.model = model
        self.view = view
        self.masks = masks
        self._changed_tensors = {t for t, _ in masks}
        self._taken = all_names(model.graph)  # subgraph names too: a new name must not shadow one
        self._nodes = {n.name: n for n in model.graph.node}
        self._created: dict[str, np.ndarray] = {}
        # a subgraph reading a shape constant by name is a reader too: that constant is copied, not patched
        self._readers = Counter(i for n in model.graph.node for i in reads(n))
        self._copies: dict[tuple[str, str], onnx.NodeProto] = {}  # (shape node, reader) -> its own copy
        self._before: dict[str, list[onnx.NodeProto]] = {}  # node -> new nodes that feed it

    # -- questions ------------------------------------------------------------
    def mask(self, tensor: str, axis: int) -> np.ndarray | None:
        return self.masks.get((tensor, axis))

    def changed(self, tensor: str) -> bool:
        return tensor in self._changed_tensors

    def kept(self, tensor: str, axis: int) -> int:
        mask = self.mask(tensor, axis)
        if mask is not None:
            return int(mask.sum())
        return self.view.dim(tensor, axis)

    def new_shape(self, tensor: str) -> list:
        shape = list(self.view.shape(tensor) or [])
        for axis in range(len(shape)):
            mask = self.mask(tensor, axis)
            if mask is not None and isinstance(shape[axis], int):  # a folded dynamic axis stays dynamic
                shape[axis] = int(mask.sum())
        return shape

    # -- edits ----------------------------------------------------------------
    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        self.remove_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, node: onnx.NodeProto, name: str) -> None:
        keep = [a for a in node.attribute if a.name != name]
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)

    def replace_const_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Point input `index` of `node` at a new initializer holding `value`."""
        name = self._fresh_name(f"{node.input[index]}__{node.name}")
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self._created[name] = np.asarray(value)
        node.input[index] = name

    def set_const_element(self, node_name: str, index: int, offset: int, value: int,
                          reader: tuple[onnx.NodeProto, int] | None = None) -> None:
        """Change one element of constant input `index` of another node (a shape Concat).

        reader: (node, input index) that reads the Concat's output.  A Concat
        that others read too is copied for this reader, so their shapes stay.
        """
        node = self._nodes[node_name]
        if reader is not None and reader[0].input[reader[1]] in node.output and self._readers[node.output[0]] > 1:
            node = self._own_copy(node, *reader)
        current = node.input[index]
        values = self._created.get(current)
        if values is None:
            values = self.view.const(current)
        if int(values.flat[offset]) == value:
            return
        values = np.array(values, copy=True)
        values.flat[offset] = value
        self.replace_const_input(node, index, values)

    def set_const_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Add (or replace) optional input `index`, padding skipped inputs with ''."""
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = "placeholder"
        self.replace_const_input(node, index, value)

    def gather_input(self, node: onnx.NodeProto, index: int, axis: int, keep: np.ndarray) -> None:
        """Feed input `index` of `node` through a new Gather of the kept positions of `axis`
        (a run-time tensor that cannot shrink where it is made, such as a recurrent initial state)."""
        source = node.input[index]
        indices = self._fresh_name(f"{source}__kept_indices_{node.name}")
        self.model.graph.initializer.append(numpy_helper.from_array(np.flatnonzero(keep).astype(np.int64), indices))
        out = self._fresh_name(f"{source}__kept_{node.name}")
        gather = helper.make_node("Gather", [source, indices], [out], name=out, axis=axis)
        self._before.setdefault(node.name, []).append(gather)
        node.input[index] = out

    def _own_copy(self, node: onnx.NodeProto, reader: onnx.NodeProto, input_index: int) -> onnx.NodeProto:
        key = (node.name, reader.name)
        if key not in self._copies:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self._fresh_name(f"{node.name}__{reader.name}")
            del copy.output[:]
            copy.output.append(self._fresh_name(f"{node.output[0]}__{reader.name}"))
            self._readers[node.output[0]] -= 1
            reader.input[input_index] = copy.output[0]
            self._copies[key] = copy
        return self._copies[key]

    def finish(self) -> None:
        """Place the shape-node copies right after their originals and inserted nodes right
        before their readers (topological order holds)."""
        if not self._copies and not self._before:
            return
        after: dict[str, list[onnx.NodeProto]] = {}
        for (original, _), copy in self._copies.items():
            after.setdefault(original, []).append(copy)
        nodes = []
        for n in self.model.graph.node:
            nodes.extend(self._before.get(n.name, []))
            nodes.append(n)
            nodes.extend(after.get(n.name, []))
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)

    def _fresh_name(self, base: str) -> str:
        return fresh_name(self._taken, base)
