"""Calibration statistics: streamed per-channel stats and Gram matrices equal a direct numpy computation,
memory chunking does not change results, and the data-aware criteria use them."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, relu_mlp
from onnx import helper, numpy_helper

from onnxprune.calibration import (
    CalibrationSet,
    Capture,
    GramRequest,
    calibration_statistics,
    collect_statistics,
    consumers_of,
    expose,
    rows,
    sink_tensors,
)
from onnxprune.calibration.capture import plan_chunks
from onnxprune.calibration.features import conv_output_shape
from onnxprune.errors import DataError
from onnxprune.importance import score_groups
from onnxprune.importance.data_aware import CalibrationRequired
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.session import make_session


def small_cnn(stride=2, pads=(1, 0, 2, 1), dilations=(1, 2)):
    """Conv(3->6, stride, asymmetric pads, dilation) -> Relu -> Conv(6->5, 3x3 same) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(5->4, transB)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[stride, stride],
                         pads=list(pads), dilations=list(dilations)),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)
             for name, shape in (("w1", (6, 3, 3, 3)), ("b1", (6,)), ("w2", (5, 6, 3, 3)), ("b2", (5,)),
                                 ("w3", (4, 5)), ("b3", (4,)))]
    return make_model(nodes, [("x", ["N", 3, 11, 12])], [("y", ["N", 4])], inits)


def data(n=23, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 11, 12)).astype(np.float32)}


def run_all(model, names, feeds):
    session = make_session(expose(model, names))
    return dict(zip(names, session.run(names, feeds)))


def im2col(x, w_shape, strides, pads, dilations):
    """Reference unfold, written independently: one row per (sample, output position)."""
    n, c, h, wd = x.shape
    kh, kw = w_shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = xp[b, :, i * strides[0]:i * strides[0] + dilations[0] * (kh - 1) + 1:dilations[0],
                           j * strides[1]:j * strides[1] + dilations[1] * (kw - 1) + 1:dilations[1]]
                out.append(patch.reshape(-1))
    return np.array(out, dtype=np.float64), (oh, ow)


def test_channel_stats_equal_numpy_across_batches_and_chunks():
    model, _ = prepare(small_cnn())
    feeds = data()
    tensors = [("c1", 1), ("r1", 1), ("r2", 1), ("f", 1)]
    # batch 4 (last batch partial) and a cap so small that every tensor gets its own pass
    stats = collect_statistics(model, feeds, tensors, batch_size=4, memory_cap=1)
    assert stats.passes == len(tensors) and stats.samples == 23
    values = run_all(model, [t for t, _ in tensors], feeds)
    for name, axis in tensors:
        v = values[name].astype(np.float64)
        other = tuple(a for a in range(v.ndim) if a != axis)
        s = stats.channel(name, axis)
        assert s.count == v.size // v.shape[axis]
        np.testing.assert_allclose(s.mean, v.mean(axis=other), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s.var, v.var(axis=other), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s.apoz, (v <= 0).mean(axis=other))
        np.testing.assert_allclose(s.mean_abs, np.abs(v).mean(axis=other), rtol=1e-6)
        np.testing.assert_allclose(s.mean_sq, np.square(v).mean(axis=other), rtol=1e-5)
    big = collect_statistics(model, feeds, tensors, batch_size=64)
    assert big.passes == 1
    for key in tensors:
        np.testing.assert_allclose(big.channel(*key).var, stats.channel(*key).var, rtol=1e-6, atol=1e-8)


def test_conv_rows_are_the_convolution():
    """Unfolded rows times the weight give the Conv output (strides, asymmetric pads, dilation)."""
    model, _ = prepare(small_cnn())
    feeds = data(5)
    cons = consumers_of(model)
    values = run_all(model, ["x", "c1", "r1", "c2", "f", "y"], feeds)
    inits = {t.name: t for t in model.graph.initializer}
    for name, x, y in (("conv1", "x", "c1"), ("conv2", "r1", "c2"), ("fc", "f", "y")):
        c = cons[name]
        xr, yr = rows(c, values[x], values[y], per_sample=None)
        w = c.effective_weight(numpy_helper.to_array(inits[c.weight]).astype(np.float64))
        b = numpy_helper.to_array(inits[c.bias]).astype(np.float64)
        np.testing.assert_allclose(xr @ w.T + b, yr, rtol=1e-4, atol=1e-4)
    # against an independent im2col
    c = cons["conv1"]
    ref, out = im2col(values["x"].astype(np.float64), c.weight_shape, (2, 2), (1, 0, 2, 1), (1, 2))
    assert conv_output_shape(c, (11, 12)) == out == values["c1"].shape[2:]
    xr, _ = rows(c, values["x"], per_sample=None)
    np.testing.assert_allclose(xr, ref, rtol=1e-6)


def test_gram_and_cross_terms_equal_numpy():
    model, _ = prepare(small_cnn())
    feeds = data(9)
    cons = consumers_of(model)
    requests = [GramRequest(cons[n], cons[n].output) for n in ("conv1", "conv2", "fc")]
    stats = collect_statistics(model, feeds, grams=requests, batch_size=4, per_sample=None)
    values = run_all(model, ["x", "c1", "r1", "c2", "f", "y"], feeds)
    for name, x, y in (("conv1", "x", "c1"), ("conv2", "r1", "c2"), ("fc", "f", "y")):
        xr, yr = rows(cons[name], values[x], values[y], per_sample=None)
        xr, yr = xr.astype(np.float64), yr.astype(np.float64)
        g = stats.grams[name]
        assert g.n == len(xr)
        np.testing.assert_allclose(g.xtx, xr.T @ xr, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(g.xty, xr.T @ yr, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(g.xsum, xr.sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(g.ysq, np.square(yr).sum(0), rtol=1e-5)


def test_grouped_gram_holds_the_diagonal_blocks_of_the_full_gram():
    from onnxprune.calibration.features import GramStats, GroupedGramStats

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 3 * 4)), rng.standard_normal((50, 3 * 2))
    grouped, full = GroupedGramStats(4, 6, 3), GramStats(12, 6)
    for part in (slice(0, 20), slice(20, 50)):
        grouped.update(x[part], y[part])
        full.update(x[part], y[part])
    for i, g in enumerate(grouped.parts):
        cols, outs = slice(4 * i, 4 * i + 4), slice(2 * i, 2 * i + 2)
        np.testing.assert_allclose(g.xtx, full.xtx[cols, cols], rtol=1e-5)
        np.testing.assert_allclose(g.xty, full.xty[cols, outs], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.ysq, full.ysq[outs], rtol=1e-6)
    assert grouped.n == 50 and np.isclose(grouped.target_energy, full.target_energy)


def test_sampled_positions_bound_the_rows():
    model, _ = prepare(small_cnn())
    cons = consumers_of(model)
    req = [GramRequest(cons["conv2"])]
    a = collect_statistics(model, data(10), grams=req, per_sample=7, seed=3)
    b = collect_statistics(model, data(10), grams=req, per_sample=7, seed=3)
    assert a.grams["conv2"].n == 10 * 7
    np.testing.assert_array_equal(a.grams["conv2"].xtx, b.grams["conv2"].xtx)


def test_plan_chunks_respects_the_cap():
    plan = plan_chunks({"a": 100, "b": 100, "c": 300, "d": None}, batch_size=4, memory_cap=900)
    assert plan.batch_size == 3  # 300 * 4 > 900: the batch shrinks so one tensor fits
    assert sorted(plan.chunks) == [["a", "b"], ["c"], ["d"]]  # unknown sizes get a pass of their own


def test_expose_keeps_only_the_needed_prefix():
    model, _ = prepare(small_cnn())
    early = expose(model, ["r1"])
    assert [n.name for n in early.graph.node] == ["conv1", "relu1"]
    assert {t.name for t in early.graph.initializer} == {"w1", "b1"}
    assert [o.name for o in early.graph.output] == ["r1"]
    got = Capture(model, ["r1", "y"]).run(data(3), 2)
    assert got["r1"].shape[0] == 2 and got["y"].shape == (2, 4)


def test_calibration_set_split_and_static_batch():
    model, _ = prepare(small_cnn())
    calib = CalibrationSet.open(data(20), model, max_samples=15)
    fit, held = calib.split(0.2, seed=1)
    assert len(fit) == 12 and len(held) == 3
    assert not set(fit.indices) & set(held.indices)
    assert sum(n for _, n in fit.batches(5)) == 12
    tiny_fit, tiny_held = CalibrationSet.open(data(3), model).split(0.2)
    assert len(tiny_fit) == 3 and len(tiny_held) == 0


def test_data_aware_criteria_need_statistics():
    model, _ = prepare(small_cnn())
    analysis = build_analysis(model)
    with pytest.raises(CalibrationRequired, match="calibration"):
        score_groups(analysis, analysis.prunable_groups(), "flap")


def dead_and_constant_model():
    """Gemm(4->6) -> Relu -> Gemm(6->3): unit 1 is dead (always 0 after Relu), unit 4 is constant."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[:, 1], b1[1] = 0.0, -1.0  # relu(-1) = 0 always
    w1[:, 4], b1[4] = 0.0, 2.0  # relu(2) = 2 always
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    return relu_mlp(w1, b1, w2)


def test_data_aware_criteria_rank_dead_and_constant_units_lowest():
    model, _ = prepare(dead_and_constant_model())
    analysis = build_analysis(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)}
    stats = calibration_statistics(model, analysis, feeds)
    assert sink_tensors(analysis) == [("r", 1)]
    group = analysis.group("fc1")
    scores = {c: score_groups(analysis, [group], c, stats=stats)[group.id]
              for c in ("apoz", "mean_act", "flap", "wanda")}
    for name in ("apoz", "mean_act", "wanda"):
        assert scores[name].argmin() == 1, name  # the dead unit
    assert scores["flap"][1] == 0 and scores["flap"][4] == 0  # no fluctuation: replaceable by its mean
    # wanda = mean_rows |W| * rms(x), normalised by its mean over the units
    s = stats.channel("r", 1)
    w2 = analysis.view.const("w2")
    raw = np.abs(w2).mean(axis=1) * s.rms
    np.testing.assert_allclose(scores["wanda"], raw / raw.mean(), rtol=1e-6)
    raw = s.var * np.square(w2).sum(axis=1)
    np.testing.assert_allclose(scores["flap"], raw / raw.mean(), rtol=1e-6)


def test_calibration_set_reads_scattered_samples_from_any_dataset():
    """Datasets that only serve contiguous ranges (image folders, text) are read run by run."""
    from onnxprune.runtime.data import Dataset

    values = data(12)["x"]

    class Ranges(Dataset):
        source = "ranges"

        def bind(self, inputs):
            pass

        def __len__(self):
            return len(values)

        def arrays(self, start, stop):
            return {"x": values[start:stop]}

    model, _ = prepare(small_cnn())
    calib = CalibrationSet.open(Ranges(), model)
    picked = CalibrationSet(calib.dataset, calib.specs, np.array([0, 1, 2, 5, 7, 8, 11]))
    got = np.concatenate([feeds["x"] for feeds, _ in picked.batches(4)])
    np.testing.assert_array_equal(got, values[[0, 1, 2, 5, 7, 8, 11]])
    values[8, 0, 0, 0] = np.inf  # a streamed dataset is checked batch by batch
    with pytest.raises(DataError, match="calibration sample 8 of ranges, input 'x', holds NaN or infinite"):
        list(picked.batches(4))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_sample_with_nan_or_inf_is_refused_by_name(bad, tmp_path):
    """One poisoned sample would turn every Gram matrix and refit weight into NaN."""
    import onnxprune

    values = data(12)
    values["x"][7, 1, 2, 3] = bad
    path = tmp_path / "calib.npz"
    np.savez(path, **values)
    with pytest.raises(DataError, match=r"input 'x': sample 7 of .*calib\.npz holds NaN or infinite values"):
        onnxprune.prune(small_cnn(), ratio=0.5, round_to=1, calib=str(path))


def test_padding_is_dropped_per_sample_not_per_row_for_token_rows():
    # a Gemm reading [batch * tokens, hidden] (BERT-style 2-D exports) must see every token of the real
    # samples; keeping "the first n rows" kept one token of one sample
    from onnxprune.calibration.capture import Capture

    batch, tokens, hidden = 4, 3, 2
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["flat"], name="flatten_tokens"),
             helper.make_node("Relu", ["flat"], ["y"], name="act")]
    model = make_model(nodes, [("x", [batch, tokens, hidden])], [("y", [batch * tokens, hidden])],
                       [numpy_helper.from_array(np.array([-1, hidden], np.int64), "rows")])
    x = np.arange(batch * tokens * hidden, dtype=np.float32).reshape(batch, tokens, hidden)
    got = Capture(model, ["flat", "x"]).run({"x": x}, n=2)  # the last two samples are padding
    assert got["flat"].shape == (2 * tokens, hidden)
    np.testing.assert_array_equal(got["flat"], x[:2].reshape(-1, hidden))
    assert got["x"].shape == (2, tokens, hidden)
