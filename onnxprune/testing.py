"""Helpers for tests and benchmarks: realistic fixtures and the masking oracle.

* `materialize_zoo_model` turns the weight-less model-zoo graphs shipped with the
  onnx package (weights produced by ConstantOfShape) into models with seeded
  random weights and plausible BatchNorm statistics.
* `masked_reference` builds the oracle for a pruning plan: the dense model with
  a Mul-by-mask inserted wherever removed units would have been consumed.  A
  pruned model must produce the same outputs as this masked dense model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_models() -> list[Path]:
    return sorted(ZOO_DIR.glob("light_*.onnx"))


def materialize_zoo_model(path: str | Path, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape-generated weights by seeded random initializers."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    bn_roles = _batchnorm_roles(graph)
    kept = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            name = node.output[0]
            role = bn_roles.get(name)
            if role == "scale":
                value = rng.uniform(0.5, 1.5, shape)
            elif role == "var":
                value = rng.uniform(0.5, 1.5, shape)
            elif role in ("bias", "mean"):
                value = rng.normal(0, 0.1, shape)
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                value = rng.normal(0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names and i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    return model


def _batchnorm_roles(graph) -> dict[str, str]:
    roles = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for name, role in zip(node.input[1:], ("scale", "bias", "mean", "var")):
                roles[name] = role
    return roles


def masked_reference(model: onnx.ModelProto, analysis, removed_roots) -> onnx.ModelProto:
    """The dense model with removed units zeroed where they are consumed."""
    masks = analysis.keep_masks(removed_roots)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    del ref.graph.value_info[:]
    new_nodes = []
    rename: dict[tuple[str, str], str] = {}
    sink_nodes: dict[str, list] = {}
    for use in analysis.state.sinks:
        if (use.tensor, use.axis) in masks:
            sink_nodes.setdefault(use.node, []).append(use)
    for node in ref.graph.node:
        for use in sink_nodes.get(node.name, []):
            rank = analysis.view.rank(use.tensor)
            shape = [1] * rank
            shape[use.axis] = -1
            mask = masks[(use.tensor, use.axis)].astype(np.float32).reshape(shape)
            mask_name = f"{use.tensor}__mask_{node.name}_{use.axis}"
            out_name = f"{use.tensor}__masked_{node.name}_{use.axis}"
            current = rename.get((node.name, use.tensor), use.tensor)
            ref.graph.initializer.append(numpy_helper.from_array(mask, mask_name))
            new_nodes.append(helper.make_node("Mul", [current, mask_name], [out_name], name=out_name))
            rename[(node.name, use.tensor)] = out_name
        for i, name in enumerate(node.input):
            if (node.name, name) in rename:
                node.input[i] = rename[(node.name, name)]
        new_nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(new_nodes)
    return ref


def plant_dead_units(model: onnx.ModelProto, analysis, group, unit_indices) -> None:
    """Zero everything that produces the given units of `group`, in place.

    Source weights and biases, and BatchNorm gamma and beta, are set to zero:
    what structured-sparse training exports.  `model` must be the model the
    analysis was built on.
    """
    produced_by = {"weight_out", "bias", "bn_scale", "bn_bias"}
    roots = {int(group.roots[i]) for i in unit_indices}
    inits = {t.name: t for t in model.graph.initializer}
    source_nodes = {s.node for s in group.sources}
    op_of = {n.name: n.op_type for n in model.graph.node}
    for p in group.params:
        per_channel_shift = p.role == "constant" and op_of.get(p.node) in ("Add", "Sub", "Mul")
        if not (p.role in produced_by or per_channel_shift):
            continue
        if p.role in ("weight_out", "bias") and p.node not in source_nodes:
            continue
        layout = analysis.layouts[p.tensor][p.axis]
        positions = [i for i, u in enumerate(layout.tolist()) if u >= 0 and int(analysis.root_of[u]) in roots]
        values = numpy_helper.to_array(inits[p.tensor]).copy()
        index = [slice(None)] * values.ndim
        index[p.axis] = positions
        values[tuple(index)] = 0
        inits[p.tensor].CopyFrom(numpy_helper.from_array(values, p.tensor))
