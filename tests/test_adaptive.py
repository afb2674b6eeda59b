"""Sensitivity curves and adaptive allocation: each group loses what costs the least predicted divergence
per FLOP, within the rounding and max-ratio constraints, and the plan meets its target."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_model
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.calibration.curves import Curve, removal_orders, sensitivity_curves
from onnxprune.cli import main
from onnxprune.cost import model_cost
from onnxprune.errors import UsageError
from onnxprune.options import PruneOptions
from onnxprune.importance import score_groups
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.strategy.adaptive import allocate_adaptive, allowed_kept
from onnxprune.strategy.allocate import Target, allocate, removed_flags
from onnxprune.strategy.estimate import CostEstimator

ROOT = Path(__file__).resolve().parent.parent
DIGITS, CALIB = ROOT / "models" / "digits_resnet.onnx", ROOT / "models" / "digits_calib.npz"


@pytest.fixture(scope="module")
def digits():
    working, _ = prepare(DIGITS)
    analysis = build_analysis(working)
    scores = score_groups(analysis, analysis.prunable_groups(), "l1", 0)
    curves = sensitivity_curves(working, analysis, str(CALIB), removal_orders(scores), samples=16, max_samples=64)
    estimator = CostEstimator(analysis, model_cost(working))
    return analysis, scores, curves, estimator


def test_a_curve_starts_at_zero_and_never_falls():
    curve = Curve(0, "g", "channels", 10, removed=[1, 3, 5], losses=[0.1, 0.05, 0.4])
    assert curve.loss_at(0) == 0.0
    values = [curve.loss_at(k) for k in np.linspace(0, 9, 37)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert curve.loss_at(9) > curve.loss_at(5)  # past the last point the last slope continues


def test_curves_grow_with_the_share_removed_on_a_trained_model(digits):
    _, _, curves, _ = digits
    assert len(curves.curves) == 6
    for c in curves.curves.values():
        assert c.losses[0] < c.losses[-1], c.name


def test_adaptive_meets_the_flops_target_within_rounding_and_max_ratio(digits):
    analysis, scores, curves, estimator = digits
    target = Target(None, 0.5, None, "adaptive", 0.75, 8, [], [])
    chosen = allocate_adaptive(analysis, scores, curves, target, estimator)
    flops, _ = estimator.estimate(removed_flags(analysis, chosen.keep))
    assert 0.5 <= 1 - flops / estimator.dense_flops <= 0.52
    for gid, kept in chosen.keep.items():
        g = analysis.groups[gid]
        assert len(kept) in allowed_kept(g, 8, 0.75)
        assert len(kept) == g.size or len(kept) % 8 == 0
        assert len(kept) >= g.size * 0.25


def test_adaptive_predicts_no_more_divergence_than_uniform_at_the_same_target(digits):
    analysis, scores, curves, estimator = digits
    for goal in (0.3, 0.5):
        adaptive = allocate_adaptive(analysis, scores, curves, Target(None, goal, None, "adaptive", 0.9, 8, [], []),
                                     estimator)
        uniform = allocate(analysis, scores, Target(None, goal, None, "uniform", 0.9, 8, [], []), estimator)
        predicted = sum(curves.curves[g].loss_at(analysis.groups[g].size - len(k)) for g, k in uniform.items())
        assert adaptive.predicted_loss <= predicted + 1e-9, goal


def linear_pair_with_a_redundant_unit() -> tuple:
    """x (N, 4) -> MatMul fc1 -> h (N, 3) -> MatMul fc2 -> y (N, 2), no nonlinearity between them, and the
    third hidden unit exactly the sum of the first two: removing it loses nothing a refit of fc2 cannot
    give back (fc2 reads units 0 and 1 once more each)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 2)).astype(np.float32)
    w1 = np.concatenate([w1, w1.sum(axis=1, keepdims=True)], axis=1)
    w2 = rng.normal(size=(3, 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    data = {"x": rng.normal(size=(64, 4)).astype(np.float32)}
    return model, data


@pytest.mark.parametrize("fill, redundant_costs_nothing", [("refit", True), ("mean", False)])
def test_a_curve_measures_what_the_refit_of_the_consumer_cannot_give_back(fill, redundant_costs_nothing):
    model, data = linear_pair_with_a_redundant_unit()
    working, _ = prepare(model)
    analysis = build_analysis(working)
    group = next(g for g in analysis.groups if g.size == 3)
    curves = sensitivity_curves(working, analysis, data, {group.id: np.array([2, 1, 0])}, grid=(0.34, 0.67),
                                samples=64, fill=fill)
    redundant, independent = curves.curves[group.id].losses  # unit 2 alone, then units 2 and 1
    assert (redundant < 1e-6) == redundant_costs_nothing, redundant
    assert independent > 0.01  # unit 1 is not a combination of unit 0: nothing predicts it


def test_with_calibration_data_the_default_strategy_is_adaptive_and_else_uniform():
    calibrated = PruneOptions.build(target_flops=0.5, calib=str(CALIB)).with_strategy()
    assert calibrated.target.strategy == "adaptive"
    assert PruneOptions.build(target_flops=0.5).with_strategy().target.strategy == "uniform"
    named = PruneOptions.build(target_flops=0.5, calib=str(CALIB), strategy="global").with_strategy()
    assert named.target.strategy == "global"
    for uniform_only in ({"ratio": {"heads": 0.25, "neurons": 0.3}}, {"target_flops": 0.5, "steps": 3}):
        assert PruneOptions.build(calib=str(CALIB), **uniform_only).with_strategy().target.strategy == "uniform"


def test_a_prune_with_calibration_data_and_no_strategy_compares_adaptive_with_uniform(tmp_path):
    plan = tmp_path / "plan.json"
    _, report = onnxprune.prune(DIGITS, tmp_path / "out.onnx", target_flops=0.4, calib=str(CALIB), calib_samples=32,
                                sensitivity_samples=8, least_squares=False, save_plan=plan)
    assert any(n.startswith("allocations repaired and compared") for n in report.notes)
    kept = json.loads(plan.read_text())["meta"]["strategy"]
    assert kept in ("adaptive", "uniform")
    assert ("(l1, adaptive)" if kept == "adaptive" else "(l1, adaptive: the uniform plan kept)") in report.mode


def test_adaptive_by_default_gives_way_to_uniform_where_its_curves_would_pass_the_budget(tmp_path, monkeypatch):
    import onnxprune.pipeline.stages as stages

    monkeypatch.setattr(stages, "DEFAULT_BUDGET_FLOPS", 1e9)  # digits: 6 groups x 6 passes x 64 samples x 97 MFLOPs
    options = dict(target_flops=0.4, calib=str(CALIB), calib_samples=32, least_squares=False)
    _, report = onnxprune.prune(DIGITS, tmp_path / "default.onnx", **options)
    assert "(l1, uniform)" in report.mode
    assert any(n.startswith("uniform allocation: adaptive, the default with calibration data") for n in report.notes)
    _, named = onnxprune.prune(DIGITS, tmp_path / "named.onnx", strategy="adaptive", sensitivity_samples=8, **options)
    assert any(n.startswith("adaptive allocation:") for n in named.notes)  # named: the curves run anyway


def test_adaptive_strategy_needs_calibration_data():
    with pytest.raises(UsageError, match="--calib"):
        onnxprune.prune(DIGITS, target_flops=0.5, strategy="adaptive")


def test_adaptive_allocation_is_repaired_beside_uniform_and_the_closer_one_is_kept(tmp_path):
    """The curves predict each group alone; both allocations are repaired and measured on held-out samples."""
    plan = tmp_path / "plan.json"
    _, report = onnxprune.prune(DIGITS, tmp_path / "out.onnx", target_flops=0.4, strategy="adaptive",
                                calib=str(CALIB), calib_samples=32, sensitivity_samples=8, least_squares=False,
                                save_plan=plan)
    assert any(n.startswith("adaptive allocation:") for n in report.notes)
    note = next(n for n in report.notes if n.startswith("allocations repaired and compared"))
    measured = {name: dict(re.findall(r"(output error|top-1 agreement) ([0-9.e+-]+)", part))
                for name, part in re.findall(r"(adaptive|uniform) ([^;]+)", note)}
    assert measured.keys() == {"adaptive", "uniform"}
    error = {name: float(m["output error"]) for name, m in measured.items()}
    agreement = {name: float(m["top-1 agreement"]) for name, m in measured.items()}
    kept = json.loads(plan.read_text())["meta"]["strategy"]
    adaptive_no_worse = error["adaptive"] <= error["uniform"] and agreement["adaptive"] >= agreement["uniform"]
    assert kept == ("adaptive" if adaptive_no_worse else "uniform") and note.endswith(f"kept {kept}")
    repair = next(p for p in report.passes if p["name"] == "reconstruction")
    assert repair["details"]["fidelity_after"] == pytest.approx(error[kept], rel=1e-3)
    assert [p["name"] for p in report.passes].count("reconstruction") == 1  # the loser's passes are gone
    assert report.after.flops <= 0.6 * report.before.flops


def test_the_sensitivity_command_prints_one_row_per_group_and_writes_json(tmp_path, capsys):
    out = tmp_path / "curves.json"
    assert main(["sensitivity", str(DIGITS), "--calib", str(CALIB), "--calib-samples", "32",
                 "--sensitivity-samples", "8", "--sensitivity-grid", "0.25,0.5", "--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loss r=0.25" in text and "/stage3/conv1/Conv" in text
    data = json.loads(out.read_text())
    assert data["grid"] == [0.25, 0.5] and len(data["curves"]) == 6
    assert all(len(c["points"]) == 2 and c["flops_per_unit"] > 0 for c in data["curves"])


def test_the_sensitivity_command_without_calibration_data_exits_2(capsys):
    assert main(["sensitivity", str(DIGITS)]) == 2
    assert "--calib" in capsys.readouterr().err


# -- progressive pruning ---------------------------------------------------------------------------------
TEST = ROOT / "models" / "digits_test.npz"


def test_progressive_steps_reach_the_target_through_the_scheduled_shares(tmp_path):
    _, report = onnxprune.prune(DIGITS, tmp_path / "p.onnx", target_flops=0.5, steps=3, schedule="cubic",
                                least_squares=False)
    removed = [s["flops_removed"] for s in report.steps]
    assert len(removed) == 3 and removed == sorted(removed)
    assert removed[0] >= 0.5 * (1 - (2 / 3) ** 3) - 0.05  # cubic: most of the target in the first step
    assert 0.5 <= 1 - report.after.flops / report.before.flops <= 0.56
    assert report.mode.startswith("progressive, 3 of 3 steps (cubic)")
    assert (tmp_path / "p.onnx").exists()


def test_progressive_pruning_stops_before_the_budget_and_keeps_the_last_step_within_it(tmp_path):
    out = tmp_path / "p.onnx"
    _, report = onnxprune.prune(DIGITS, out, target_flops=0.9, steps=4, validate_data=str(TEST), max_accuracy_drop=0.005,
                                measure_latency=False, max_ratio=0.95, round_to=1, calib=str(CALIB), calib_samples=64)
    kept = [s for s in report.steps if s["passed"]]
    assert report.steps[-1]["passed"] is False and kept
    assert report.quality.drop <= 0.005
    assert report.after.flops == kept[-1]["flops"]
    assert out.exists()


def test_a_progressive_run_cannot_save_one_plan(tmp_path):
    with pytest.raises(UsageError, match="--save-plan"):
        onnxprune.prune(DIGITS, tmp_path / "p.onnx", ratio=0.3, steps=2, save_plan=tmp_path / "plan.json")



def test_an_allocation_better_on_one_held_out_measure_and_worse_on_another_does_not_replace_uniform():
    from onnxprune.pipeline.stages import _no_worse

    # MiniLM measured: adaptive had the smaller per-token error and the larger error of the pooled embedding
    adaptive = {"fidelity_after": 0.041, "pooled_after": 0.138, "agreement_after": None}
    uniform = {"fidelity_after": 0.070, "pooled_after": 0.092, "agreement_after": None}
    assert not _no_worse(adaptive, uniform)
    assert _no_worse({"fidelity_after": 0.05, "pooled_after": None, "agreement_after": 0.9},
                     {"fidelity_after": 0.06, "pooled_after": None, "agreement_after": 0.9})
    assert not _no_worse({"fidelity_after": 0.05, "pooled_after": None, "agreement_after": 0.8},
                         {"fidelity_after": 0.06, "pooled_after": None, "agreement_after": 0.9})
