"""The QOperator format's mixing ops (QLinearConv, QLinearMatMul, QGemm) as the reconstruction passes
see them: the float op each computes on real values.

Such an op reads integer activations x with their scale and zero point, an integer weight and an int32
bias, and writes its output as integers with its own scale and zero point. Its `Consumer` is the float
op's (`consumer`), with the input's scale and zero point, so that the rows the passes fit from are the
dequantized input (`Consumer.real_input`); its weight and bias are read and written as integers by
`passes.integer_weights`, in the scheme they have.

What a refit matches is the op's output before it is requantized: onnxruntime's quantizer drops a Relu
after a QLinearConv and lets the output's integer range clip at 0 instead, so the op's integer output
is relu(z) where a QDQ Conv's float output is z; fitting a linear map to clipped targets would pull
every negative pre-activation up to 0. `with_float_twins` adds, beside such an op, a DequantizeLinear
of its input and the float op with the dequantized weight and bias: its output is z, in float, which is
what least squares fits to and output matching measures (on the dense model, and on the model being
repaired). Only the copy that is measured gets the twins; the model written keeps its nodes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.features import Consumer, consumer_for
from onnxprune.ir.editor import GraphEditor, copy_model
from onnxprune.ir.quant import qlinear_mixing


def consumer(edit: GraphEditor, node: onnx.NodeProto) -> Consumer | str | None:
    """The Consumer of a QOperator mixing op, named like it: the float op it computes, reading the
    integer input with its scale and zero point. A reason (str) where the passes cannot refit it;
    None when `node` is not such an op."""
    rule = qlinear_mixing(node)
    if rule is None:
        return None
    names = {i: node.input[i] if i < len(node.input) else "" for i in (*rule.x, *rule.w)}
    x, x_scale, x_zero = (names[i] for i in rule.x)
    w = names[rule.w[0]]
    varying = [names[i] for i in (*rule.x[1:], *rule.w) if names[i] and not edit.is_initializer(names[i])]
    if varying or not x_scale or not names[rule.w[1]]:
        return f"{node.op_type} '{node.name}' reads {varying[0] if varying else 'a scale'} that is not a constant"
    if edit.value(x_scale).size != 1 or (x_zero and edit.value(x_zero).size != 1):
        return f"{node.op_type} '{node.name}': its input has more than one scale or zero point"
    bias = node.input[rule.bias] if rule.bias is not None and rule.bias < len(node.input) else ""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in rule.attributes}
    if rule.bias_times_alpha:  # Y = alpha * (x w + bias): as Gemm, its beta is alpha
        attrs["beta"] = float(attrs.get("alpha", 1.0))
    float_op = helper.make_node(rule.computes, [x, w] + ([bias] if bias else []), [node.output[0]],
                                name=node.name, **attrs)
    known = {name: edit.initializers[name] for name in (w, bias) if name and edit.is_initializer(name)}
    c = consumer_for(float_op, known)
    if c is None:
        return f"{node.op_type} '{node.name}' is not a {rule.computes} with a constant weight and bias"
    zero = float(edit.value(x_zero).reshape(())) if x_zero else 0.0
    return replace(c, input_scale=float(edit.value(x_scale).reshape(())), input_zero_point=zero)


def with_float_twins(model: onnx.ModelProto, layers: list[tuple[Consumer, np.ndarray, np.ndarray]]
                     ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` with, for each (QOperator consumer, its real weight in its own layout, its bias in
    output units), the float op computing that consumer's output before requantization; and the tensor
    each twin writes, by consumer node name."""
    out = copy_model(model)
    edit = GraphEditor(out)
    real_inputs: dict[str, str] = {}
    twins: dict[str, str] = {}
    for c, weight, bias in layers:
        node = edit.node(c.node)
        rule = qlinear_mixing(node)
        if c.input not in real_inputs:  # one DequantizeLinear per integer input, whoever reads it
            x_parts = [node.input[i] for i in rule.x if i < len(node.input) and node.input[i]]
            real_inputs[c.input] = edit.fresh_name(f"{c.input}/real")
            edit.add_node(helper.make_node("DequantizeLinear", x_parts, [real_inputs[c.input]],
                                           name=edit.fresh_name(f"{c.input}/dequantize")))
        w = edit.add_initializer(weight.astype(np.float32), f"{c.node}/real_weight")
        inputs = [real_inputs[c.input], w]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in rule.attributes}
        if c.op_type != "MatMul":  # Gemm: `bias` is in output units already (alpha folded in), so beta 1
            inputs.append(edit.add_initializer(bias.astype(np.float32), f"{c.node}/real_bias"))
        twins[c.node] = edit.fresh_name(f"{c.node}/preactivation")
        edit.add_node(helper.make_node(c.op_type, inputs, [twins[c.node]], name=edit.fresh_name(f"{c.node}/twin"),
                                       **attrs))
    edit.commit()
    return out, twins
