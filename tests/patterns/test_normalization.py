"""Normalisation layers: per-channel ones (BatchNorm, InstanceNorm) are sliced
with the channel; ones that compute statistics across the pruned axis
(LayerNorm over it, GroupNorm) block it; LRN prunes but not exactly."""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from helpers import analysis_of, feeds_for, make_model, prune_matches_oracle, random_removal, run, weight
from onnxprune.ir.shapes import infer_shapes
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.passes.cleanup import DropUnusedInitializers
from onnxprune.pipeline import build_analysis, prepare

RNG = np.random.default_rng(7)


def _positive(*shape, name):
    return numpy_helper.from_array(RNG.uniform(0.5, 1.5, shape).astype(np.float32), name)


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _group_of(analysis, node_name):
    return next(g for g in analysis.groups if any(s.node == node_name for s in g.sources))


def _conv_norm_conv(norm_nodes, norm_inits, opset=17, x_shape=(1, 3, 8, 8)):
    """x -> conv1 (8 ch) -> <norm_nodes: 'conv1' -> 'norm'> -> Relu -> conv2 (4 ch)."""
    inits = [weight(8, 3, 3, 3, name="w1"), weight(8, name="b1"), weight(4, 8, 1, 1, name="w2"), *norm_inits]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        *norm_nodes,
        helper.make_node("Relu", ["norm"], ["relu"], name="relu"),
        helper.make_node("Conv", ["relu", "w2"], ["conv2"], name="conv2"),
    ]
    return make_model(nodes, [("x", list(x_shape))], [("conv2", [1, 4, *x_shape[2:]])], inits, opset=opset)


def test_batchnorm_scale_bias_mean_and_var_are_sliced_with_the_channels():
    bn = helper.make_node("BatchNormalization", ["conv1", "gamma", "beta", "mean", "var"], ["norm"], name="bn")
    model = _conv_norm_conv([bn], [weight(8, name="gamma"), weight(8, name="beta"), weight(8, name="mean"),
                                   _positive(8, name="var")])
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    roles = {p.tensor: p.role for p in group.params}
    assert roles["gamma"] == "bn_scale" and roles["beta"] == "bn_bias"
    assert roles["mean"] == roles["var"] == "bn_stats"
    kept = 8 - len(removed)
    for name in ("gamma", "beta", "mean", "var"):
        assert _initializer(pruned, name).shape == (kept,)


def test_batchnorm1d_after_a_gemm_is_sliced_with_the_features():
    inits = [weight(6, 12, name="w1"), weight(12, name="gamma"), weight(12, name="beta"), weight(12, name="mean"),
             _positive(12, name="var"), weight(12, 5, name="w2")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["fc1"], name="fc1"),
        helper.make_node("BatchNormalization", ["fc1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        helper.make_node("Gemm", ["relu", "w2"], ["fc2"], name="fc2"),
    ]
    model = make_model(nodes, [("x", [3, 6])], [("fc2", [3, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    assert _group_of(analysis, "fc1").prunable
    assert _initializer(pruned, "var").shape == (12 - len(removed),)


def test_instancenorm_scale_and_bias_are_sliced_with_the_channels():
    norm = helper.make_node("InstanceNormalization", ["conv1", "scale", "bias"], ["norm"], name="inorm")
    model = _conv_norm_conv([norm], [weight(8, name="scale"), weight(8, name="bias")])
    analysis, pruned, removed = prune_matches_oracle(model)
    assert _group_of(analysis, "conv1").prunable
    kept = 8 - len(removed)
    assert _initializer(pruned, "scale").shape == (kept,)
    assert _initializer(pruned, "bias").shape == (kept,)


def test_layernorm_over_the_channel_axis_blocks_the_channels():
    """Gemm features -> LayerNorm(axis=-1): every feature's value depends on all others."""
    inits = [weight(6, 12, name="w1"), weight(12, name="ln_scale"), weight(12, name="ln_bias"),
             weight(12, 5, name="w2")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["fc1"], name="fc1"),
        helper.make_node("LayerNormalization", ["fc1", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1),
        helper.make_node("Gemm", ["ln", "w2"], ["fc2"], name="fc2"),
    ]
    model = make_model(nodes, [("x", [3, 6])], [("fc2", [3, 5])], inits)
    group = _group_of(analysis_of(model), "fc1")
    assert not group.prunable
    assert any("LayerNormalization 'ln'" in r and "statistics" in r for r in group.blocked), group.blocked


def test_layernorm_over_spatial_axes_only_passes_the_channels():
    """LayerNorm(axis=2) on NCHW normalises each channel's HxW plane on its own."""
    ln = helper.make_node("LayerNormalization", ["conv1", "ln_scale", "ln_bias"], ["norm"], name="ln", axis=2)
    model = _conv_norm_conv([ln], [weight(8, 8, name="ln_scale"), weight(8, 8, name="ln_bias")])
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    assert _initializer(pruned, "ln_scale").shape == (8, 8)


def test_groupnorm_blocks_the_channels_it_normalises_across():
    gn = helper.make_node("GroupNormalization", ["conv1", "gn_scale", "gn_bias"], ["norm"], name="gn",
                          num_groups=2)
    model = _conv_norm_conv([gn], [weight(8, name="gn_scale"), weight(8, name="gn_bias")], opset=21)
    analysis = analysis_of(model)
    group = _group_of(analysis, "conv1")
    assert not group.prunable
    assert any("GroupNormalization 'gn'" in r and "statistics" in r for r in group.blocked), group.blocked
    assert _group_of(analysis, "conv2").blocked  # graph output; nothing else is prunable
    assert analysis.prunable_groups() == []


def _prune(model, fraction=0.5, seed=0):
    working, _ = prepare(model)
    analysis = build_analysis(working)
    removed = random_removal(analysis, fraction, seed)
    pruned = ApplyPlan(analysis, removed)(working).model
    pruned = DropUnusedInitializers()(pruned).model
    infer_shapes(pruned)
    onnx.checker.check_model(pruned, full_check=True)
    return analysis, pruned, removed


def test_lrn_lets_channels_be_pruned_but_marks_the_group_inexact():
    lrn = helper.make_node("LRN", ["conv1"], ["norm"], name="lrn", size=3)
    model = _conv_norm_conv([lrn], [])
    analysis, pruned, removed = _prune(model)
    group = _group_of(analysis, "conv1")
    assert group.prunable and group.size == 8
    assert any("LRN 'lrn'" in r and "neighbouring channels" in r for r in group.inexact)
    assert removed
    kept = 8 - len(removed)
    assert _initializer(pruned, "w2").shape[1] == kept
    (out,) = run(pruned, feeds_for(model))
    assert out.shape == (1, 4, 8, 8) and np.isfinite(out).all()


# -- hidden (residual-stream) width: opt-in through LayerNorm and RMSNorm ---------------

def _residual_stream():
    """ids -> embedding (12 wide) -> x + MLP(LayerNorm(x)) -> RMSNorm (decomposed) -> head."""
    inits = [weight(10, 12, name="emb"), _positive(12, name="g1"), weight(12, name="b1"),
             weight(12, 16, name="w1"), weight(16, 12, name="w2"), weight(12, name="b2"),
             _positive(12, name="g2"), weight(12, 7, name="head"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["up"], name="up"),
        helper.make_node("Relu", ["up"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w2"], ["down"], name="down"),
        helper.make_node("Add", ["down", "b2"], ["branch"], name="bias"),
        helper.make_node("Add", ["x", "branch"], ["h"], name="residual"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean_sq", axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms"),
        helper.make_node("Div", ["h", "rms"], ["normed"], name="normalise"),
        helper.make_node("Mul", ["normed", "g2"], ["rmsnorm"], name="rms_scale"),
        helper.make_node("MatMul", ["rmsnorm", "head"], ["y"], name="lm_head"),
    ]
    graph = helper.make_graph(nodes, "stream", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _stream_by_hand(model, ids, kept):
    """The same computation in numpy with only the `kept` hidden dims: norms over those alone."""
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = p["emb"][:, kept][ids]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = (x - mu) / np.sqrt(var + 1e-5) * p["g1"][kept] + p["b1"][kept]
    h = x + np.maximum(ln @ p["w1"][kept], 0) @ p["w2"][:, kept] + p["b2"][kept]
    rms = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6) * p["g2"][kept]
    return rms @ p["head"][kept]


def test_the_hidden_width_is_blocked_by_the_norms_unless_opted_in():
    model = _residual_stream()
    working, _ = prepare(model)
    assert not any(g.kind == "hidden" for g in build_analysis(working).groups)
    hidden = [g for g in build_analysis(working, prune_hidden=True).groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].prunable and hidden[0].size == 12
    assert any("LayerNormalization 'ln' computes its statistics over the hidden axis 2" in r for r in hidden[0].inexact)
    assert any("ReduceMean 'mean_sq' reduces over axis 2" in r for r in hidden[0].inexact)
    roles = {p.role for p in hidden[0].params}
    assert {"embedding", "norm_scale", "norm_bias", "weight_in", "weight_out"} <= roles


def test_pruned_hidden_width_computes_the_norms_over_the_kept_dims():
    model = _residual_stream()
    working, _ = prepare(model)
    analysis = build_analysis(working, prune_hidden=True)
    group = next(g for g in analysis.groups if g.kind == "hidden")
    removed = {int(r) for r in group.roots[[1, 4, 5, 9]]}
    pruned = ApplyPlan(analysis, removed)(working).model
    onnx.checker.check_model(pruned, full_check=True)
    ids = np.random.default_rng(0).integers(0, 10, (2, 5)).astype(np.int64)
    kept = [i for i in range(12) if i not in (1, 4, 5, 9)]
    np.testing.assert_allclose(run(pruned, {"ids": ids})[0], _stream_by_hand(model, ids, kept), atol=1e-4)
