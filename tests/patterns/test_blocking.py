"""Degrading gracefully: what cannot be proven safe blocks only the groups that reach it."""
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from helpers import analysis_of, blocked_reasons, const, conv, group_of, make_model, prune_matches_oracle, weight

H, W = 4, 4
X = ("x", [1, 4, H, W])


def with_healthy_branch(blocked_nodes, blocked_inits, blocked_outputs, opset=13):
    """The given branch on x plus an independent conv1 -> relu -> conv2 branch that can prune."""
    c1, c1_w = conv("conv1", "x", "h1", 4, 6)
    c2, c2_w = conv("conv2", "h1r", "y2", 6, 3)
    nodes = [*blocked_nodes, c1, helper.make_node("Relu", ["h1"], ["h1r"], name="relu1"), c2]
    outputs = [*blocked_outputs, ("y2", [1, 3, H, W])]
    return make_model(nodes, [X], outputs, list(blocked_inits) + c1_w + c2_w, opset=opset)


def assert_healthy_branch_prunes(model, analysis):
    assert group_of(analysis, "conv1").prunable, group_of(analysis, "conv1").blocked
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    conv2_w = next(t for t in pruned.graph.initializer if t.name.startswith("conv2.w"))
    assert conv2_w.dims[1] == 6 - len(removed & set(group_of(analysis, "conv1").roots.tolist()))


# -- ops without a rule -----------------------------------------------------------

def test_depth_to_space_without_a_rule_blocks_only_the_group_reaching_it():
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    cd, cd_w = conv("conv_d", "d", "y1", 2, 3)
    model = with_healthy_branch(
        [c0, helper.make_node("DepthToSpace", ["c"], ["d"], name="d2s", blocksize=2), cd],
        c0_w + cd_w,
        [("y1", [1, 3, 2 * H, 2 * W])],
    )
    analysis = analysis_of(model)
    group = group_of(analysis, "conv0")
    assert not group.prunable
    assert any("DepthToSpace 'd2s' has no pruning rule" in r for r in group.blocked)
    assert_healthy_branch_prunes(model, analysis)


def test_unsupported_consumer_blocks_a_group_even_when_another_consumer_is_a_conv():
    # conv0 feeds a conv (fine) and DepthToSpace (not fine): the whole group is kept
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    c_ok, c_ok_w = conv("conv_ok", "c", "y0", 8, 3)
    model = with_healthy_branch(
        [c0, c_ok, helper.make_node("DepthToSpace", ["c"], ["y1"], name="d2s", blocksize=2)],
        c0_w + c_ok_w,
        [("y0", [1, 3, H, W]), ("y1", [1, 2, 2 * H, 2 * W])],
    )
    analysis = analysis_of(model)
    assert any("DepthToSpace 'd2s'" in r for r in group_of(analysis, "conv0").blocked)
    assert_healthy_branch_prunes(model, analysis)


def test_custom_domain_op_blocks_its_inputs_with_a_reason_naming_the_node():
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    c1, c1_w = conv("conv1", "x", "h1", 4, 6)
    c2, c2_w = conv("conv2", "h1", "y2", 6, 3)
    custom = helper.make_node("FancyAct", ["c"], ["y1"], name="fancy", domain="com.example")
    graph = helper.make_graph(
        [c0, custom, c1, c2], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X[1])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 8, H, W]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 3, H, W])],
        initializer=c0_w + c1_w + c2_w,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    analysis = analysis_of(model)
    group = group_of(analysis, "conv0")
    assert not group.prunable
    assert any("FancyAct 'fancy' has no pruning rule" in r for r in group.blocked)
    assert group_of(analysis, "conv1").prunable  # onnxruntime cannot run FancyAct: analysis only


def test_topk_over_the_channel_axis_blocks_with_a_reason():
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    ct, ct_w = conv("conv_t", "top", "y1", 3, 2)
    model = with_healthy_branch(
        [c0, helper.make_node("TopK", ["c", "k"], ["top", "top_idx"], name="topk", axis=1), ct],
        c0_w + ct_w + [const([3], "k")],
        [("y1", [1, 2, H, W])],
    )
    analysis = analysis_of(model)
    assert any("TopK 'topk'" in r and "axis 1" in r for r in group_of(analysis, "conv0").blocked)
    assert_healthy_branch_prunes(model, analysis)


# -- graph outputs ----------------------------------------------------------------

def test_conv_output_that_is_a_graph_output_is_blocked():
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    model = with_healthy_branch([c0], c0_w, [("c", [1, 8, H, W])])
    analysis = analysis_of(model)
    assert "reaches graph output 'c'" in group_of(analysis, "conv0").blocked
    assert "reaches graph output 'y2'" in group_of(analysis, "conv2").blocked
    assert_healthy_branch_prunes(model, analysis)


def test_intermediate_tensor_exposed_as_a_graph_output_blocks_its_group_only():
    # c is both consumed by conv_next and listed as an output (a debugging tap)
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    cn, cn_w = conv("conv_next", "c", "n", 8, 5)
    cl, cl_w = conv("conv_last", "n", "y1", 5, 3)
    model = with_healthy_branch([c0, cn, cl], c0_w + cn_w + cl_w,
                                [("c", [1, 8, H, W]), ("y1", [1, 3, H, W])])
    analysis = analysis_of(model)
    assert "reaches graph output 'c'" in group_of(analysis, "conv0").blocked
    assert group_of(analysis, "conv_next").prunable
    prune_matches_oracle(model, 0.5)


# -- nothing prunable -------------------------------------------------------------

def test_model_where_every_group_is_blocked_still_analyses():
    c0, c0_w = conv("conv0", "x", "c", 4, 8)
    model = make_model(
        [c0, helper.make_node("DepthToSpace", ["c"], ["d"], name="d2s", blocksize=2),
         helper.make_node("Conv", ["d", "single.w"], ["y"], name="single", kernel_shape=[1, 1])],
        [X], [("y", [1, 1, 2 * H, 2 * W])], c0_w + [weight(1, 2, 1, 1, name="single.w")],
    )
    analysis = analysis_of(model)
    assert analysis.groups, "groups are still reported"
    assert analysis.prunable_groups() == []
    reasons = blocked_reasons(model)
    assert any("DepthToSpace 'd2s'" in r for r in reasons)
    assert any("reaches graph output 'y'" in r for r in reasons)
    with pytest.raises(AssertionError, match="nothing was prunable"):
        prune_matches_oracle(model, 0.5)
    report = onnxprune.analyze(model).to_dict()  # the CLI's `analyze` path
    assert all(g["blocked"] for g in report["groups"])


def test_model_without_any_source_analyses_to_no_groups():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [X], [("y", X[1])])
    analysis = analysis_of(model)
    assert analysis.groups == []
    assert blocked_reasons(model) == []


def test_an_op_type_has_one_rule_and_a_second_registration_fails_loudly():
    import pytest as _pytest

    from onnxprune.analysis.rules.base import RULES, Rule, register

    assert "Conv" in RULES
    with _pytest.raises(RuntimeError, match="'Conv' already has a rule"):
        @register("Conv")
        class AnotherConvRule(Rule):
            pass


def test_a_criterion_name_is_taken_once():
    import pytest as _pytest

    from onnxprune.importance.base import Criterion, register

    with _pytest.raises(RuntimeError, match="'l1' is already registered"):
        @register
        class AnotherL1(Criterion):
            name = "l1"
