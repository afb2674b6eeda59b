"""An ONNX graph run by PyTorch, so that gradients flow to its initializers.

onnxruntime computes no gradients, and converters to PyTorch modules (onnx2torch)
rename and re-lay-out the weights they take over (a Gemm's B becomes a Linear's
transposed weight, Conv and BatchNormalization fuse into modules) and need
torchvision. Repair by distillation has to write each trained value back to the
initializer it came from, so here every initializer stays a tensor under its own
name and layout, and every node is one rule of `OPS` (op type -> torch function
of the node and its input values). A node whose op has no rule is refused by
name before anything runs (`unsupported`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import UnsupportedModelError, UsageError
from onnxprune.ir.graph_view import tensor_values

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - the message is the point
    raise UsageError("repair by distillation needs PyTorch (CPU is enough): pip install 'onnxprune[distill]' "
                     "or pip install torch") from exc

Rule = Callable[[onnx.NodeProto, dict, list], list]
OPS: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            OPS[op] = fn
        return fn
    return register


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def ints(t) -> list[int]:
    """A shape-like input as Python ints (it is a constant or comes from Shape, never trained)."""
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else np.asarray(t).reshape(-1))]


# -- elementwise ------------------------------------------------------------------------------------------

for _op, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
                 "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "And": torch.logical_and,
                 "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
                 "Or": torch.logical_or, "Max": torch.maximum, "Min": torch.minimum}.items():
    OPS[_op] = (lambda fn: lambda node, a, x: [fn(x[0], x[1])])(_fn)

for _op, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
                 "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
                 "Reciprocal": torch.reciprocal, "Not": torch.logical_not, "Identity": lambda t: t,
                 "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos,
                 "IsNaN": torch.isnan}.items():
    OPS[_op] = (lambda fn: lambda node, a, x: [fn(x[0])])(_fn)


@rule("Mod")
def _mod(node, a, x):
    return [torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])]


@rule("Trilu")
def _trilu(node, a, x):
    k = int(x[1].reshape(-1)[0]) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)]


@rule("Where")
def _where(node, a, x):
    return [torch.where(x[0].bool(), x[1], x[2])]


@rule("Gelu")
def _gelu(node, a, x):
    return [F.gelu(x[0], approximate=a.get("approximate", "none"))]


@rule("HardSigmoid")
def _hard_sigmoid(node, a, x):
    return [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)]


@rule("HardSwish")
def _hard_swish(node, a, x):
    return [F.hardswish(x[0])]


@rule("LeakyRelu")
def _leaky(node, a, x):
    return [F.leaky_relu(x[0], a.get("alpha", 0.01))]


@rule("Clip")
def _clip(node, a, x):
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return [torch.clamp(x[0], low, high)]


@rule("Cast")
def _cast(node, a, x):
    dtype = helper.tensor_dtype_to_np_dtype(a["to"])
    return [x[0].to(torch.from_numpy(np.zeros(0, dtype)).dtype)]


# -- linear algebra ---------------------------------------------------------------------------------------

@rule("MatMul")
def _matmul(node, a, x):
    return [torch.matmul(x[0], x[1])]


@rule("Gemm")
def _gemm(node, a, x):
    left = x[0].transpose(-1, -2) if a.get("transA", 0) else x[0]
    right = x[1].transpose(-1, -2) if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return [out]


def _auto_pads(node: onnx.NodeProto, a: dict, spatial: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Explicit pads (begins, then ends) for the node's auto_pad (SAME_UPPER, SAME_LOWER, VALID) or pads."""
    dims = len(kernel)
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "NOTSET":
        return list(a.get("pads", [0] * 2 * dims))
    if mode == "VALID":
        return [0] * 2 * dims
    strides = a.get("strides", [1] * dims)
    dilations = a.get("dilations", [1] * dims)
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
        total = max(0, (-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size)
        small = total // 2
        begins.append(small if mode == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


@rule("Conv")
def _conv(node, a, x):
    w = x[1]
    dims = w.dim() - 2
    pads = _auto_pads(node, a, x[0].shape[2:], w.shape[2:])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    data = x[0]
    if list(pads[:dims]) != list(pads[dims:]):  # asymmetric: pad explicitly
        spec = []
        for k in reversed(range(dims)):
            spec += [pads[k], pads[k + dims]]
        data, pads = F.pad(data, spec), [0] * 2 * dims
    return [conv(data, w, x[2] if len(x) > 2 else None, stride=a.get("strides", 1), padding=list(pads[:dims]),
                 dilation=a.get("dilations", 1), groups=a.get("group", 1))]


# -- normalisation and softmax ----------------------------------------------------------------------------

@rule("LayerNormalization")
def _layer_norm(node, a, x):
    axis = a.get("axis", -1) % x[0].dim()
    shape = x[0].shape[axis:]
    return [F.layer_norm(x[0], shape, x[1], x[2] if len(x) > 2 else None, a.get("epsilon", 1e-5))]


@rule("BatchNormalization")
def _batch_norm(node, a, x):
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5))]


@rule("Softmax")
def _softmax(node, a, x):
    return [torch.softmax(x[0], a.get("axis", -1))]


@rule("LogSoftmax")
def _log_softmax(node, a, x):
    return [torch.log_softmax(x[0], a.get("axis", -1))]


def _reduce_axes(node, a, x) -> tuple[list[int] | None, bool]:
    axes = ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("axes")
    return axes, bool(a.get("keepdims", 1))


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(node, a, x):
    axes, keep = _reduce_axes(node, a, x)
    dims = list(range(x[0].dim())) if not axes else axes
    if node.op_type == "ReduceMean":
        return [x[0].mean(dim=dims, keepdim=keep)]
    if node.op_type == "ReduceSum":
        return [x[0].sum(dim=dims, keepdim=keep)]
    fn = torch.amax if node.op_type == "ReduceMax" else torch.amin
    return [fn(x[0], dim=dims, keepdim=keep)]


@rule("GlobalAveragePool")
def _gap(node, a, x):
    return [x[0].mean(dim=list(range(2, x[0].dim())), keepdim=True)]


@rule("MaxPool", "AveragePool")
def _pool(node, a, x):
    kernel = a["kernel_shape"]
    dims = len(kernel)
    pads = a.get("pads", [0] * 2 * dims)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or list(pads[:dims]) != list(pads[dims:]) \
            or any(d != 1 for d in a.get("dilations", [1] * dims)):
        raise UnsupportedModelError(f"node {node.name!r}: {node.op_type} with auto_pad, asymmetric pads or dilations "
                                    "is not supported by the distillation backend")
    stride = a.get("strides", [1] * dims)
    ceil = bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        return [fn(x[0], kernel, stride, list(pads[:dims]), ceil_mode=ceil)]
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    return [fn(x[0], kernel, stride, list(pads[:dims]), ceil_mode=ceil,
               count_include_pad=bool(a.get("count_include_pad", 0)))]


# -- shapes -----------------------------------------------------------------------------------------------

@rule("Reshape")
def _reshape(node, a, x):
    shape = ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@rule("Flatten")
def _flatten(node, a, x):
    axis = a.get("axis", 1)
    axis = axis + x[0].dim() if axis < 0 else axis  # axis == rank is allowed: (everything, 1)
    return [x[0].reshape(int(np.prod(x[0].shape[:axis])), int(np.prod(x[0].shape[axis:])))]


@rule("Transpose")
def _transpose(node, a, x):
    perm = a.get("perm", list(reversed(range(x[0].dim()))))
    return [x[0].permute(*perm)]


@rule("Shape")
def _shape(node, a, x):
    dims = list(x[0].shape)[a.get("start", 0):a.get("end", None)]
    return [torch.tensor(dims, dtype=torch.int64)]


@rule("Unsqueeze")
def _unsqueeze(node, a, x):
    axes = ints(x[1]) if len(x) > 1 else a["axes"]
    out = x[0]
    rank = out.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        out = out.unsqueeze(axis)
    return [out]


@rule("Squeeze")
def _squeeze(node, a, x):
    axes = ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("axes")
    if axes is None:
        return [x[0].squeeze()]
    out = x[0]
    for axis in sorted((ax % out.dim() for ax in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


@rule("Concat")
def _concat(node, a, x):
    return [torch.cat([t for t in x if t is not None], dim=a["axis"])]


@rule("Split")
def _split(node, a, x):
    axis = a.get("axis", 0)
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        return list(torch.chunk(x[0], len(node.output), dim=axis))
    return list(torch.split(x[0], sizes, dim=axis))


@rule("Slice")
def _slice(node, a, x):
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = x[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= out.dim()
        size = out.shape[axis]
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        if step > 0:  # the ONNX clamps: [0, size] forward, [-1, size - 1] backward
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
        out = torch.index_select(out, axis, torch.arange(start, end, step, dtype=torch.int64))
    return [out]


@rule("Gather")
def _gather(node, a, x):
    axis = a.get("axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    flat = torch.index_select(x[0], axis, idx.reshape(-1))
    shape = list(x[0].shape[:axis]) + list(idx.shape) + list(x[0].shape[axis + 1:])
    return [flat.reshape(shape)]


@rule("GatherElements")
def _gather_elements(node, a, x):
    axis = a.get("axis", 0) % x[0].dim()
    idx = x[1].long()
    return [torch.gather(x[0], axis, torch.where(idx < 0, idx + x[0].shape[axis], idx))]


@rule("GatherND")
def _gather_nd(node, a, x):
    if a.get("batch_dims", 0):
        raise UnsupportedModelError(f"node {node.name!r}: GatherND with batch_dims is not supported by the "
                                    "distillation backend")
    idx = x[1].long()
    depth = idx.shape[-1]
    picked = x[0][tuple(idx[..., k] for k in range(depth))]
    return [picked]


@rule("Pad")
def _pad(node, a, x):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = ints(x[1]) if len(x) > 1 else a["pads"]
    rank = x[0].dim()
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begin[axis % rank], end[axis % rank] = pads[k], pads[k + len(axes)]
    spec = []
    for axis in reversed(range(rank)):
        spec += [begin[axis], end[axis]]
    if mode == "constant":
        value = float(x[2].reshape(-1)[0]) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        return [F.pad(x[0], spec, value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    while spec[-2:] == [0, 0] and len(spec) > 2:  # torch pads only the trailing axes in these modes
        spec = spec[:-2]
    return [F.pad(x[0], spec, mode=torch_mode)]


@rule("Expand")
def _expand(node, a, x):
    shape = ints(x[1])
    return [x[0] * torch.ones(shape, dtype=x[0].dtype)]


@rule("ConstantOfShape")
def _constant_of_shape(node, a, x):
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return [torch.full(ints(x[0]), value.reshape(-1)[0].item(), dtype=torch.from_numpy(value.copy()).dtype)]


@rule("Constant")
def _constant(node, a, x):
    if "value" not in a:
        raise UnsupportedModelError(f"node {node.name!r}: only Constant's `value` attribute is supported")
    return [torch.from_numpy(numpy_helper.to_array(a["value"]).copy())]


@rule("Range")
def _range(node, a, x):
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


# -- the graph --------------------------------------------------------------------------------------------

def unsupported(model: onnx.ModelProto) -> list[str]:
    """'node (op)' for each node of the main graph no rule of OPS runs."""
    return [f"{n.name or n.output[0]} ({n.op_type})" for n in model.graph.node
            if n.op_type not in OPS or n.domain not in ("", "ai.onnx")]


class TorchGraph:
    """`model`'s main graph as a differentiable function of its inputs; the initializers named in
    `trainable` are leaf tensors with requires_grad (float32), the others constants."""

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = ()):
        missing = unsupported(model)
        if missing:
            raise UnsupportedModelError(f"the distillation backend has no rule for {', '.join(missing[:5])}"
                             f"{' and more' if len(missing) > 5 else ''}; repair without --distill")
        self.nodes = list(model.graph.node)
        self.attrs = [attributes(n) for n in self.nodes]
        wanted = set(trainable)
        self.values: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            array = tensor_values(init)  # external data read from disk
            tensor = torch.from_numpy(np.array(array, copy=True))
            if init.name in wanted:
                tensor = tensor.float().requires_grad_(True)
                self.parameters[init.name] = tensor
            self.values[init.name] = tensor

    def __call__(self, feeds: dict[str, np.ndarray | torch.Tensor], outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        values = dict(self.values)
        values.update((k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
                      for k, v in feeds.items())
        wanted = set(outputs)
        for node, a in zip(self.nodes, self.attrs):
            if wanted.issubset(values):
                break
            try:
                got = OPS[node.op_type](node, a, [values[i] if i else None for i in node.input])
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # PyTorch's own complaint, placed
                raise UnsupportedModelError(
                    f"node {node.name or node.output[0]!r} ({node.op_type}) fails in the distillation backend: "
                    f"{str(exc).splitlines()[0]}; repair without --distill") from exc
            values.update(zip(node.output, got))
        return {name: values[name] for name in outputs}
