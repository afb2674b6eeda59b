"""The fast paths of prune (issue 14) compute exactly what the straightforward code they replaced did.

Each test holds the replaced code as a reference and compares bit for bit: the vectorised cost
estimate, unit indices and score combination, the byte-size count, the shape-inference memo, the
sessions that take their weights in place, and the byte-for-byte read-back of a written file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.analysis.units import NO_UNIT
from onnxprune.cost import model_cost
from onnxprune.errors import ValidationError
from onnxprune.importance.base import combine, unit_index
from onnxprune.ir import model_io
from onnxprune.ir import shapes
from onnxprune.ir.shapes import infer_shapes
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.inputs import dense_input_shapes, plan_input_shapes
from onnxprune.runtime.session import make_session, raw_data_places, session_in_place, session_options
from onnxprune.strategy.estimate import CostEstimator

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models" / "fixtures"
MODELS = [ROOT / "models" / "digits_resnet.onnx", FIXTURES / "inception_legacy.onnx",
          FIXTURES / "shufflenet_legacy.onnx", FIXTURES / "transformers" / "bert_encoder_legacy.onnx",
          FIXTURES / "transformers" / "llama_decoder_legacy.onnx", FIXTURES / "ort_fused" / "gpt2_decoder_fused.onnx"]


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: p.stem)
def analysed(request):
    working, _ = prepare(request.param)
    return working, build_analysis(working)


def _reference_estimate(est: CostEstimator, removed: np.ndarray) -> tuple[float, float]:
    """The loop the vectorised estimate replaced."""
    keep = ~np.append(removed, False)
    frac = np.array([keep[r].mean() for r in est._slot_roots])
    flops = sum(f * np.prod(frac[s]) for f, s in est.node_terms)
    params = sum(p * np.prod(frac[s]) for p, s in est.param_terms)
    return float(flops), float(params)


def test_the_cost_estimate_is_bit_identical_to_the_per_slot_loop(analysed):
    working, analysis = analysed
    est = CostEstimator(analysis, model_cost(working))
    rng = np.random.default_rng(0)
    for fraction in (0.0, 0.1, 0.5, 0.9, 1.0):
        removed = rng.random(len(analysis.root_of)) < fraction
        assert est.estimate(removed) == _reference_estimate(est, removed)


def _reference_unit_index(analysis, group, p) -> np.ndarray:
    layout = analysis.layouts[p.tensor][p.axis]
    index_of = {int(r): i for i, r in enumerate(group.roots)}
    return np.array([index_of.get(int(analysis.root_of[u]), -1) if u != NO_UNIT else -1 for u in layout.tolist()],
                    dtype=np.int64)


def test_unit_indices_match_the_lookup_per_position(analysed):
    _, analysis = analysed
    checked = 0
    for g in analysis.groups:
        for p in g.params:
            assert np.array_equal(unit_index(analysis, g, p), _reference_unit_index(analysis, g, p))
            checked += 1
    assert checked


def _reference_combine(size, members, how="sum"):
    total = np.zeros(size)
    count = np.zeros(size)
    for idx, scores in members:
        mine = idx >= 0
        if not mine.any():
            continue
        per_unit = np.zeros(size)
        np.add.at(per_unit, idx[mine], np.asarray(scores, dtype=np.float64)[mine])
        hits = np.zeros(size)
        np.add.at(hits, idx[mine], 1.0)
        touched = hits > 0
        if how == "mean":
            per_unit[touched] /= hits[touched]
        mean = per_unit[touched].mean()
        if mean > 0:
            per_unit /= mean
        total += per_unit
        count += touched
    if not count.any():
        return None
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


@pytest.mark.parametrize("how", ["sum", "mean"])
def test_score_combination_adds_in_the_same_order(how):
    rng = np.random.default_rng(1)
    for size in (1, 7, 64):
        members = []
        for _ in range(3):
            n = int(rng.integers(1, 5 * size))
            members.append((rng.integers(-1, size, n), rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)))
        assert np.array_equal(combine(size, members, how), _reference_combine(size, members, how))
    assert combine(4, [(np.full(3, -1), np.ones(3))]) is None


def test_byte_size_matches_protobuf_without_encoding_the_weights(analysed):
    working, _ = analysed
    for t in working.graph.initializer:
        if not model_io.is_external(t):
            assert model_io._tensor_byte_size(t) == t.ByteSize(), t.name


def test_shape_inference_memo_answers_like_a_fresh_inference(analysed):
    working, _ = analysed
    fixed = plan_input_shapes(working).shapes
    one, other = onnx.ModelProto(), onnx.ModelProto()
    one.CopyFrom(working)
    other.CopyFrom(working)
    first = infer_shapes(one, fixed)
    infos = [vi.SerializeToString() for vi in one.graph.value_info]
    first["not a tensor"] = (1, ())  # a caller's change stays the caller's
    again = infer_shapes(other, fixed)
    assert "not a tensor" not in again
    del first["not a tensor"]
    assert again == first
    assert [vi.SerializeToString() for vi in other.graph.value_info] == infos
    shapes.forget_shapes()
    assert infer_shapes(other, fixed) == first  # a fresh inference
    assert [vi.SerializeToString() for vi in other.graph.value_info] == infos


@pytest.fixture
def in_place_always(monkeypatch):
    """The fixtures are small: hand their weights over in place all the same."""
    from onnxprune.runtime import session

    monkeypatch.setattr(session, "IN_PLACE_MIN_BYTES", 0)


@pytest.mark.parametrize("optimize", [False, True])  # True: make_session serialises; session_in_place still agrees
def test_sessions_taking_weights_in_place_give_the_outputs_of_the_serialised_model(analysed, optimize,
                                                                                    in_place_always):
    import gc

    import onnxruntime as ort

    working, _ = analysed
    feeds = dense_input_shapes(working, None, probe=True).feeds  # sizes the model runs at
    opts = dict(threads=1, optimize=optimize, prepack=False)
    sessions = [session_in_place(working, session_options(**opts), "CPUExecutionProvider"),
                session_in_place(working, session_options(**opts), "CPUExecutionProvider",
                                 serialized=working.SerializeToString()),
                make_session(working, **opts)]
    gc.collect()  # the buffers onnxruntime reads must outlive everything but the session
    for session in sessions[1:]:
        for a, b in zip(session.run(None, feeds), sessions[0].run(None, feeds)):
            assert np.array_equal(a, b, equal_nan=True)
    got = sessions[0].run(None, feeds)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(working.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_a_file_that_does_not_hold_the_validated_bytes_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    real_write = model_io.write_model

    def write_then_flip_a_byte(model, path, **kwargs):
        real_write(model, path, **kwargs)
        data = bytearray(Path(path).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(path).write_bytes(bytes(data))

    monkeypatch.setattr(model_io, "write_model", write_then_flip_a_byte)
    with pytest.raises(ValidationError, match="not the validated model"):
        onnxprune.prune(ROOT / "models" / "digits_resnet.onnx", tmp_path / "out.onnx", ratio=0.3)
    assert list(tmp_path.iterdir()) == []


def test_a_written_file_is_checked_byte_for_byte(tmp_path):
    _, report = onnxprune.prune(ROOT / "models" / "digits_resnet.onnx", tmp_path / "out.onnx", ratio=0.3)
    assert "read back from disk" in report.checks
    model = onnx.load(str(tmp_path / "out.onnx"))
    assert report.after.file_size == (tmp_path / "out.onnx").stat().st_size == model.ByteSize()


def test_raw_data_places_point_at_each_initializers_bytes(analysed):
    working, _ = analysed
    data = working.SerializeToString()
    places = raw_data_places(data)
    raw = {t.name: t.raw_data for t in working.graph.initializer if t.HasField("raw_data")}
    assert set(places) == set(raw)
    for name, (offset, length) in places.items():
        assert data[offset:offset + length] == raw[name]
    assert raw_data_places(data[: len(data) // 2]) == {}  # truncated: nothing, never a wrong place


@pytest.mark.parametrize("model, options", [
    (ROOT / "models" / "digits_resnet.onnx", {"target_flops": 0.5}),
    (ROOT / "models" / "digits_resnet.onnx", {"lossless": True}),
    (FIXTURES / "transformers" / "gpt2_decoder_legacy.onnx", {"ratio": {"heads": 0.25, "neurons": 0.3}}),
])
def test_prune_writes_the_same_file_and_report_whether_weights_go_in_place_or_not(tmp_path, monkeypatch, model,
                                                                                   options):
    from onnxprune.runtime import session

    results = []
    for limit in (0, 1 << 40):
        monkeypatch.setattr(session, "IN_PLACE_MIN_BYTES", limit)
        out = tmp_path / f"{limit}.onnx"
        _, report = onnxprune.prune(model, out, **options)
        results.append((out.read_bytes(), report.checks, report.max_abs_diff, report.after.file_size))
    assert results[0] == results[1]
