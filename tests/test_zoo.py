"""Integration: every model-zoo graph shipped with the onnx package.

Their weights are ConstantOfShape placeholders; `materialize_zoo_model`
replaces them with seeded random values first.
"""
import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.testing import materialize_zoo_model, plant_dead_units, zoo_models

ZOO = {p.stem.replace("light_", ""): p for p in zoo_models()}


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_model(request):
    return request.param, materialize_zoo_model(ZOO[request.param])


def test_ratio_0_3_gives_a_smaller_valid_model_with_unchanged_outputs(zoo_model):
    name, model = zoo_model
    pruned, report = onnxprune.prune(model, ratio=0.3)
    assert "onnxruntime run" in report.checks and "output shapes unchanged" in report.checks
    assert report.after.params < report.before.params
    assert report.after.flops < report.before.flops
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]


def test_lossless_removes_planted_dead_channels_without_changing_outputs(zoo_model):
    name, model = zoo_model
    working, _ = prepare(model)
    analysis = build_analysis(working)
    planted = 0
    for group in analysis.prunable_groups()[::3]:
        if group.inexact:
            continue  # LRN neighbours: removing a channel is not exact there
        k = max(1, group.size // 4)
        plant_dead_units(working, analysis, group, range(k))
        planted += k
    del working.graph.value_info[:]
    _, report = onnxprune.prune(working, lossless=True)
    removed = sum(c.before - c.after for c in report.changes)
    assert removed == planted
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert report.after.params < report.before.params


def test_lossless_on_an_unmodified_model_changes_nothing():
    model = materialize_zoo_model(ZOO["squeezenet"])
    _, report = onnxprune.prune(model, lossless=True)
    assert report.changes == []
    assert report.after.params == report.before.params


def test_a_residual_branch_with_zero_output_is_removed():
    model = materialize_zoo_model(ZOO["resnet50"])
    working, _ = prepare(model)
    # the BatchNorm closing the second bottleneck's residual branch: gamma = beta = 0
    sums = [n for n in working.graph.node if n.op_type == "Sum"]
    producers = {o: n for n in working.graph.node for o in n.output}
    branch_bn = next(producers[i] for i in sums[1].input if producers[i].op_type == "BatchNormalization")
    inits = {t.name: t for t in working.graph.initializer}
    for name in branch_bn.input[1:3]:
        inits[name].CopyFrom(onnx.numpy_helper.from_array(np.zeros(inits[name].dims, np.float32), name))
    convs_before = sum(n.op_type == "Conv" for n in working.graph.node)
    _, report = onnxprune.prune(working, lossless=True)
    assert report.after.op_counts["Conv"] == convs_before - 3  # the bottleneck's three convs are gone
    assert report.after.op_counts["Sum"] == report.before.op_counts["Sum"] - 1
    assert report.max_abs_diff < 1e-5


@pytest.mark.parametrize("name", ["shufflenet", "densenet121"])
def test_analyze_says_what_it_prunes_and_why_it_blocks(name):
    report = onnxprune.analyze(materialize_zoo_model(ZOO[name]))
    groups = report.analysis.groups
    assert any(g.prunable for g in groups)
    blocked = [g for g in groups if not g.prunable]
    assert blocked and all(g.blocked and all(len(r) > 15 for r in g.blocked) for g in blocked)
