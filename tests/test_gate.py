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
from helpers import make_model, run, weight
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, ValidationError
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
    with pytest.raises(OnnxPruneError, match="needs validation data"):
        onnxprune.prune(EXAMPLE, out, ratio=0.1, max_accuracy_drop=0.02)
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--validate-data", str(TEST_DATA),
              "--max-accuracy-drop", "-0.1"])
    assert exit_.value.code == 2
    assert main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--validate-data", str(TEST_DATA),
                 "--max-accuracy-drop", "2"]) == 2  # over 1 only in a custom metric's own unit
    assert "fraction in [0, 1]" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 3, 32, 32), np.float32), labels=np.zeros(4, np.int64))
    assert main(["prune", str(EXAMPLE), str(out), "--ratio", "0.1", "--validate-data", str(bad)]) == 7
    assert "axis 1 is 3, the model needs 1" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(OnnxPruneError, match="in \\[0, 1\\]"):
        onnxprune.prune(EXAMPLE, None, ratio=0.1, validate_data=TEST_DATA, max_accuracy_drop=-0.1)


def _regressor() -> onnx.ModelProto:
    """x[N, 4] -> MatMul(4x8) -> Relu -> MatMul(8x1) -> Reshape[-1] -> y[N]: one value per sample."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
             helper.make_node("Reshape", ["o", "flat"], ["y"], name="flatten")]
    flat = onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat")
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N"])],
                      [weight(4, 8, name="w1"), weight(8, 1, name="w2"), flat])


def test_a_regressor_is_gated_on_the_cosine_over_all_its_samples():
    """One value per sample has no direction of its own: the cosine is taken over the whole output."""
    model = _regressor()
    data = {"x": np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)}
    pruned, report = onnxprune.prune(model, None, ratio=0.5, round_to=1, validate_data=data, **FAST)
    q = report.quality
    assert q.metric == "cosine_similarity" and q.before == 1.0
    assert set(q.fidelity) == {"cosine_similarity", "relative_l2_error", "max_abs_error", "mean_abs_error"}
    dense, small = run(model, data)[0].astype(np.float64), run(pruned, data)[0].astype(np.float64)
    assert q.fidelity["cosine_similarity"] == pytest.approx(dense @ small / np.linalg.norm(dense) / np.linalg.norm(small))
    assert q.fidelity["relative_l2_error"] == pytest.approx(np.linalg.norm(small - dense) / np.linalg.norm(dense))
    assert q.drop == pytest.approx(1.0 - q.fidelity["cosine_similarity"]) and q.drop > 0
    table = report.render_table()
    assert "Cosine similarity to dense" in table and "Relative L2 error to dense" in table
    assert "Gated drop: 1 - cosine" in table and "Top-1 agreement" not in table


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


# -- outputs that are not class scores --------------------------------------------------------------
def _detector() -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> conv1 (16 channels) -> Relu -> head (1x1, 16 -> 1) -> score map y[N, 1, 8, 8].

    Like a text detector's probability map, y has one channel: an arg-max over axis 1 always agrees.
    Channels 0..7 come in pairs with the same filter and opposite head weights, so they cancel in y;
    channels 8..15 make y, and channel 15's head weight is tiny. Keeping only channels 0..7 leaves
    y = 0 everywhere (cosine 0 to the dense map); removing channel 15 changes y very little."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w1[1:8:2] = w1[0:8:2]
    head = rng.standard_normal((1, 16, 1, 1)).astype(np.float32)
    head[0, 1:8:2] = -head[0, 0:8:2]
    head[0, 15] = 1e-3
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "head"], ["y"], name="head", kernel_shape=[1, 1])]
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             onnx.numpy_helper.from_array(head, "head")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 1, 8, 8])], inits)


@pytest.fixture
def detector(tmp_path):
    model, data = tmp_path / "detector.onnx", tmp_path / "images.npz"
    onnx.save(_detector(), str(model))
    np.savez(data, x=np.random.default_rng(1).standard_normal((12, 3, 8, 8)).astype(np.float32))
    return model, data


def _plan(path: Path, keep: list[int]) -> str:
    path.write_text(json.dumps({"format": "onnxprune-plan/1", "groups": [{"name": "conv1", "size": 16, "keep": keep}]}))
    return str(path)


def test_a_destroyed_score_map_fails_the_gate_and_writes_nothing(tmp_path, capsys, detector):
    model, data = detector
    out, rep, md = tmp_path / "out" / "small.onnx", tmp_path / "out" / "r.json", tmp_path / "out" / "r.md"
    out.parent.mkdir()
    argv = ["prune", str(model), str(out), "--plan", _plan(tmp_path / "plan.json", list(range(8))),
            "--validate-data", str(data), "--max-accuracy-drop", "0.01", "--no-latency",
            "--report", str(rep), "--markdown", str(md)]
    assert main(argv) == 9
    captured = capsys.readouterr()
    assert "cosine similarity to the dense model 1 -> " in captured.err and "over the budget of 0.01" in captured.err
    assert "Gated drop: 1 - cosine" in captured.out and "Top-1 agreement" not in captured.out
    assert list(out.parent.iterdir()) == []
    with pytest.raises(AccuracyDropError) as err:
        onnxprune.prune(model, None, plan=tmp_path / "plan.json", validate_data=data, max_accuracy_drop=0.01, **FAST)
    q = err.value.report.quality
    assert abs(q.fidelity["cosine_similarity"]) < 0.05 and q.fidelity["relative_l2_error"] == pytest.approx(1, abs=1e-3)
    assert q.drop > 0.95 and q.passed is False


def test_a_lightly_pruned_score_map_passes_the_gate(tmp_path, capsys, detector):
    model, data = detector
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    argv = ["prune", str(model), str(out), "--plan", _plan(tmp_path / "plan.json", list(range(15))),
            "--validate-data", str(data), "--max-accuracy-drop", "0.01", "--no-latency", "--report", str(rep)]
    assert main(argv) == 0
    assert "within the budget of 0.01" in capsys.readouterr().out
    q = json.loads(rep.read_text())["quality"]
    assert q["metric"] == "cosine_similarity" and q["passed"] is True and q["gated"] == {"y": "cosine_similarity"}
    fid = q["fidelity_vs_dense"]["y"]
    assert 0.999 < fid["cosine_similarity"] < 1.0 and 0 < fid["relative_l2_error"] < 0.05
    assert "top1_agreement" not in fid  # one channel: no class axis to agree on


def _two_heads() -> onnx.ModelProto:
    """x[N, 6] -> fc1 (16) -> Relu -> cls (5 class scores) and proj -> Reshape -> feat[N, 2, 4]."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="cls"),
             helper.make_node("MatMul", ["r", "w3"], ["p"], name="proj"),
             helper.make_node("Reshape", ["p", "shape"], ["feat"], name="to_map")]
    inits = [weight(6, 16, name="w1"), weight(16, name="b1"), weight(16, 5, name="w2"), weight(5, name="b2"),
             weight(16, 8, name="w3"), onnx.numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape")]
    return make_model(nodes, [("x", ["N", 6])], [("logits", ["N", 5]), ("feat", ["N", 2, 4])], inits)


def test_every_output_gets_its_fidelity_and_the_worst_is_gated():
    model = _two_heads()
    data = {"x": np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32)}
    pruned, report = onnxprune.prune(model, None, ratio=0.5, round_to=1, validate_data=data, **FAST)
    q = report.quality
    assert set(q.outputs) == {"logits", "feat"}
    assert q.gated == {"logits": "top1_agreement", "feat": "cosine_similarity"} and q.metric == "fidelity"
    assert "top1_agreement" in q.outputs["logits"] and "top1_agreement" not in q.outputs["feat"]
    feeds = {"x": data["x"]}
    dense, small = run(model, feeds)[1].reshape(40, -1), run(pruned, feeds)[1].reshape(40, -1)
    norms = np.linalg.norm(dense, axis=1) * np.linalg.norm(small, axis=1)
    # a sample whose pruned 'feat' is all zero (its kept fc1 units all below zero) has a cosine of 0
    cos = np.divide(np.sum(dense * small, axis=1), norms, out=np.zeros(len(norms)), where=norms > 0)
    assert q.outputs["feat"]["cosine_similarity"] == pytest.approx(cos.mean(), rel=1e-5)
    drops = {"logits": 1 - q.outputs["logits"]["top1_agreement"], "feat": 1 - q.outputs["feat"]["cosine_similarity"]}
    assert q.drop == pytest.approx(max(drops.values())) and q.output == max(drops, key=drops.get)
    table = report.render_table()
    for row in ("Top-1 agreement with dense ('logits')", "Cosine similarity to dense ('feat')",
                "Relative L2 error to dense ('logits')", f"worst output '{q.output}'"):
        assert row in table


def test_a_declared_class_axis_or_none_decides_what_is_agreement():
    model = _two_heads()
    data = {"x": np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32)}
    _, report = onnxprune.prune(model, None, lossless=True, validate_data=data, class_axis="none", **FAST)
    assert report.quality.gated == {"logits": "cosine_similarity", "feat": "cosine_similarity"}
    _, report = onnxprune.prune(model, None, lossless=True, validate_data=data, class_axis=2, **FAST)
    assert report.quality.gated == {"logits": "cosine_similarity", "feat": "top1_agreement"}  # logits has no axis 2


def test_a_custom_metric_is_the_gated_number(tmp_path, capsys, detector):
    model, data = detector
    metric = tmp_path / "peaks.py"
    metric.write_text("import numpy as np\n\n"
                      "def peak(outputs, labels):\n    return float(outputs.max(axis=(1, 2, 3)).mean())\n\n"
                      "def two(outputs, labels):\n    return {'a': 1.0, 'b': 2.0}\n")
    dense_peak = float(run(_detector(), {"x": np.load(data)["x"]})[0].max(axis=(1, 2, 3)).mean())
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    base = ["prune", str(model), str(out), "--validate-data", str(data), "--no-latency", "--report", str(rep)]
    destroyed = _plan(tmp_path / "destroyed.json", list(range(8)))
    # a budget above 1 is in the metric's own unit; the destroyed map's peaks fall from dense_peak to 0
    assert main([*base, "--plan", destroyed, "--metric", f"{metric}:peak",
                 "--max-accuracy-drop", f"{dense_peak * 0.9:.4f}"]) == 9
    err = capsys.readouterr().err
    assert "peak (custom metric)" in err and not out.exists() and not rep.exists()
    light = _plan(tmp_path / "light.json", list(range(15)))
    assert main([*base, "--plan", light, "--metric", f"{metric}:peak", "--max-accuracy-drop", "0.05"]) == 0
    assert "peak (custom metric)" in capsys.readouterr().out
    q = json.loads(rep.read_text())["quality"]
    assert q["metric"] == "custom:peak" and q["before"] == pytest.approx(dense_peak, rel=1e-5)
    assert q["custom_before"]["peak"] == q["before"] and q["drop"] == pytest.approx(q["before"] - q["after"])
    assert "y" in q["fidelity_vs_dense"]  # fidelity is still reported
    assert main([*base, "--plan", light, "--metric", f"{metric}:two"]) == 1
    assert "the gate needs one" in capsys.readouterr().err


def _time_major() -> onnx.ModelProto:
    """x[T, N, 4] (time first) -> fc1 (8) -> Relu -> fc2 (3) -> y[T, N, 3], and its mean over time pooled[N, 3]."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
             helper.make_node("ReduceMean", ["y"], ["pooled"], name="pool", axes=[0], keepdims=0)]
    return make_model(nodes, [("x", ["T", "N", 4])], [("y", ["T", "N", 3]), ("pooled", ["N", 3])],
                      [weight(4, 8, name="w1"), weight(8, 3, name="w2")])


def test_batch_axis_1_feeds_a_time_major_model(tmp_path, capsys):
    model, data = tmp_path / "rnn.onnx", tmp_path / "seq.npz"
    onnx.save(_time_major(), str(model))
    samples = np.random.default_rng(3).standard_normal((7, 5, 4)).astype(np.float32)  # samples first
    np.savez(data, x=samples)
    rep = tmp_path / "r.json"
    argv = ["prune", str(model), str(tmp_path / "small.onnx"), "--ratio", "0.25", "--round-to", "1",
            "--validate-data", str(data), "--no-latency", "--batch-size", "3", "--report", str(rep)]
    assert main(argv) == 7  # fed as [batch, time, 4], 'pooled' does not hold the samples on its first axis
    err = capsys.readouterr().err
    assert "output 'pooled' has shape (5, 3) for a batch of 1" in err and "--batch-axis" in err
    assert main([*argv, "--batch-axis", "1"]) == 0
    q = json.loads(rep.read_text())["quality"]
    assert q["samples"] == 7 and q["gated"] == {"y": "cosine_similarity", "pooled": "top1_agreement"}
    time_major = {"x": np.moveaxis(samples, 0, 1)}  # what the model is fed, all samples at once
    dense = run(onnx.load(str(model)), time_major)[0]
    small = run(onnx.load(str(tmp_path / "small.onnx")), time_major)[0]
    d, s = np.moveaxis(dense, 1, 0).reshape(7, -1), np.moveaxis(small, 1, 0).reshape(7, -1)
    cos = np.sum(d * s, axis=1) / np.linalg.norm(d, axis=1) / np.linalg.norm(s, axis=1)
    assert q["fidelity_vs_dense"]["y"]["cosine_similarity"] == pytest.approx(cos.mean(), rel=1e-5)


def _batch_one_only() -> onnx.ModelProto:
    """x[N, 4] -> fc1 (8) -> Relu -> fc2 (8) -> Reshape to the constant [1, 8] -> fc3 -> y[1, 3]: the batch
    of 1 is built into the Reshape, so onnxruntime refuses any other; fc1's units can be pruned."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["h2"], name="fc2"),
             helper.make_node("Reshape", ["h2", "shape"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w3"], ["y"], name="fc3")]
    shape = onnx.numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    inits = [weight(4, 8, name="w1"), weight(8, 8, name="w2"), weight(8, 3, name="w3"), shape]
    return make_model(nodes, [("x", ["N", 4])], [("y", [1, 3])], inits)


def test_a_model_that_runs_one_sample_at_a_time_passes_through_the_gate(tmp_path, capsys):
    model, data, out = tmp_path / "one.onnx", tmp_path / "x.npz", tmp_path / "small.onnx"
    onnx.save(_batch_one_only(), str(model))
    rng = np.random.default_rng(4)
    np.savez(data, x=rng.standard_normal((10, 4)).astype(np.float32), labels=rng.integers(0, 3, 10))
    argv = ["prune", str(model), str(out), "--ratio", "0.25", "--round-to", "1", "--validate-data", str(data),
            "--max-accuracy-drop", "1", "--no-latency"]
    assert main(argv) == 0 and out.exists()
    text = capsys.readouterr().out
    assert "a batch of 10 samples failed (onnxruntime: node 'flatten' (Reshape) failed)" in text
    assert "fed one at a time" in text and "Top-1 accuracy" in text and "within the budget" in text
