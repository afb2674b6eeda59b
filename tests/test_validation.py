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


def test_the_checker_sees_every_node_and_small_constant_but_large_weights_only_as_stand_ins():
    import numpy as np
    import onnx

    from onnxprune.runtime.validate import CHECKER_STUB_BYTES, checker_copy, validate_model

    model = onnx.load(EXAMPLE)
    large = [t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) > CHECKER_STUB_BYTES]
    assert large  # the example has weights big enough to stand in for
    copy = checker_copy(model)
    assert list(copy.graph.node) == list(model.graph.node)
    stand_ins = {t.name: t for t in copy.graph.initializer}
    for t in model.graph.initializer:
        got = stand_ins[t.name]
        if t in large:
            assert got.data_type == t.data_type and list(got.dims) == [1] * len(t.dims)
        else:
            assert got == t
    onnx.checker.check_model(copy)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].input[0] = "never_made"  # a node reading a tensor nothing produces
    shapes = {i.name: [1] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]] for i in broken.graph.input}
    with pytest.raises(ValidationError, match="onnx.checker rejected"):
        validate_model(broken, shapes)
    assert np.isfinite(validate_model(model, shapes).outputs[0]).all()
