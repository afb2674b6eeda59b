"""Weight-level sparsity (`onnxprune sparsify`): N:M layout per op, the stated sparsity per layer,
SparseGPT's error against magnitude's, shared weights, composition with prune, the command line."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import conv, make_model, run, weight
from onnxprune.cli import main
from onnxprune.errors import PlanError, UsageError
from onnxprune.pipeline import prune
from onnxprune.sparsity import Pattern, nm_violations, sparsify
from onnxprune.ir.prepare import prepare
from onnxprune.calibration.data import CalibrationSet
from onnxprune.sparsity.api import _assemble, _gram_matrices
from onnxprune.sparsity.layers import Solver, find_targets
from onnxprune.sparsity.sequential import solve_in_levels
from onnxprune.sparsity.masks import select_mask
from onnxprune.sparsity.sparsegpt import sparsegpt

MODELS = Path(__file__).resolve().parent.parent / "models"
EXAMPLE = MODELS / "digits_resnet.onnx"
CALIB = MODELS / "digits_calib.npz"


def weights_of(model: onnx.ModelProto | str | Path) -> dict[str, np.ndarray]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def non_zeros_per_block(w: np.ndarray, node: onnx.NodeProto, m: int = 4) -> np.ndarray:
    """Non-zeros in every m consecutive weights along the reduction axis: Conv's input channels (at one
    output and kernel position), Gemm's K (axis 1 with transB, else axis 0), MatMul's K (axis 0)."""
    if node.op_type == "Conv":
        return (w.reshape(w.shape[0], w.shape[1] // m, m, -1) != 0).sum(axis=2)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if trans_b:
        return (w.reshape(w.shape[0], w.shape[1] // m, m) != 0).sum(axis=2)
    return (w.reshape(w.shape[0] // m, m, w.shape[1]) != 0).sum(axis=1)


def correlated(n: int, features: int, seed: int = 0) -> np.ndarray:
    """Inputs whose features are strongly correlated: where SparseGPT's update has something to use."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((features, features)) * np.linspace(1.5, 0.1, features)[:, None]
    return (rng.standard_normal((n, features)) @ mixing + 0.3).astype(np.float32)


def mlp(transb: int = 0, rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """x (N, 32) -> Gemm 32->64 -> Relu -> MatMul 64->16 -> Gemm 16->8 (transB). `rng`: weights from a
    generator of the test's own (else helpers' shared one, whose draws depend on the tests run before)."""
    def draw(*shape, name):
        if rng is None:
            return weight(*shape, name=name)
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm"),
             helper.make_node("Gemm", ["m", "w3", "b3"], ["y"], name="fc3", transB=transb)]
    w3 = draw(8, 16, name="w3") if transb else draw(16, 8, name="w3")
    inits = [draw(32, 64, name="w1"), draw(64, name="b1"), draw(64, 16, name="w2"), w3, draw(8, name="b3")]
    return make_model(nodes, [("x", ["N", 32])], [("y", ["N", 8])], inits)


def cnn() -> onnx.ModelProto:
    """x (N, 8, 10, 10) -> Conv 8->16 3x3 -> Relu -> depthwise 3x3 -> Conv 16->12 1x1."""
    c1, w1 = conv("c1", "x", "a", 8, 16)
    dw = helper.make_node("Conv", ["r", "dw.w"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=16)
    c2, w2 = conv("c2", "d", "y", 16, 12, k=1)
    nodes = [c1, helper.make_node("Relu", ["a"], ["r"], name="relu"), dw, c2]
    return make_model(nodes, [("x", ["N", 8, 10, 10])], [("y", ["N", 12, 10, 10])],
                      w1 + [weight(16, 1, 3, 3, name="dw.w")] + w2)


def cnn_calibration(n: int = 48) -> dict[str, np.ndarray]:
    return {"x": correlated(n * 100, 8).reshape(n, 10, 10, 8).transpose(0, 3, 1, 2).copy()}


# -- masks ----------------------------------------------------------------------------------------

def test_a_pattern_says_what_it_keeps_and_refuses_nonsense():
    p = Pattern.parse("2:4")
    assert (p.n, p.m, p.fraction, str(p)) == (2, 4, 0.5, "2:4")
    assert Pattern.parse("1:8").fraction == pytest.approx(0.875)
    for bad in ("4:2", "0:4", "2:2", "2/4", "half"):
        with pytest.raises(UsageError, match="--pattern"):
            Pattern.parse(bad)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(UsageError, match="fraction"):
            Pattern.unstructured(bad)


def test_an_nm_mask_zeroes_the_lowest_m_minus_n_of_every_block():
    scores = np.random.default_rng(0).random((6, 16))
    mask = select_mask(scores, Pattern.parse("2:4"))
    assert (mask.reshape(6, 4, 4).sum(axis=2) == 2).all()
    kept = np.where(mask, np.nan, scores).reshape(6, 4, 4)
    zeroed = np.where(mask, scores, np.nan).reshape(6, 4, 4)
    assert (np.nanmin(kept, axis=2) >= np.nanmax(zeroed, axis=2)).all()


def test_the_obs_update_for_one_zeroed_weight_is_the_least_squares_refit_of_the_others():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8))
    h = x.T @ x
    w = rng.standard_normal((1, 8))
    w[0, 0] = 1e-3  # the weight with the lowest saliency: the one zeroed
    out = sparsegpt(w, h, Pattern.unstructured(1 / 8), damp=1e-12)
    refit = w[0, 1:] + w[0, 0] * np.linalg.solve(h[1:, 1:], h[1:, 0])  # argmin ||X (w - w')|| with w'_0 = 0
    assert out[0, 0] == 0.0
    np.testing.assert_allclose(out[0, 1:], refit, rtol=1e-6, atol=1e-9)


# -- the layout sparse tensor cores read ----------------------------------------------------------

@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_every_nm_block_runs_along_the_reduction_axis_of_each_op(tmp_path, criterion):
    model = mlp(transb=1)
    calib = {"x": correlated(256, 32)} if criterion != "magnitude" else None
    _, report = sparsify(model, tmp_path / "s.onnx", pattern="2:4", criterion=criterion, calib=calib)
    w = weights_of(tmp_path / "s.onnx")
    # Gemm (K, N): blocks of 4 along K at each output; MatMul's right operand likewise; Gemm transB (N, K)
    assert nm_violations(w["w1"].T, 2, 4) == 0 and (w["w1"] == 0).mean() == 0.5
    assert nm_violations(w["w2"].T, 2, 4) == 0 and (w["w2"] == 0).mean() == 0.5
    assert nm_violations(w["w3"], 2, 4) == 0 and (w["w3"] == 0).mean() == 0.5
    assert [r.sparsity for r in report.layers] == [0.5, 0.5, 0.5]


def test_conv_blocks_are_four_input_channels_at_one_kernel_position(tmp_path):
    _, report = sparsify(cnn(), tmp_path / "s.onnx", pattern="2:4", calib=cnn_calibration())
    w = weights_of(tmp_path / "s.onnx")["c1.w"]  # (16, 8, 3, 3)
    nonzero = (w.reshape(16, 2, 4, 3, 3) != 0).sum(axis=2)  # per output, channel block, kh, kw
    assert (nonzero == 2).all()
    depthwise = next(r for r in report.layers if r.layer == "dw")
    assert depthwise.skipped == "input channels per group 1 is not a multiple of 4"
    assert (weights_of(tmp_path / "s.onnx")["dw.w"] != 0).all()  # left dense, as the table says


# -- the stated sparsity, per layer ---------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_every_layer_reaches_the_stated_sparsity(fraction, criterion):
    calib = cnn_calibration() if criterion != "magnitude" else None
    model, report = sparsify(cnn(), sparsity=fraction, criterion=criterion, calib=calib)
    w = weights_of(model)
    for row in report.layers:
        assert row.skipped is None
        zeros = int((w[row.weight] == 0).sum())
        assert zeros == row.zeros_after
        if criterion == "wanda":  # each output keeps the same share
            per_row = (w[row.weight].reshape(len(w[row.weight]), -1) == 0).sum(axis=1)
            assert (per_row == round(fraction * w[row.weight][0].size)).all()
        else:
            assert zeros == round(fraction * w[row.weight].size), row.layer


def test_sparsegpt_moves_each_layer_less_than_magnitude_and_wanda_on_calibration_data():
    calib = {"x": correlated(512, 32)}
    errors, model = {}, mlp(rng=np.random.default_rng(0))
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("2:4", None):
            _, report = sparsify(model, pattern=pattern, sparsity=None if pattern else 0.6, criterion=criterion,
                                 calib=calib)
            errors[criterion, pattern] = {r.layer: r.error for r in report.layers}
    for pattern in ("2:4", None):
        for layer, error in errors["sparsegpt", pattern].items():
            assert error < errors["magnitude", pattern][layer], (pattern, layer)
            assert error < errors["wanda", pattern][layer], (pattern, layer)


def deep_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x (N, 32) -> Gemm 32->64 -> Tanh -> Gemm 64->64 -> Tanh -> MatMul 64->32 -> Tanh -> Gemm 32->16:
    four layers, each reading the one before, so an early layer's error reaches every later one."""
    def draw(*shape, name, scale=1.0):
        fan_in = shape[0] if len(shape) == 2 else 4
        return numpy_helper.from_array((rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             helper.make_node("Tanh", ["h1"], ["a1"], name="t1"),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
             helper.make_node("Tanh", ["h2"], ["a2"], name="t2"),
             helper.make_node("MatMul", ["a2", "w3"], ["h3"], name="mm3"),
             helper.make_node("Tanh", ["h3"], ["a3"], name="t3"),
             helper.make_node("Gemm", ["a3", "w4", "b4"], ["y"], name="fc4")]
    inits = [draw(32, 64, name="w1", scale=0.5), draw(64, name="b1"), draw(64, 64, name="w2", scale=2.0),
             draw(64, name="b2"), draw(64, 32, name="w3", scale=2.0), draw(32, 16, name="w4"), draw(16, name="b4")]
    return make_model(nodes, [("x", ["N", 32])], [("y", ["N", 16])], inits)


def sparsegpt_model(model: onnx.ModelProto, calib: dict, pattern: Pattern, sequential: bool):
    working, _ = prepare(model)
    selection = find_targets(working, pattern)
    replaced, solved = solve_in_levels(working, selection.targets, Solver(pattern, "sparsegpt"),
                                       CalibrationSet.open(calib, working), None, 0, sequential=sequential)
    return _assemble(working, selection, replaced, solved)


@pytest.mark.parametrize("pattern", ["2:4", "0.6"])
def test_solving_each_layer_on_the_inputs_the_sparsified_layers_before_give_it_ends_closer_to_dense(pattern):
    rng = np.random.default_rng(3)
    dense_model = deep_mlp(rng)
    p = Pattern.parse(pattern) if ":" in pattern else Pattern.unstructured(float(pattern))
    calib, unseen = {"x": correlated(2048, 32, seed=1)}, correlated(512, 32, seed=2)
    dense = run(dense_model, {"x": unseen})[0].astype(np.float64)
    far = {}
    for sequential in (False, True):
        model, layers = sparsegpt_model(dense_model, calib, p, sequential)
        got = run(model, {"x": unseen})[0]
        far[sequential] = np.linalg.norm(got - dense) / np.linalg.norm(dense)
        w = weights_of(model)
        for row in layers:  # the pattern holds exactly, whatever the inputs were
            if p.structured:  # every weight here is (K, N): blocks run down its columns
                assert nm_violations(w[row.weight].T, 2, 4) == 0, row.layer
            assert row.zeros_after == int((w[row.weight] == 0).sum()) == round(p.fraction * w[row.weight].size)
    assert far[True] < 0.9 * far[False], far


def test_the_reported_error_is_the_output_error_on_the_calibration_data():
    x, dense_model = correlated(400, 32), mlp()
    model, report = sparsify(dense_model, sparsity=0.5, calib={"x": x}, calib_samples=None)
    dense, sparse = weights_of(dense_model), weights_of(model)
    # fc1 reads the model's input, so its inherited error is none: its error is its output's whole distance
    # from the dense output, the refit bias included
    y = x.astype(np.float64) @ dense["w1"] + dense["b1"]
    y_sparse = x.astype(np.float64) @ sparse["w1"] + sparse["b1"]
    expected = ((y - y_sparse) ** 2).sum() / (y ** 2).sum()
    assert report.layers[0].error == pytest.approx(expected, rel=1e-4)
    assert report.layers[0].output_error == pytest.approx(expected, rel=1e-4)


def test_a_gemm_reading_tokens_flattened_with_the_batch_sees_every_token_in_its_gram():
    # [1, 16, 8] -> Reshape [16, 8] -> Gemm: axis 0 of the Gemm's input is tokens, not samples
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w", "b"], ["y"], name="proj")]
    model = make_model(nodes, [("x", [1, 16, 8])], [("y", [16, 4])],
                       [numpy_helper.from_array(np.array([16, 8], np.int64), "shape"), weight(8, 4, name="w"),
                        weight(4, name="b")])
    working, _ = prepare(model)
    targets = find_targets(working, Pattern.parse("2:4")).targets
    grams, samples = _gram_matrices(working, targets, {"x": correlated(10 * 16, 8).reshape(10, 16, 8)}, None,
                                    256, 0)
    assert samples == 10 and grams["proj"].n == 10 * 16


# -- which weights ----------------------------------------------------------------------------------

def test_a_weight_another_op_also_reads_stays_dense_with_the_reason():
    # a tied embedding: the Gather's table is also the MatMul's weight (transposed copy not involved)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "table"], ["y"], name="tied"),
             helper.make_node("MatMul", ["y", "w"], ["z"], name="head")]
    model = make_model(nodes, [], [("z", [4, 8])], [weight(8, 8, name="table"), weight(8, 8, name="w"),
                                                   numpy_helper.from_array(np.arange(4, dtype=np.int64), "ids")])
    out, report = sparsify(model, sparsity=0.5)
    rows = {r.layer: r for r in report.layers}
    assert rows["tied"].skipped == "also read by Gather 'embed', which zeros would change too"
    assert np.array_equal(weights_of(out)["table"], weights_of(model)["table"])
    assert rows["head"].sparsity == 0.5


def test_a_weight_shared_by_two_matmuls_is_solved_once_for_both():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="second")]
    model = make_model(nodes, [("x", ["N", 16])], [("y", ["N", 16])], [weight(16, 16, name="w")])
    out, report = sparsify(model, pattern="2:4", calib={"x": correlated(256, 16)})
    assert [r.layer for r in report.layers] == ["first + second"]
    assert nm_violations(weights_of(out)["w"].T, 2, 4) == 0
    assert [n.input[1] for n in out.graph.node if n.op_type == "MatMul"] == ["w", "w"]


def test_nothing_to_sparsify_is_refused_with_the_cause():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", ["N", 4])], [("y", ["N", 4])])
    with pytest.raises(PlanError, match="no Conv, Gemm or MatMul"):
        sparsify(model, sparsity=0.5)
    with pytest.raises(UsageError, match="--include 'nothing\\*'"):
        sparsify(mlp(), sparsity=0.5, include=["nothing*"])
    with pytest.raises(PlanError, match="every weight stays dense"):
        sparsify(cnn(), pattern="2:4", include=["dw"])


def test_options_that_cannot_work_are_usage_errors():
    with pytest.raises(UsageError, match="choose one of"):
        sparsify(mlp(), sparsity=0.5, pattern="2:4")
    with pytest.raises(UsageError, match="choose one of"):
        sparsify(mlp())
    with pytest.raises(UsageError, match="calibration data"):
        sparsify(mlp(), sparsity=0.5, criterion="sparsegpt")
    with pytest.raises(UsageError, match="criterion"):
        sparsify(mlp(), sparsity=0.5, criterion="obs")


# -- the model that comes out ------------------------------------------------------------------------

def test_prune_then_sparsify_zeroes_inside_the_structure_that_remains(tmp_path):
    pruned_path, sparse_path = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    prune(EXAMPLE, pruned_path, target_flops=0.4)
    _, report = sparsify(pruned_path, sparse_path, pattern="2:4", calib=CALIB, calib_samples=64)
    pruned, sparse = weights_of(pruned_path), weights_of(sparse_path)
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in sparse.items()}
    assert report.sparsified and all(r.sparsity == 0.5 for r in report.sparsified)
    nodes = {n.name: n for n in onnx.load(str(sparse_path)).graph.node}
    for row in report.sparsified:
        assert non_zeros_per_block(sparse[row.weight], nodes[row.layer]).max() == 2, row.layer
    assert "read back from disk" in report.checks


@pytest.mark.parametrize("criterion", ["magnitude", "sparsegpt"])
def test_weights_on_disk_come_out_on_disk(tmp_path, criterion):
    source, out = tmp_path / "ext.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(), str(source), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    calib = cnn_calibration() if criterion == "sparsegpt" else None
    _, report = sparsify(source, out, sparsity=0.5, criterion=criterion, calib=calib)
    assert (tmp_path / "out.onnx.data").is_file()
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert (weights_of(out)["c1.w"] == 0).mean() == 0.5 and report.sparsity == 0.5


def test_the_sparsified_model_stays_close_where_sparsegpt_compensates(monkeypatch):
    import helpers

    monkeypatch.setattr(helpers, "RNG", np.random.default_rng(0))  # its own weights, whatever ran before
    calib, x, dense_model = cnn_calibration(64), cnn_calibration(8)["x"], cnn()
    dense = run(dense_model, {"x": x})[0]
    far = {}
    for criterion in ("magnitude", "sparsegpt"):
        model, _ = sparsify(dense_model, sparsity=0.5, criterion=criterion, calib=calib if criterion != "magnitude" else None)
        got = run(model, {"x": x})[0]
        far[criterion] = np.linalg.norm(got - dense) / np.linalg.norm(dense)
    assert far["sparsegpt"] < far["magnitude"]


# -- command line -----------------------------------------------------------------------------------

def test_the_command_prints_the_per_layer_table_and_writes_a_validated_model(tmp_path, capsys):
    out, report = tmp_path / "s.onnx", tmp_path / "r.json"
    assert main(["sparsify", str(EXAMPLE), str(out), "--pattern", "2:4", "--calib", str(CALIB), "--calib-samples",
                 "32", "--report", str(report), "--markdown", str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert "rel. error on calib" in text and "/stage3/conv2/Conv" in text and "50.0%" in text
    assert "no speed-up" in text and f"wrote {out}" in text
    data = json.loads(report.read_text())
    assert data["mode"].startswith("2:4, sparsegpt") and data["sparsity"] == 0.5
    assert all(r["relative_error"] is not None for r in data["layers"] if r["skipped"] is None)
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "0.5", "--pattern", "2:4"], "not allowed with"),
    (["--pattern", "4:2"], "N must be at least 1 and below M"),
    (["--sparsity", "1.5"], "1.5 is not a fraction"),
    (["--pattern", "2:4", "--criterion", "wanda"], "calibration data"),
    (["--pattern", "2:4", "--exclude", "Conv", "--exclude", "Gemm"], "leave none"),
])
def test_impossible_options_exit_with_code_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "s.onnx"
    try:
        code = main(["sparsify", str(EXAMPLE), str(out)] + argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_gate_refuses_a_model_that_lost_too_much_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "s.onnx"
    code = main(["sparsify", str(EXAMPLE), str(out), "--sparsity", "0.95", "--criterion", "magnitude",
                 "--validate-data", str(MODELS / "digits_test.npz"), "--max-accuracy-drop", "0.01", "--no-latency"])
    assert code == 9
    captured = capsys.readouterr()
    assert "Top-1 accuracy" in captured.out and "Nothing was written" in captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == []
