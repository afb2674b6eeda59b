"""A rewrite that breaks the graph is caught before anything is written."""
from pathlib import Path

import pytest

import onnxprune
from onnxprune.analysis.rules.conv import ConvRule
from onnxprune.cli import main
from onnxprune.errors import ValidationError

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


@pytest.fixture
def broken_conv_rewrite(monkeypatch):
    """Simulate a rule bug: every Conv gets a group count that cannot divide its channels."""
    def bad_rewrite(self, node, rw):
        rw.set_attr(node, "group", 7)
    monkeypatch.setattr(ConvRule, "rewrite", bad_rewrite)


def test_a_broken_rewrite_raises_and_names_the_problem(broken_conv_rewrite, tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(ValidationError) as err:
        onnxprune.prune(EXAMPLE, out, ratio=0.3)
    assert "Conv" in str(err.value) or "conv" in str(err.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_cli_exits_4_and_writes_nothing(broken_conv_rewrite, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", str(EXAMPLE), str(out), "--ratio", "0.3"]) == 4
    assert "onnxprune: error:" in capsys.readouterr().err
    assert not out.exists()


def test_dynamic_batch_is_validated_at_the_documented_default_and_stays_dynamic():
    pruned, report = onnxprune.prune(EXAMPLE, ratio=0.3)
    dim = pruned.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    assert "onnxruntime run" in report.checks


def test_input_shape_overrides_the_default(tmp_path):
    _, small = onnxprune.prune(EXAMPLE, ratio=0.3, input_shapes={"input": [1, 1, 32, 32]})
    _, big = onnxprune.prune(EXAMPLE, ratio=0.3, input_shapes={"input": [4, 1, 32, 32]})
    assert big.before.flops == 4 * small.before.flops
