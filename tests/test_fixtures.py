"""Integration: small CNNs exported from PyTorch by models/export_fixtures.py,
with both exporters (legacy TorchScript and dynamo, which writes external data)."""
from pathlib import Path

import onnx
import pytest

import onnxprune
from helpers import prune_matches_oracle

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
ALL = sorted(p.name for p in FIXTURES.glob("*.onnx"))


@pytest.mark.parametrize("name", ALL)
def test_pruned_fixture_matches_the_masking_oracle(name):
    analysis, pruned, removed = prune_matches_oracle(FIXTURES / name, fraction=0.4)
    assert removed


@pytest.mark.parametrize("name", ALL)
def test_every_conv_group_except_the_classifier_is_prunable(name):
    groups = onnxprune.analyze(FIXTURES / name).analysis.groups
    blocked = [g for g in groups if not g.prunable]
    # only the output layer (logits / per-pixel head) is pinned by the graph output
    assert len(blocked) == 1, [(g.name, g.blocked) for g in blocked]
    assert "graph output" in blocked[0].blocked[0]


def test_chunk_bounds_computed_from_the_channel_count_become_constants():
    # the legacy exporter writes ShuffleNetV2's chunk(2, dim=1) as Slices whose bounds are
    # (Shape[1] + 1) / 2 at run time: a static channel count, so the same on every run
    analysis, pruned, removed = prune_matches_oracle(FIXTURES / "shufflenet_legacy.onnx", fraction=0.4)
    stem = next(g for g in analysis.groups if g.name == "/stem/stem.0/Conv")
    assert set(removed) & set(stem.roots.tolist())
    constants = {t.name for t in pruned.graph.initializer}
    chunk = [n for n in pruned.graph.node if n.op_type == "Slice" and n.name.startswith("/unit1/")]
    assert len(chunk) == 2 and all(n.input[1] in constants and n.input[2] in constants for n in chunk)


@pytest.mark.parametrize("name", [n for n in ALL if "dynamo" in n])
def test_dynamo_export_with_external_data_is_written_with_external_data(name, tmp_path):
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(FIXTURES / name, out, target_flops=0.3)
    assert (tmp_path / "pruned.onnx.data").is_file()
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out))
    assert report.after.flops <= 0.7 * report.before.flops * 1.05
