"""`onnxprune bench` / `onnxprune.benchmark`: latency tables, shapes, providers, profiling.

Timing values are never asserted on (the machine is shared); only their
consistency (min <= median <= p90, speed-up = ratio of medians) and the
method (interleaving, warm-up, shapes) are.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, ProviderError
from onnxprune.runtime import bench
from onnxprune.runtime.bench import input_shapes_for, summarize_profile

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "digits_half.onnx"
    onnxprune.prune(EXAMPLE, path, target_flops=0.5)
    return path


def test_two_models_side_by_side_with_speedups(pruned):
    result = onnxprune.benchmark([EXAMPLE, pruned], runs=5, warmup=1)
    dense, small = result.entries
    assert (dense.name, small.name) == ("digits_resnet.onnx", "digits_half.onnx")
    assert dense.input_shapes == small.input_shapes == {"input": [1, 1, 32, 32]}
    for e in result.entries:
        lat = e.latency
        assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
    assert dense.speedup == 1.0
    assert small.speedup == pytest.approx(dense.latency.median_ms / small.latency.median_ms)
    assert result.threads == 1 and result.provider == "CPUExecutionProvider" and result.runs == 5
    table = result.render_table()
    assert "speed-up" in table and "1.00x" in table and "digits_half.onnx" in table
    assert "| digits_half.onnx |" in result.render_markdown()


def test_runs_are_interleaved_in_rotating_order(monkeypatch):
    calls = []

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feeds):
            calls.append(self.name)

    made = iter(["a", "b", "c"])
    monkeypatch.setattr(bench, "make_session", lambda *a, **k: FakeSession(next(made)))
    model = onnx.load(str(EXAMPLE))
    result = bench.benchmark([model, model, model], runs=3, warmup=2)
    assert [e.name for e in result.entries] == ["main_graph #1", "main_graph #2", "main_graph #3"]
    warm, timed = calls[:6], calls[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_batch_and_input_shape_fix_dynamic_axes(pruned):
    model = onnx.load(str(EXAMPLE))
    assert input_shapes_for(model) == {"input": [1, 1, 32, 32]}
    assert input_shapes_for(model, batch=8) == {"input": [8, 1, 32, 32]}
    assert input_shapes_for(model, batch=8, given={"input": [2, 1, 32, 32]}) == {"input": [2, 1, 32, 32]}
    result = onnxprune.benchmark([EXAMPLE, pruned], runs=2, warmup=0, batch=3)
    assert all(e.input_shapes == {"input": [3, 1, 32, 32]} for e in result.entries)


def test_a_static_batch_cannot_be_changed():
    model = onnx.load(str(EXAMPLE))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(OnnxPruneError, match="static batch of 1"):
        onnxprune.benchmark(model, batch=4, runs=1)
    assert onnxprune.benchmark(model, batch=1, runs=1, warmup=0).entries[0].input_shapes["input"][0] == 1


def test_unknown_provider_lists_the_available_ones(capsys):
    import onnxruntime as ort

    with pytest.raises(ProviderError, match="CPUExecutionProvider") as err:
        onnxprune.benchmark(EXAMPLE, provider="NoSuchExecutionProvider")
    assert all(p in str(err.value) for p in ort.get_available_providers())
    assert main(["bench", str(EXAMPLE), "--provider", "NoSuchExecutionProvider"]) == ProviderError.exit_code == 8
    assert "NoSuchExecutionProvider" in capsys.readouterr().err


def test_profile_summarises_time_per_op_type(pruned):
    result = onnxprune.benchmark([EXAMPLE, pruned], runs=3, warmup=1, profile=True)
    for e in result.entries:
        assert e.op_times_ms and "Conv" in e.op_times_ms and all(t >= 0 for t in e.op_times_ms.values())
        assert list(e.op_times_ms.values()) == sorted(e.op_times_ms.values(), reverse=True)
    text = result.render_profile()
    assert "Conv" in text and "total kernel time" in text


def test_profile_summary_skips_warmup_runs():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(ts, op, dur):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0, 100), kernel(1, "Conv", 9000),  # warm-up run: ignored
              run(200, 100), kernel(201, "Conv", 300), kernel(250, "Relu", 100),
              {"cat": "Node", "name": "n_fence_before", "ts": 260, "dur": 5000, "args": {"op_name": "Relu"}},
              run(400, 100), kernel(401, "Conv", 500)]
    assert summarize_profile(events, skip_runs=1) == {"Conv": pytest.approx(0.4), "Relu": pytest.approx(0.05)}


def test_cli_bench_json_and_table(pruned, tmp_path, capsys):
    assert main(["bench", str(EXAMPLE), str(pruned), "--runs", "3", "--warmup", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["digits_resnet.onnx", "digits_half.onnx"]
    assert {"median_ms", "p90_ms", "min_ms", "speedup", "input_shapes"} <= set(data["models"][0])
    assert data["threads"] == 1 and data["provider"] == "CPUExecutionProvider"
    md = tmp_path / "bench.md"
    argv = ["bench", str(EXAMPLE), "--runs", "2", "--input-shape", "input:2x1x32x32", "--profile",
            "--markdown", str(md)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2x1x32x32" in out and "median ms" in out and "Conv" in out
    assert "2x1x32x32" in md.read_text()


def test_cli_bench_bad_shapes_and_missing_models(capsys, tmp_path):
    assert main(["bench", str(EXAMPLE), "--runs", "1", "--input-shape", "pixels:1x1x32x32"]) == 2
    assert "pixels" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 3


def test_bench_a_model_zoo_graph():
    from onnxprune.testing import materialize_zoo_model, zoo_models

    squeezenet = materialize_zoo_model(next(p for p in zoo_models() if "squeezenet" in p.name))
    result = onnxprune.benchmark(squeezenet, runs=2, warmup=1)
    assert result.entries[0].input_shapes == {"data_0": [1, 3, 224, 224]}
    assert np.isfinite(result.entries[0].latency.median_ms)
