"""The pass protocol (onnxprune/passes/protocol.py): what every pass promises, and the combinators.

Every pass, called on a model, leaves that model's bytes as they were; says modified=False only
when it hands back the very model it was given; returns a model onnx.checker accepts; and
records what it did as JSON-ready data. The contract test runs each pass of onnxprune.passes
on a model where it has work to do and on one where it has none; a new pass without a case
here fails `test_every_pass_has_a_contract_case`.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper, numpy_helper

import onnxprune
import onnxprune.passes
from onnxprune.calibration import CalibrationSet
from onnxprune.ir.editor import copy_model
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.passes.cleanup import CLEANUP, DropUnusedInitializers, RemoveDeadNodes, ReshareInitializers
from onnxprune.passes.depth import DropLayers
from onnxprune.passes.lossless import BypassZeroBranches, find_dead_structure
from onnxprune.passes.protocol import NOTHING_TO_DO, FixedPoint, Guarded, Pass, PassResult, Sequence, Verdict
from onnxprune.passes.least_squares import LeastSquaresRefit
from onnxprune.passes.reconstruct import (
    BiasCompensation,
    BnRecalibration,
    OutputMatching,
    ReconstructionContext,
    ReconstructionPass,
)
from onnxprune.pipeline import build_analysis, prepare


def arr(value, name):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


# -- models with work for each pass ---------------------------------------------------------------------
def conv_net() -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 -> BN -> Relu -> conv3 (1x1) -> Relu -> pool -> Flatten."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g", "beta", "mu", "var"], ["n2"], name="bn"),
             helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    inits = [arr(0.3 * rng.standard_normal((6, 3, 3, 3)), "w1"), arr(0.1 * rng.standard_normal(6), "b1"),
             arr(0.3 * rng.standard_normal((4, 6, 3, 3)), "w2"), arr(0.1 * rng.standard_normal(4), "b2"),
             arr(np.ones(4), "g"), arr(np.zeros(4), "beta"), arr(np.zeros(4), "mu"), arr(np.ones(4), "var"),
             arr(0.5 * rng.standard_normal((4, 4, 1, 1)), "w3"), arr(0.1 * rng.standard_normal(4), "b3")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], inits)


def pruned_conv_net():
    """(dense, analysis, removed roots, pruned, reconstruction context): two of conv1's six filters go."""
    dense, _ = prepare(conv_net())
    analysis = build_analysis(dense)
    removed = {int(r) for r in analysis.group("conv1").roots[[0, 5]]}
    pruned = ApplyPlan(analysis, removed)(dense).model
    data = CalibrationSet.open({"x": np.random.default_rng(2).standard_normal((40, 3, 8, 8)).astype(np.float32)},
                               dense)
    fit, held = data.split(0.25, 0)
    ctx = ReconstructionContext(dense, analysis.keep_masks(removed), fit, held, batch_size=16)
    return dense, analysis, removed, pruned, ctx


def residual_net(zero_branch: bool) -> onnx.ModelProto:
    """x -> conv_a -> Relu -> r; s = r + conv_b(r) (all zero when `zero_branch`); y = conv_c(s)."""
    rng = np.random.default_rng(5)
    scale = 0.0 if zero_branch else 0.5
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu_a"),
             helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["r", "b"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wc", "bc"], ["y"], name="conv_c")]
    inits = [arr(rng.standard_normal((4, 3, 3, 3)), "wa"), arr(rng.standard_normal(4), "ba"),
             arr(scale * rng.standard_normal((4, 4, 3, 3)), "wb"), arr(scale * rng.standard_normal(4), "bb"),
             arr(rng.standard_normal((2, 4, 1, 1)), "wc"), arr(rng.standard_normal(2), "bc")]
    model, _ = prepare(make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 2, 6, 6])], inits))
    return model


def with_dead_code(dead: bool) -> onnx.ModelProto:
    """y = Relu(x) * k; with `dead`, also a Sigmoid nobody reads and an initializer nobody reads."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Mul", ["r", "k"], ["y"], name="mul")]
    inits = [arr(np.full(4, 2.0), "k")]
    if dead:
        nodes.insert(1, helper.make_node("Sigmoid", ["x"], ["unused"], name="sigmoid"))
        inits.append(arr(np.zeros(3), "orphan"))
    return make_model(nodes, [("x", [2, 4])], [("y", [2, 4])], inits)


def with_copies(equal: bool) -> onnx.ModelProto:
    """Two readers of a vector and of its per-reader copy `b__a2_2` (equal values when `equal`)."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="a1"),
             helper.make_node("Add", ["s", "b__a2_2"], ["y"], name="a2")]
    inits = [arr(np.ones(4), "b"), arr(np.ones(4) * (1 if equal else 2), "b__a2_2")]
    return make_model(nodes, [("x", [2, 4])], [("y", [2, 4])], inits)


def always_keep(before, after) -> Verdict:
    return Verdict(True, "the test judge keeps everything")


def _reconstruction(make, changes: bool):
    def case():
        dense, analysis, removed, pruned, ctx = pruned_conv_net()
        return make(ctx, analysis, changes), pruned, changes
    return case


def _apply_plan(changes: bool):
    def case():
        dense, _ = prepare(conv_net())
        analysis = build_analysis(dense)
        removed = {int(r) for r in analysis.group("conv1").roots[[1, 2]]} if changes else set()
        return ApplyPlan(analysis, removed), dense, changes
    return case


LAYER = SimpleNamespace(name="branch", input="r", output="s")  # what DropLayers needs of an analysis.blocks.Unit

# name -> () -> (pass, model, whether the pass has something to do on that model)
CASES = {
    "apply_plan": _apply_plan(True),
    "apply_plan, nothing removed": _apply_plan(False),
    "remove_dead_nodes": lambda: (RemoveDeadNodes(), with_dead_code(True), True),
    "remove_dead_nodes, all live": lambda: (RemoveDeadNodes(), with_dead_code(False), False),
    "drop_unused_initializers": lambda: (DropUnusedInitializers(), with_dead_code(True), True),
    "drop_unused_initializers, all read": lambda: (DropUnusedInitializers(), with_dead_code(False), False),
    "reshare_initializers": lambda: (ReshareInitializers(), with_copies(True), True),
    "reshare_initializers, copies differ": lambda: (ReshareInitializers(), with_copies(False), False),
    "bypass_zero_branches": lambda: (BypassZeroBranches(), residual_net(True), True),
    "bypass_zero_branches, none zero": lambda: (BypassZeroBranches(), residual_net(False), False),
    "drop_layers": lambda: (DropLayers([LAYER]), residual_net(False), True),
    "drop_layers, none chosen": lambda: (DropLayers([]), residual_net(False), False),
    "least_squares": _reconstruction(lambda ctx, a, c: LeastSquaresRefit(ctx, nodes=None if c else []), True),
    "least_squares, no layer": _reconstruction(lambda ctx, a, c: LeastSquaresRefit(ctx, nodes=[]), False),
    "bias_compensation": _reconstruction(lambda ctx, a, c: BiasCompensation(ctx, a), True),
    "bias_compensation, all skipped": _reconstruction(lambda ctx, a, c: BiasCompensation(ctx, a, skip={"conv2"}),
                                                      False),
    "bn_recalibration": _reconstruction(lambda ctx, a, c: BnRecalibration(ctx), True),
    "bn_recalibration, after a refit": _reconstruction(lambda ctx, a, c: BnRecalibration(ctx, skip={"conv2"}), False),
    "output_matching": _reconstruction(lambda ctx, a, c: OutputMatching(ctx), True),
    "output_matching, no layer": _reconstruction(lambda ctx, a, c: OutputMatching(ctx, nodes=[]), False),
    "sequence (cleanup)": lambda: (CLEANUP, with_dead_code(True), True),
    "sequence (cleanup), nothing": lambda: (CLEANUP, with_dead_code(False), False),
    "guarded": lambda: (Guarded(RemoveDeadNodes(), always_keep), with_dead_code(True), True),
    "fixed point": lambda: (FixedPoint(BypassZeroBranches(), 4), residual_net(True), True),
    "fixed point, nothing": lambda: (FixedPoint(BypassZeroBranches(), 4), residual_net(False), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_pass_keeps_the_contract(case):
    p, model, has_work = CASES[case]()
    before = model.SerializeToString()
    result = p(model)
    assert isinstance(result, PassResult)
    assert model.SerializeToString() == before, "the pass changed its input model"
    assert result.modified == has_work
    if result.modified:
        assert result.model is not model
    else:
        assert result.model is model and result.record.summary
    onnx.checker.check_model(result.model, full_check=True)
    record = json.loads(json.dumps(result.record.to_dict(), allow_nan=False))
    assert record["name"] == p.name and record["modified"] == result.modified and record["summary"]


def _pass_classes() -> set[type]:
    for info in pkgutil.iter_modules(onnxprune.passes.__path__):
        importlib.import_module(f"onnxprune.passes.{info.name}")
    found, todo = set(), [Pass]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("onnxprune.") and sub is not ReconstructionPass:
                found.add(sub)
    return found


def test_every_pass_has_a_contract_case():
    covered = {type(CASES[name]()[0]) for name in CASES}
    missing = {cls.__name__ for cls in _pass_classes() - covered}
    assert not missing, f"add a case to CASES for {sorted(missing)}"


# -- combinators ------------------------------------------------------------------------------------------
class Rename(Pass):
    """A toy pass: the graph gets a new name (on a copy)."""

    name = "rename"

    def __init__(self, to: str):
        self.to = to

    def run(self, model):
        if model.graph.name == self.to:
            return self.unchanged(model)
        out = copy_model(model)
        out.graph.name = self.to
        return self.changed(out, f"renamed to {self.to}")


class Countdown(Pass):
    """Changes the model while its doc_string counts down to 0 (never, with start=None)."""

    name = "countdown"

    def run(self, model):
        left = model.doc_string
        if left == "0":
            return self.unchanged(model)
        out = copy_model(model)
        out.doc_string = "forever" if left == "forever" else str(int(left) - 1)
        return self.changed(out, f"{left} -> {out.doc_string}")


def tiny(doc: str = "") -> onnx.ModelProto:
    model = with_dead_code(False)
    model.doc_string = doc
    return model


def test_guarded_undoes_a_pass_the_judge_rejects_and_records_why():
    model = tiny()
    seen = []

    def judge(before, after):
        seen.append((before, after.graph.name))
        return Verdict(False, "the held-out error grew", {"error_before": 0.1, "error_after": 0.3})

    result = Guarded(Rename("other"), judge)(model)
    assert seen == [(model, "other")]
    assert result.model is model and not result.modified and model.graph.name == "test"
    record = result.record
    assert record.name == "rename" and record.details["verdict"] == "undone"
    assert record.details["reason"] == "the held-out error grew" and record.details["error_after"] == 0.3
    assert "the held-out error grew" in record.summary
    [tried] = record.children
    assert tried.modified and tried.summary == "renamed to other"  # what was tried stays in the record


def test_guarded_keeps_what_the_judge_accepts_and_does_not_judge_a_pass_with_nothing_to_do():
    calls = []

    def judge(before, after):
        calls.append(after.graph.name)
        return Verdict(True, "fine")

    kept = Guarded(Rename("other"), judge)(tiny())
    assert kept.modified and kept.model.graph.name == "other" and kept.record.details["verdict"] == "kept"
    idle = Guarded(Rename("other"), judge)(kept.model)
    assert not idle.modified and idle.model is kept.model and idle.record.details["verdict"] == NOTHING_TO_DO
    assert calls == ["other"]


def test_fixed_point_repeats_until_nothing_changes():
    result = FixedPoint(Countdown(), max_rounds=10)(tiny("3"))
    assert result.modified and result.model.doc_string == "0"
    assert result.record.details == {"rounds": 4, "converged": True}
    assert [c.modified for c in result.record.children] == [True, True, True, False]


def test_fixed_point_stops_at_its_bound_and_says_so():
    model = tiny("forever")
    result = FixedPoint(Countdown(), max_rounds=5)(model)
    assert result.record.details == {"rounds": 5, "converged": False}
    assert "stopped after 5 round(s)" in result.record.summary
    assert result.modified and result.model is not model and model.doc_string == "forever"


def test_sequence_runs_in_order_and_records_every_child():
    result = Sequence("both", [Rename("first"), Rename("first"), Rename("second")])(tiny())
    assert result.model.graph.name == "second" and result.modified
    assert [(c.name, c.modified, c.summary) for c in result.record.children] == [
        ("rename", True, "renamed to first"), ("rename", False, NOTHING_TO_DO), ("rename", True, "renamed to second")]
    nothing = Sequence("none", [Rename("test")])(tiny())
    assert not nothing.modified and nothing.record.summary == NOTHING_TO_DO and len(nothing.record.children) == 1


def test_a_pass_that_claims_no_change_must_return_its_input():
    class Liar(Pass):
        name = "liar"

        def run(self, model):
            return self.unchanged(copy_model(model))

    with pytest.raises(AssertionError, match="liar"):
        Liar()(tiny())


# -- what the converted passes do -----------------------------------------------------------------------------
def test_lossless_elimination_bypasses_zero_branches_to_a_fixed_point_and_finds_dead_units_on_the_result():
    model = residual_net(True)
    found = find_dead_structure(model)
    assert found.branches == 1 and "add" not in {n.name for n in found.model.graph.node}
    assert found.analysis.view.model is found.model  # the analysis of the last round, not a new one
    assert found.record.details == {"rounds": 2, "converged": True}
    assert [n.name for n in model.graph.node] == ["conv_a", "relu_a", "conv_b", "add", "conv_c"]


def test_a_dropped_layer_that_was_a_graph_output_keeps_the_output_name():
    model = residual_net(False)
    unit = SimpleNamespace(name="head", input="s", output="y")
    result = DropLayers([unit])(model)
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert [n.op_type for n in result.model.graph.node][-1] == "Identity"
    assert "conv_c" not in {n.name for n in result.model.graph.node}


def test_the_prune_report_lists_every_pass_that_ran_including_those_with_nothing_to_do():
    def passes(report):
        data = json.loads(json.dumps(report.to_dict(), allow_nan=False))["passes"]
        return [(p["name"], p["modified"], [c["name"] for c in p.get("passes", [])]) for p in data]

    _, report = onnxprune.prune(conv_net(), ratio=0.5, round_to=1)
    assert passes(report) == [("apply_plan", True, []),
                              ("cleanup", False, ["reshare_initializers", "drop_unused_initializers"])]
    assert [c["summary"] for c in report.to_dict()["passes"][1]["passes"]] == [NOTHING_TO_DO] * 2

    _, report = onnxprune.prune(residual_net(True), lossless=True)
    assert passes(report) == [("bypass_zero_branches", True, ["bypass_zero_branches"] * 2),
                              ("apply_plan", False, []),
                              ("cleanup", False, ["reshare_initializers", "drop_unused_initializers"])]

    calib = {"x": np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)}
    _, report = onnxprune.prune(conv_net(), ratio=0.5, round_to=1, calib=calib)
    name, _, children = passes(report)[1]
    assert name == "reconstruction"
    assert children == ["least_squares", "bias_compensation", "bn_recalibration", "output_matching"]
