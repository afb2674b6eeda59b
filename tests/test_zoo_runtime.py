"""`eval`, `bench`, `sweep` and the prune gate on the light model-zoo graphs.

The onnx package's `light_*` models carry no weights; `materialize_zoo_model`
gives them seeded random ones. Such a network maps random images to nearly
the same class (biases dominate the deep random features), so the data here
is random noise at scales spread over four decades: the dense SqueezeNet
then picks four different classes across the samples, and a 30% pruning
changes about a third of its predictions. Labels are the dense model's own
argmax, so its top-1 accuracy is 100% by construction and the pruned
model's accuracy equals its top-1 agreement with the dense model.

Only the cheapest graphs: SqueezeNet (output [N, 1000, 1, 1], static batch
1) and ShuffleNet v1 (input 'gpu_0/data_0': an npz key with a slash;
grouped convs and a channel shuffle). Timings are never asserted on.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.runtime.gate import AccuracyDropError
from onnxprune.runtime.session import make_session
from onnxprune.testing import materialize_zoo_model, zoo_models

SAMPLES = 24


def zoo_path(key: str) -> Path:
    return next(p for p in zoo_models() if p.name == f"light_{key}.onnx")


def run_ort(model_path: Path, x: np.ndarray) -> np.ndarray:
    """First output, one sample at a time (the zoo graphs have a static batch of 1), as [N, classes]."""
    model = onnx.load(str(model_path))
    session = make_session(model, threads=1)
    name = model.graph.input[0].name
    out = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return out.reshape(len(x), -1)


def spread_images(seed: int = 0) -> np.ndarray:
    """Gaussian noise images, sample i scaled by 10 ** (4 i / (N - 1))."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, 4, SAMPLES)[:, None, None, None]
    return (rng.standard_normal((SAMPLES, 3, 224, 224)) * scales).astype(np.float32)


class Zoo:
    """A materialized zoo model on disk, its data (labelled by its own argmax) and a 30% pruning."""

    def __init__(self, key: str, root: Path):
        self.key = key
        self.model = materialize_zoo_model(zoo_path(key))
        self.input = self.model.graph.input[0].name
        self.dense = root / f"{key}.onnx"
        onnx.save(self.model, str(self.dense))
        self.x = spread_images()
        self.scores = run_ort(self.dense, self.x)
        self.labels = self.scores.argmax(1).astype(np.int64)
        self.data = root / f"{key}.npz"
        np.savez(self.data, **{self.input: self.x, "labels": self.labels})
        self.pruned = root / f"{key}_pruned.onnx"
        onnxprune.prune(self.dense, self.pruned, ratio=0.3)
        self.pruned_scores = run_ort(self.pruned, self.x)


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory):
    return Zoo("squeezenet", tmp_path_factory.mktemp("squeezenet"))


@pytest.fixture(scope="module")
def shufflenet(tmp_path_factory):
    return Zoo("shufflenet", tmp_path_factory.mktemp("shufflenet"))


@pytest.fixture(params=["squeezenet", "shufflenet"])
def zoo(request):
    return request.getfixturevalue(request.param)


# -- eval ----------------------------------------------------------------------------------------------
def test_the_data_is_not_trivial(squeezenet):
    """The premise of the accuracy checks: several classes, and the pruning changes some predictions."""
    assert len(set(squeezenet.labels.tolist())) >= 3
    agreement = np.mean(squeezenet.pruned_scores.argmax(1) == squeezenet.labels)
    assert 0.3 < agreement < 0.95


def test_eval_of_a_model_against_its_own_argmax_and_itself(zoo, capsys):
    argv = ["eval", str(zoo.dense), "--data", str(zoo.data), "--reference", str(zoo.dense), "--threads", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == SAMPLES and result["batch_size"] == 1  # static batch: looped one by one
    assert result["output"] == zoo.model.graph.output[0].name
    assert result["accuracy"] == result["reference_accuracy"] == {"top1": 1.0, "top5": 1.0}
    fid = result["fidelity"]
    assert fid["top1_agreement"] == 1.0
    assert fid["max_abs_error"] == fid["mean_abs_error"] == fid["kl_divergence"] == 0.0
    assert fid["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert any("probabilities" in note for note in result["notes"])  # both zoo models end in Softmax


def test_eval_of_the_pruned_model_matches_an_independent_computation(zoo):
    result = onnxprune.evaluate(zoo.pruned, zoo.data, reference=zoo.dense, threads=1)
    mine, dense = zoo.pruned_scores, zoo.scores
    agreement = np.mean(mine.argmax(1) == dense.argmax(1))
    assert result.accuracy["top1"] == pytest.approx(agreement)  # labels are the dense argmax
    assert result.fidelity["top1_agreement"] == pytest.approx(agreement)
    assert result.reference_accuracy["top1"] == 1.0
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(mine, zoo.labels)])
    assert result.accuracy["top5"] == pytest.approx(top5)
    assert result.fidelity["max_abs_error"] == pytest.approx(np.abs(mine - dense).max(), rel=1e-5)
    assert result.fidelity["max_abs_error"] > 0


def test_eval_of_the_pruned_squeezenet_shows_lower_agreement(squeezenet, capsys):
    argv = ["eval", str(squeezenet.pruned), "--data", str(squeezenet.data), "--reference", str(squeezenet.dense),
            "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    agreement = np.mean(squeezenet.pruned_scores.argmax(1) == squeezenet.labels)
    assert agreement < 1.0
    assert f"{agreement * 100:.2f}%" in out and "100.00%" in out and "fidelity: top-1 agreement" in out
    assert f"{(agreement - 1) * 100:+.2f} pt" in out  # the change column, pruned vs dense


def test_eval_without_labels_needs_the_reference(shufflenet, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, shufflenet.x[:4])
    with pytest.raises(DataError, match="no labels"):
        onnxprune.evaluate(shufflenet.dense, path)
    result = onnxprune.evaluate(shufflenet.dense, path, reference=shufflenet.dense, threads=1)
    assert result.accuracy == {} and result.fidelity["top1_agreement"] == 1.0 and result.samples == 4


# -- data that does not fit the model: DataError, exit code 7, the input named --------------------------
def mismatches(zoo: Zoo) -> list[tuple[str, dict, str]]:
    x, y, name = zoo.x[:2], zoo.labels[:2], zoo.input
    return [
        ("name", {"data_1": x, "mask": x, "labels": y}, rf"input '{name}'.*no array.*'data_1', 'mask'"),
        ("shape", {name: np.ascontiguousarray(x.transpose(0, 2, 3, 1)), "labels": y},
         rf"input '{name}'.*\[1, 3, 224, 224\].*\(2, 224, 224, 3\).*axis 1 is 224, the model needs 3"),
        ("rank", {name: x[:, 0], "labels": y}, rf"input '{name}'.*4 dims.*\(2, 224, 224\)"),
        ("dtype", {name: np.zeros(x.shape, np.uint8), "labels": y}, rf"input '{name}'.*float32.*uint8.*preprocessing"),
    ]


@pytest.mark.parametrize("kind", ["name", "shape", "rank", "dtype"])
def test_mismatched_npz_is_a_data_error_naming_the_input(zoo, kind, tmp_path, capsys):
    _, arrays, pattern = next(m for m in mismatches(zoo) if m[0] == kind)
    path = tmp_path / f"bad_{kind}.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern):
        onnxprune.evaluate(zoo.dense, path)
    assert main(["eval", str(zoo.dense), "--data", str(path)]) == DataError.exit_code == 7
    assert f"input '{zoo.input}'" in capsys.readouterr().err


def test_mismatched_data_stops_sweep_and_prune_before_any_work(squeezenet, tmp_path, capsys):
    path = tmp_path / "nhwc.npz"
    np.savez(path, **{squeezenet.input: squeezenet.x[:2].transpose(0, 2, 3, 1), "labels": squeezenet.labels[:2]})
    out_dir, out = tmp_path / "swept", tmp_path / "pruned.onnx"
    assert main(["sweep", str(squeezenet.dense), "--ratios", "0.1", "--data", str(path),
                 "--output-dir", str(out_dir)]) == 7
    assert "input 'data_0'" in capsys.readouterr().err
    assert main(["prune", str(squeezenet.dense), str(out), "--ratio", "0.1", "--validate-data", str(path)]) == 7
    assert "axis 1 is 224, the model needs 3" in capsys.readouterr().err
    assert not out_dir.exists() and not out.exists()


# -- bench -------------------------------------------------------------------------------------------------
def test_bench_dense_and_pruned_side_by_side(zoo, tmp_path, capsys):
    md = tmp_path / "bench.md"
    argv = ["bench", str(zoo.dense), str(zoo.pruned), "--runs", "3", "--warmup", "1", "--markdown", str(md)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "median ms" in table
    rows = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("│ ").split("│")] for line in table.splitlines() if line.startswith("│ "))}
    dense_row, pruned_row = rows[zoo.dense.name], rows[zoo.pruned.name]
    assert dense_row[1] == pruned_row[1] == "1x3x224x224" and dense_row[5] == "1.00x"
    speedup = float(dense_row[2]) / float(pruned_row[2])  # median ms
    assert float(pruned_row[5].rstrip("x")) == pytest.approx(speedup, abs=0.01)
    assert f"| {zoo.pruned.name} |" in md.read_text()
    assert main(["bench", str(zoo.dense), str(zoo.pruned), "--runs", "2", "--warmup", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    dense, pruned = data["models"]
    assert dense["input_shapes"] == pruned["input_shapes"] == {zoo.input: [1, 3, 224, 224]}
    assert dense["speedup"] == 1.0
    assert pruned["speedup"] == pytest.approx(dense["median_ms"] / pruned["median_ms"], rel=1e-3)
    for m in (dense, pruned):
        assert 0 < m["min_ms"] <= m["median_ms"] <= m["p90_ms"]


def test_bench_refuses_a_batch_the_static_graph_cannot_take(squeezenet, capsys):
    assert main(["bench", str(squeezenet.dense), "--batch", "4", "--runs", "1"]) == 2
    assert "static batch of 1" in capsys.readouterr().err


# -- sweep ----------------------------------------------------------------------------------------------------
def test_sweep_two_ratios_flops_decrease_and_accuracy_matches_eval(squeezenet, tmp_path, capsys):
    out_dir = tmp_path / "models"
    argv = ["sweep", str(squeezenet.dense), "--ratios", "0.5,0.2", "--data", str(squeezenet.data),
            "--runs", "2", "--warmup", "0", "--output-dir", str(out_dir), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    dense, (low, high) = data["dense"], data["points"]
    assert data["metric"] == "top1" and data["samples"] == SAMPLES
    assert (low["ratio"], high["ratio"]) == (0.2, 0.5) and low["error"] is None and high["error"] is None
    assert dense["flops_kept"] == 1.0 and dense["quality"]["after"] == 1.0
    assert dense["flops"] > low["flops"] > high["flops"]
    assert 1.0 > low["flops_kept"] > high["flops_kept"] and 1.0 > low["params_kept"] > high["params_kept"]
    assert high["flops_kept"] <= 0.5 * 1.05 and low["flops_kept"] <= 0.8 * 1.05
    for p in (low, high):  # the sweep's accuracy is what `eval` says of the model it wrote
        written = onnxprune.evaluate(p["output"], squeezenet.data, threads=1)
        assert p["quality"]["after"] == pytest.approx(written.accuracy["top1"])
        assert p["quality"]["drop"] == pytest.approx(1.0 - written.accuracy["top1"])
        assert p["speedup"] == pytest.approx(dense["latency_ms"]["median_ms"] / p["latency_ms"]["median_ms"], rel=1e-3)
    assert high["quality"]["after"] < 1.0


def test_sweep_shufflenet_table_without_labels(shufflenet):
    result = onnxprune.sweep(shufflenet.dense, [0.1, 0.3], data={shufflenet.input: shufflenet.x[:6]},
                             target="ratio", latency_runs=2, latency_warmup=0)
    assert result.metric == "top1_agreement" and result.dense.value == 1.0
    a, b = result.points
    assert a.error is None and b.error is None
    assert 1.0 > a.flops_kept > b.flops_kept and result.dense.flops > a.flops > b.flops
    assert all(0.0 <= p.value <= 1.0 for p in (a, b))
    table = result.render_table()
    for text in ("units removed", "FLOPs kept", "top-1 agreement", "speed-up", "│ dense ", "│ 0.1 ", "│ 0.3 "):
        assert text in table
    assert f"{a.flops_kept * 100:.2f}%" in table and f"{b.flops_kept * 100:.2f}%" in table
    assert a.value == 1.0 and "+0.00 pt" in table and "-0.00 pt" not in table  # no drop is no negative zero


# -- the prune gate -------------------------------------------------------------------------------------------
def test_a_failed_gate_on_a_zoo_graph_exits_9_and_writes_nothing(squeezenet, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, plan, rep, md = (out_dir / n for n in ("small.onnx", "plan.json", "r.json", "r.md"))
    argv = ["prune", str(squeezenet.dense), str(out), "--ratio", "0.3", "--validate-data", str(squeezenet.data),
            "--max-accuracy-drop", "0", "--no-latency", "--save-plan", str(plan), "--report", str(rep),
            "--markdown", str(md)]
    assert main(argv) == AccuracyDropError.exit_code == 9
    captured = capsys.readouterr()
    drop = 1.0 - np.mean(squeezenet.pruned_scores.argmax(1) == squeezenet.labels)
    assert f"a drop of {drop * 100:.2f} points" in captured.err and "budget of 0.00 points" in captured.err
    assert "Nothing was written" in captured.err and "Top-1 accuracy" in captured.out
    assert list(out_dir.iterdir()) == []
    # the same pruning with a budget it fits writes the model and its reports
    argv[argv.index("--max-accuracy-drop") + 1] = "0.5"
    assert main(argv) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["plan.json", "r.json", "r.md", "small.onnx"]
    assert json.loads(rep.read_text())["quality"]["drop"] == pytest.approx(drop)
