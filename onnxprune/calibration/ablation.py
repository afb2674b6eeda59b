"""Zero-ablation sensitivity: how far the outputs move when one unit is removed.

onnxruntime has no autograd (and the core does not depend on torch), so the
"sensitivity of a calibration loss" is measured by ablation rather than by a
first-order Taylor estimate: the score of a unit is the increase of the loss
when that unit is zeroed, the loss being the divergence from the dense
model's outputs (no labels needed):

* an output of rank 2 with more than one column (a classifier's logits or
  probabilities): KL(p_dense || p_ablated) of the softmax over axis 1 (used as
  is when the output already is a probability vector), averaged over samples;
* any other float output: mean squared error relative to the dense output's
  mean square.  Several outputs add up.

Where the gate sits. The gate is applied at the group's *sinks*: the input
channel axis of every Conv/Gemm/MatMul that consumes the units, right before
that consumer (the tensors the data-aware criteria read). That is exactly
what physical removal does (the tests' masking oracle,
`onnxprune.testing.masked_reference`: pruned == dense with the removed units
zeroed at their consumers). Zeroing the source output instead would not be
removal: a BatchNorm (or the bias folded into the conv, or a residual Add
of a coupled source) after the source would turn the zero into its shift,
and the channel would still reach the next layer as a constant.  A unit of
several channels (an attention head, a grouped-conv index) has all its
positions gated by the same gate entry, in every tensor that carries it.

Cost. One onnxruntime session of a *gated* copy of the model serves every
ablation: an extra graph input `onnxprune_gate` (one float per scored unit,
plus a last entry that stays 1 for positions no scored unit owns) is gathered
into a per-channel mask and multiplied into each sink tensor.  Each unit then
costs one pass of `samples` calibration samples through the whole model:
units x samples forward passes in all (digits_resnet: 448 units x 64 samples).
A FLOPs budget bounds it: past `budget_flops` the sample count shrinks (not
below `min_samples`), and when even that does not fit an `AblationBudgetError`
says how large the job is and what to use instead.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.units import NO_UNIT
from onnxprune.calibration.capture import Capture, calibration_session
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.padding import row_mask
from onnxprune.calibration.stats import ChannelStats, calibration_statistics
from onnxprune.errors import AblationBudgetError, OnnxPruneError
from onnxprune.ir.graph_view import reads
from onnxprune.ir.model_io import copy_fields
from onnxprune.runtime.metrics import looks_like_probabilities
from onnxprune.runtime.progress import Progress

log = logging.getLogger(__name__)

GATE = "onnxprune_gate"
DEFAULT_SAMPLES = 64
DEFAULT_MIN_SAMPLES = 8
# 3e13 FLOPs: 6 to 12 minutes at the 40-80 GFLOP/s onnxruntime reached on 2 CPU cores here
# (digits_resnet: 0.83 TFLOPs of ablations, 12-24 s)
DEFAULT_BUDGET_FLOPS = 3e13
FILLS = ("zero", "mean", "refit")


@dataclass
class GatedModel:
    """A copy of a model whose sinks are multiplied by a gate vector (graph input `gate`).

    slots[group id] = gate index of the group's unit 0 (its units are consecutive);
    `units` scored units, gate length units + 1 (the last entry is always 1).
    """

    model: onnx.ModelProto
    gate: str
    units: int
    slots: dict[int, int]
    gated: list[tuple[str, int]]  # the (tensor, axis) slots that were gated
    used: np.ndarray  # per gate index: whether any gated position carries it
    muls: dict[str, np.ndarray] = field(default_factory=dict)  # gating Mul node -> gate index per position
    refits: list["Refit"] = field(default_factory=list)

    def ones(self) -> np.ndarray:
        return np.ones(self.units + 1, dtype=np.float32)

    @property
    def controls(self) -> set[str]:
        """The graph inputs that say what is removed: the gate, and each refit's matrix and offset."""
        return set(self.unchanged)

    @cached_property
    def unchanged(self) -> dict[str, np.ndarray]:
        """The controls' values that remove nothing (the gate all ones, every refit zero), made once: a
        refit's matrix is [P, P] and every group's probe feeds them."""
        out = {self.gate: self.ones()}
        for r in self.refits:
            out.update(r.zeros())
        return out


RIDGE = 1e-3  # of the mean variance: the kept positions are often nearly collinear (a ReLU's dead ones)


@dataclass
class Refit:
    """A sink whose gated-off positions read a linear prediction from its kept positions, fitted by least
    squares on calibration data: x_off ≈ mean_off + Aᵀ(x_on − mean_on). The consumer reads that sink
    linearly, so this is what the repair's least-squares refit of the consumer gives back (the refit's
    optimum is W_on + A W_off, the same product). Fed per run: `matrix` (x along the axis times it, zero
    but at [on, off]; a 1x1 Conv's weight for a channels-first map) and `offset` [P]."""

    matrix: str
    offset: str
    index: np.ndarray  # gate index per position of the axis
    stats: ChannelStats
    mul: str = ""  # the gating Mul of the sink
    first: str = ""  # the first node of the prediction (it reads the sink before the gate)
    kernel: int = 0  # spatial dims of a 1x1 Conv's weight (the matrix transposed); 0: a MatMul's [P, P]

    def matrix_shape(self, p: int) -> list[int]:
        return [p, p] + [1] * self.kernel

    def _layout(self, matrix: np.ndarray) -> np.ndarray:
        """x along the axis times `matrix`, as the node reads it (a Conv's weight is [out, in, 1...])."""
        return np.ascontiguousarray(matrix.T).reshape(self.matrix_shape(len(matrix))) if self.kernel else matrix

    def zeros(self) -> dict[str, np.ndarray]:
        p = len(self.index)
        return {self.matrix: np.zeros(self.matrix_shape(p), np.float32), self.offset: np.zeros(p, np.float32)}

    def fitted(self, gate: np.ndarray) -> dict[str, np.ndarray]:
        off = gate[self.index] == 0
        if not off.any():
            return self.zeros()
        on = ~off
        cov, mean = self.stats.covariance, self.stats.mean
        c_on = cov[np.ix_(on, on)].astype(np.float64)
        ridge = RIDGE * max(float(np.trace(c_on)) / max(int(on.sum()), 1), 1e-12)
        coef = np.linalg.solve(c_on + ridge * np.eye(len(c_on)), cov[np.ix_(on, off)]) if on.any() else \
            np.zeros((0, int(off.sum())))
        p = len(self.index)
        matrix, offset = np.zeros((p, p), np.float32), np.zeros(p, np.float32)
        matrix[np.ix_(on, off)] = coef
        offset[off] = mean[off] - mean[on] @ coef
        return {self.matrix: self._layout(matrix), self.offset: offset}


def gated_model(model: onnx.ModelProto, analysis, groups: Sequence,
                fill: dict[tuple[str, int], np.ndarray] | None = None,
                refit: dict[tuple[str, int], ChannelStats] | None = None) -> GatedModel:
    """Gate every sink position that carries a unit of `groups` (see the module docstring). With
    `fill[(tensor, axis)]` (one value per position of that axis, e.g. its mean on calibration data), a
    gated-off position reads that value instead of zero: removal followed by bias compensation. With
    `refit[(tensor, axis)]` (statistics with a covariance), it reads its least-squares prediction from the
    positions kept (`Refit`): removal followed by the refit of the consumer."""
    slots, total, index, by_node, used = _gate_slots(analysis, groups)
    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    graph = gated.graph
    names = {n for node in graph.node for n in list(node.input) + list(node.output)}
    names |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    gate = GATE
    while gate in names:
        gate += "_"
    graph.input.append(helper.make_tensor_value_info(gate, TensorProto.FLOAT, [total + 1]))
    done: dict[tuple, str] = {}
    nodes: list[onnx.NodeProto] = []
    muls: dict[str, np.ndarray] = {}
    refits: list[Refit] = []
    counter = 0
    for node in graph.node:
        keys = by_node.get(node.name, [])
        for tensor in dict.fromkeys(t for t, _ in keys):
            axes = tuple(sorted(a for t, a in keys if t == tensor))
            if (tensor, axes) not in done:
                current = tensor
                for axis in axes:
                    rank = analysis.view.rank(tensor)
                    if rank is None and axis != -1:
                        raise OnnxPruneError(f"ablation: the rank of '{tensor}' (consumed by '{node.name}') is "
                                             "unknown, so its channels cannot be gated; use another criterion")
                    prefix = f"{gate}_{counter}"
                    counter += 1
                    shape = [-1] if rank is None else [1] * rank
                    if rank is not None:
                        shape[axis % rank] = -1
                    graph.initializer.append(numpy_helper.from_array(index[(tensor, axis)], f"{prefix}_index"))
                    graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}_shape"))
                    nodes.append(helper.make_node("Gather", [gate, f"{prefix}_index"], [f"{prefix}_g"],
                                                  name=f"{prefix}_gather"))
                    mask = f"{prefix}_mask"
                    nodes.append(helper.make_node("Reshape", [f"{prefix}_g", f"{prefix}_shape"], [mask],
                                                  name=f"{prefix}_reshape"))
                    elem = (analysis.view.shapes.get(tensor) or (TensorProto.FLOAT,))[0]
                    if elem not in (TensorProto.FLOAT, 0, None):
                        nodes.append(helper.make_node("Cast", [mask], [f"{prefix}_cast"], to=int(elem),
                                                      name=f"{prefix}_cast"))
                        mask = f"{prefix}_cast"
                    nodes.append(helper.make_node("Mul", [current, mask], [f"{prefix}_out"], name=f"{prefix}_mul"))
                    muls[f"{prefix}_mul"] = index[(tensor, axis)]
                    gated_off = current
                    current = f"{prefix}_out"
                    stats = (refit or {}).get((tensor, axis))
                    if stats is not None and rank is not None and elem in (TensorProto.FLOAT, 0, None):
                        refits.append(_refit_off(nodes, graph, prefix, gated_off, current, axis % rank, rank,
                                                 index[(tensor, axis)], stats))
                        current = f"{prefix}_refitted"
                    elif fill is not None and (tensor, axis) in fill:
                        current = _fill_off(nodes, graph, prefix, current, mask, fill[(tensor, axis)], shape, elem)
                done[(tensor, axes)] = current
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = done[(tensor, axes)]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return GatedModel(gated, gate, total, slots, sorted(k for k, v in index.items() if (v < total).any()), used, muls,
                      refits)


def _gate_slots(analysis, groups: Sequence):
    """Where each group's units sit in the gate vector (slots: group id -> index of its unit 0; `total`
    units, the entry after them always 1), the gate index of every position of every sink (tensor, axis),
    the sinks each node reads, and which gate entries any position carries."""
    slots: dict[int, int] = {}
    slot_of_root: dict[int, int] = {}
    total = 0
    for g in groups:
        slots[g.id] = total
        for i, r in enumerate(g.roots.tolist()):
            slot_of_root[int(r)] = total + i
        total += g.size
    root_of = analysis.root_of
    by_node: dict[str, list[tuple[str, int]]] = {}
    index: dict[tuple[str, int], np.ndarray] = {}
    used = np.zeros(total + 1, dtype=bool)
    for use in analysis.state.sinks:
        key = (use.tensor, use.axis)
        if key not in index:
            layout = analysis.layouts[use.tensor][use.axis]
            roots = np.where(layout == NO_UNIT, -1, root_of[np.maximum(layout, 0)])
            index[key] = np.array([slot_of_root.get(int(r), total) for r in roots.tolist()], dtype=np.int64)
            used[index[key]] = True
        if (index[key] < total).any() and key not in by_node.get(use.node, []):
            by_node.setdefault(use.node, []).append(key)
    return slots, total, index, by_node, used


def _fill_off(nodes: list, graph, prefix: str, gated: str, mask: str, values: np.ndarray, shape: list[int],
              elem) -> str:
    """gated + values * (1 - mask): positions gated off read `values`."""
    dtype = helper.tensor_dtype_to_np_dtype(elem) if elem not in (0, None) else np.float32
    graph.initializer.append(numpy_helper.from_array(np.ones((), dtype), f"{prefix}_one"))
    graph.initializer.append(numpy_helper.from_array(values.astype(dtype).reshape(shape), f"{prefix}_fill"))
    nodes.append(helper.make_node("Sub", [f"{prefix}_one", mask], [f"{prefix}_off"], name=f"{prefix}_off"))
    nodes.append(helper.make_node("Mul", [f"{prefix}_fill", f"{prefix}_off"], [f"{prefix}_filled"],
                                  name=f"{prefix}_filled"))
    nodes.append(helper.make_node("Add", [gated, f"{prefix}_filled"], [f"{prefix}_sum"], name=f"{prefix}_sum"))
    return f"{prefix}_sum"


def _refit_off(nodes: list, graph, prefix: str, ungated: str, gated: str, axis: int, rank: int,
               index: np.ndarray, stats: ChannelStats) -> Refit:
    """gated + the prediction of `ungated` along `axis`, its matrix and offset fed per run (zero but at the
    positions gated off): a 1x1 convolution for a channels-first feature map (no transposes of a large
    activation), else a MatMul over the axis moved last."""
    p = len(index)
    conv = axis == 1 and rank >= 3
    refit = Refit(f"{prefix}_refit_matrix", f"{prefix}_refit_offset", index, stats, mul=f"{prefix}_mul",
                  first=f"{prefix}_predict" if conv or axis == rank - 1 else f"{prefix}_to_last",
                  kernel=rank - 2 if conv else 0)
    graph.input.append(helper.make_tensor_value_info(refit.matrix, TensorProto.FLOAT, refit.matrix_shape(p)))
    graph.input.append(helper.make_tensor_value_info(refit.offset, TensorProto.FLOAT, [p]))
    predicted = f"{prefix}_predicted"
    if conv:
        nodes.append(helper.make_node("Conv", [ungated, refit.matrix, refit.offset], [predicted],
                                      name=f"{prefix}_predict"))
    else:
        perm = [i for i in range(rank) if i != axis] + [axis]
        source = ungated
        if axis != rank - 1:
            nodes.append(helper.make_node("Transpose", [ungated], [f"{prefix}_to_last"], perm=perm,
                                          name=f"{prefix}_to_last"))
            source = f"{prefix}_to_last"
        nodes.append(helper.make_node("MatMul", [source, refit.matrix], [f"{prefix}_product"],
                                      name=f"{prefix}_predict"))
        nodes.append(helper.make_node("Add", [f"{prefix}_product", refit.offset], [predicted],
                                      name=f"{prefix}_shift"))
        if axis != rank - 1:
            nodes.append(helper.make_node("Transpose", [predicted], [f"{prefix}_back"],
                                          perm=[int(i) for i in np.argsort(perm)], name=f"{prefix}_back"))
            predicted = f"{prefix}_back"
    nodes.append(helper.make_node("Add", [gated, predicted], [f"{prefix}_refitted"], name=f"{prefix}_refitted"))
    return refit


def sink_statistics(model: onnx.ModelProto, analysis, groups: Sequence, calib: CalibrationSet,
                    batch_size: int = 64, threads: int = 0,
                    covariance: bool = False) -> dict[tuple[str, int], ChannelStats]:
    """Statistics of every sink of `groups` along its unit axis, on the calibration samples (streamed a
    chunk of tensors at a time under the statistics' memory cap)."""
    stats = calibration_statistics(model, analysis, calib, groups=groups, batch_size=batch_size, threads=threads,
                                   covariance=covariance)
    return stats.channels


# -- the loss -------------------------------------------------------------------------------------
class Divergence:
    """Divergence of one output from its dense value: 'kl' (rank-2 class scores) or relative 'mse'."""

    def __init__(self, name: str, reference: list[np.ndarray], kind: str,
                 valid: list[np.ndarray | None] | None = None):
        self.name = name
        self.kind = kind
        if kind == "kl":
            self.probabilities = all(looks_like_probabilities(r, 1) for r in reference)
            self.log_p = [self._log_probs(r) for r in reference]
            self.p = [np.exp(lp) for lp in self.log_p]
        else:
            self.reference = [r.astype(np.float64) for r in reference]
            # per batch: which [sample, position] rows are tokens (padding never counts)
            self.keep = [row_mask(r.shape, v, rows_per_sample=True) if r.ndim >= 3 else None
                         for r, v in zip(self.reference, valid or [None] * len(reference))]
            energy = sum(float(self._per_position(np.square(r), k).sum()) for r, k in zip(self.reference, self.keep))
            count = sum(float(np.sum(k)) if k is not None else r.shape[0] * (r.shape[1] if r.ndim >= 3 else 1)
                        for r, k in zip(self.reference, self.keep))
            self.scale = 1.0 / max(energy / max(count, 1), 1e-12)

    @staticmethod
    def _per_position(squares: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """Mean over each position's elements ([samples, positions]; a rank-2 output is one position per
        sample), padded positions zeroed."""
        if squares.ndim < 3:
            return squares.reshape(squares.shape[0], 1, -1).mean(axis=2)
        per = squares.reshape(squares.shape[0], squares.shape[1], -1).mean(axis=2)
        return per if keep is None else per * keep

    def _log_probs(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        if self.probabilities:
            return np.log(np.maximum(x, 1e-12))
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    def total(self, batch: int, x: np.ndarray) -> float:
        """Summed over the batch's samples (divide by the sample count for the mean)."""
        if self.kind == "kl":
            return float((self.p[batch] * (self.log_p[batch] - self._log_probs(x))).sum())
        diff = x.astype(np.float64) - self.reference[batch]
        if diff.ndim == 0:
            return float(np.square(diff)) * self.scale
        keep = self.keep[batch]
        per = self._per_position(np.square(diff), keep)  # each sample's positions, padding zeroed
        positions = keep.sum(axis=1) if keep is not None else np.full(per.shape[0], per.shape[1])
        return float((per.sum(axis=1) / np.maximum(positions, 1)).sum()) * self.scale


def divergence_kind(values: np.ndarray, loss: str) -> str | None:
    """The divergence an output is measured by: 'kl' for class scores, 'mse' for other floats, None otherwise."""
    if values.dtype.kind != "f":
        return None
    if loss != "auto":
        if loss == "kl" and values.ndim < 2:
            raise OnnxPruneError(f"ablation loss 'kl' needs class scores of rank 2, got shape {values.shape}")
        return loss
    return "kl" if values.ndim == 2 and values.shape[1] > 1 else "mse"


# -- suffixes -------------------------------------------------------------------------------------
@dataclass
class Suffix:
    """The part of the gated model a group's gates can change, as a model of its own.

    frontier: the tensors it reads from the unchanged prefix (fed from one
    capture of the prefix per group); outputs: the graph outputs it changes.
    """

    model: onnx.ModelProto
    frontier: list[str]
    outputs: list[str]
    flops: float | None


def suffix(gm: GatedModel, start: set[str], node_flops: dict[str, float] | None,
           dtypes: dict[str, int]) -> Suffix:
    """Every node downstream of the gating Mul nodes `start`, with the gate masks they need."""
    graph = gm.model.graph
    constants = {t.name for t in graph.initializer}
    controls = gm.controls
    affected: set[str] = set()
    chosen: set[int] = set()
    gate_only: dict[str, int] = {}  # tensor -> producer, for nodes computed from the gate and constants alone
    for i, node in enumerate(graph.node):
        ins = reads(node)
        if node.name in start or any(x in affected for x in ins):
            chosen.add(i)
            affected.update(o for o in node.output if o)
        elif all(x in constants or x in controls or x in gate_only for x in ins):
            gate_only.update((o, i) for o in node.output if o)
    stack = [x for i in chosen for x in reads(graph.node[i]) if x in gate_only]
    while stack:
        i = gate_only[stack.pop()]
        if i not in chosen:
            chosen.add(i)
            stack.extend(x for x in reads(graph.node[i]) if x in gate_only)
    nodes = [graph.node[i] for i in sorted(chosen)]
    produced = {o for n in nodes for o in n.output if o}
    frontier = list(dict.fromkeys(x for n in nodes for x in reads(n)
                                  if x not in produced and x not in constants and x not in controls))
    outputs = [o for o in graph.output if o.name in affected]
    out = onnx.ModelProto()
    copy_fields(gm.model, out, skip="graph")
    out.graph.name = graph.name
    out.graph.node.extend(nodes)
    used = {x for n in nodes for x in reads(n)}
    out.graph.initializer.extend(t for t in graph.initializer if t.name in used)
    old_inputs = {i.name: i for i in graph.input}
    for name in frontier:
        elem = dtypes.get(name, TensorProto.FLOAT)
        out.graph.input.append(old_inputs.get(name) or helper.make_tensor_value_info(name, elem, None))
    out.graph.input.extend(old_inputs[x] for x in [gm.gate, *sorted(controls & used - {gm.gate})])
    out.graph.output.extend(outputs)
    flops = None if node_flops is None else float(sum(node_flops.get(n.name, 0.0) for n in nodes))
    return Suffix(out, frontier, [o.name for o in outputs], flops)


# -- the measurement ------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """Loss increase when each unit alone is zeroed: `scores[group id]`, one value per unit."""

    scores: dict[int, np.ndarray]
    samples: int
    units: int
    runs: int = 0
    seconds: float = 0.0
    losses: dict[str, str] = field(default_factory=dict)  # output -> "kl" / "mse"
    flops: float | None = None  # estimated FLOPs of the ablations (suffixes only)
    dense_flops: float | None = None  # what the same ablations would cost through the whole model
    notes: list[str] = field(default_factory=list)


def _node_flops(model: onnx.ModelProto) -> dict[str, float] | None:
    try:
        from onnxprune.cost import model_cost

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return {n.name: float(n.flops) for n in model_cost(copy).nodes}
    except Exception:  # an unknown cost only switches the budget off
        log.debug("ablation: no FLOPs estimate", exc_info=True)
        return None


def _plan_samples(per_sample_cost: float | None, available: int, samples: int, min_samples: int,
                  budget: float | None, units: int) -> tuple[int, list[str]]:
    """per_sample_cost: FLOPs of every ablation of one sample."""
    samples = max(1, min(samples, available))
    if not per_sample_cost or budget is None:
        return samples, []
    if per_sample_cost * samples <= budget:
        return samples, []
    fit = int(budget // per_sample_cost)
    floor = min(min_samples, samples)
    if fit < floor:
        raise AblationBudgetError(
            f"ablation sensitivity of {units} units would cost {per_sample_cost * floor / 1e12:.3g} TFLOPs even "
            f"with the fewest samples allowed ({floor}; {per_sample_cost / 1e9:.3g} GFLOPs per sample for all "
            f"units), over the budget of {budget / 1e12:.3g} TFLOPs. Use a criterion that costs one pass over "
            "the data (thinet, flap, wanda, mean_act), score fewer groups, or raise the budget "
            "(ablation_sensitivity(..., budget_flops=...))")
    note = (f"ablation: {units} units x {samples} samples would cost {per_sample_cost * samples / 1e12:.3g} "
            f"TFLOPs, over the budget of {budget / 1e12:.3g} TFLOPs: {fit} samples per unit instead")
    log.warning(note)
    return fit, [note]


@dataclass
class Probes:
    """What every ablation of a set of groups shares: the gated model, the calibration batches (a seeded
    subset) and, per group, the suffix of the model its gates can change (`plans`: group, the unit
    indices that reach a gate, the suffix)."""

    gm: GatedModel
    plans: list[tuple[Any, list[int], Suffix]]
    batches: list
    samples: int
    notes: list[str]
    cost_per_sample: float | None  # FLOPs of one ablation of every unit, per sample
    whole_flops: float | None
    valid: list[np.ndarray | None] | None = None  # per batch: its token positions (padding never counts)

    @property
    def units(self) -> int:
        return sum(len(a) for _, a, _ in self.plans)


def plan_probes(model: onnx.ModelProto, analysis, data: Any, groups: Sequence, *, samples: int,
                runs_per_group: int | None = None, min_samples: int = DEFAULT_MIN_SAMPLES,
                budget_flops: float | None = DEFAULT_BUDGET_FLOPS, batch_size: int = 64,
                max_samples: int | None = None, seed: int = 0, fill: str = "zero") -> Probes:
    """Gate `groups`, cut each group's suffix, and pick the calibration samples the FLOP budget allows
    (the caller runs each group's suffix once per unit, or `runs_per_group` times). `fill`, what a
    gated-off position reads: "zero"; "mean", its mean on the calibration data (as after bias
    compensation); "refit", its least-squares prediction from the positions kept (as after the refit of
    its consumer; the mean where a sink cannot be refit)."""
    if fill not in FILLS:
        raise OnnxPruneError(f"ablation fill must be one of {', '.join(FILLS)}, got '{fill}'")
    calib = CalibrationSet.open(data, model, max_samples=max_samples)
    stats = sink_statistics(model, analysis, groups, calib, batch_size, covariance=fill == "refit") \
        if fill != "zero" else {}
    gm = gated_model(model, analysis, groups, {k: v.mean for k, v in stats.items()} if stats else None,
                     stats if fill == "refit" else None)
    node_flops = _node_flops(model)
    dtypes = {name: entry[0] for name, entry in analysis.view.shapes.items() if entry and entry[0]}
    plans = []
    for g in groups:
        lo, hi = gm.slots[g.id], gm.slots[g.id] + g.size
        active = [k - lo for k in range(lo, hi) if gm.used[k]]
        if not active:
            continue
        start = {name for name, idx in gm.muls.items() if ((idx >= lo) & (idx < hi)).any()}
        start |= {r.first for r in gm.refits if r.mul in start}  # the prediction reads the ungated sink
        plans.append((g, active, suffix(gm, start, node_flops, dtypes)))
    units = sum(len(a) for _, a, _ in plans)
    cost = None if node_flops is None else \
        sum((runs_per_group or len(a)) * (s.flops or 0.0) for _, a, s in plans)
    count, notes = _plan_samples(cost, len(calib), samples, min_samples, budget_flops, units)
    if count < len(calib):
        pick = np.sort(np.random.default_rng(seed).choice(len(calib), count, replace=False))
        calib = CalibrationSet(calib.dataset, calib.specs, calib.indices[pick], calib.mask_input)
    whole = None if node_flops is None else sum(node_flops.values())
    batches = list(calib.batches(batch_size))
    valid = [calib.real_positions(feeds, n) for feeds, n in batches]
    return Probes(gm, plans, batches, len(calib), notes, cost, whole, valid)


class GroupProbe:
    """One group's suffix in an onnxruntime session, with the dense outputs it is compared against:
    `loss(zeroed)` is the divergence of the outputs when the units `zeroed` of the group are gated off,
    averaged over the calibration samples."""

    def __init__(self, probes: Probes, group, part: Suffix, loss: str, threads: int):
        self.probes, self.group, self.part = probes, group, part
        gm = probes.gm
        inputs = {i.name for i in part.model.graph.input}
        self.refits = [r for r in gm.refits if r.matrix in inputs]
        self.unchanged = {name: gm.unchanged[name] for name in gm.controls & inputs}
        self.feeds = _frontier_feeds(gm, part, probes.batches, threads) if part.outputs else []
        self.session = calibration_session(part.model, threads=threads) if part.outputs else None
        self.losses: list[tuple[int, Divergence]] = []
        if self.session is not None:
            dense = _run(self.session, part.outputs, self.feeds, self.unchanged)
            for j, name in enumerate(part.outputs):
                kind = divergence_kind(dense[0][j], loss)
                if kind is not None:
                    self.losses.append((j, Divergence(name, [b[j] for b in dense], kind, probes.valid)))
        self.runs = len(self.feeds)

    @property
    def kinds(self) -> dict[str, str]:
        return {d.name: d.kind for _, d in self.losses}

    def loss(self, zeroed: Sequence[int]) -> float:
        if not self.losses:
            return 0.0
        gate = self.unchanged[self.probes.gm.gate].copy()
        gate[self.probes.gm.slots[self.group.id] + np.asarray(zeroed, dtype=np.int64)] = 0.0
        controls = {**self.unchanged, self.probes.gm.gate: gate}
        for r in self.refits:
            controls.update(r.fitted(gate))
        total = 0.0
        for b, values in enumerate(_run(self.session, self.part.outputs, self.feeds, controls)):
            total += sum(d.total(b, values[j]) for j, d in self.losses)
        self.runs += len(self.feeds)
        return max(total / self.probes.samples, 0.0)


def check_float_outputs(model: onnx.ModelProto, probes: Probes, kinds: dict[str, str]) -> None:
    if probes.plans and not kinds:
        raise OnnxPruneError("ablation sensitivity needs a float model output to measure the divergence on; "
                             f"the outputs are {[o.name for o in model.graph.output]}")


def ablation_sensitivity(
    model: onnx.ModelProto,
    analysis,
    data: Any,
    *,
    groups: Sequence | None = None,
    samples: int = DEFAULT_SAMPLES,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    budget_flops: float | None = DEFAULT_BUDGET_FLOPS,
    batch_size: int = 64,
    max_samples: int | None = None,
    loss: str = "auto",
    seed: int = 0,
    threads: int = 0,
    progress: bool | None = None,
) -> Sensitivity:
    """Zero-ablation sensitivity of every unit of `groups` (default: the prunable ones) on `model`
    (the model `analysis` was built on).

    samples: calibration samples per ablation (a seeded random subset of the
    first `max_samples` of `data`), fed `batch_size` at a time.
    loss: "auto" (KL for rank-2 class scores, relative MSE otherwise), "kl" or "mse".
    budget_flops: FLOPs allowed for all ablations (None: no limit), estimated
    per group as its units x samples x the FLOPs of the part of the model
    after its first gate.
    """
    check_loss(loss)
    clock = time.perf_counter()
    groups = list(analysis.prunable_groups() if groups is None else groups)
    probes = plan_probes(model, analysis, data, groups, samples=samples, min_samples=min_samples,
                         budget_flops=budget_flops, batch_size=batch_size, max_samples=max_samples, seed=seed)
    scores = {g.id: np.zeros(g.size) for g in groups}
    kinds: dict[str, str] = {}
    runs = 0
    with Progress(probes.units, "ablation", enabled=progress) as bar:
        for g, active, part in probes.plans:
            probe = GroupProbe(probes, g, part, loss, threads)
            kinds.update(probe.kinds)
            for i in active if probe.losses else ():
                scores[g.id][i] = probe.loss([i])
                bar.update()
            if not probe.losses:
                bar.update(len(active))
            runs += probe.runs
    check_float_outputs(model, probes, kinds)
    n, cost, whole = probes.samples, probes.cost_per_sample, probes.whole_flops
    result = Sensitivity(scores, n, probes.units, runs=runs, losses=kinds,
                         flops=None if cost is None else cost * n,
                         dense_flops=None if whole is None else whole * probes.units * n, notes=probes.notes)
    result.seconds = time.perf_counter() - clock
    return result


def check_loss(loss: str) -> None:
    if loss not in ("auto", "kl", "mse"):
        raise OnnxPruneError(f"ablation loss must be 'auto', 'kl' or 'mse', got '{loss}'")


def _run(session, outputs: list[str], feeds, controls: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """Per batch, the outputs (padding rows dropped) with the gate and refits `controls`."""
    return [[v[:n] for v in session.run(outputs, {**f, **controls})] for f, n in feeds]


def _frontier_feeds(gm: GatedModel, part: Suffix, batches, threads: int):
    """Per batch: the suffix's inputs (graph inputs as given, prefix tensors from one dense run) and n."""
    graph_inputs = {i.name for i in gm.model.graph.input}
    captured = [x for x in part.frontier if x not in graph_inputs]
    capture = Capture(gm.model, captured, threads=threads) if captured else None
    out = []
    for feeds, n in batches:
        f = {x: feeds[x] for x in part.frontier if x in graph_inputs}
        if capture is not None:
            f.update(capture.run({**feeds, **gm.unchanged}))
        out.append((f, n))
    return out
