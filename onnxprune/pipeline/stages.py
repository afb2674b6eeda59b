"""The prune stages, in the order `prune` runs them; each reads and writes the PruneState.

    load -> evaluate dense -> drop layers -> analyze -> calibrate -> score -> allocate
         -> rewrite -> reconstruct -> clean up -> validate -> evaluate pruned -> latency -> gate -> save

LOAD runs once per model; DECIDE and FINISH run per prune (a sweep forks the
loaded state and runs them once per ratio).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import numpy as np

from onnxprune.analysis import Analysis, analyze_graph
from onnxprune.analysis.diagnose import explain
from onnxprune.calibration.ablation import DEFAULT_BUDGET_FLOPS
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.curves import removal_orders, sensitivity_curves
from onnxprune.cost import model_cost
from onnxprune.errors import InputSizesRejected, PlanError, UsageError
from onnxprune.importance import criterion, score_groups
from onnxprune.importance.data_aware import criterion_statistics
from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.model_io import check_no_growth, model_byte_size
from onnxprune.ir.prepare import prepare
from onnxprune.ir.shapes import infer_shapes, output_shapes
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.passes.cleanup import CLEANUP
from onnxprune.passes.depth import DropLayers
from onnxprune.passes.lossless import find_dead_structure
from onnxprune.passes.reconstruction import reconstruct
from onnxprune.pipeline.runner import Stage
from onnxprune.pipeline.state import PruneState
from onnxprune.report import AttentionChange, GroupChange, ModelStats, PruneReport
from onnxprune.runtime.cache import CacheChange
from onnxprune.runtime.data import open_data
from onnxprune.runtime.gate import AccuracyDropError, check_gate_options, compare_latency, compare_quality, \
    pruned_outputs, reference_pass
from onnxprune.runtime.inputs import dense_input_shapes, recheck_input_shapes
from onnxprune.runtime.metrics import load_metric
from onnxprune.runtime.output import save_verified, stage_if_on_disk
from onnxprune.runtime.validate import run_model, validate_model
from onnxprune.strategy.adaptive import allocate_adaptive
from onnxprune.strategy.allocate import Target, allocate, eligible_groups
from onnxprune.strategy.depth import choose_drops
from onnxprune.strategy.estimate import CostEstimator
from onnxprune.strategy.plan import Plan


def build_analysis(model, prune_hidden: bool = False, prune_cache: bool = False) -> Analysis:
    shapes = infer_shapes(model)
    return analyze_graph(GraphView(model, shapes), hidden_width=prune_hidden, prune_cache=prune_cache)


# ---- load ----

def check_options(state: PruneState) -> None:
    """Everything the options alone can refuse, before any model is read."""
    o = state.options
    o.check()
    if o.target.strategy == "adaptive" and o.calibration.calib is None and o.target.width:
        raise UsageError("--strategy adaptive measures each group's sensitivity on calibration data: give "
                         "--calib DATA (unlabelled samples the model reads), or use --strategy uniform or global")
    state.measure_latency = check_gate_options(o.gate.validate_data, o.gate.max_accuracy_drop, o.gate.metric,
                                               o.runtime.measure_latency, o.runtime.latency_runs,
                                               o.runtime.latency_warmup, o.runtime.threads, o.runtime.provider)
    state.metric = load_metric(o.gate.metric) if isinstance(o.gate.metric, str) else o.gate.metric


def load(state: PruneState) -> None:
    o = state.options
    state.dense, state.source = prepare(state.model, state.output)
    state.working = state.dense
    if state.input_shapes is None:  # else: sizes a first attempt found the dense model runs at
        state.input_shapes = dense_input_shapes(state.dense, _shapes(o), o.runtime.seed,
                                                probe=state.lossless or state.probe_sizes)
    state.dense_cost = model_cost(state.dense, state.input_shapes.shapes)
    state.before = ModelStats.from_cost(state.dense_cost, state.source.file_size)
    state.expected_shapes = output_shapes(state.dense, state.input_shapes.shapes)
    state.validate_data = _open(state, o.gate.validate_data)
    state.calib_data = _open(state, o.calibration.calib)
    if state.calib_data is not None and o.calibration.mask_input is not None:
        state.calib_data = CalibrationSet.open(state.calib_data, state.dense, mask_input=o.calibration.mask_input)


def read_plan(state: PruneState) -> None:
    plan = state.options.target.plan
    state.given_plan = plan if plan is None or isinstance(plan, Plan) else Plan.load(plan)


def _shapes(options) -> dict | None:
    shapes = options.runtime.input_shapes
    return None if shapes is None else dict(shapes)


def _open(state: PruneState, data):
    """A path is opened with the data options (tokenizer, preprocessing); datasets and arrays pass."""
    if isinstance(data, (str, os.PathLike)):
        return open_data(data, **state.options.data.reading())
    return data


def evaluate_dense(state: PruneState) -> None:
    """Before any pruning work: data that does not fit the model fails fast."""
    o = state.options
    state.dense_ref = reference_pass(state.dense, state.validate_data, batch_size=o.data.batch_size,
                                     provider=o.runtime.provider, progress=o.runtime.progress, metric=state.metric,
                                     batch_axis=o.data.batch_axis, class_axis=o.gate.class_axis)


LOAD = [
    Stage("check options", check_options, timing="load"),
    Stage("load", load),
    Stage("read plan", read_plan, timing="load"),
    Stage("evaluate dense", evaluate_dense, applies=lambda s: s.validate_data is not None),
]


# ---- decide ----

def _drops_layers(state: PruneState) -> bool:
    return state.options.depth.drop_layers is not None or bool(state.given_plan and state.given_plan.drop)


def drop_layers(state: PruneState) -> None:
    o = state.options
    _, state.depth = choose_drops(
        state.working, o.depth.drop_layers, o.depth.drop_unit, state.given_plan, calib=state.calib_data,
        calib_samples=o.calibration.calib_samples, input_shapes=state.input_shapes.shapes, seed=o.runtime.seed,
        batch_size=o.data.batch_size)
    dropped = DropLayers(state.depth.units)(state.working)
    if state.calib_data is not None:  # the repair restores the outputs from before the drop (passes never edit it)
        state.reference = state.working
    state.working = dropped.model
    state.passes.append(dropped.record)
    state.dense = None  # the repair reads the model before the drop as `reference`: not held twice


def analyze(state: PruneState) -> None:
    plan = state.given_plan
    hidden = state.options.target.prune_hidden or bool(plan and plan.meta.get("prune_hidden"))
    state.analysis = build_analysis(state.working, hidden, _prunes_cache(state))
    state.groups_total = len(state.analysis.groups)
    state.groups_prunable = len(state.analysis.prunable_groups())


def _prunes_cache(state: PruneState) -> bool:
    """Heads may go from a key-value cache: asked for, or the replayed plan was made so."""
    return state.options.target.prune_cache or bool(state.given_plan and state.given_plan.meta.get("prune_cache"))


def _cache_meta(state: PruneState) -> dict:
    """What a saved plan records so that a replay analyses the model the same way."""
    return {"prune_cache": True} if _prunes_cache(state) else {}


def _scores_needed(state: PruneState) -> bool:
    return state.width and state.given_plan is None


def calibrate(state: PruneState) -> None:
    o = state.options
    state.statistics = criterion_statistics(o.scoring.criterion, state.working, state.analysis, state.calib_data,
                                            max_samples=o.calibration.calib_samples, seed=o.runtime.seed,
                                            ablation_samples=o.calibration.ablation_samples)


def score(state: PruneState) -> None:
    state.scores = score_groups(state.analysis, state.analysis.prunable_groups(), state.options.scoring.criterion,
                                state.options.runtime.seed, stats=state.statistics)


def _adaptive(state: PruneState) -> bool:
    return state.options.target.strategy == "adaptive"


def curves_affordable(state: PruneState) -> None:
    """Adaptive by default only where its curves fit the ablation FLOP budget: each group's curve runs
    len(grid) + 1 passes of the curve samples, bounded here by passes through the whole model. Past it
    (BERT-base: 24 groups, 22 GFLOPs a sample, about 7x the budget) the run is uniform, and says so."""
    o, groups = state.options, len(state.analysis.prunable_groups())
    cost = groups * (len(o.scoring.sensitivity_grid) + 1) * o.scoring.sensitivity_samples * state.dense_cost.flops
    if cost <= DEFAULT_BUDGET_FLOPS:
        return
    state.options = replace(o, target=replace(o.target, strategy="uniform"))
    state.notes.append(f"uniform allocation: adaptive, the default with calibration data, would measure "
                       f"sensitivity curves of {groups} groups for up to {cost / 1e12:.3g} TFLOPs, over the budget "
                       f"of {DEFAULT_BUDGET_FLOPS / 1e12:.3g} TFLOPs; name --strategy adaptive to run them anyway "
                       "(with fewer samples per curve)")


def measure_curves(state: PruneState) -> None:
    """Sensitivity curves of the eligible groups, their units removed in the criterion's order."""
    o, analysis = state.options, state.analysis
    t = o.target
    groups = eligible_groups(analysis, list(t.include), list(t.exclude))
    state.curves = sensitivity_curves(state.working, analysis, state.calib_data,
                                      removal_orders({g.id: state.scores[g.id] for g in groups}),
                                      grid=o.scoring.sensitivity_grid, samples=o.scoring.sensitivity_samples,
                                      max_samples=o.calibration.calib_samples, seed=o.runtime.seed,
                                      progress=o.runtime.progress)


def allocate_units(state: PruneState) -> None:
    """Scores and a target -> the units each group keeps; refuses a plan that removes nothing."""
    o, analysis = state.options, state.analysis
    t = o.target
    target = Target(t.ratio, t.target_flops, t.target_params, t.strategy, t.max_ratio, t.round_to,
                    list(t.include), list(t.exclude))
    estimator = None if t.ratio is not None else CostEstimator(analysis, state.dense_cost)
    state.mode = t.describe(o.scoring.criterion)
    if _adaptive(state):
        chosen = allocate_adaptive(analysis, state.scores, state.curves, target, estimator)
        state.notes.append(chosen.note("FLOPs" if t.target_flops is not None else "parameters"
                                       if t.target_params is not None else "units"))
        state.notes += state.curves.notes
        state.candidates = {"adaptive": chosen.keep}
        if _repairs_with_held_out(state):  # the curves predict each group alone: check the sum after the repair
            state.candidates["uniform"] = allocate(analysis, state.scores, replace(target, strategy="uniform"),
                                                   estimator)
        keep_units(state, chosen.keep, "adaptive")
    else:
        keep_units(state, allocate(analysis, state.scores, target, estimator), t.strategy)
    state.notes += list(getattr(state.statistics, "notes", None) or [])


def keep_units(state: PruneState, keep: dict[int, np.ndarray], strategy: str) -> None:
    """The plan of an allocation (group id -> kept unit indices); refuses one that removes nothing."""
    o, analysis, t = state.options, state.analysis, state.options.target
    state.keep, state.removed = keep, set()
    for gid, kept in keep.items():
        flags = np.ones(analysis.groups[gid].size, dtype=bool)
        flags[kept] = False
        state.removed.update(int(r) for r in analysis.groups[gid].roots[flags])
    if not state.removed:  # never hand back an unchanged copy as if it were pruned
        eligible = len(keep)
        hint = (f" after rounding kept counts up to multiples of {t.round_to} (--round-to): raise the ratio or "
                "lower --round-to" if eligible else "")
        raise PlanError(f"{state.mode}: nothing to remove in {eligible} eligible group(s){hint}." + explain(analysis))
    meta = {"criterion": o.scoring.criterion, "strategy": strategy,
            "ratio": dict(t.ratio) if isinstance(t.ratio, dict) else t.ratio, "target_flops": t.target_flops,
            "target_params": t.target_params, "round_to": t.round_to,
            "prune_hidden": t.prune_hidden or bool(state.given_plan and state.given_plan.meta.get("prune_hidden")),
            **_cache_meta(state)}
    state.plan = Plan.from_keep(analysis, keep, meta)


def replay_plan(state: PruneState) -> None:
    state.plan = state.given_plan
    state.removed = state.plan.removed_roots(state.analysis)
    state.mode = "plan replay"


def eliminate_dead(state: PruneState) -> None:
    """Lossless: remove zero residual branches (repeatedly, each exposing more), then dead units."""
    found = find_dead_structure(state.working, _prunes_cache(state))
    analysis, branches = found.analysis, found.branches
    state.working, state.analysis = found.model, analysis
    state.passes.append(found.record)
    state.groups_total, state.groups_prunable = len(analysis.groups), len(analysis.prunable_groups())
    state.removed = found.dead_units
    keep = {}
    for g in analysis.groups:
        flags = np.array([int(r) not in state.removed for r in g.roots.tolist()])
        if not flags.all():
            keep[g.id] = np.flatnonzero(flags)
    state.plan = Plan.from_keep(analysis, keep, {"mode": "lossless", **_cache_meta(state)})
    state.mode = "lossless elimination"
    note = f"removed {branches} all-zero residual branch(es) and {len(state.removed)} dead unit(s)"
    if not branches and not state.removed:
        note = ("nothing exactly dead was found: the output computes the same as the input"
                + explain(analysis).replace("\nWhy:\n  - ", "; only prunable groups were searched. ")
                .replace("\n  - ", "; "))
    state.notes.append(note)


def _depth_only(state: PruneState) -> bool:
    return state.depth is not None and not state.width and state.given_plan is None


def depth_only(state: PruneState) -> None:
    state.plan, state.removed, state.mode = Plan(meta={"mode": "drop layers"}), set(), ""


SCORE = [  # skipped where a forked state already holds their results
    Stage("analyze", analyze, applies=lambda s: not s.options.target.lossless and s.analysis is None),
    Stage("calibrate", calibrate, applies=lambda s: _scores_needed(s) and s.scores is None
          and s.calib_data is not None and criterion(s.options.scoring.criterion).needs_data),
    Stage("score", score, applies=lambda s: _scores_needed(s) and s.scores is None),
]

DECIDE = [
    Stage("drop layers", drop_layers, applies=_drops_layers),
    *SCORE,
    Stage("sensitivity budget", curves_affordable, timing="sensitivity",
          applies=lambda s: _scores_needed(s) and s.adaptive_by_default and _adaptive(s) and s.curves is None),
    Stage("sensitivity", measure_curves, applies=lambda s: _scores_needed(s) and _adaptive(s) and s.curves is None),
    Stage("allocate", allocate_units, applies=_scores_needed),
    Stage("replay plan", replay_plan, applies=lambda s: s.given_plan is not None, timing="analyze"),
    Stage("eliminate dead structure", eliminate_dead, applies=lambda s: s.options.target.lossless,
          timing="rewrite"),
    Stage("depth only", depth_only, applies=_depth_only, timing="rewrite"),
]


# ---- rewrite and repair ----

def rewrite(state: PruneState) -> None:
    analysis = state.analysis
    state.changes = [GroupChange(g.name, g.sources[0].op_type, g.size, g.size - gone) for g in analysis.groups
                     if (gone := sum(1 for r in g.roots.tolist() if int(r) in state.removed))]
    if state.removed or not _depth_only(state):
        applied = ApplyPlan(analysis, state.removed)(state.working)
        state.working = applied.model
        state.passes.append(applied.record)
    state.cache = CacheChange.of(analysis, state.removed)
    state.attention = AttentionChange.of_groups(analysis.groups, state.removed)


def _zeroes_cache(state: PruneState) -> bool:
    """Lossless, with a cache that lost heads, validated on a past that holds values."""
    return state.lossless and state.cache is not None and state.cache.holds_values(state.input_shapes.feeds)


def cache_reference(state: PruneState) -> None:
    """The lossless reference for a cache that lost heads: the dense model on a cache it could have
    written, the removed heads' entries zero (a dead KV group caches zero values; random ones there
    would change the dense outputs, not the pruned model's)."""
    feeds = state.cache.zeroed(state.input_shapes.feeds)
    state.cache.reference = (feeds, run_model(state.dense, feeds, "dense model"))


def _repairs(state: PruneState) -> bool:
    """With calibration data, after removing units or layers (never after lossless elimination: nothing
    changed)."""
    return (state.calib_data is not None and not state.options.target.lossless
            and (bool(state.removed) or state.reference is not None))


def repair(state: PruneState) -> None:
    """The reconstruction passes, restoring the outputs of the model before any drop (else the dense)."""
    o = state.options
    dense = state.reference if state.reference is not None else state.dense
    state.working, recon = reconstruct(dense, state.working, state.analysis, state.removed, state.calib_data,
                                        max_samples=o.calibration.calib_samples,
                                        least_squares=o.reconstruction.least_squares,
                                        bias_correction=o.reconstruction.bias_correction,
                                        bn_recalibration=o.reconstruction.bn_recalibration, seed=o.runtime.seed,
                                        class_axis=o.gate.class_axis if isinstance(o.gate.class_axis, int) else None)
    state.notes += recon.summary().splitlines()
    state.passes.append(recon.record)
    if not _depth_only(state):
        state.mode += ", reconstructed"


def clean_up(state: PruneState) -> None:
    """Shared vectors that kept the same units are shared again; a model whose distinct parameters grew
    (a shared weight sliced per reader) is refused before anything is written."""
    cleaned = CLEANUP(state.working)
    working = state.working = cleaned.model
    state.passes.append(cleaned.record)
    check_no_growth(working, state.dense_cost.param_bytes)
    if state.source.value_info:  # shapes of intermediate tensors, for a model that listed them
        infer_shapes(working)
    else:  # analysis filled them in; written out, they would make a small model's file grow
        del working.graph.value_info[:]
    if state.depth is not None:
        _add_depth(state)


def _add_depth(state: PruneState) -> None:
    state.plan.drop = list(state.depth.dropped)
    width = state.width or (state.given_plan is not None and bool(state.given_plan.groups))
    state.mode = state.depth.mode() + (f"; then {state.mode}" if width and state.mode else "")
    state.notes = state.depth.notes() + state.notes


def _repairs_with_held_out(state: PruneState) -> bool:
    o = state.options.reconstruction
    return state.calib_data is not None and (o.least_squares or o.bias_correction or o.bn_recalibration)


def _candidates(state: PruneState) -> bool:
    return len(state.candidates) > 1


def rewrite_candidates(state: PruneState) -> None:
    """Rewrite and repair every candidate allocation (adaptive, then uniform of the same target) and keep the
    first that is no worse than every other on each held-out measure of the repaired outputs against the
    dense model's (`HELD_OUT`), else the last (uniform). Sensitivity curves measure each group alone, so
    their sum can misjudge a whole plan; and one measure can rank two plans the other way from another
    (MiniLM: the adaptive plan had the smaller per-token error and the larger error of the pooled
    embedding, and retrieved worse), so adaptive is kept only where no measure says it is worse."""
    trials = {}
    for name, keep in state.candidates.items():
        trial = replace(state, notes=list(state.notes), passes=list(state.passes))
        keep_units(trial, keep, name)
        trial.mode = state.options.target.describe(state.options.scoring.criterion, kept=name)
        rewrite(trial)
        repair(trial)
        trials[name] = (trial, {k: trial.passes[-1].details.get(k) for k in HELD_OUT})
    names = list(trials)
    name = next((n for n in names if all(_no_worse(trials[n][1], trials[o][1]) for o in names if o != n)), names[-1])
    trial = trials[name][0]
    for f in ("keep", "removed", "plan", "changes", "working", "cache", "attention", "notes", "passes", "mode"):
        setattr(state, f, getattr(trial, f))
    measured = "; ".join(f"{n} " + ", ".join(f"{HELD_OUT[k]} {v:.4g}" for k, v in m.items() if v is not None)
                         for n, (_, m) in trials.items())
    state.notes.append(f"allocations repaired and compared on the held-out calibration samples: {measured}; "
                       f"kept {name}")


# held-out measures of a repaired model (the reconstruction record's details) -> how the notes name them;
# agreement is better higher, the errors lower
HELD_OUT = {"fidelity_after": "output error", "pooled_after": "pooled output error",
            "agreement_after": "top-1 agreement"}


def _no_worse(a: dict, b: dict) -> bool:
    for key, value in a.items():
        other = b.get(key)
        if value is None or other is None:
            continue
        if (value < other) if key == "agreement_after" else (value > other):
            return False
    return True


REWRITE = [
    Stage("rewrite and repair the candidates", rewrite_candidates, applies=_candidates, timing="rewrite"),
    Stage("rewrite", rewrite, applies=lambda s: not _candidates(s)),
    Stage("cache reference", cache_reference, applies=_zeroes_cache, timing="validate"),
    Stage("reconstruct", repair, applies=lambda s: _repairs(s) and not _candidates(s), timing="rewrite"),
    Stage("clean up", clean_up, timing="rewrite",
          releases=("analysis", "dense", "reference", "statistics", "scores", "curves")),
]


# ---- validate, measure, gate, save ----

def validate(state: PruneState) -> None:
    """Checker, strict shape inference and an onnxruntime run (from the staged file for a large model)."""
    state.staged = stage_if_on_disk(state.working, state.output, state.source)
    shapes, cache = _pruned_shapes(state), state.cache
    feeds, reference = _lossless_reference(state)
    names = [o.name for o in state.working.graph.output]
    expected = state.expected_shapes if cache is None else cache.output_shapes(names, state.expected_shapes)
    state.validation = validate_model(state.working, shapes, reference_outputs=reference, feeds=feeds,
                                      expected_shapes=expected, seed=state.options.runtime.seed,
                                      run_from=state.staged.path if state.staged is not None else None)
    if cache is not None:  # the expected shapes were the dense model's with the caches' kept heads
        checks = state.validation.checks
        checks[:] = ["output shapes as expected (the caches at their kept heads)" if c == "output shapes unchanged"
                     else c for c in checks]
    size = len(state.validation.serialized or b"") or model_byte_size(state.working)
    state.after = ModelStats.from_cost(model_cost(state.working, shapes), size)


@contextmanager
def sizes_checked_on_failure(state: PruneState) -> Iterator[None]:
    """Stages run at input sizes that were planned, not run on the dense model: when one fails (the
    pruned model's validation run, a cost of zero at a size the model cannot take, a layer drop's
    random inputs), the sizes are checked first (`check_input_sizes`), so that the failure reported
    is the pruning's, or prune starts again at sizes the dense model runs at."""
    try:
        yield
    except (UsageError, AccuracyDropError, InputSizesRejected):  # not about the sizes
        raise
    except Exception:
        if state.input_shapes is not None:
            check_input_sizes(state)
        raise


def check_input_sizes(state: PruneState) -> None:
    """Input sizes only planned (not run) are run on the dense model (the caller's model loaded again):
    if it fails there, raise InputSizesRejected with the sizes it runs at."""
    planned = state.input_shapes
    if planned.checked:
        return
    dense, _ = prepare(state.model)
    o = state.options
    found = recheck_input_shapes(dense, planned, _shapes(o), o.runtime.seed)
    planned.checked = True
    if found is not None:
        raise InputSizesRejected(
            f"the dense model does not run at the input sizes assumed for it ({planned.sizes()}), but does at "
            f"{found.sizes()}: give those with --input-shape", found)


def _pruned_shapes(state: PruneState) -> dict[str, list[int]]:
    """The input shapes the pruned model runs at: the dense model's, with a pruned cache's kept heads."""
    shapes = state.input_shapes.shapes
    return shapes if state.cache is None else state.cache.input_shapes(shapes)


def _lossless_reference(state: PruneState) -> tuple[dict | None, list | None]:
    """(feeds, outputs) lossless validation runs the pruned model on and expects back; (None, None) otherwise
    (feeds None: random ones, from the seed the dense model's outputs were computed with)."""
    shapes, cache = state.input_shapes, state.cache
    if not state.lossless:
        return None, None
    if cache is None:
        return None, shapes.outputs
    feeds, outputs = cache.reference or (shapes.feeds, shapes.outputs)
    return cache.kept_feeds(feeds), cache.kept_outputs([o.name for o in state.working.graph.output], outputs)


def _runnable(state: PruneState):
    staged = str(state.staged.path) if state.staged is not None else None
    return state.validation.serialized or staged or state.working


def evaluate_pruned(state: PruneState) -> None:
    reference, adapt = state.dense_ref, None
    if state.cache is not None:  # a smaller cache: fed and compared at the dense cache's kept heads
        reference, adapt = state.cache.kept_reference(reference), state.cache.kept_feeds
    outputs = pruned_outputs(reference, _runnable(state), progress=state.options.runtime.progress, adapt=adapt)
    state.quality = compare_quality(reference, outputs, state.options.gate.max_accuracy_drop)


def measure_latency(state: PruneState) -> None:
    r = state.options.runtime
    on_disk = str(state.staged.path) if state.staged is not None else state.working
    state.latency = compare_latency(state.model, on_disk, provider=r.provider, threads=r.threads,
                                    runs=r.latency_runs, warmup=r.latency_warmup,
                                    input_shapes=state.input_shapes.shapes, progress=r.progress, seed=r.seed,
                                    pruned_shapes=_pruned_shapes(state) if state.cache is not None else None)


def build_report(state: PruneState) -> None:
    notes = state.notes + [n for n in [state.input_shapes.note()] if n]
    result = state.validation
    state.report = PruneReport(
        input=str(state.source.path) if state.source.path else "<ModelProto>",
        output=str(state.output) if state.output is not None else None,
        mode=state.mode, before=state.before, after=state.after, groups_total=state.groups_total,
        groups_prunable=state.groups_prunable, changes=state.changes, checks=result.checks,
        max_abs_diff=result.max_abs_diff, notes=notes, timings=state.clock.timings, quality=state.quality, latency=state.latency,
        depth=state.depth.to_dict() if state.depth is not None else None,
        passes=[r.to_dict() for r in state.passes], attention=state.attention,
        cache=state.cache.heads() if state.cache is not None else None)


def gate(state: PruneState) -> None:
    if state.quality is not None and state.quality.passed is False:
        state.validation.serialized = None
        raise AccuracyDropError(f"accuracy gate: {state.quality.verdict()} Nothing was written; "
                                + state.gate_advice, state.report)


def save(state: PruneState) -> None:
    if state.plan_path is not None:
        state.plan.save(state.plan_path)
    if state.staged is not None:  # validation already ran the staged file from disk
        state.after.file_size = state.staged.commit()
    elif state.output is not None:
        state.after.file_size = save_verified(state.working, state.output, state.validation, source=state.source)
        state.validation.checks.append("read back from disk")
    state.validation.serialized = None


FINISH = [
    Stage("validate", validate),
    Stage("evaluate pruned", evaluate_pruned, applies=lambda s: s.dense_ref is not None),
    Stage("latency", measure_latency, applies=lambda s: s.measure_latency),
    Stage("report", build_report, timing="save"),
    Stage("gate", gate, timing="save"),
    Stage("save", save),
]
