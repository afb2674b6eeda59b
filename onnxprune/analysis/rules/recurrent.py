"""LSTM, GRU and RNN: the hidden size is a group of units.

A unit is one hidden index j.  It owns rows g*hidden + j of W and R for every
gate g (LSTM: i, o, f, c; GRU: z, r, h; RNN: one gate), column j of R (R reads
the previous hidden state), entries j of both bias halves (Wb, Rb) and of the
three LSTM peepholes, index j of the initial states and of every output (Y,
Y_h, Y_c: the hidden axis is the last one in both layouts).  Both directions
of a bidirectional op share one unit index space, so `hidden_size` stays one
number.  GRU's linear_before_reset and LSTM's input_forget change no layout.

The input features of X are consumed like a MatMul's: W's last axis is sliced
with the units of X's producer.

onnxruntime's int8 DynamicQuantizeLSTM (com.microsoft, what quantize_dynamic makes of an LSTM)
is an LSTM whose W [directions, input, 4 x hidden] and R [directions, hidden, 4 x hidden] are
stored transposed, as integers, with a scale and zero point each (inputs 8-11: one per direction,
sliced with nothing, or one per direction and gate row, sliced with the rows).  It quantizes X and
the hidden state itself at run time, over a range that always holds 0: a removed input feature
masked to 0 (and a removed hidden unit that stays 0) leaves every other value's quantization as
it is, which is what removing them does.

A run-time initial state whose hidden axis carries no units (zeros expanded
to the batch size, a graph input) cannot shrink where it is made: the pruned
op reads it through a Gather of the kept units.  One whose hidden axis does
carry units (a decoder started from an encoder's Y_h) is coupled with them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.analysis.rules.base import Rule, register

if TYPE_CHECKING:
    from onnxprune.analysis.context import AnalysisState
    from onnxprune.analysis.rewriter import Rewriter

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}
W, R, B, INITIAL_H, INITIAL_C, PEEPHOLES = 1, 2, 3, 5, 6, 7
HIDDEN_AXIS = 2  # of X's features, of initial states, of Y_h and Y_c
Y_HIDDEN_AXIS = 3


def _initial_states(node: onnx.NodeProto) -> tuple[int, ...]:
    return (INITIAL_H,) if node.op_type in ("GRU", "RNN") else (INITIAL_H, INITIAL_C)


@register("LSTM", "GRU", "RNN")
class RecurrentRule(Rule):
    """W [directions, gates x hidden, input] and R [directions, gates x hidden, hidden]."""

    rows_axis = 1  # of W and R: gates x hidden
    input_axis = 2  # of W: X's features
    recurrent_axis = 2  # of R: the previous hidden state

    def _hidden_size(self, s: "AnalysisState", node: onnx.NodeProto, where: str) -> tuple[int | None, str | None]:
        """(hidden size, None), or (None, why the weights cannot be sliced)."""
        for index, label in ((W, "W"), (R, "R")):
            if not s.view.is_const(node.input[index]):
                return None, f"{where}: {label} ('{node.input[index]}') is computed at run time, not a constant weight"
        dims = list(s.view.initializers[node.input[W]].dims)
        gates, rows = GATES[node.op_type], self.rows_axis
        hidden = int(s.view.attr(node, "hidden_size", 0)) or (dims[rows] // gates if len(dims) == 3 else 0)
        if len(dims) != 3 or dims[rows] != gates * hidden:
            rows_then_input = [f"{gates} x hidden_size {hidden}", "input"]
            expected = ["directions"] + (rows_then_input if rows == 1 else rows_then_input[::-1])
            return None, f"{where}: W has shape {dims}, not [{', '.join(expected)}]"
        return hidden, None

    def propagate(self, node, s):
        where = f"{node.op_type} '{node.name}'"
        x = node.input[0]
        for axis, layout in s.layouts_of(x).items():
            if axis != HIDDEN_AXIS:
                s.block(layout, f"{where} steps over axis {axis} of '{x}' (time or batch): its units cannot go")
        states = [i for i in _initial_states(node) if s.view.has_input(node, i)]
        hidden, problem = self._hidden_size(s, node, where)
        if problem:
            for name in [x] + [node.input[i] for i in states]:
                s.block_tensor(name, problem)
            return
        in_layout = s.layout(x, HIDDEN_AXIS)
        if in_layout is not None:
            s.param(node, W, self.input_axis, in_layout, "weight_in")
            s.sink(node, x, HIDDEN_AXIS)
        outputs = [(name, Y_HIDDEN_AXIS if k == 0 else HIDDEN_AXIS) for k, name in enumerate(node.output) if name]
        if not outputs:
            return
        units = s.fresh(node, *outputs[0], hidden)
        gates = GATES[node.op_type]
        s.param(node, W, self.rows_axis, np.tile(units, gates), "weight_out")
        s.param(node, R, self.rows_axis, np.tile(units, gates), "weight_out")
        # R's columns read the previous hidden state: the masking oracle zeroes them (onnxprune.testing)
        s.param(node, R, self.recurrent_axis, units, "recurrent_in")
        s.param(node, B, 1, np.tile(units, 2 * gates), "bias")
        if gates == 4:
            s.param(node, PEEPHOLES, 1, np.tile(units, 3), "constant")
        self.slice_quantization(node, s, np.tile(units, gates))
        for index in states:
            self._initial_state(node, s, index, units, where)
        for name, axis in outputs:
            s.set_layout(name, axis, units)

    @staticmethod
    def _initial_state(node, s, index: int, units: np.ndarray, where: str) -> None:
        name = node.input[index]
        if s.view.is_const(name):
            s.param(node, index, HIDDEN_AXIS, units, "constant")
            return
        for axis, layout in s.layouts_of(name).items():
            if axis != HIDDEN_AXIS:
                s.block(layout, f"{where} reads axis {axis} of initial state '{name}' (direction or batch): "
                                "its units cannot go")
        if s.layout(name, HIDDEN_AXIS) is not None:
            s.set_layout(name, HIDDEN_AXIS, units)  # started from another layer's hidden units: one group
        # otherwise the rewrite gathers the kept units out of it

    def slice_quantization(self, node, s, rows: np.ndarray) -> None:
        """Float weights have none."""

    def rewrite(self, node, rw: "Rewriter"):
        keep = rw.mask(node.input[W], self.rows_axis)
        if keep is None:
            return
        kept_units = keep[: len(keep) // GATES[node.op_type]]
        rw.set_attr(node, "hidden_size", int(kept_units.sum()))
        for index in _initial_states(node):
            name = node.input[index] if rw.view.has_input(node, index) else ""
            if name and not rw.view.is_const(name) and rw.mask(name, HIDDEN_AXIS) is None:
                rw.gather_input(node, index, HIDDEN_AXIS, kept_units)


@register("com.microsoft.DynamicQuantizeLSTM")
class DynamicQuantizeLSTMRule(RecurrentRule):
    """W [directions, input, 4 x hidden] and R [directions, hidden, 4 x hidden], int8; then W_scale,
    W_zero_point, R_scale, R_zero_point: [directions] (stay) or [directions, 4 x hidden] (gate rows)."""

    rows_axis, input_axis, recurrent_axis = 2, 1, 1
    QUANTIZATION = ((8, "quant_scale"), (9, "quant_zero_point"), (10, "quant_scale"), (11, "quant_zero_point"))

    def slice_quantization(self, node, s, rows):
        for index, role in self.QUANTIZATION:
            shape = s.view.shape(node.input[index]) if s.view.has_input(node, index) else None
            if shape is not None and len(shape) == 2 and shape[1] == len(rows):
                s.param(node, index, 1, rows, role)
