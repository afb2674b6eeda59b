"""Shape inference: onnx first, onnxruntime's symbolic inference as fallback."""
from onnx import helper

from onnxprune.ir.shapes import infer_shapes
from helpers import make_model, weight


def model_with_contrib_op():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Gelu", ["c"], ["g"], domain="com.microsoft", name="ms_gelu"),
        helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "contrib", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])],
                              [weight(8, 3, 1, 1, name="w"), weight(4, 8, 1, 1, name="w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_contrib_op_shapes_come_from_the_symbolic_fallback():
    shapes = infer_shapes(model_with_contrib_op())
    assert shapes["g"][1] == (1, 8, 8, 8)


def test_stale_value_info_is_replaced():
    model = model_with_contrib_op()
    model.graph.value_info.append(helper.make_tensor_value_info("c", 1, [1, 99, 8, 8]))
    infer_shapes(model)
    c = [vi for vi in model.graph.value_info if vi.name == "c"]
    assert len(c) == 1 and c[0].type.tensor_type.shape.dim[1].dim_value == 8


def test_symbolic_batch_stays_symbolic():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [("x", ["batch", 3, 8, 8])], [("y", ["batch", 8, 8, 8])], [weight(8, 3, 1, 1, name="w")])
    assert infer_shapes(model)["y"][1] == ("batch", 8, 8, 8)


def test_missing_sympy_is_said_not_swallowed(monkeypatch, caplog):
    # onnxruntime >= 1.32 stopped installing sympy; without it heads and run-time shapes go unseen
    import builtins

    import onnxprune.ir.shapes as shapes_module

    real_import = builtins.__import__

    def no_symbolic(name, *args, **kwargs):
        if name == "onnxruntime.tools.symbolic_shape_infer":
            raise ImportError("No module named 'sympy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_symbolic)
    monkeypatch.setattr(shapes_module, "_warned_no_symbolic", False)
    with caplog.at_level("WARNING", logger="onnxprune.ir.shapes"):
        infer_shapes(model_with_contrib_op())
    message = caplog.text
    assert "sympy" in message and "pip install sympy" in message and "heads" in message


def test_sympy_is_a_declared_dependency():
    from importlib.metadata import requires

    assert any(r.split(">")[0].split("=")[0].strip() == "sympy" for r in requires("onnxprune"))
