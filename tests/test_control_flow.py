"""Models with control flow (If, Loop, Scan): subgraphs come out intact, what they read keeps its
channels, and everything else is still pruned."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from helpers import analysis_of, conv, group_of, prune_matches_oracle, run, weight
from onnxprune.cli import main
from onnxprune.passes.cleanup import RemoveDeadNodes
from onnxprune.pipeline import prepare
from onnxprune.testing import masked_reference

H = W = 8
C = 16  # ratio 0.5 with the default --round-to 8 removes 8 channels


def value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def finish(nodes, inputs, outputs, inits, name) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def silero_like(dead_channels=(), zero_branch=False, branch_reads_conv3_bias=False) -> onnx.ModelProto:
    """conv0 -> relu -> conv1 -> relu -> r1 -> If(flag) -> conv3 -> relu -> conv4 -> y.

    Like silero-vad choosing its 16 kHz or 8 kHz path: both branches read r1 from the outer scope.
    The then-branch holds its weight in a Constant node (and value_info); the else-branch reads
    'else.w', a main-graph tensor that only constant folding turns into an initializer.
    dead_channels: conv0 channels with zero filter and bias. zero_branch: r1 = relu1 + an all-zero
    conv branch (lossless mode bypasses it). branch_reads_conv3_bias: the then-branch reads 'conv3.b'.
    """
    c0, c0_w = conv("conv0", "x", "c0", 4, C)
    c1, c1_w = conv("conv1", "r0", "c1", C, C)
    c3, c3_w = conv("conv3", "branch", "c3", C, C)
    c4, c4_w = conv("conv4", "r3", "y", C, 3)
    for t in c0_w:
        values = numpy_helper.to_array(t).copy()
        values[list(dead_channels)] = 0
        t.CopyFrom(numpy_helper.from_array(values, t.name))
    then_bias = "conv3.b" if branch_reads_conv3_bias else "then.b"
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["then_w"], name="then_const", value=weight(C, C, 3, 3, name="then_w")),
         helper.make_node("Conv", ["r1", "then_w", then_bias], ["then_c"], name="then_conv",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["then_c"], ["then_y"], name="then_relu")],
        "sr16k", [], [value("then_y", [1, C, H, W])], value_info=[value("then_c", [1, C, H, W])])
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["r1", "else.w"], ["else_c"], name="else_conv", kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["else_c"], ["else_y"], name="else_sigmoid")],
        "sr8k", [], [value("else_y", [1, C, H, W])])
    relu1_out = "r1_main" if zero_branch else "r1"
    nodes = [c0, helper.make_node("Relu", ["c0"], ["r0"], name="relu0"), c1,
             helper.make_node("Relu", ["c1"], [relu1_out], name="relu1"),
             helper.make_node("Identity", ["else.w.raw"], ["else.w"], name="share_else_w"),
             helper.make_node("If", ["flag"], ["branch"], name="sr_switch", then_branch=then_graph,
                              else_branch=else_graph),
             c3, helper.make_node("Relu", ["c3"], ["r3"], name="relu3"), c4]
    inits = c0_w + c1_w + c3_w + c4_w + [weight(C, name="then.b"), weight(C, C, 1, 1, name="else.w.raw")]
    if zero_branch:
        nodes[4:4] = [helper.make_node("Conv", ["r1_main", "zero.w", "zero.b"], ["z"], name="zero_conv",
                                       kernel_shape=[1, 1]),
                      helper.make_node("Add", [relu1_out, "z"], ["r1"], name="residual")]
        inits += [numpy_helper.from_array(np.zeros((C, C, 1, 1), np.float32), "zero.w"),
                  numpy_helper.from_array(np.zeros(C, np.float32), "zero.b")]
    return finish(nodes, [value("x", [1, 4, H, W]), value("flag", [], TensorProto.BOOL)],
                  [value("y", [1, 3, H, W])], inits, "silero_like")


def loop_model() -> onnx.ModelProto:
    """convA -> conv0 -> Loop (3 x: state = relu(conv(state, 'loop.w') + 'loop.b')) -> convB -> convC.

    The body reads 'loop.w' and 'loop.b', main-graph initializers, by name."""
    ca, ca_w = conv("convA", "x", "a", 4, C)
    c0, c0_w = conv("conv0", "ar", "r0", C, C)
    cb, cb_w = conv("convB", "looped", "b", C, C)
    cc, cc_w = conv("convC", "br", "y", C, 3)
    body = helper.make_graph(
        [helper.make_node("Conv", ["state", "loop.w", "loop.b"], ["step"], name="body_conv",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["step"], ["state_out"], name="body_relu"),
         helper.make_node("Identity", ["cond"], ["cond_out"], name="body_cond")],
        "refine_body", [value("iter", [], TensorProto.INT64), value("cond", [], TensorProto.BOOL),
                        value("state", [1, C, H, W])],
        [value("cond_out", [], TensorProto.BOOL), value("state_out", [1, C, H, W])])
    nodes = [ca, helper.make_node("Relu", ["a"], ["ar"], name="reluA"), c0,
             helper.make_node("Loop", ["trips", "keep_going", "r0"], ["looped"], name="refine", body=body),
             cb, helper.make_node("Relu", ["b"], ["br"], name="reluB"), cc]
    inits = ca_w + c0_w + cb_w + cc_w + [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                         numpy_helper.from_array(np.array(True), "keep_going"),
                                         weight(C, C, 3, 3, name="loop.w", scale=0.1), weight(C, name="loop.b")]
    return finish(nodes, [value("x", [1, 4, H, W])], [value("y", [1, 3, H, W])], inits, "loop")


def scan_model() -> onnx.ModelProto:
    """convA -> conv0 -> Scan along the width (running sum of column * 'scan.scale') -> convB -> convC."""
    ca, ca_w = conv("convA", "x", "a", 4, C)
    c0, c0_w = conv("conv0", "ar", "r0", C, C)
    cb, cb_w = conv("convB", "scanned", "b", C, C)
    cc, cc_w = conv("convC", "br", "y", C, 3)
    body = helper.make_graph(
        [helper.make_node("Mul", ["column", "scan.scale"], ["scaled"], name="body_scale"),
         helper.make_node("Add", ["acc", "scaled"], ["acc_out"], name="body_sum"),
         helper.make_node("Relu", ["acc_out"], ["column_out"], name="body_relu")],
        "cumsum_body", [value("acc", [1, C, H]), value("column", [1, C, H])],
        [value("acc_out", [1, C, H]), value("column_out", [1, C, H])])
    nodes = [ca, helper.make_node("Relu", ["a"], ["ar"], name="reluA"), c0,
             helper.make_node("Scan", ["acc0", "r0"], ["acc_final", "scanned"], name="cumsum", body=body,
                              num_scan_inputs=1, scan_input_axes=[3], scan_output_axes=[3]),
             cb, helper.make_node("Relu", ["b"], ["br"], name="reluB"), cc]
    inits = ca_w + c0_w + cb_w + cc_w + [numpy_helper.from_array(np.zeros((1, C, H), np.float32), "acc0"),
                                         weight(C, 1, name="scan.scale")]
    return finish(nodes, [value("x", [1, 4, H, W])], [value("y", [1, 3, H, W])], inits, "scan")


# -- helpers ---------------------------------------------------------------------------------------

def control_flow_nodes(model):
    return {n.name: n for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")}


def assert_subgraphs_intact(dense, pruned):
    """Same control-flow nodes with byte-identical attributes: node order, Constant nodes, value_info."""
    before, after = control_flow_nodes(dense), control_flow_nodes(pruned)
    assert before.keys() == after.keys()
    for name, node in before.items():
        assert list(after[name].attribute) == list(node.attribute), f"subgraph of {name} changed"


def feeds(model, flag=None, seed=0):
    out = {"x": np.random.default_rng(seed).standard_normal((1, 4, H, W)).astype(np.float32)}
    if flag is not None:
        out["flag"] = np.array(flag)
    return out


def assert_matches_oracle_on_every_branch(model, flags=(None,)):
    """Random removal in every prunable group; the pruned model equals the masked dense one (each branch)."""
    analysis, pruned, removed = prune_matches_oracle(model, 0.5)
    working, _ = prepare(model)
    reference = masked_reference(working, analysis, removed)
    for flag in flags:
        for got, want in zip(run(pruned, feeds(model, flag)), run(reference, feeds(model, flag))):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    return analysis, pruned


def initializer_dims(model):
    return {t.name: list(t.dims) for t in model.graph.initializer}


# -- If ----------------------------------------------------------------------------------------------

def test_groups_read_inside_an_if_branch_are_blocked_naming_the_if():
    analysis = analysis_of(silero_like())
    assert group_of(analysis, "conv0").prunable and group_of(analysis, "conv3").prunable
    reasons = group_of(analysis, "conv1").blocked
    assert any("'r1' is read inside the subgraph of If 'sr_switch': channels cannot change there" in r
               for r in reasons), reasons


def test_if_model_prunes_outside_the_branches_and_matches_the_oracle_on_both_branches():
    model = silero_like()
    _, pruned = assert_matches_oracle_on_every_branch(model, flags=(True, False))
    assert_subgraphs_intact(model, pruned)
    assert initializer_dims(pruned)["else.w"] == [C, C, 1, 1]  # read only inside the else-branch


def test_prune_ratio_validates_an_if_model_and_leaves_its_branches_intact():
    model = silero_like()
    pruned, report = onnxprune.prune(model, ratio=0.5)
    assert {c.name: (c.before, c.after) for c in report.changes} == {"conv0": (C, C // 2), "conv3": (C, C // 2)}
    assert "onnxruntime run" in report.checks
    onnx.checker.check_model(pruned, full_check=True)
    assert_subgraphs_intact(model, pruned)
    dims = initializer_dims(pruned)
    assert dims["conv1.w"] == [C, C // 2, 3, 3] and dims["conv4.w"] == [3, C // 2, 3, 3]
    for flag in (True, False):  # both branches still run on the unchanged r1
        assert run(pruned, feeds(model, flag))[0].shape == (1, 3, H, W)


def test_a_weight_shared_with_a_branch_keeps_the_channels_of_the_conv_after_the_if():
    # the then-branch reads conv3's bias by name: slicing it for conv3 would break the branch
    model = silero_like(branch_reads_conv3_bias=True)
    analysis = analysis_of(model)
    assert any("'conv3.b' is read inside the subgraph of If 'sr_switch'" in r
               for r in group_of(analysis, "conv3").blocked)
    _, pruned = assert_matches_oracle_on_every_branch(model, flags=(True, False))
    assert initializer_dims(pruned)["conv3.b"] == [C]
    assert_subgraphs_intact(model, pruned)


def test_dead_node_removal_keeps_what_only_a_branch_reads_and_sorts_by_outer_reads():
    model = silero_like()
    nodes = list(model.graph.node)
    if_node = next(n for n in nodes if n.op_type == "If")
    nodes.remove(if_node)
    nodes.insert(0, if_node)  # before relu1 and the Identity whose outputs its branches read
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    cleaned = RemoveDeadNodes()(model).model
    order = [n.name for n in cleaned.graph.node]
    assert order.index("relu1") < order.index("sr_switch") and order.index("share_else_w") < order.index("sr_switch")
    assert {"else.w.raw", "then.b"} <= set(initializer_dims(cleaned))
    onnx.checker.check_model(cleaned, full_check=True)


# -- Loop and Scan -------------------------------------------------------------------------------------

def test_loop_state_keeps_its_channels_and_the_body_still_reads_its_outer_initializers():
    model = loop_model()
    analysis = analysis_of(model)
    assert group_of(analysis, "convA").prunable and group_of(analysis, "convB").prunable
    assert any("'r0' is read inside the subgraph of Loop 'refine'" in r for r in group_of(analysis, "conv0").blocked)
    _, pruned = assert_matches_oracle_on_every_branch(model)
    assert_subgraphs_intact(model, pruned)
    pruned, report = onnxprune.prune(model, ratio=0.5)
    assert {c.name for c in report.changes} == {"convA", "convB"}
    assert initializer_dims(pruned)["loop.w"] == [C, C, 3, 3] and "loop.b" in initializer_dims(pruned)
    assert_subgraphs_intact(model, pruned)


def test_scan_input_keeps_its_channels_and_the_rest_prunes():
    model = scan_model()
    analysis = analysis_of(model)
    assert group_of(analysis, "convA").prunable and group_of(analysis, "convB").prunable
    assert any("'r0' is read inside the subgraph of Scan 'cumsum'" in r for r in group_of(analysis, "conv0").blocked)
    _, pruned = assert_matches_oracle_on_every_branch(model)
    assert_subgraphs_intact(model, pruned)
    pruned, report = onnxprune.prune(model, ratio=0.5)
    assert {c.name for c in report.changes} == {"convA", "convB"}
    assert initializer_dims(pruned)["scan.scale"] == [C, 1]


# -- lossless ----------------------------------------------------------------------------------------------

def test_lossless_removes_dead_channels_and_a_zero_branch_the_if_reads_through():
    model = silero_like(dead_channels=[2, 5, 11], zero_branch=True)
    pruned, report = onnxprune.prune(model, lossless=True)
    assert {c.name: (c.before, c.after) for c in report.changes} == {"conv0": (C, C - 3)}
    ops = [n.op_type for n in pruned.graph.node]
    assert "Add" not in ops and ops.count("Conv") == 4  # the zero branch is gone
    branch = control_flow_nodes(pruned)["sr_switch"]
    reads = {i for a in branch.attribute for n in a.g.node for i in n.input}
    assert "r1_main" in reads and "r1" not in reads  # the branches read the bypass's survivor
    for flag in (True, False):
        for got, want in zip(run(pruned, feeds(model, flag)), run(model, feeds(model, flag))):
            # only summation order differs; activations reach ~500 here, so the tolerance scales with them
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


# -- command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--ratio", "0.5"], ["--lossless"]])
def test_cli_prunes_an_if_model_end_to_end(tmp_path, extra):
    model = silero_like()
    src, dst = tmp_path / "vad.onnx", tmp_path / "vad_pruned.onnx"
    onnx.save(model, str(src))
    assert main(["prune", str(src), str(dst), *extra, "--no-progress"]) == 0
    pruned = onnx.load(str(dst))
    onnx.checker.check_model(pruned, full_check=True)
    assert_subgraphs_intact(model, pruned)
    expected_conv0 = C // 2 if "--ratio" in extra else C
    assert initializer_dims(pruned)["conv0.w"][0] == expected_conv0
    for flag in (True, False):
        assert run(pruned, feeds(model, flag))[0].shape == (1, 3, H, W)


# -- calibration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_calibrated_repair_refits_around_a_loop_or_scan_and_leaves_the_body_alone(build):
    model = build()
    calib = {"x": np.random.default_rng(0).standard_normal((48, 4, H, W)).astype(np.float32)}
    pruned, report = onnxprune.prune(model, ratio=0.5, calib=calib)
    assert "reconstructed" in report.mode and {c.name for c in report.changes} == {"convA", "convB"}
    assert_subgraphs_intact(model, pruned)
    body_weights = {"loop.w", "loop.b"} if build is loop_model else {"scan.scale"}
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for name in body_weights:  # the least-squares refit changed other weights, not these
        np.testing.assert_array_equal(after[name], dense[name])
