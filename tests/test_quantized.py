"""Quantized models prune as they are (issue 12): QDQ (static, per-tensor and per-channel),
dynamic quantization (DynamicQuantizeLinear + MatMulInteger/ConvInteger), the QOperator format
(QLinearConv, QLinearMatMul, QGemm and the com.microsoft QLinear* ops) and weight-only MatMulNBits.
Weights stay integers; a channel goes with its per-channel scale and zero point; criteria read the
dequantized weights.  Models are made in the tests by onnxruntime's quantization tools from float
models built here, and compared with the masking oracle unfused (see helpers.prune_matches_oracle);
QOperator graphs, whose activations between ops are integers, with the masked quantized model
(helpers.masked_quantized_reference)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

import onnxprune
from onnxprune.calibration.removal_error import removal_errors
from onnxprune.importance import score_groups
from onnxprune.pipeline import build_analysis, prepare
from helpers import (analysis_of, conv, group_of, make_model, masked_quantized_reference, prune_matches_oracle,
                     weight)


class RandomReader(CalibrationDataReader):
    """A few seeded random samples for the calibration of activation ranges."""

    def __init__(self, name: str, shape: list[int], count: int = 8):
        rng = np.random.default_rng(0)
        self.samples = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self.samples, None)


def quantized(model: onnx.ModelProto, tmp_path, *, static: bool = True, per_channel: bool = False,
              input_shape: list[int] | None = None) -> onnx.ModelProto:
    """onnxruntime's quantize_static (QDQ format) or quantize_dynamic of `model`."""
    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    if static:
        name = model.graph.input[0].name
        quantize_static(str(src), str(dst), RandomReader(name, input_shape), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel)
    else:  # 7-bit weights: x86 u8s8 kernels add pairs of products in int16 and saturate otherwise, and a
        # removed row held at the zero point still enters those pair sums in the oracle
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=True)
    return onnx.load(dst)


def cnn() -> onnx.ModelProto:
    """x -> conv c1 (16) -> Relu -> conv c2 (8) -> GlobalAveragePool -> Flatten -> Gemm fc (4)."""
    (c1, w1), (c2, w2) = conv("c1", "x", "a", 3, 16), conv("c2", "r", "b", 16, 8)
    nodes = [c1, helper.make_node("Relu", ["a"], ["r"], name="act"), c2,
             helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4])],
                      w1 + w2 + [weight(4, 8, name="fc.w"), weight(4, name="fc.b")], opset=13)


def mlp() -> onnx.ModelProto:
    """x [N, 3, 16] -> MatMul fc1 (32) + bias -> Relu -> MatMul fc2 (8)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 3, 16])], [("y", ["N", 3, 8])],
                      [weight(16, 32, name="w1"), weight(32, name="b1"), weight(32, 8, name="w2")], opset=13)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def dequantizer_inputs(model: onnx.ModelProto, weight_name: str) -> list[str]:
    """data, scale, zero point of the DequantizeLinear that reads `weight_name`."""
    return list(next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight_name).input)


# -- QDQ -------------------------------------------------------------------------------------------------

def test_preparing_a_qdq_model_keeps_its_weights_int8_behind_their_dequantize_nodes(tmp_path):
    # folding DequantizeLinear of a constant would store the weight as float: 4x the bytes, no int8 kernels
    working, _ = prepare(quantized(cnn(), tmp_path, input_shape=[1, 3, 8, 8]))
    assert sum(n.op_type == "DequantizeLinear" for n in working.graph.node) >= 6
    assert initializer(working, "c1.w_quantized").data_type == TensorProto.INT8


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_static_qdq_cnn_prunes_like_the_masked_oracle_and_its_weights_stay_int8(tmp_path, per_channel):
    model = quantized(cnn(), tmp_path, per_channel=per_channel, input_shape=[1, 3, 8, 8])
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, optimize=False)
    c1, c2 = group_of(analysis, "c1"), group_of(analysis, "c2")
    assert c1.prunable and c2.prunable and c1.size == 16 and c2.size == 8
    kept1 = 16 - sum(int(r) in removed for r in c1.roots)
    kept2 = 8 - sum(int(r) in removed for r in c2.roots)
    w1 = initializer(pruned, "c1.w_quantized")
    assert w1.data_type == TensorProto.INT8 and list(w1.dims) == [kept1, 3, 3, 3]
    assert list(initializer(pruned, "c2.w_quantized").dims) == [kept2, kept1, 3, 3]
    assert list(initializer(pruned, "fc.w_quantized").dims) == [4, kept2]
    bias = initializer(pruned, "c1.b_quantized")
    assert bias.data_type == TensorProto.INT32 and list(bias.dims) == [kept1]
    _, scale, zero = dequantizer_inputs(pruned, "c1.w_quantized")
    # per channel: one scale and zero point per kept filter; per tensor: the one scale stays
    assert np.prod(initializer(pruned, scale).dims) == (kept1 if per_channel else 1)
    assert np.prod(initializer(pruned, zero).dims) == (kept1 if per_channel else 1)
    assert not group_of(analysis, "fc").prunable  # its output is the graph output


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_static_qdq_mlp_prunes_its_hidden_neurons_with_their_column_scales(tmp_path, per_channel):
    model = quantized(mlp(), tmp_path, per_channel=per_channel, input_shape=[2, 3, 16])
    analysis, pruned, removed = prune_matches_oracle(model, 0.25, optimize=False)
    kept = 32 - len(removed)
    w1, scale, _ = dequantizer_inputs(pruned, "w1_quantized")
    assert list(initializer(pruned, w1).dims) == [16, kept]
    assert list(initializer(pruned, "w2_quantized").dims) == [kept, 8]
    assert np.prod(initializer(pruned, scale).dims) == (kept if per_channel else 1)


def qdq_gemm(w_q: np.ndarray, scales: np.ndarray, opset: int = 13, **dq_attrs) -> onnx.ModelProto:
    """x [2, 3] -> Gemm fc0 (K) -> Gemm fc1 (weight [K, N] dequantized from int8 `w_q` with `scales`)
    -> Relu -> Gemm fc2 (2, rows of equal magnitude: fc1's own columns decide its ranking)."""
    k, n = w_q.shape
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(scales.astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(scales.shape, np.int8), "w_z"), weight(3, k, name="w0"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 2 * n, dtype=np.float32).reshape(2, n).T, "w2")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", **dq_attrs),
             helper.make_node("Gemm", ["x", "w0"], ["h0"], name="fc0"),
             helper.make_node("Gemm", ["h0", "w"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", [2, 3])], [("y", [2, 2])], inits, opset=opset)


def test_criteria_rank_a_quantized_weight_by_its_dequantized_values():
    # column 0 holds large integers at a tiny scale, column 1 small integers at a large scale:
    # the stored integers say column 0 matters most, the real weights say column 1 does
    w_q = np.array([[120, 10, 60, 60]] * 4, np.int8)
    model = qdq_gemm(w_q, np.array([0.001, 0.5, 0.01, 0.01]), axis=1)
    analysis = analysis_of(model)
    group = group_of(analysis, "fc1")
    scores = score_groups(analysis, [group], "l1")[group.id]
    assert scores[1] > scores[0] and scores[1] == scores.max()
    assert scores[0] == scores.min()


def test_thinet_measures_a_qdq_consumer_through_its_dequantized_weight(tmp_path):
    # the next layer's reconstruction error needs its weight: read behind the DequantizeLinear
    working, _ = prepare(quantized(cnn(), tmp_path, per_channel=True, input_shape=[1, 3, 8, 8]))
    analysis = build_analysis(working)
    feeds = {"x": np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)}
    errors = removal_errors(working, analysis, feeds, per_sample=None)
    assert not errors.skipped
    assert {node for _, _, node in errors.matrices} == {"c2", "fc"}  # the consumers of c1's and c2's units
    m = next(m for key, m in errors.matrices.items() if key[2] == "c2")
    assert m.shape == (16, 16) and np.isfinite(m).all() and np.trace(m) > 0


def test_a_weight_quantized_in_blocks_prunes_across_the_blocks_and_keeps_the_blocked_axis():
    # blocks of 4 input rows share a scale: output columns may go (each has its own scales), rows may not
    rng = np.random.default_rng(0)
    w_q = rng.integers(-100, 100, (8, 6)).astype(np.int8)
    model = qdq_gemm(w_q, rng.uniform(0.01, 0.1, (2, 6)), opset=21, axis=0, block_size=4)
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, optimize=False)
    fc0, fc1 = group_of(analysis, "fc0"), group_of(analysis, "fc1")
    assert not fc0.prunable
    assert any("DequantizeLinear 'dq_w'" in r and "blocks of 4 along axis 0" in r for r in fc0.blocked)
    assert fc1.prunable
    assert list(initializer(pruned, "w_s").dims) == [2, 6 - len(removed)]  # the scales of the kept columns


def test_a_per_channel_activation_quantization_slices_its_scale_and_zero_point():
    (c1, w1), (c2, w2) = conv("c1", "x", "a", 3, 8), conv("c2", "a_dq", "y", 8, 4)
    scale = numpy_helper.from_array(np.linspace(0.01, 0.08, 8).astype(np.float32), "a_s")
    zero = numpy_helper.from_array(np.arange(8, dtype=np.int8), "a_z")
    nodes = [c1, helper.make_node("QuantizeLinear", ["a", "a_s", "a_z"], ["a_q"], axis=1, name="q_a"),
             helper.make_node("DequantizeLinear", ["a_q", "a_s", "a_z"], ["a_dq"], axis=1, name="dq_a"), c2]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], w1 + w2 + [scale, zero], opset=13)
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, optimize=False)
    kept = 8 - len(removed)
    scales = [t for t in pruned.graph.initializer if t.name.startswith("a_s")]
    assert scales and all(list(t.dims) == [kept] for t in scales)
    assert {p.role for p in group_of(analysis, "c1").params} >= {"quant_scale", "quant_zero_point"}


def test_lossless_removes_the_dead_channels_of_a_qdq_model_and_keeps_its_outputs(tmp_path):
    model = cnn()
    weights = {t.name: t for t in model.graph.initializer}
    for name in ("c1.w", "c1.b"):  # channels 2 and 5 of c1 trained to zero
        values = numpy_helper.to_array(weights[name]).copy()
        values[[2, 5]] = 0
        weights[name].CopyFrom(numpy_helper.from_array(values, name))
    int8 = quantized(model, tmp_path, per_channel=True, input_shape=[1, 3, 8, 8])
    pruned, report = onnxprune.prune(int8, lossless=True)  # lossless validation: outputs must stay equal
    assert list(initializer(pruned, "c1.w_quantized").dims) == [14, 3, 3, 3]
    assert list(initializer(pruned, "c2.w_quantized").dims) == [8, 14, 3, 3]


def test_prune_to_a_flops_target_writes_a_smaller_int8_model(tmp_path):
    model = quantized(cnn(), tmp_path, per_channel=True, input_shape=[1, 3, 8, 8])
    pruned, report = onnxprune.prune(model, tmp_path / "small.onnx", target_flops=0.3, round_to=1)
    assert report.after.flops <= 0.72 * report.before.flops
    written = onnx.load(tmp_path / "small.onnx")
    assert all(initializer(written, n).data_type == TensorProto.INT8
               for n in ("c1.w_quantized", "c2.w_quantized", "fc.w_quantized"))
    assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 4 for t in written.graph.initializer)


# -- dynamic quantization ----------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_dynamic_matmul_integer_mlp_prunes_like_the_masked_oracle(tmp_path, per_channel):
    model = quantized(mlp(), tmp_path, static=False, per_channel=per_channel)
    assert [n.op_type for n in model.graph.node].count("MatMulInteger") == 2
    analysis, pruned, removed = prune_matches_oracle(model, 0.25, optimize=False)
    group = group_of(analysis, "fc1_quant")
    assert group.prunable and group.size == 32
    kept = 32 - len(removed)
    w1 = initializer(pruned, "w1_quantized")
    assert w1.data_type == TensorProto.INT8 and list(w1.dims) == [16, kept]
    assert list(initializer(pruned, "w2_quantized").dims) == [kept, 8]
    # the removed neurons are masked where DynamicQuantizeLinear reads them, not on the int8 tensor
    assert any(s.node == "r_QuantizeLinear" and s.tensor == "r" for s in analysis.state.sinks)
    if per_channel:  # the per-column weight scales (applied after the op) and zero points go too
        assert list(initializer(pruned, "w1_scale").dims) == [kept]
        assert list(initializer(pruned, "w1_zero_point").dims) == [kept]


def test_a_dynamic_conv_integer_net_prunes_like_the_masked_oracle(tmp_path):
    model = quantized(cnn(), tmp_path, static=False)
    assert [n.op_type for n in model.graph.node].count("ConvInteger") == 2
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, optimize=False)
    c1 = group_of(analysis, "c1_quant")
    kept1 = 16 - sum(int(r) in removed for r in c1.roots)
    assert list(initializer(pruned, "c1.w_quantized").dims) == [kept1, 3, 3, 3]
    assert list(initializer(pruned, "a_bias_reshape_output").dims) == [1, kept1, 1, 1]  # bias added after


# -- the QOperator format ------------------------------------------------------------------------------------

def qoperator(model: onnx.ModelProto, tmp_path, input_shape: list[int], *, per_channel: bool = False,
              activations: QuantType = QuantType.QInt8) -> onnx.ModelProto:
    """onnxruntime's quantize_static in the QOperator format: QLinearConv, QLinearMatMul, QGemm and the
    com.microsoft QLinear* ops read and write integer activations.  7-bit weights (reduce_range), as for
    dynamic quantization above: x86 u8s8 kernels saturate pairs of 8-bit products otherwise."""
    src, dst = tmp_path / "float.onnx", tmp_path / "qop.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), RandomReader(model.graph.input[0].name, input_shape),
                    quant_format=QuantFormat.QOperator, per_channel=per_channel, reduce_range=True,
                    activation_type=activations)
    return onnx.load(dst)


def branchy() -> onnx.ModelProto:
    """x -> c1 (8) -> c2 (8) -> Add(c1, c2) -> c3 (6) -> x * Sigmoid(x); LeakyRelu(Add) -> Concat (8 + 6)
    -> c4 (4) -> AveragePool (3x3, stride 2) -> GlobalAveragePool -> Flatten -> Gemm fc (4): every QLinear
    op quantize_static writes for a CNN."""
    (c1, w1), (c2, w2), (c3, w3), (c4, w4) = (conv("c1", "x", "a", 3, 8), conv("c2", "a", "b", 8, 8),
                                              conv("c3", "s", "c", 8, 6), conv("c4", "cat", "d", 14, 4))
    nodes = [c1, c2, helper.make_node("Add", ["a", "b"], ["s"], name="residual"), c3,
             helper.make_node("Sigmoid", ["c"], ["gate"], name="sigmoid"),
             helper.make_node("Mul", ["c", "gate"], ["swish"], name="swish"),
             helper.make_node("LeakyRelu", ["s"], ["leaky"], name="leaky", alpha=0.1),
             helper.make_node("Concat", ["leaky", "swish"], ["cat"], name="cat", axis=1), c4,
             helper.make_node("AveragePool", ["d"], ["dp"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["dp"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4])],
                      w1 + w2 + w3 + w4 + [weight(4, 4, name="fc.w"), weight(4, name="fc.b")], opset=13)


def kept(analysis, removed: set[int], source: str) -> int:
    group = group_of(analysis, source)
    return group.size - sum(int(r) in removed for r in group.roots.tolist())


ACTIVATIONS = [(False, QuantType.QInt8), (True, QuantType.QInt8), (True, QuantType.QUInt8)]


@pytest.mark.parametrize("per_channel,activations", ACTIVATIONS,
                         ids=["per_tensor-int8", "per_channel-int8", "per_channel-uint8"])
def test_a_qoperator_cnn_prunes_like_the_masked_quantized_model_and_stays_int8(tmp_path, per_channel, activations):
    model = qoperator(cnn(), tmp_path, [1, 3, 8, 8], per_channel=per_channel, activations=activations)
    assert {n.op_type for n in model.graph.node} >= {"QLinearConv", "QLinearGlobalAveragePool", "QGemm"}
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, oracle=masked_quantized_reference, atol=0)
    kept1, kept2 = kept(analysis, removed, "c1_quant"), kept(analysis, removed, "c2_quant")
    assert kept1 < 16 and kept2 < 8
    w1 = initializer(pruned, "c1.w_quantized")
    assert w1.data_type == TensorProto.INT8 and list(w1.dims) == [kept1, 3, 3, 3]
    assert list(initializer(pruned, "c2.w_quantized").dims) == [kept2, kept1, 3, 3]
    assert list(initializer(pruned, "fc.w_quantized").dims) == [4, kept2]  # QGemm, transB: [N, K]
    bias = initializer(pruned, "c1.b_quantized")
    assert bias.data_type == TensorProto.INT32 and list(bias.dims) == [kept1]
    # per channel: one scale and zero point per kept filter; per tensor: the one scale stays
    for name in ("c1.w_scale", "c1.w_zero_point"):
        assert np.prod(initializer(pruned, name).dims) == (kept1 if per_channel else 1)
    assert np.prod(initializer(pruned, "fc.w_scale").dims) == (4 if per_channel else 1)  # fc's outputs stay


def test_qoperator_add_concat_and_activations_carry_channels_to_the_next_conv(tmp_path):
    model = qoperator(branchy(), tmp_path, [1, 3, 8, 8], per_channel=True)
    assert {n.op_type for n in model.graph.node} >= {"QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                                                     "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                                                     "QGemm"}
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, oracle=masked_quantized_reference, atol=0)
    residual = group_of(analysis, "c1_quant")
    assert {s.node for s in residual.sources} == {"c1_quant", "c2_quant"}  # QLinearAdd: one group
    kept_residual, kept3 = kept(analysis, removed, "c1_quant"), kept(analysis, removed, "c3_quant")
    # c4 reads the concatenation: the residual's kept channels, then c3's
    assert list(initializer(pruned, "c4.w_quantized").dims) == [kept(analysis, removed, "c4_quant"),
                                                                  kept_residual + kept3, 3, 3]
    concat = next(n for n in pruned.graph.node if n.op_type == "QLinearConcat")
    assert helper.get_attribute_value(concat.attribute[0]) == 1


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_qoperator_mlp_slices_the_column_scales_and_the_constant_of_its_qlinear_add(tmp_path, per_channel):
    model = qoperator(mlp(), tmp_path, [2, 3, 16], per_channel=per_channel)
    assert [n.op_type for n in model.graph.node].count("QLinearMatMul") == 2
    analysis, pruned, removed = prune_matches_oracle(model, 0.25, oracle=masked_quantized_reference, atol=0)
    hidden = kept(analysis, removed, "fc1_quant")
    assert list(initializer(pruned, "w1_quantized").dims) == [16, hidden]
    assert list(initializer(pruned, "w2_quantized").dims) == [hidden, 8]
    assert list(initializer(pruned, "b1_quantized").dims) == [hidden]  # the bias QLinearAdd adds, int8
    assert np.prod(initializer(pruned, "w1_scale").dims) == (hidden if per_channel else 1)


def test_a_depthwise_qlinear_conv_keeps_one_group_per_kept_channel(tmp_path):
    (c1, w1), (c3, w3) = conv("c1", "x", "a", 3, 8), conv("c3", "d", "y", 8, 4)
    depthwise = helper.make_node("Conv", ["a", "dw.w", "dw.b"], ["d"], name="dw", group=8, kernel_shape=[3, 3],
                                 pads=[1] * 4)
    model = make_model([c1, depthwise, c3], [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                       w1 + w3 + [weight(8, 1, 3, 3, name="dw.w"), weight(8, name="dw.b")], opset=13)
    int8 = qoperator(model, tmp_path, [1, 3, 8, 8], per_channel=True)
    analysis, pruned, removed = prune_matches_oracle(int8, 0.5, oracle=masked_quantized_reference, atol=0)
    channels = kept(analysis, removed, "c1_quant")
    dw = next(n for n in pruned.graph.node if n.name == "dw_quant")
    assert next(helper.get_attribute_value(a) for a in dw.attribute if a.name == "group") == channels
    assert list(initializer(pruned, "dw.w_scale").dims) == [channels]


def test_a_channels_last_qlinear_global_average_pool_passes_the_last_axis():
    """x [1, 4, 4, 3] -> QLinearMatMul (8 features, last axis) -> QLinearGlobalAveragePool channels_last
    -> [1, 1, 1, 8] -> QLinearMatMul (2): the features are pooled over H and W, not mixed."""
    rng = np.random.default_rng(0)

    def const(name, values, dtype):
        return numpy_helper.from_array(np.asarray(values, dtype), name)

    inits = [const("s", 0.05, np.float32), const("z", 0, np.int8), const("w_s", 0.02, np.float32),
             const("w1", rng.integers(-60, 60, (3, 8)), np.int8), const("w2", rng.integers(-60, 60, (8, 2)), np.int8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quantize"),
             helper.make_node("QLinearMatMul", ["xq", "s", "z", "w1", "w_s", "z", "s", "z"], ["h"], name="fc1"),
             helper.make_node("QLinearGlobalAveragePool", ["h", "s", "z", "s", "z"], ["p"], name="pool",
                              domain="com.microsoft", channels_last=1),
             helper.make_node("QLinearMatMul", ["p", "s", "z", "w2", "w_s", "z", "s", "z"], ["yq"], name="fc2"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dequantize")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    analysis, pruned, removed = prune_matches_oracle(model, 0.5, oracle=masked_quantized_reference, atol=0)
    assert group_of(analysis, "fc1").prunable
    assert list(initializer(pruned, "w2").dims) == [8 - len(removed), 2]


def test_criteria_read_qoperator_weights_dequantized(tmp_path):
    """The integers times their per-channel scale are the float weights, to half a step."""
    float_model = cnn()
    model = qoperator(float_model, tmp_path, [1, 3, 8, 8], per_channel=True)
    view = analysis_of(model).view
    floats = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    for name, axis in (("c1.w", 0), ("fc.w", 0)):  # QLinearConv filters, QGemm rows (transB)
        scale = numpy_helper.to_array(initializer(model, f"{name}_scale"))
        shape = [1] * floats[name].ndim
        shape[axis] = -1
        error = np.abs(view.weight(f"{name}_quantized") - floats[name])
        assert (error <= scale.reshape(shape) / 2 + 1e-6).all()


def test_prune_writes_a_smaller_qoperator_model_that_stays_int8(tmp_path):
    model = qoperator(branchy(), tmp_path, [1, 3, 8, 8], per_channel=True)
    pruned, report = onnxprune.prune(model, tmp_path / "small.onnx", ratio=0.5, round_to=1)
    written = onnx.load(tmp_path / "small.onnx")
    assert report.after.params < 0.6 * report.before.params
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    assert all(initializer(written, f"{c}.w_quantized").data_type == TensorProto.INT8 for c in ("c1", "c2", "c3", "c4"))



def test_a_qoperator_model_costs_the_macs_of_its_float_original_and_meets_a_flops_target(tmp_path):
    """QLinearConv, QLinearMatMul and QGemm read their weight at input 3: counted like Conv, MatMul and Gemm."""
    from onnxprune.cost import model_cost

    float_model = branchy()
    model = qoperator(float_model, tmp_path, [1, 3, 8, 8], per_channel=True)
    linear = {"Conv", "Gemm", "QLinearConv", "QGemm"}
    macs = [{n.name.removesuffix("_quant"): n.macs for n in model_cost(m).nodes if n.op_type in linear}
            for m in (float_model, model)]
    assert macs[0] == macs[1] and all(macs[0].values())
    _, report = onnxprune.prune(model, tmp_path / "half.onnx", target_flops=0.5, round_to=1)
    assert 0.45 <= 1 - report.after.flops / report.before.flops <= 0.6

# -- weight-only MatMulNBits (com.microsoft) ------------------------------------------------------------

def nbits(w: np.ndarray, block: int, zero_points: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """w [K, N] quantized to 4 bits in blocks of `block` rows, as MatMulNBits stores it: B [N, blocks,
    block // 2] (two values a byte, low nibble first), scales [N * blocks], zero points two a byte
    (or none: symmetric around 8); and the dequantized [K, N]."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w.T
    grouped = padded.reshape(n, blocks, block)
    if zero_points:
        lo, hi = grouped.min(axis=2), grouped.max(axis=2)
        scale = np.maximum(hi - lo, 1e-6) / 15
        zero = np.clip(np.round(-lo / scale), 0, 15)
    else:
        scale = np.maximum(np.abs(grouped).max(axis=2), 1e-6) / 7
        zero = np.full(scale.shape, 8.0)
    q = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    zp = None
    if zero_points:
        z = np.zeros((n, 2 * (-(-blocks // 2))), np.uint8)
        z[:, :blocks] = zero
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)
    real = ((q - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k].T
    return packed, scale.reshape(-1).astype(np.float32), zp, real.astype(np.float32)


def nbits_mlp(zero_points: bool, g_idx: bool = False, dead: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """x [N, 40] -> MatMulNBits fc1 (96, blocks of 16, a bias) -> Relu -> MatMulNBits fc2 (8, `g_idx`:
    act-order); fc1's first `dead` neurons all zero; and fc1's real weight."""
    rng = np.random.default_rng(3)
    inits, nodes, real1 = [], [], None
    for name, x, y, k, n in (("fc1", "x", "h", 40, 96), ("fc2", "r", "y", 96, 8)):
        w = rng.standard_normal((k, n)).astype(np.float32)
        if name == "fc1":
            w[:, :dead] = 0
        packed, scales, zp, real = nbits(w, 16, zero_points)
        real1 = real if real1 is None else real1
        inits += [numpy_helper.from_array(packed, f"{name}.B"), numpy_helper.from_array(scales, f"{name}.scales")]
        inputs = [x, f"{name}.B", f"{name}.scales", f"{name}.zp" if zp is not None else ""]
        if zp is not None:
            inits.append(numpy_helper.from_array(zp, f"{name}.zp"))
        if name == "fc1":
            inputs += ["", f"{name}.bias"]
            bias = rng.standard_normal(n).astype(np.float32)
            bias[:dead] = 0
            inits.append(numpy_helper.from_array(bias, f"{name}.bias"))
        elif g_idx:  # act-order: the block of each input feature
            inputs.append(f"{name}.g_idx")
            inits.append(numpy_helper.from_array((np.arange(k) // 16).astype(np.int32), f"{name}.g_idx"))
        nodes.append(helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", name=name, K=k, N=n,
                                      bits=4, block_size=16))
        if name == "fc1":
            nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, real1


@pytest.mark.parametrize("zero_points", [True, False], ids=["packed_zero_points", "symmetric"])
def test_matmul_nbits_prunes_output_rows_and_whole_blocks_of_the_next_layers_inputs(zero_points):
    model, _ = nbits_mlp(zero_points)
    analysis, pruned, removed = prune_matches_oracle(model, 0.34)
    group = group_of(analysis, "fc1")
    # a unit is a block of 16 of fc2's input features, or two when two blocks share a zero-point byte
    per_unit = 32 if zero_points else 16
    assert group.prunable and group.size == 96 // per_unit
    kept = 96 - per_unit * len(removed)
    fc1, fc2 = (next(n for n in pruned.graph.node if n.name == name) for name in ("fc1", "fc2"))
    attrs = {name: {a.name: helper.get_attribute_value(a) for a in node.attribute} for name, node in
             (("fc1", fc1), ("fc2", fc2))}
    assert (attrs["fc1"]["N"], attrs["fc2"]["K"]) == (kept, kept)
    assert list(initializer(pruned, fc1.input[1]).dims) == [kept, 3, 8]
    assert list(initializer(pruned, fc2.input[1]).dims) == [8, kept // 16, 8]
    assert list(initializer(pruned, fc1.input[2]).dims) == [kept * 3]
    assert list(initializer(pruned, fc2.input[2]).dims) == [8 * (kept // 16)]
    assert list(initializer(pruned, fc1.input[5]).dims) == [kept]
    if zero_points:
        assert list(initializer(pruned, fc2.input[3]).dims) == [8 * (kept // 32)]


def test_criteria_read_matmul_nbits_weights_unpacked_and_dequantized():
    model, real = nbits_mlp(zero_points=True)
    analysis = analysis_of(model)
    values = analysis.view.weight("fc1.B")  # [N, blocks, block_size], the last block padded
    assert values.shape == (96, 3, 16)
    np.testing.assert_allclose(values.reshape(96, -1)[:, :40].T, real, rtol=1e-6, atol=1e-6)


def test_matmul_nbits_with_act_order_keeps_the_input_features_and_says_why():
    model, _ = nbits_mlp(zero_points=True, g_idx=True)
    analysis = analysis_of(model)
    fc1 = group_of(analysis, "fc1")
    assert not fc1.prunable
    assert any(r.startswith("MatMulNBits 'fc2': its g_idx input reorders") for r in fc1.blocked)


def test_lossless_removes_a_dead_block_of_matmul_nbits_neurons():
    # symmetric: a zero weight is stored as 8, zero only once dequantized
    model, _ = nbits_mlp(zero_points=False, dead=16)
    pruned, _ = onnxprune.prune(model, lossless=True)
    fc1 = next(n for n in pruned.graph.node if n.name == "fc1")
    assert {a.name: helper.get_attribute_value(a) for a in fc1.attribute}["N"] == 80
