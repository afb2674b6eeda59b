"""`onnxprune sweep` / `onnxprune.sweep`: prune at several ratios, accuracy (or
fidelity), FLOPs, params and latency of each, JSON and an optional plot.

Timings are never asserted on, only their consistency.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, UsageError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "models" / "digits_resnet.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"


@pytest.fixture(scope="module")
def small():
    with np.load(TEST_DATA) as npz:
        return {"input": npz["input"][:150], "labels": npz["labels"][:150]}


@pytest.fixture(scope="module")
def small_npz(small, tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "small.npz"
    np.savez(path, **small)
    return path


@pytest.fixture(scope="module")
def swept():
    return onnxprune.sweep(EXAMPLE, [0.5, 0.02], data=TEST_DATA, target="flops", max_accuracy_drop=0.02,
                           latency_runs=3, latency_warmup=0)


def test_each_ratio_is_pruned_measured_and_timed(swept):
    dense, (tiny, half) = swept.dense, swept.points
    assert [p.ratio for p in swept.points] == [0.02, 0.5]  # sorted
    assert swept.metric == "top1" and swept.samples == 450
    assert dense.flops_kept == dense.params_kept == 1.0 and dense.value == pytest.approx(449 / 450)
    assert 1.0 > tiny.flops_kept > half.flops_kept and half.flops_kept <= 0.5 * 1.05
    assert 1.0 > tiny.params_kept > half.params_kept
    assert tiny.quality.passed is True and half.quality.passed is False  # data-free 50%: about 20% left
    assert half.quality.drop > 0.5 and swept.best() is tiny
    for p in (dense, tiny, half):
        assert 0 < p.latency_ms["min_ms"] <= p.latency_ms["median_ms"] <= p.latency_ms["p90_ms"]
        assert p.speedup == pytest.approx(dense.latency_ms["median_ms"] / p.latency_ms["median_ms"])
    assert dense.speedup == 1.0


def test_table_markdown_and_json(swept):
    table = swept.render_table()
    for column in ("FLOPs removed", "FLOPs kept", "params kept", "top-1 accuracy", "latency ms", "speed-up",
                   "drop <= 2 pt"):
        assert column in table
    assert "│ dense " in table and "│ 0.02 " in table and "│ 0.5 " in table and "99.78%" in table
    assert "Largest reduction within a 2-point budget: 0.02" in table
    md = swept.render_markdown()
    assert "| dense | 100.00% | 100.00% | 99.78% |" in md
    data = json.loads(json.dumps(swept.to_dict()))
    assert [p["ratio"] for p in data["points"]] == [0.02, 0.5] and data["best"] == 0.02
    assert data["latency"]["threads"] == 1 and data["dense"]["latency_ms"]["median_ms"] > 0
    assert data["points"][1]["quality"]["passed"] is False


def test_cli_sweep_json_by_unit_ratio_without_latency(tmp_path, capsys, small_npz):
    out_dir = tmp_path / "models"
    argv = ["sweep", str(EXAMPLE), "--ratios", "0.1,0.02", "--target", "ratio", "--round-to", "1",
            "--data", str(small_npz), "--no-latency", "--json", "--output-dir", str(out_dir),
            "--report", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "ratio" and data["latency"] is None and data["samples"] == 150
    assert [p["ratio"] for p in data["points"]] == [0.02, 0.1]
    assert all(p["latency_ms"] is None and p["error"] is None for p in data["points"])
    assert data["points"][0]["flops_kept"] > data["points"][1]["flops_kept"]
    assert sorted(f.name for f in out_dir.iterdir()) == ["digits_resnet.ratio0.02.onnx", "digits_resnet.ratio0.1.onnx"]
    assert json.loads((tmp_path / "s.json").read_text())["points"] == data["points"]
    md = (tmp_path / "s.md").read_text()
    assert "units removed" in md and "latency ms" not in md


def test_cli_sweep_with_calibration_data_repairs_every_ratio(capsys, small_npz):
    """--calib reaches prune at every ratio: 50% of FLOPs removed keeps the digits model near its
    dense top-1 (data-free pruning leaves ~23%)."""
    calib = str(ROOT / "models" / "digits_calib.npz")
    argv = ["sweep", str(EXAMPLE), "--ratios", "0.5", "--data", str(small_npz), "--calib", calib,
            "--calib-samples", "128", "--no-latency", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["options"]["calibration"] == calib and data["options"]["calib_samples"] == 128
    assert "least_squares" not in data["options"]  # only what differs from prune's defaults
    [point] = data["points"]
    assert point["quality"]["after"] >= point["quality"]["before"] - 0.03
    with pytest.raises(UsageError, match="calibraton"):
        onnxprune.sweep(EXAMPLE, [0.5], data=small_npz, calibraton="typo.npz")


def test_without_labels_sweep_measures_agreement(small):
    result = onnxprune.sweep(EXAMPLE, [0.5], data={"input": small["input"]}, measure_latency=False)
    assert result.metric == "top1_agreement" and result.dense.value == 1.0
    assert result.points[0].quality.fidelity["top1_agreement"] == result.points[0].value < 1.0
    assert "top-1 agreement" in result.render_table()


def test_an_unreachable_ratio_is_reported_and_the_others_go_on(small):
    result = onnxprune.sweep(EXAMPLE, [0.02, 0.99], data=small, measure_latency=False)
    ok, failed = result.points
    assert ok.error is None and ok.value is not None
    assert failed.error is not None and "99.0% of FLOPs" in failed.error and failed.quality is None
    assert "failed: cannot remove 99.0% of FLOPs" in result.render_table()


def test_bad_ratios_and_targets(capsys):
    assert main(["sweep", str(EXAMPLE), "--ratios", "0.1,abc", "--data", str(TEST_DATA)]) == 2
    assert "--ratios '0.1,abc'" in capsys.readouterr().err
    assert main(["sweep", str(EXAMPLE), "--ratios", "0.1,1.5", "--data", str(TEST_DATA)]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    with pytest.raises(OnnxPruneError, match="not one of"):
        onnxprune.sweep(EXAMPLE, [0.1], data=TEST_DATA, target="latency")
    with pytest.raises(SystemExit):
        main(["sweep", str(EXAMPLE), "--ratios", "0.1"])  # --data is required


def test_missing_matplotlib_is_a_clear_error_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    png = tmp_path / "s.png"
    argv = ["sweep", str(EXAMPLE), "--ratios", "0.1", "--data", str(tmp_path / "nothing-read-yet.npz"),
            "--plot", str(png)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "onnxprune[plot]" in err
    assert not png.exists()


def test_plot_accuracy_vs_flops_and_latency(tmp_path, small_npz, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    argv = ["sweep", str(EXAMPLE), "--ratios", "0.02,0.5", "--data", str(small_npz), "--plot", str(png),
            "--runs", "2", "--warmup", "0", "--max-accuracy-drop", "0.02"]
    assert main(argv) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _score_map() -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> conv1 (16) -> Relu -> head (1x1) -> y[N, 1, 8, 8]: a detector-like score map."""
    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((1, 16, 1, 1)).astype(np.float32), "head")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "head"], ["y"], name="head", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "map", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_score_map_is_swept_on_its_cosine_to_the_dense_map():
    x = np.random.default_rng(13).standard_normal((10, 3, 8, 8)).astype(np.float32)
    result = onnxprune.sweep(_score_map(), [0.25, 0.75], data={"x": x}, target="ratio", round_to=1,
                             max_accuracy_drop=0.05, measure_latency=False)
    assert result.metric == "cosine_similarity" and result.dense.value == 1.0
    light, heavy = result.points
    assert 1.0 > light.value > heavy.value  # a quarter of the channels costs less than three quarters
    assert light.quality.drop == pytest.approx(1 - light.quality.fidelity["cosine_similarity"])
    table = result.render_table()
    assert "cosine similarity" in table and "drop <= 0.05" in table
    light_row = next(line for line in table.splitlines() if line.startswith("│ 0.25 "))
    cells = [c.strip() for c in light_row.split("│")[1:-1]]
    assert cells[3:] == [f"{light.value:.4g}", f"{-light.quality.drop:+.4g}", "yes"]  # numbers, not percent
    assert "Largest reduction within a budget of 0.05: 0.25" in table


def test_cli_sweep_with_a_custom_metric_and_a_time_major_input(tmp_path, capsys):
    rng = np.random.default_rng(14)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, data, metric = tmp_path / "rnn.onnx", tmp_path / "seq.npz", tmp_path / "m.py"
    onnx.save(model, str(path))
    np.savez(data, x=rng.standard_normal((6, 5, 4)).astype(np.float32))  # samples first
    metric.write_text("def energy(outputs, labels):\n    assert outputs.shape[1:] == (5, 3)  # samples first\n"
                      "    return float((outputs ** 2).mean())\n")
    argv = ["sweep", str(path), "--ratios", "0.5", "--target", "ratio", "--round-to", "1", "--data", str(data),
            "--batch-axis", "1", "--metric", f"{metric}:energy", "--max-accuracy-drop", "100", "--no-latency",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "custom:energy" and out["samples"] == 6
    [point] = out["points"]
    assert point["quality"]["before"] == out["dense"]["quality"]["after"] > 0
    assert point["quality"]["passed"] is True  # a budget of 100 is in the metric's own unit
