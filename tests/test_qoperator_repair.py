"""The calibration repair of a QOperator model: QLinearConv, QLinearMatMul and QGemm read integer
activations, so the passes fit the float op each computes from its dequantized input to the dense
model's output before requantization, and write the weights back as integers in the scheme they had
(dtype, axis, range, symmetric zero points), the weight scale from the new range, the int32 bias
re-derived at input scale x the new weight scale. The graph keeps its nodes."""
import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

import onnxprune
from onnxprune.ir.quant import IntegerScheme, qlinear_mixing
from onnxprune.passes.reconstruct import ConsumerEditor
from test_quantized import RandomReader, cnn, mlp
from test_quantized_repair import CALIB, TEST, check_mlp_refit_without_bias, error, least_squares_layers, \
    pruned_plain_and_repaired, repaired_without_least_squares, values

SCHEMES = {  # 7-bit weights where int8: x86 u8s8 kernels saturate pairs of 8-bit products otherwise
    "per_tensor": dict(per_channel=False, reduce_range=True),
    "per_channel": dict(per_channel=True, reduce_range=True),
    # (onnxruntime writes per-channel QOperator weights as int8 whatever the weight type)
    "uint8_asymmetric": dict(per_channel=False, weight_type=QuantType.QUInt8, WeightSymmetric=False),
}


def qoperator(model: onnx.ModelProto, tmp_path, input_shape: list[int], *, per_channel: bool,
              reduce_range: bool = False, weight_type: QuantType = QuantType.QInt8,
              activation_type: QuantType = QuantType.QUInt8, **extra_options) -> onnx.ModelProto:
    src, dst = tmp_path / "float.onnx", tmp_path / "qop.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), RandomReader(model.graph.input[0].name, input_shape),
                    quant_format=QuantFormat.QOperator, per_channel=per_channel, reduce_range=reduce_range,
                    weight_type=weight_type, activation_type=activation_type, extra_options=extra_options)
    return onnx.load(dst)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def scheme_of(model: onnx.ModelProto, name: str) -> IntegerScheme:
    """The integer scheme of a QOperator op's weight (inputs 3, 4, 5), per channel along its outputs."""
    q, scale, zero = (values(model, i) for i in node(model, name).input[3:6])
    return IntegerScheme.of(q, zero, 0 if scale.size > 1 else None)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_least_squares_refits_qlinear_conv_and_qgemm_weights_as_integers_in_their_own_scheme(tmp_path, scheme):
    int8 = qoperator(cnn(), tmp_path, [1, 3, 8, 8], **SCHEMES[scheme])
    plain, repaired, layers = pruned_plain_and_repaired(int8)
    assert layers["c2_quant"]["action"] == layers["fc_quant"]["action"] == "refit"
    assert all(layers[n]["error_after"] < layers[n]["error_before"] for n in ("c2_quant", "fc_quant"))
    for name in ("c2_quant", "fc_quant"):
        op = node(repaired, name)
        x_scale, w, w_scale, w_zero, bias = (op.input[i] for i in (1, 3, 4, 5, qlinear_mixing(op).bias))
        old_w, old_scale, old_zero = (values(plain, i) for i in node(plain, name).input[3:6])
        q = values(repaired, w)
        assert q.dtype == old_w.dtype and q.shape == old_w.shape and not np.array_equal(q, old_w)
        # the scheme is kept: dtype, range (7-bit stays 7-bit), symmetric zero points, one scale per row or not
        assert scheme_of(repaired, name) == scheme_of(plain, name)
        new = scheme_of(repaired, name)
        assert new.qmin <= q.min() and q.max() <= new.qmax
        assert values(repaired, w_scale).shape == old_scale.shape
        assert values(repaired, w_zero).dtype == old_zero.dtype
        if scheme == "uint8_asymmetric":  # the zero points follow the new ranges, as uint8
            assert q.dtype == np.uint8 and not new.symmetric
        else:  # symmetric 7-bit int8: zero points 0, integers within -64..64, the range used
            assert not values(repaired, w_zero).any() and (new.qmin, new.qmax) == (-64, 64)
            assert np.abs(q).max() == 64
        # the int32 bias (read at input scale x weight scale) was refit too: its real values moved by more
        # than the new scale's steps
        assert values(repaired, bias).dtype == np.int32
        step = values(repaired, x_scale) * values(repaired, w_scale)
        old_step = values(plain, x_scale) * old_scale
        assert np.abs(values(repaired, bias) * step - values(plain, bias) * old_step).max() > step.max()
    # the requantized model is closer to the dense int8 model on data the repair never saw
    assert error(repaired, int8, TEST) < 0.5 * error(plain, int8, TEST)


def test_a_new_weight_scale_re_derives_the_int32_bias_so_its_real_values_stay(tmp_path):
    # the bias has no scale of its own: the op reads it at input scale x weight scale, so a weight written
    # at twice its values (twice the scale) takes a bias of half the integers
    before = qoperator(cnn(), tmp_path, [1, 3, 8, 8], **SCHEMES["per_channel"])
    int8 = onnx.ModelProto()
    int8.CopyFrom(before)
    edit = ConsumerEditor(int8)
    c = edit.consumer("c2_quant")
    assert c.op_type == "Conv" and c.input_scale == float(values(int8, "a_scale"))
    weight, bias = edit.weight(c), edit.bias_of(c)
    edit.set_raw_weight(c, 2 * weight)
    np.testing.assert_allclose(values(int8, "c2.w_scale"), 2 * values(before, "c2.w_scale"), rtol=1e-6)
    np.testing.assert_allclose(edit.weight(c), 2 * weight, rtol=1e-6)
    step = values(int8, "a_scale") * values(int8, "c2.w_scale")
    np.testing.assert_allclose(edit.bias_of(c), bias, atol=float(step.max()) / 2 + 1e-7)
    np.testing.assert_allclose(values(int8, "c2.b_quantized"), values(before, "c2.b_quantized") / 2, atol=1)


def test_a_qlinear_matmul_has_no_bias_input_and_is_refit_without_one(tmp_path):
    int8 = qoperator(mlp(), tmp_path, [2, 3, 16], per_channel=True, reduce_range=True)
    assert [n.op_type for n in int8.graph.node].count("QLinearMatMul") == 2
    check_mlp_refit_without_bias(int8, "fc2_quant", margin=0.5)


def test_bias_compensation_and_output_matching_write_qoperator_biases_and_weights_as_integers(tmp_path):
    # without least squares: the int32 biases compensated from the dense input means (dequantized), the
    # rows scaled to the dense output statistics before requantization, all written as integers
    int8 = qoperator(cnn(), tmp_path, [1, 3, 8, 8], **SCHEMES["per_channel"])
    plain, repaired, actions, verdicts = repaired_without_least_squares(int8)
    assert actions["bias_compensation"] == {"c2_quant": "bias", "fc_quant": "bias"}
    assert verdicts["bias_compensation"] == "kept"
    assert actions["output_matching"] == {"c2_quant": "matched", "fc_quant": "matched"}
    assert [n.op_type for n in repaired.graph.node] == [n.op_type for n in plain.graph.node]
    assert values(repaired, "c2.w_quantized").dtype == np.int8
    assert values(repaired, "c2.b_quantized").dtype == np.int32
    assert not np.array_equal(values(repaired, "c2.b_quantized"), values(plain, "c2.b_quantized"))
    assert error(repaired, int8, TEST) < 0.5 * error(plain, int8, TEST)


def test_integers_two_qoperator_ops_read_are_not_refit_and_say_why(tmp_path):
    # one int8 weight read by two QLinearMatMuls: requantizing it for one would change it for both
    int8 = qoperator(mlp(), tmp_path, [2, 3, 16], per_channel=False, reduce_range=True)
    fc2 = node(int8, "fc2_quant")
    twin = onnx.helper.make_node("QLinearMatMul", list(fc2.input), ["y_twin"], name="fc2_twin")
    add = onnx.helper.make_node("QLinearAdd", [fc2.output[0], *fc2.input[6:8], "y_twin", *fc2.input[6:8],
                                               *fc2.input[6:8]], ["y_sum"], name="sum", domain="com.microsoft")
    reader = next(n for n in int8.graph.node if fc2.output[0] in n.input)
    reader.input[list(reader.input).index(fc2.output[0])] = "y_sum"
    int8.graph.node.extend([twin, add])
    int8 = sorted_graph(int8)
    calib = {"x": np.random.default_rng(3).standard_normal((64, 3, 16)).astype(np.float32)}
    plain, _ = onnxprune.prune(int8, ratio=0.25, round_to=1)
    repaired, report = onnxprune.prune(int8, calib=calib, ratio=0.25, round_to=1, strategy="uniform")
    layers = least_squares_layers(report)
    for name in ("fc2_quant", "fc2_twin"):
        assert layers[name]["action"] == "skipped"
        assert "int8 'w2_quantized' is shared by 2 readers" in layers[name]["detail"]
    np.testing.assert_array_equal(values(repaired, "w2_quantized"), values(plain, "w2_quantized"))
    assert values(repaired, "w2_quantized").shape[0] < 32  # sliced, not refit


def test_a_weight_scale_two_ops_read_is_copied_for_the_one_refit_not_changed_for_both(tmp_path):
    # a deduplicating optimizer leaves equal scales as one initializer: each refit writes its own copy
    int8 = qoperator(cnn(), tmp_path, [1, 3, 8, 8], **SCHEMES["per_tensor"])
    node(int8, "fc_quant").input[4] = "c2.w_scale"
    plain, _ = onnxprune.prune(int8, target_flops=0.4, round_to=1)
    repaired, report = onnxprune.prune(int8, calib=CALIB, target_flops=0.4, round_to=1, strategy="uniform")
    layers = least_squares_layers(report)
    assert layers["c2_quant"]["action"] == layers["fc_quant"]["action"] == "refit"
    c2_scale, fc_scale = (node(repaired, name).input[4] for name in ("c2_quant", "fc_quant"))
    assert c2_scale != fc_scale and values(repaired, c2_scale) != values(repaired, fc_scale)
    assert error(repaired, int8, TEST) < 0.5 * error(plain, int8, TEST)


def sorted_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The nodes in an order where each comes after what it reads."""
    nodes, done = list(model.graph.node), {i.name for i in model.graph.input} | {
        t.name for t in model.graph.initializer} | {""}
    order = []
    while nodes:
        ready = next(n for n in nodes if all(i in done for i in n.input))
        order.append(ready)
        done.update(ready.output)
        nodes.remove(ready)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model
