"""The graph editor (onnxprune/ir/editor.py): one def-use index, one naming authority, copy-on-write.

Fresh names never collide with a tensor of the graph or of a subgraph; writing a constant that
other nodes (or a subgraph) read leaves theirs intact; the index follows every edit.
"""
from __future__ import annotations

import numpy as np
import onnx
from helpers import make_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir.editor import GraphEditor


def arr(value, name, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def shared_weight_model() -> onnx.ModelProto:
    """Two Muls read one constant `w`; a third node reads its own `k`."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"], name="m1"),
             helper.make_node("Mul", ["a", "w"], ["b"], name="m2"),
             helper.make_node("Add", ["b", "k"], ["y"], name="add")]
    return make_model(nodes, [("x", [4])], [("y", [4])], [arr(np.ones(4), "w"), arr(np.zeros(4), "k")])


def if_model() -> onnx.ModelProto:
    """y = If(cond) then: x * w (reads `w` from outside; defines `t` and `then_out`), else: x."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"], name="then_mul"),
                              helper.make_node("Identity", ["t"], ["then_out"], name="then_id")], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("Mul", ["x", "w"], ["direct"], name="direct_mul"),
             helper.make_node("If", ["cond"], ["y"], name="switch", then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "direct"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
                              initializer=[arr(np.full(4, 3.0), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fresh_names_never_collide_with_the_graph_or_its_subgraphs():
    edit = GraphEditor(if_model())
    taken = {"x", "w", "direct", "y", "z", "cond", "t", "then_out", "else_out"}
    names = [edit.fresh_name(base) for base in ["t", "t", "then_out", "w", "direct", "new", "new"]]
    assert len(set(names)) == len(names)
    assert not set(names) & taken  # `t` and `then_out` live only inside the then-branch
    assert names[-2:] == ["new", "new_1"]


def test_writing_a_shared_constant_copies_it_for_that_reader_only():
    model = shared_weight_model()
    edit = GraphEditor(model)
    m1 = edit.node("m1")
    name = edit.write_const(m1, 1, np.full(4, 5.0, np.float32))
    assert name == "w__m1" and list(m1.input) == ["x", "w__m1"]
    assert list(edit.node("m2").input) == ["a", "w"]
    np.testing.assert_array_equal(values(model)["w"], np.ones(4))  # the other reader's constant is intact
    np.testing.assert_array_equal(values(model)["w__m1"], np.full(4, 5.0))
    assert edit.reader_count("w") == 1 and edit.reader_count("w__m1") == 1
    # now m2 is the only reader of `w`: written in place, no new tensor
    assert edit.write_const(edit.node("m2"), 1, np.full(4, 7.0, np.float32)) == "w"
    np.testing.assert_array_equal(values(model)["w"], np.full(4, 7.0))
    onnx.checker.check_model(model, full_check=True)


def test_a_constant_a_subgraph_reads_is_shared_and_copied_not_changed():
    model = if_model()
    edit = GraphEditor(model)
    assert [(n.name, i) for n, i in edit.readers("w")] == [("direct_mul", 1), ("switch", -1)]
    name = edit.write_const(edit.node("direct_mul"), 1, np.zeros(4, np.float32))
    assert name != "w"
    np.testing.assert_array_equal(values(model)["w"], np.full(4, 3.0))  # what the then-branch reads


def test_attaching_a_constant_always_makes_a_new_one_and_the_index_follows():
    model = shared_weight_model()
    edit = GraphEditor(model)
    add = edit.node("add")
    new = edit.attach_const(add, 1, np.ones(4, np.float32), "k__add")
    assert new == "k__add" and edit.reader_count("k") == 0 and edit.readers(new) == [(add, 1)]
    assert "k" in values(model)  # left for dead-code removal: attaching never deletes


def test_a_private_copy_of_a_node_serves_one_reader_and_the_others_keep_the_original():
    shape = helper.make_node("Concat", ["a", "b"], ["shape"], name="concat", axis=0)
    nodes = [shape, helper.make_node("Reshape", ["x", "shape"], ["y1"], name="r1"),
             helper.make_node("Reshape", ["x", "shape"], ["y2"], name="r2")]
    inits = [arr([2], "a", np.int64), arr([3], "b", np.int64)]
    model = make_model(nodes, [("x", [6])], [("y1", [2, 3]), ("y2", [2, 3])], inits)
    edit = GraphEditor(model)
    r2 = edit.node("r2")
    copy = edit.own_copy(edit.node("concat"), r2, 1)
    assert edit.own_copy(edit.node("concat"), r2, 1) is copy  # one copy per (node, reader)
    edit.attach_const(copy, 0, np.array([3], np.int64), "a__copy")
    edit.commit()
    assert [n.name for n in model.graph.node] == ["concat", copy.name, "r1", "r2"]
    assert list(edit.node("r1").input) == ["x", "shape"] and list(edit.node("concat").input) == ["a", "b"]
    assert edit.node("r2").input[1] == copy.output[0] and edit.producer(copy.output[0]).name == copy.name
    onnx.checker.check_model(model, full_check=True)


def test_reroute_follows_reads_into_subgraphs_and_keeps_a_graph_output_name():
    model = if_model()
    edit = GraphEditor(model)
    edit.reroute({"w": "x", "z": "y"})
    then = next(a.g for a in edit.node("switch").attribute if a.name == "then_branch")
    assert list(then.node[0].input) == ["x", "x"] and list(edit.node("direct_mul").input) == ["x", "x"]
    assert edit.reader_count("w") == 0 and edit.reader_count("x") >= 3
    assert edit.producer("z").op_type == "Identity" and list(edit.producer("z").input) == ["y"]
    assert list(edit.node("add").output) == ["z__dropped"]
