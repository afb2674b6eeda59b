"""Progressive pruning: the target reached in `steps` parts, each on the model the last one left.

    load (once) -> for each step: decide -> rewrite -> repair -> validate -> measure -> gate
                -> the last model within budget: validate -> latency -> save

Each step re-analyses and re-scores the current model (a criterion sees what
the earlier steps left, and the repair of each step starts from a model
already repaired), removes its share of the target — `linear` (equal parts)
or `cubic` (large parts first, small near the target: 1 - (1 - t)^3 of the
target after a fraction t of the steps) — and is measured on the validation
data against the *original* dense model. With `max_accuracy_drop` the run
stops at the first step past the budget and keeps the one before it; the
report says how far it got, step by step.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import onnx

from onnxprune.cost import model_cost
from onnxprune.errors import AccuracyDropError, UsageError
from onnxprune.ir.prepare import prepare
from onnxprune.options import PruneOptions, with_keywords
from onnxprune.pipeline.runner import Stage, run_stages
from onnxprune.pipeline.stages import DECIDE, LOAD, REWRITE, build_report, evaluate_pruned, gate, \
    measure_latency, save, validate
from onnxprune.pipeline.state import PruneState
from onnxprune.report import PruneReport
from onnxprune.runtime.measures import POINT_METRICS, metric_label

STEP_CHECKS = [
    Stage("validate", validate),
    Stage("evaluate pruned", evaluate_pruned, applies=lambda s: s.dense_ref is not None),
    Stage("report", build_report, timing="save"),
    Stage("gate", gate, timing="save"),
]
FINAL = [
    Stage("validate", validate),
    Stage("evaluate pruned", evaluate_pruned, applies=lambda s: s.dense_ref is not None),
    Stage("latency", measure_latency, applies=lambda s: s.measure_latency),
    Stage("report", build_report, timing="save"),
    Stage("save", save),
]


def scheduled(fraction_of_steps: float, schedule: str) -> float:
    """The share of the final target reached after `fraction_of_steps` of the steps."""
    if schedule == "cubic":
        return 1.0 - (1.0 - fraction_of_steps) ** 3
    return fraction_of_steps


def prune_progressively(state: PruneState) -> tuple[onnx.ModelProto, PruneReport]:
    """Run `state` (loaded by nothing yet; options with steps > 1) step by step; see the module docstring."""
    o = state.options
    if o.save_plan is not None:
        raise UsageError("a progressive run (--steps) removes units of a different model at each step, so one plan "
                         "cannot replay it: drop --save-plan, or prune in one step")
    run_stages(state, LOAD)
    steps, last_good, failure, changes = [], None, None, {}
    current = state.dense
    for i in range(1, o.target.steps + 1):
        clock = time.perf_counter()
        options = _step_options(o, i, state, current)
        if options is None:  # an earlier step already removed this much
            continue
        step = _successor(state, current, options)
        try:
            run_stages(step, DECIDE + REWRITE + STEP_CHECKS)
        except AccuracyDropError as exc:
            failure = exc
            steps.append(_record(i, step, time.perf_counter() - clock, passed=False))
            break
        steps.append(_record(i, step, time.perf_counter() - clock, passed=True))
        last_good, current = step, step.working
        for c in step.changes:  # each group from its original width to its last
            changes[c.name] = dataclasses.replace(c, before=changes[c.name].before) if c.name in changes else c
    if last_good is None:
        if failure is not None:
            failure.report.notes += _step_notes(steps, o.target.steps)
            raise failure
        raise UsageError("no step removed anything: the target is reached before the first step")
    last_good.changes = list(changes.values())
    return _finish(state, last_good, steps)


def _finish(state: PruneState, last: PruneState, steps: list[dict]) -> tuple[onnx.ModelProto, PruneReport]:
    """The last model within budget, validated again on its way to disk, timed and saved."""
    o = state.options
    last.output, last.measure_latency = state.output, state.measure_latency
    last.notes = _step_notes(steps, o.target.steps) + last.notes
    last.mode = f"progressive, {len([s for s in steps if s['passed']])} of {o.target.steps} steps " \
                f"({o.target.schedule}): {o.target.describe(o.scoring.criterion)}"
    try:
        run_stages(last, FINAL)
    finally:
        if last.staged is not None:
            last.staged.discard()
    last.report.steps = steps
    return last.working, last.report


def _successor(state: PruneState, model: onnx.ModelProto, options: PruneOptions) -> PruneState:
    """A state over `model` (the last step's result) that keeps what the first load made: the data, the
    input sizes, the dense model's outputs on the validation data and its statistics for the report."""
    step = PruneState(options, state.model, None)
    step.dense, _ = prepare(model)
    step.source = state.source  # what the output is written like: the user's file
    step.working = step.dense
    step.input_shapes = state.input_shapes
    step.dense_cost = model_cost(step.dense, state.input_shapes.shapes)
    step.before, step.expected_shapes = state.before, state.expected_shapes
    step.validate_data, step.calib_data, step.metric = state.validate_data, state.calib_data, state.metric
    step.dense_ref = state.dense_ref
    return step


def _step_options(o: PruneOptions, i: int, state: PruneState, current: onnx.ModelProto) -> PruneOptions | None:
    """Step i's target, as a fraction of the *current* model, so that the original has lost the scheduled
    share of the final target after it (None: an earlier step already removed that much)."""
    t = o.target
    share = scheduled(i / t.steps, t.schedule)
    quiet = {"steps": 1, "save_plan": None, "measure_latency": False}
    if t.target_flops is not None or t.target_params is not None:
        flops = t.target_flops is not None
        goal = (t.target_flops if flops else t.target_params) * share
        original = state.dense_cost.flops if flops else state.dense_cost.params
        cost = model_cost(current, state.input_shapes.shapes)
        step = 1.0 - (1.0 - goal) * original / (cost.flops if flops else cost.params)
        return None if step <= 1e-6 else with_keywords(o, {**quiet, "target_flops" if flops else "target_params": step})
    before = scheduled((i - 1) / t.steps, t.schedule)

    def of_what_is_left(r: float) -> float:  # each group keeps (1 - r·share) of its original units in all
        return 1.0 - (1.0 - r * share) / (1.0 - r * before)

    ratio = {k: of_what_is_left(v) for k, v in t.ratio.items()} if isinstance(t.ratio, Mapping) \
        else of_what_is_left(t.ratio)
    return with_keywords(o, {**quiet, "ratio": ratio})


def _record(i: int, step: PruneState, seconds: float, *, passed: bool) -> dict:
    q = step.quality
    after = step.after
    return {"step": i, "flops": after.flops if after else None, "params": after.params if after else None,
            "flops_removed": None if after is None else round(1 - after.flops / step.before.flops, 6),
            "metric": None if q is None else q.metric, "value": None if q is None else q.after,
            "passed": passed, "seconds": round(seconds, 3)}


def _step_notes(steps: list[dict], total: int) -> list[str]:
    lines = []
    for s in steps:
        shown = f"{s['value']:.2%}" if s["metric"] in POINT_METRICS else f"{s['value']:.4g}" if s["value"] is not None \
            else ""
        value = f", {metric_label(s['metric'])} {shown}" if shown else ""
        verdict = "" if s["passed"] else " — past the budget: stopped, the step before is kept"
        lines.append(f"step {s['step']}/{total}: {s['flops_removed']:.1%} of FLOPs removed{value} "
                     f"({s['seconds']:.1f} s){verdict}")
    return lines
