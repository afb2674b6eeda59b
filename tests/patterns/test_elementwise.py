"""Unary elementwise ops between two convs pass every channel through unchanged."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import const, make_model, prune_matches_oracle, weight


def _unary(op, opset=17, inits=(), **attrs):
    def build(x, y):
        inputs = [x] + [t.name for t in inits]
        return helper.make_node(op, inputs, [y], name="act", **attrs)
    return op, build, list(inits), opset


def _clip_bounds():
    return [const(-0.5, "clip_min", np.float32), const(0.7, "clip_max", np.float32)]


UNARY = [
    _unary("Relu"),
    _unary("LeakyRelu", alpha=0.1),
    _unary("Clip", inits=_clip_bounds()),
    _unary("Sigmoid"),
    _unary("HardSigmoid", alpha=0.3, beta=0.4),
    _unary("HardSwish"),
    _unary("Tanh"),
    _unary("Erf"),
    _unary("Gelu", opset=20),
    _unary("Gelu", opset=20, approximate="tanh"),
    _unary("Softplus"),
    _unary("Mish", opset=18),
    _unary("Elu", alpha=0.7),
    _unary("Selu"),
    _unary("Dropout"),
    _unary("Identity"),
    _unary("Cast", to=TensorProto.FLOAT),
    _unary("Abs"),
    _unary("Neg"),
]


def _ids():
    seen = {}
    out = []
    for op, *_ in UNARY:
        seen[op] = seen.get(op, 0) + 1
        out.append(op if seen[op] == 1 else f"{op}{seen[op]}")
    return out


def _sandwich(build, extra_inits, opset):
    """x -> conv1 (8 ch) -> <unary> -> conv2 (4 ch)."""
    inits = [weight(8, 3, 3, 3, name="w1"), weight(8, name="b1"), weight(4, 8, 3, 3, name="w2"), *extra_inits]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        build("conv1", "act"),
        helper.make_node("Conv", ["act", "w2"], ["conv2"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("conv2", [1, 4, 8, 8])], inits, opset=opset)


@pytest.mark.parametrize("op,build,inits,opset", UNARY, ids=_ids())
def test_unary_op_between_two_convs_passes_channels_through(op, build, inits, opset):
    model = _sandwich(build, inits, opset)
    analysis, pruned, removed = prune_matches_oracle(model)
    prunable = analysis.prunable_groups()
    assert [g.name for g in prunable] == ["conv1"]
    assert prunable[0].size == 8
    assert {s.node for s in prunable[0].sources} == {"conv1"}  # the unary op opens nothing
    kept = 8 - len(removed)
    assert analysis.layouts["act"][1].shape == (8,)
    w2 = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "w2")
    assert w2.shape[1] == kept
    # a scalar parameter input (Clip bounds) is left as it was
    for t in inits:
        assert next(i for i in pruned.graph.initializer if i.name == t.name).dims == t.dims


def test_dropout_mask_output_follows_the_channels():
    inits = [weight(8, 3, 3, 3, name="w1"), weight(4, 8, 1, 1, name="w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Dropout", ["conv1"], ["act", "mask"], name="drop"),
        helper.make_node("Conv", ["act", "w2"], ["conv2"], name="conv2"),
    ]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("conv2", [1, 4, 8, 8])], inits)
    analysis, _, _ = prune_matches_oracle(model)
    assert analysis.layouts["mask"][1].shape == (8,)
