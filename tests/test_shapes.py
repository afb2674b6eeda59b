"""Shape inference: onnx first, onnxruntime's symbolic inference as fallback."""
from onnx import helper

from onnxprune.ir.shapes import infer_shapes
from helpers import const, make_model, weight


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



def position_embeddings(positions: int):
    """BERT's embeddings: word table + position table sliced to the sequence length computed at run
    time, Slice(ids, 0, Unsqueeze(Gather(Shape(input_ids), 1))) (weights zero: only shapes matter here)."""
    import numpy as np
    from onnx import numpy_helper

    def table(rows, name, dtype=np.float32):
        return numpy_helper.from_array(np.zeros((rows, 8), dtype) if dtype == np.float32
                                       else np.arange(rows, dtype=dtype)[None], name)

    nodes = [helper.make_node("Shape", ["input_ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
             helper.make_node("Unsqueeze", ["length", "zero"], ["end"]),
             helper.make_node("Slice", ["ids", "zero", "end", "one_axis"], ["positions"]),
             helper.make_node("Gather", ["pos_table", "positions"], ["pos"]),
             helper.make_node("Gather", ["word_table", "input_ids"], ["words"]),
             helper.make_node("Add", ["words", "pos"], ["y"])]
    inits = [const(1, "one"), const([0], "zero"), const([1], "one_axis"), table(positions, "ids", np.int64),
             table(positions, "pos_table"), table(10, "word_table")]
    return make_model(nodes, [("input_ids", ["batch", "sequence"])], [("y", ["batch", "sequence", 8])], inits)


def _no_symbolic(monkeypatch):
    import onnxprune.ir.shapes as shapes_module

    calls = []
    real = shapes_module._symbolic
    monkeypatch.setattr(shapes_module, "_symbolic", lambda sk: calls.append(1) or real(sk))
    shapes_module.forget_shapes()
    return calls


def test_run_time_slice_bounds_are_folded_without_the_symbolic_fallback(monkeypatch):
    model = position_embeddings(512)
    model.graph.input[0].type.tensor_type.elem_type = 7  # int64 ids
    calls = _no_symbolic(monkeypatch)
    assert infer_shapes(model)["y"][1] == ("batch", "sequence", 8)
    assert infer_shapes(model, {"input_ids": [2, 16]})["y"][1] == (2, 16, 8)
    assert calls == []


def test_a_size_clamped_by_a_short_table_is_left_to_the_symbolic_fallback(monkeypatch):
    # at made-up sizes past the table's 16 rows the slice stops at 16: that dim does not follow the name
    model = position_embeddings(16)
    model.graph.input[0].type.tensor_type.elem_type = 7
    calls = _no_symbolic(monkeypatch)
    assert infer_shapes(model)["y"][1] == ("batch", "sequence", 8)
    assert calls == [1]
