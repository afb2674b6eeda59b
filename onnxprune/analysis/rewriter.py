"""The toolbox rules use to rewrite attributes and shape constants.

It knows the keep mask of every (tensor, axis) that loses positions and the
static shapes from before the rewrite, so a rule can ask "what is this
tensor's new shape" and patch a Reshape target or Split sizes accordingly.
Constant inputs are never patched in place: the node gets its own copy, so a
shape constant shared by several nodes stays right for the others. The edits
themselves (names, reader counts, copies, placement of new nodes) are the
graph editor's (`onnxprune.ir.editor.GraphEditor`).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.ir.editor import GraphEditor
from onnxprune.ir.graph_view import GraphView


# constants up to this many elements are compared before a copy is made (shape constants, not weights)
SMALL_VALUE = 4096


class Rewriter:
    def __init__(self, model: onnx.ModelProto, view: GraphView, masks: dict[tuple[str, int], np.ndarray]):
        self.model = model
        self.view = view  # the model before the rewrite: its shapes and constants
        self.masks = masks
        self.edit = GraphEditor(model)
        self._changed_tensors = {t for t, _ in masks}
        self._created: dict[str, np.ndarray] = {}  # constants made by this rewrite (the view has the old ones)
        self._read = {t.name for t in model.graph.initializer if self.edit.reader_count(t.name)}

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
        self.edit.set_attr(node, name, value)

    def remove_attr(self, node: onnx.NodeProto, name: str) -> None:
        self.edit.remove_attr(node, name)

    def replace_const_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Point input `index` of `node` at a new initializer holding `value` (unless the constant it
        reads holds just that: a copy equal to its original would only be merged back by the cleanup)."""
        if self._holds(node.input[index], np.asarray(value)):
            return
        name = self.edit.attach_const(node, index, value, f"{node.input[index]}__{node.name}")
        self._created[name] = np.asarray(value)

    def _holds(self, name: str, value: np.ndarray) -> bool:
        if not name or value.size > SMALL_VALUE:
            return False
        current = self._created.get(name)
        if current is None and self.view.is_const(name):
            current = self.view.const(name)
        return current is not None and current.dtype == value.dtype and current.shape == value.shape \
            and bool(np.array_equal(current, value))

    def set_const_element(self, node_name: str, index: int, offset: int, value: int,
                          reader: tuple[onnx.NodeProto, int] | None = None) -> None:
        """Change one element of constant input `index` of another node (a shape Concat).

        reader: (node, input index) that reads the Concat's output.  A Concat
        that others read too is copied for this reader, so their shapes stay.
        """
        node = self.edit.node(node_name)
        if reader is not None and reader[0].input[reader[1]] in node.output \
                and self.edit.reader_count(node.output[0]) > 1:
            node = self.edit.own_copy(node, *reader)
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
        node.input[index] = "placeholder"  # the new constant is named `placeholder__<node>`, as before
        self.replace_const_input(node, index, value)

    def gather_input(self, node: onnx.NodeProto, index: int, axis: int, keep: np.ndarray) -> None:
        """Feed input `index` of `node` through a new Gather of the kept positions of `axis`
        (a run-time tensor that cannot shrink where it is made, such as a recurrent initial state)."""
        source = node.input[index]
        indices = self.edit.add_initializer(np.flatnonzero(keep).astype(np.int64),
                                            f"{source}__kept_indices_{node.name}")
        out = self.edit.fresh_name(f"{source}__kept_{node.name}")
        self.edit.add_node(helper.make_node("Gather", [source, indices], [out], name=out, axis=axis),
                           before=node.name)
        self.edit.set_input(node, index, out)

    def finish(self) -> None:
        """Place the shape-node copies right after their originals and inserted nodes right
        before their readers (topological order holds); constants this rewrite replaced for their last
        reader go (a cleanup pass would copy every weight into a new model to drop them)."""
        self.edit.commit()
        outputs = {o.name for o in self.model.graph.output}
        self.edit.remove_initializers({n for n in self._read if not self.edit.reader_count(n) and n not in outputs})
