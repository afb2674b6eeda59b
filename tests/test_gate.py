"""The validation gate of `prune`: accuracy (or fidelity) and latency before and
after in one report, and a refusal that writes nothing when the drop exceeds
the budget.

On the bundled example, data-free pruning of half the FLOPs drops top-1
accuracy from 99.78% to about 20%, a tiny prune keeps it, and a lossless
prune keeps the outputs. Timings are never asserted on, only their
consistency.
"""
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from helpers import make_model, weight
from onnxprune.cli import main
from onnxprune.errors import DataError, OnnxPruneError, ValidationError
from onnxprune.runtime.gate import AccuracyDropError
from onnxprune.runtime.progress import Progress, progress_enabled

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "models" / "digits_resnet.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"
FAST = dict(measure_latency=False)


@pytest.fixture(scope="module")
def small():
    """The first 150 test samples with labels (faster passes where the exact accuracy does not matter)."""
    with np.load(TEST_DATA) as npz:
        return {"input": npz["input"][:150], "labels": npz["labels"][:150]}


@pytest.fixture(scope="module")
def small_npz(small, tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "small.npz"
    np.savez(path, **small)
    return path


@pytest.fixture(scope="module")
def unlabelled(small):
    return {"input": small["input"]}


def test_a_drop_over_the_budget_raises_and_writes_nothing(tmp_path):
    out, plan = tmp_path / "half.onnx", tmp_path / "plan.json"
    with pytest.raises(AccuracyDropError) as err:
        onnxprune.prune(EXAMPLE, out, target_flops=0.5, save_plan=plan, validate_data=TEST_DATA,
                        max_accuracy_drop=0.02, **FAST)
    assert not out.exists() and not plan.exists() and list(tmp_path.iterdir()) == []
    exc = err.value
    assert isinstance(exc, ValidationError) and exc.exit_code == AccuracyDropError.exit_code == 9
    q = exc.report.quality
    assert q.metric == "top1" and q.samples == 450 and q.passed is False
    assert q.before == pytest.approx(449 / 450) and q.drop > 0.5  # data-free: about 20% left
    message = str(exc)
    assert f"a drop of {q.drop * 100:.2f} points" in message and "budget of 2.00 points" in message
    assert "Nothing was written" in message


def test_a_tiny_prune_passes_the_gate_and_is_written(tmp_path, small):
    out, plan = tmp_path / "tiny.onnx", tmp_path / "plan.json"
    model, report = onnxprune.prune(EXAMPLE, out, ratio=0.02, round_to=1, save_plan=plan, validate_data=small,
                                    max_accuracy_drop=0.02, **FAST)
    assert out.exists() and plan.exists()
    q = report.quality
    assert q.passed is True and report.gate_passed is True and q.drop <= 0.02
    assert report.after.params < report.before.params
    assert q.accuracy_before["top1"] == q.before and q.accuracy_after["top1"] == q.after
    assert "top5" in q.accuracy_after and 0.0 <= q.fidelity["top1_agreement"] <= 1.0


def test_a_lossless_prune_passes_a_zero_budget(tmp_path, small):
    out = tmp_path / "same.onnx"
    _, report = onnxprune.prune(EXAMPLE, out, lossless=True, validate_data=small, max_accuracy_drop=0.0, **FAST)
    assert out.exists()
    q = report.quality
    assert q.drop == 0.0 and q.passed is True
    assert q.fidelity["top1_agreement"] == 1.0 and q.fidelity["max_abs_error"] < 1e-4


def test_one_table_with_accuracy_latency_ops_params_flops_and_size():
    _, report = onnxprune.prune(EXAMPLE, None, ratio=0.02, round_to=1, validate_data=TEST_DATA,
                                latency_runs=3, latency_warmup=0)
    assert report.latency is not None  # on by default with validation data
    lat = report.latency
    assert lat.threads == 1 and lat.runs == 3 and lat.provider == "CPUExecutionProvider"
    assert lat.input_shapes == {"input": [1, 1, 32, 32]}
    for side in (lat.before, lat.after):
        assert 0 < side["min_ms"] <= side["median_ms"] <= side["p90_ms"]
    assert lat.speedup == pytest.approx(lat.before["median_ms"] / lat.after["median_ms"])
    table = report.render_table()
    assert table.count("┌") == 1  # one table
    for row in ("Conv", "Parameters", "FLOPs", "Model size", "Top-1 accuracy", "Top-5 accuracy",
                "Top-1 agreement with dense", "Latency median (CPU, 1 thread)", "Latency p90"):
        assert row in table
    assert "99.78%" in table and f"({lat.speedup:.2f}x)" in table
    md = report.render_markdown()
    assert "| Top-1 accuracy | 99.78% |" in md and "| Latency median (CPU, 1 thread) |" in md
    data = json.loads(json.dumps(report.to_dict()))
    assert data["quality"]["metric"] == "top1" and data["quality"]["passed"] is None
    assert data["quality"]["accuracy_before"]["top1"] == pytest.approx(449 / 450)
    assert data["latency"]["speedup"] > 0 and data["latency"]["before"]["median_ms"] > 0
    assert "Validation: top-1 accuracy 99.78% ->" in report.summary()


def test_without_labels_the_gate_uses_top1_agreement(unlabelled):
    proto = onnx.load(str(EXAMPLE))
    before = proto.SerializeToString()
    with pytest.raises(AccuracyDropError, match="top-1 agreement with the dense model 100.00% ->") as err:
        onnxprune.prune(proto, None, target_flops=0.5, validate_data=unlabelled, max_accuracy_drop=0.02, **FAST)
    q = err.value.report.quality
    assert q.metric == "top1_agreement" and q.before == 1.0 and q.samples == 150
    assert q.accuracy_before == {} and q.drop == pytest.approx(1.0 - q.fidelity["top1_agreement"])
    assert proto.SerializeToString() == before  # the caller's model is untouched
    _, report = onnxprune.prune(proto, None, lossless=True, validate_data=unlabelled, max_accuracy_drop=0.0, **FAST)
    assert report.quality.after == 1.0
    table = report.render_table()
    assert "Top-1 agreement with dense" in table and "Top-1 accuracy" not in table


def test_cli_gate_refuses_with_exit_code_9_and_writes_nothing(tmp_path, capsys, small_npz):
    out, rep, md = tmp_path / "half.onnx", tmp_path / "r.json", tmp_path / "r.md"
    argv = ["prune", str(EXAMPLE), str(out), "--target-flops", "0.5", "--validate-data", str(small_npz),
            "--max-accuracy-drop", "0.02", "--no-latency", "--report", str(rep), "--markdown", str(md)]
    assert main(argv) == 9
    captured = capsys.readouterr()
    assert "accuracy gate" in captured.err and "over the budget of 2.00 points" in captured.err
    assert "Nothing was written" in captured.err
    assert "Top-1 accuracy" in captured.out and "FLOPs" in captured.out  # what was measured is shown
    assert "wrote" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_cli_gate_passes_and_writes_the_model_and_reports(tmp_path, capsys, small_npz):
    out, rep, md = tmp_path / "tiny.onnx", tmp_path / "r.json", tmp_path / "r.md"
    argv = ["prune", str(EXAMPLE), str(out), "--ratio", "0.02", "--round-to", "1", "--validate-data",
            str(small_npz), "--max-accuracy-drop", "0.02", "--runs", "2", "--warmup", "0", "--threads", "1",
            "--report", str(rep), "--markdown", str(md)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Top-1 accuracy" in text and "Latency median" in text and "within the budget of 2.00 points" in text
    onnx.checker.check_model(str(out))
    data = json.loads(rep.read_text())
    assert data["quality"]["passed"] is True and data["quality"]["max_drop"] == 0.02
    assert data["latency"]["runs"] == 2
    assert "| Top-1 accuracy |" in md.read_text()


def test_cli_gate_usage_errors(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--max-accuracy-drop", "0.02"]) == 1
    assert "needs validation data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--validate-data", str(TEST_DATA),
              "--max-accuracy-drop", "2"])
    assert exit_.value.code == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 3, 32, 32), np.float32), labels=np.zeros(4, np.int64))
    assert main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--validate-data", str(bad)]) == 7
    assert "axis 1 is 3, the model needs 1" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(OnnxPruneError, match="in \\[0, 1\\]"):
        onnxprune.prune(EXAMPLE, None, ratio=0.1, validate_data=TEST_DATA, max_accuracy_drop=-0.1)


def _regressor() -> onnx.ModelProto:
    """x[N, 4] -> MatMul(4x8) -> Relu -> MatMul(8x1) -> Reshape[-1] -> y[N]: no class axis."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
             helper.make_node("Reshape", ["o", "flat"], ["y"], name="flatten")]
    flat = onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat")
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N"])],
                      [weight(4, 8, name="w1"), weight(8, 1, name="w2"), flat])


def test_an_output_without_class_axis_reports_fidelity_but_cannot_be_gated():
    model = _regressor()
    data = {"x": np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)}
    with pytest.raises(DataError, match="needs a classifier output"):
        onnxprune.prune(model, None, ratio=0.5, round_to=1, validate_data=data, max_accuracy_drop=0.1, **FAST)
    _, report = onnxprune.prune(model, None, ratio=0.5, round_to=1, validate_data=data, **FAST)
    q = report.quality
    assert q.metric is None and q.drop is None and q.passed is None
    assert "cosine_similarity" in q.fidelity and "Cosine similarity to dense" in report.render_table()


def test_progress_bar_only_on_a_terminal_and_erased_when_done(monkeypatch):
    monkeypatch.delenv("ONNXPRUNE_PROGRESS", raising=False)
    assert progress_enabled(io.StringIO()) is False
    monkeypatch.setenv("ONNXPRUNE_PROGRESS", "1")
    assert progress_enabled(io.StringIO()) is True
    monkeypatch.setenv("ONNXPRUNE_PROGRESS", "0")
    assert progress_enabled(io.StringIO()) is False

    stream = io.StringIO()
    with Progress(4, "data", enabled=True, stream=stream) as bar:
        for _ in range(4):
            bar.update()
        assert "data [" in stream.getvalue() and "4/4" in stream.getvalue()
    assert stream.getvalue().endswith("\r")  # erased: the next output starts on a clean line
    quiet = io.StringIO()
    with Progress(4, "data", stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_data_passes_and_benchmarks_draw_progress_when_asked(capsys, small):
    onnxprune.prune(EXAMPLE, None, ratio=0.02, round_to=1, validate_data=small, latency_runs=2,
                    latency_warmup=0, progress=True)
    err = capsys.readouterr().err
    assert "dense model on data [" in err and "pruned model on data [" in err and "latency of 2 model(s)" in err
    assert "150/150" in err


def test_no_progress_when_not_asked(capsys, monkeypatch, small):
    monkeypatch.setenv("ONNXPRUNE_PROGRESS", "1")
    onnxprune.prune(EXAMPLE, None, ratio=0.02, round_to=1, validate_data=small, latency_runs=1,
                    latency_warmup=0, progress=False)
    assert capsys.readouterr().err == ""
