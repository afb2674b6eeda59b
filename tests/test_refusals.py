"""Refusals name their cause: unsupported op families, the top blocking reasons, and usage errors."""
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import PlanError, UsageError
from helpers import conv, make_model, weight


def fused_int8_model() -> onnx.ModelProto:
    """x -> MatMul (16) -> DynamicQuantizeLinear -> MatMulIntegerToFloat (8): onnxruntime's offline fusion of
    MatMulInteger and its scale, which has no pruning rule (nor shape inference)."""
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
        helper.make_node("DynamicQuantizeLinear", ["h"], ["h_q", "h_s", "h_z"], name="quantize"),
        helper.make_node("MatMulIntegerToFloat", ["h_q", "w1", "h_s", "s", "h_z", "z"], ["y"], name="fc1",
                         domain="com.microsoft"),
    ]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
                              [weight(4, 16, name="w0"), numpy_helper.from_array(np.ones((16, 8), np.int8), "w1"),
                               scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_a_fused_int8_model_is_refused_naming_its_ops_and_what_to_do():
    with pytest.raises(PlanError) as caught:
        onnxprune.prune(fused_int8_model(), ratio=0.5)
    message = str(caught.value)
    assert re.search(r"quantized operator ops \(MatMulIntegerToFloat ×1\)", message)
    assert "prune the float model, then quantize it (QDQ or QOperator format" in message
    assert "DynamicQuantizeLinear" not in message.split("\n")[0]  # dynamic quantization prunes: not named as a cause


def lstm_tagger() -> onnx.ModelProto:
    hidden, features = 8, 4
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["seq", "h"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["h", "axes0"], ["h2"], name="squeeze"),
             helper.make_node("Gemm", ["h2", "fc"], ["y"], transB=1, name="fc")]
    inits = [weight(1, 4 * hidden, features, name="W"), weight(1, 4 * hidden, hidden, name="R"),
             weight(3, hidden, name="fc"), numpy_helper.from_array(np.array([0], np.int64), "axes0")]
    return make_model(nodes, [("x", [5, 1, features])], [("y", [1, 3])], inits)


def int8_lstm_tagger() -> onnx.ModelProto:
    """lstm_tagger after onnxruntime's dynamic quantization: int8 W and R, transposed, with scales."""
    hidden, features = 8, 4
    quantized = [numpy_helper.from_array(np.ones((1, features, 4 * hidden), np.int8), "W_q"),
                 numpy_helper.from_array(np.ones((1, hidden, 4 * hidden), np.int8), "R_q"),
                 numpy_helper.from_array(np.array([0.01], np.float32), "s"),
                 numpy_helper.from_array(np.array([0], np.int8), "z")]
    nodes = [helper.make_node("DynamicQuantizeLSTM", ["x", "W_q", "R_q", "", "", "", "", "", "s", "z", "s", "z"],
                              ["seq", "h"], hidden_size=hidden, name="lstm", domain="com.microsoft"),
             helper.make_node("Squeeze", ["h", "axes0"], ["h2"], name="squeeze"),
             helper.make_node("Gemm", ["h2", "fc"], ["y"], transB=1, name="fc")]
    inits = quantized + [weight(3, hidden, name="fc"), numpy_helper.from_array(np.array([0], np.int64), "axes0")]
    graph = helper.make_graph(nodes, "int8_lstm", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                 [5, 1, features])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_an_int8_lstm_prunes_like_the_float_one():
    pruned, report = onnxprune.prune(int8_lstm_tagger(), ratio=0.5, round_to=1)
    lstm = next(n for n in pruned.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert helper.get_attribute_value(next(a for a in lstm.attribute if a.name == "hidden_size")) == 4


def test_a_float_lstm_is_not_refused_as_recurrent():
    pruned, report = onnxprune.prune(lstm_tagger(), ratio=0.5, round_to=1)
    lstm = next(n for n in pruned.graph.node if n.op_type == "LSTM")
    assert helper.get_attribute_value(next(a for a in lstm.attribute if a.name == "hidden_size")) == 4
    assert not any("recurrent" in note for note in report.notes)


def two_convs() -> onnx.ModelProto:
    (c1, w1), (c2, w2) = conv("c1", "x", "a", 3, 16), conv("c2", "r", "y", 16, 4)
    nodes = [c1, helper.make_node("Relu", ["a"], ["r"], name="act"), c2]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], w1 + w2)


def test_a_ratio_of_zero_is_a_usage_error_not_a_copy():
    with pytest.raises(UsageError, match="removes nothing"):
        onnxprune.prune(two_convs(), ratio=0.0)


def test_a_filter_matching_nothing_is_a_usage_error_listing_the_groups():
    with pytest.raises(UsageError, match=r"--include 'nope\*' leaves none of the 1 prunable groups \(c1"):
        onnxprune.prune(two_convs(), ratio=0.5, include=["nope*"])


def test_a_ratio_that_rounds_to_nothing_says_so_instead_of_writing_a_copy():
    with pytest.raises(PlanError, match="nothing to remove in 1 eligible group.*round-to"):
        onnxprune.prune(two_convs(), ratio=0.1, round_to=8)


def test_cli_exit_codes_for_usage_errors_and_refusals(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(two_convs(), src)
    assert main(["prune", str(src), str(out), "--ratio", "0"]) == 2
    assert main(["prune", str(src), str(out), "--ratio", "0.5", "--exclude", "Conv"]) == 2
    onnx.save(fused_int8_model(), src)
    assert main(["prune", str(src), str(out), "--ratio", "0.5"]) == 5
    assert "quantized operator ops" in capsys.readouterr().err
    assert not out.exists()


def test_analyze_prints_the_causes(tmp_path, capsys):
    src = tmp_path / "lstm.onnx"
    onnx.save(fused_int8_model(), src)
    assert main(["analyze", str(src)]) == 0
    assert "blocked: quantized operator ops (MatMulIntegerToFloat ×1)" in capsys.readouterr().out
    for model in (lstm_tagger(), int8_lstm_tagger()):
        onnx.save(model, src)
        assert main(["analyze", str(src)]) == 0
        assert "quantized" not in capsys.readouterr().out


def test_lossless_with_nothing_dead_says_so():
    _, report = onnxprune.prune(two_convs(), lossless=True)
    assert report.notes[0].startswith("nothing exactly dead was found")
