"""Depth pruning: whole residual blocks and layers go, their input passes through.

What counts as a block (identity shortcut, learned branch), what is refused
and why (projection shortcuts, post-norm sub-blocks, branches read from
outside), the oracle (a dropped unit equals the dense model with the unit's
branches multiplied by zero), block influence, `--drop-layers` on the
command line, plans that replay drops, and lossless removal of all-zero
transformer branches.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, run, weight
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.ir.graph_view import tensor_values
from onnxprune.ir.model_io import materialized
from onnxprune.analysis.blocks import find_blocks
from onnxprune.calibration.capture import expose
from onnxprune.calibration.influence import feature_cosines
from onnxprune.cli import main
from onnxprune.errors import PlanError, UsageError
from onnxprune.ir.graph_view import GraphView
from onnxprune.passes.depth import drop
from onnxprune.passes.reconstruct import changed_consumers, rewired_nodes
from onnxprune.pipeline import prepare
from onnxprune.runtime.evaluate import evaluate
from onnxprune.testing import ZOO_DIR, materialize_zoo_model

MODELS = Path(__file__).resolve().parent.parent / "models"
FIXTURES = MODELS / "fixtures" / "transformers"
PRE_NORM = ["gpt2_decoder_legacy.onnx", "gpt2_decoder_dynamo.onnx", "vit_legacy.onnx", "vit_dynamo.onnx",
            "llama_decoder_legacy.onnx", "llama_decoder_dynamo.onnx"]


def scan(model):
    working, _ = prepare(model)
    return working, find_blocks(GraphView(working))


def zeroed_branches(model: onnx.ModelProto, blocks, units) -> onnx.ModelProto:
    """The oracle: the dense model with every branch of `units` multiplied by zero before its Add."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    branch_of = {b.add: b.branch for b in blocks}
    adds = {a for u in units for a in u.adds}
    nodes = []
    for node in ref.graph.node:
        if node.name in adds:
            branch = branch_of[node.name]
            zero = f"{node.name}__zero"
            ref.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
            nodes.append(helper.make_node("Mul", [branch, zero], [f"{branch}__zeroed"], name=f"{node.name}__mask"))
            node.input[list(node.input).index(branch)] = f"{branch}__zeroed"
        nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(nodes)
    return ref


def token_feeds(model, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name == "pixel_values":
            feeds[vi.name] = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        elif vi.name == "input":
            feeds[vi.name] = rng.standard_normal((batch, 1, 32, 32)).astype(np.float32)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones((batch, length), np.int64)
        else:
            feeds[vi.name] = rng.integers(0, 128, (batch, length)).astype(np.int64)
    return feeds


# -- what a block is ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRE_NORM)
def test_pre_norm_transformers_have_an_attention_and_a_feed_forward_block_per_layer(name):
    _, found = scan(FIXTURES / name)
    assert [b.kind for b in found.blocks] == ["attention", "mlp", "attention", "mlp"]
    assert all(u.droppable for u in found.block_units)
    layers = found.units("layer")
    assert [(u.kind, len(u.adds)) for u in layers] == [("attention+mlp", 2)] * 2
    assert all(u.droppable for u in layers)
    assert found.blocks[1].exit == found.blocks[2].input  # layers chain along the residual stream
    assert len({u.name for u in found.block_units + layers}) == 6  # readable, distinct names


@pytest.mark.parametrize("name", ["bert_encoder_legacy.onnx", "bert_encoder_dynamo.onnx"])
def test_post_norm_bert_drops_whole_layers_never_a_sub_block_alone(name):
    """LN(x + f(x)) without f is LN(x), not x: a sub-block cannot go, the layer from one LayerNorm
    output to the next can."""
    working, found = scan(FIXTURES / name)
    assert [b.trunk for b in found.blocks] == ["norm"] * 4
    assert all(not u.droppable and "post-norm" in u.refused for u in found.block_units)
    layers = found.candidates("layer")
    assert len(layers) == 2
    producer = {o: n for n in working.graph.node for o in n.output}
    assert all(producer[u.output].op_type == "LayerNormalization" for u in layers)
    with pytest.raises(PlanError, match="post-norm.*use unit 'layer'"):
        onnxprune.prune(FIXTURES / name, drop_layers=1, drop_unit="block")


def test_resnet_identity_blocks_are_candidates_and_projection_shortcuts_are_not():
    _, found = scan(MODELS / "digits_resnet.onnx")
    assert [(u.name, u.kind) for u in found.candidates("layer")] == [("/stage1", "conv")]
    refused = found.not_droppable("layer")
    assert [name for name, _ in refused] == ["/stage2", "/stage3"]
    assert "not the identity" in refused[0][1] and "/stage2/downsample/downsample.0/Conv" in refused[0][1]


def test_resnet50_bottlenecks_twelve_identity_blocks_and_four_projection_shortcuts():
    _, found = scan(materialize_zoo_model(ZOO_DIR / "light_resnet50.onnx"))
    assert len(found.candidates("layer")) == 12  # 3 + 4 + 6 + 3 blocks, minus each stage's first
    assert len(found.refused) == 4
    assert all("BatchNormalization" in r.reason for r in found.refused)  # Conv + BN on the skip path


def test_a_branch_also_read_outside_the_block_is_refused():
    conv_a = helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="branch/conv_a")
    relu = helper.make_node("Relu", ["a"], ["r"], name="branch/relu")
    conv_b = helper.make_node("Conv", ["r", "wb"], ["b"], pads=[1, 1, 1, 1], name="branch/conv_b")
    add = helper.make_node("Add", ["x", "b"], ["y"], name="residual")
    model = make_model([conv_a, relu, conv_b, add], [("x", [1, 4, 8, 8])], [("y", [1, 4, 8, 8]), ("r", [1, 4, 8, 8])],
                       [weight(4, 4, 3, 3, name="wa"), weight(4, 4, 3, 3, name="wb")])
    _, found = scan(model)
    assert len(found.blocks) == 1
    assert "'r', computed inside it, is a graph output" in found.units("block")[0].refused


def test_an_elementwise_formula_is_not_a_block():
    """GELU's x + 0.044715 x^3 is x + f(x) without a learned layer."""
    _, found = scan(FIXTURES / "gpt2_decoder_legacy.onnx")
    assert not any("act" in b.add for b in found.blocks)


# -- the masking oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,unit,index", [
    ("gpt2_decoder_legacy.onnx", "layer", 0), ("gpt2_decoder_dynamo.onnx", "attention", 1),
    ("vit_legacy.onnx", "mlp", 0), ("vit_dynamo.onnx", "layer", 1),
    ("llama_decoder_legacy.onnx", "layer", 0), ("llama_decoder_dynamo.onnx", "block", 3),
    ("../../digits_resnet.onnx", "block", 0),
])
def test_a_dropped_unit_equals_the_dense_model_with_its_branches_zeroed(name, unit, index):
    working, found = scan(FIXTURES / name)
    chosen = [found.units(unit)[index]]
    reference = zeroed_branches(working, found.blocks, chosen)
    copy = onnx.ModelProto()
    copy.CopyFrom(working)
    pruned = drop(copy, chosen)
    onnx.checker.check_model(materialized(pruned))  # tensors left on disk are read in
    assert len(pruned.graph.node) < len(working.graph.node)
    for batch, length in [(1, 5), (3, 11)]:
        feeds = token_feeds(working, batch, length)
        for got, want in zip(run(pruned, feeds), run(reference, feeds)):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(run(working, feeds)[0], run(reference, feeds)[0], atol=1e-3)  # the unit mattered


@pytest.mark.parametrize("name", ["bert_encoder_legacy.onnx", "bert_encoder_dynamo.onnx"])
def test_bert_without_its_last_layer_outputs_what_entered_that_layer(name):
    working, found = scan(FIXTURES / name)
    last = found.units("layer")[-1]
    entering = expose(working, [last.input])
    pruned = drop(onnx.load_from_string(working.SerializeToString()), [last])
    assert [o.name for o in pruned.graph.output] == [o.name for o in working.graph.output]
    feeds = token_feeds(working, 2, 7)
    np.testing.assert_allclose(run(pruned, feeds)[0], run(entering, feeds)[0], atol=1e-6)


# -- block influence and the pipeline ----------------------------------------------------------------------


def test_block_influence_is_zero_for_an_unchanged_stream_and_one_for_an_orthogonal_one():
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    assert np.allclose(1 - feature_cosines(x, x, axis=2), 0)
    assert np.allclose(1 - feature_cosines(x, 3 * x, axis=2), 0)  # scale does not count
    e0, e1 = np.eye(4)[0].reshape(1, 4, 1, 1), np.eye(4)[1].reshape(1, 4, 1, 1)
    assert np.allclose(1 - feature_cosines(e0, e1, axis=1), 1)  # channels are the features of a conv map


def test_prune_drops_the_lowest_influence_layer_and_reports_every_score():
    pruned, report = onnxprune.prune(FIXTURES / "gpt2_decoder_legacy.onnx", drop_layers=1)
    depth = report.depth
    scores = {c["name"]: c["influence"] for c in depth["candidates"]}
    assert set(scores) == {"/transformer/h.0", "/transformer/h.1"}
    assert [d["name"] for d in depth["dropped"]] == [min(scores, key=scores.get)]
    assert all(0 < s < 2 for s in scores.values())
    assert "random input" in depth["influence"] and any("random input" in n for n in report.notes)
    assert report.after.params < report.before.params and "onnxruntime run" in report.checks
    dims = [[d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(pruned.graph.input) + list(pruned.graph.output)]
    assert dims == [["batch", "sequence"], ["batch", "sequence", 128]]  # dynamic axes stay dynamic
    for batch, length in [(1, 4), (2, 13)]:
        assert run(pruned, token_feeds(pruned, batch, length))[0].shape == (batch, length, 128)


def test_calibration_data_scores_the_resnet_block_and_a_projection_block_cannot_be_asked_for():
    _, report = onnxprune.prune(MODELS / "digits_resnet.onnx", drop_layers=1, calib=MODELS / "digits_calib.npz",
                                calib_samples=64)
    assert [d["name"] for d in report.depth["dropped"]] == ["/stage1"]
    assert "64 calibration sample(s)" in report.depth["influence"]
    assert report.after.op_counts["Add"] == report.before.op_counts["Add"] - 1
    with pytest.raises(PlanError, match=r"cannot drop 2 layer\(s\): the model has 1 .*not the identity") as err:
        onnxprune.prune(MODELS / "digits_resnet.onnx", drop_layers=2)
    assert err.value.exit_code == 5


def test_with_calibration_data_the_layers_after_a_drop_are_refit_to_the_outputs_from_before_it():
    """Dropping digits' only identity block leaves 10% top-1 on digits_test.npz; least squares
    against the model before the drop brings it back (measured 99.56%, dense 99.78%)."""
    calib, test = MODELS / "digits_calib.npz", str(MODELS / "digits_test.npz")
    repaired, report = onnxprune.prune(MODELS / "digits_resnet.onnx", drop_layers=1, calib=calib)
    assert "least_squares: applied" in "\n".join(report.notes)
    assert evaluate(repaired, test).accuracy["top1"] >= 0.95
    unrepaired, _ = onnxprune.prune(MODELS / "digits_resnet.onnx", drop_layers=1, calib=calib, least_squares=False,
                                    bias_correction=False, bn_recalibration=False)
    assert evaluate(unrepaired, test).accuracy["top1"] < 0.5


def test_the_readers_of_a_dropped_layer_count_as_changed():
    dense, _ = prepare(str(FIXTURES / "gpt2_decoder_legacy.onnx"))
    before = onnx.ModelProto()
    before.CopyFrom(dense)
    [unit] = [u for u in find_blocks(GraphView(dense)).units("layer") if u.name == "/transformer/h.0"]
    dropped = drop(dense, [unit])
    rewired = rewired_nodes(before, dropped)
    readers = {n.name for n in dropped.graph.node if unit.input in n.input}
    assert rewired and rewired <= readers
    later = {n.name for n in dropped.graph.node if n.name.startswith("/transformer/h.1/") and n.op_type == "MatMul"
             and n.input[1].startswith("onnx::MatMul")}  # the second layer's weight MatMuls
    assert len(later) == 4 and set(changed_consumers(before, {}, rewired)) >= later


def test_drop_layers_combines_with_a_width_ratio_and_the_plan_replays_both(tmp_path):
    plan = tmp_path / "plan.json"
    pruned, report = onnxprune.prune(FIXTURES / "vit_dynamo.onnx", drop_layers=1, ratio=0.3, save_plan=plan)
    assert report.mode.startswith("1 layer(s) dropped") and "ratio 0.3" in report.mode
    assert len(report.changes) == 2  # the remaining layer's heads and FFN neurons
    saved = json.loads(plan.read_text())
    assert len(saved["drop"]) == 1 and len(saved["groups"]) == 2
    replayed, again = onnxprune.prune(FIXTURES / "vit_dynamo.onnx", plan=plan)
    assert again.mode.startswith("1 layer(s) dropped (plan)")
    feeds = token_feeds(pruned, 2, 0)
    np.testing.assert_allclose(run(replayed, feeds)[0], run(pruned, feeds)[0], atol=1e-6)
    with pytest.raises(UsageError, match="not with lossless"):
        onnxprune.prune(FIXTURES / "vit_dynamo.onnx", drop_layers=1, lossless=True)


def test_cli_drop_layers_writes_a_smaller_model_reports_the_layer_and_replays_from_the_plan(tmp_path, capsys):
    src = FIXTURES / "llama_decoder_dynamo.onnx"
    out, plan, report = tmp_path / "short.onnx", tmp_path / "plan.json", tmp_path / "report.json"
    assert main(["prune", str(src), str(out), "--drop-layers", "1", "--save-plan", str(plan),
                 "--report", str(report)]) == 0
    text = capsys.readouterr().out
    data = json.loads(report.read_text())
    (dropped,) = data["depth"]["dropped"]
    assert f"dropped layer {dropped['name']} (attention+mlp, block influence" in text
    assert dropped["name"] in {"model.layers.0", "model.layers.1"} and dropped["influence"] > 0
    assert len(onnx.load(str(out)).graph.node) < len(prepare(src)[0].graph.node)
    assert json.loads(plan.read_text())["drop"][0]["adds"] == dropped["adds"]

    again = tmp_path / "again.onnx"
    assert main(["prune", str(src), str(again), "--plan", str(plan)]) == 0
    feeds = token_feeds(prepare(src)[0], 2, 6)
    np.testing.assert_allclose(run(onnx.load(str(again)), feeds)[0], run(onnx.load(str(out)), feeds)[0], atol=1e-6)


def test_cli_asking_for_more_layers_than_exist_exits_5_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["prune", str(FIXTURES / "gpt2_decoder_dynamo.onnx"), str(out), "--drop-layers", "3"]) == 5
    err = capsys.readouterr().err
    assert "cannot drop 3 layer(s): the model has 2 that can be dropped (transformer.h.0, transformer.h.1)" in err
    assert not out.exists()
    assert main(["prune", str(FIXTURES / "gpt2_decoder_dynamo.onnx"), str(out), "--drop-layers", "1",
                 "--lossless"]) == 2
    assert "--drop-layers) combines with a ratio or target, not with lossless" in capsys.readouterr().err


# -- lossless: all-zero transformer branches -----------------------------------------------------------------


@pytest.mark.parametrize("name,bias", [("gpt2_decoder_legacy.onnx", "transformer.h.0.attn.c_proj.bias"),
                                       ("gpt2_decoder_dynamo.onnx", "transformer.h.0.attn.c_proj.bias")])
def test_lossless_removes_an_attention_block_whose_output_projection_is_zero(name, bias):
    working, _ = scan(FIXTURES / name)
    producer = {o: n for n in working.graph.node for o in n.output}
    inits = {t.name: t for t in working.graph.initializer}
    proj_add = next(n for n in working.graph.node if bias in n.input)
    matmul = producer[next(i for i in proj_add.input if i != bias)]
    for t in [bias] + [i for i in matmul.input if i in inits]:  # c_proj weight and bias: all zero
        inits[t].CopyFrom(numpy_helper.from_array(np.zeros_like(tensor_values(inits[t])), t))
    pruned, report = onnxprune.prune(working, lossless=True)
    assert report.max_abs_diff < 1e-5
    assert "removed 1 all-zero residual branch(es)" in report.notes[0]
    after = find_blocks(GraphView(pruned))
    assert [b.kind for b in after.blocks] == ["mlp", "attention", "mlp"]
    assert report.after.op_counts["Softmax"] == report.before.op_counts["Softmax"] - 1
