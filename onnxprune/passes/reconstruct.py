"""Reconstruction passes: repair a pruned model with calibration data, without retraining.

Each pass follows the pass protocol (`passes.protocol`): called with the
current pruned model, it returns a new one (the input is not modified) and a
record with one entry per layer (details["layers"]). They share a
`ReconstructionContext` (the dense model, the keep masks of the plan, the
fit and held-out calibration splits, batch/memory settings). The driver,
`passes.reconstruction.reconstruct`, guards each with held-out fidelity.

* `LeastSquaresRefit` (`passes.least_squares`) — refit each changed Conv/Gemm/MatMul's kept
  weights and bias so its outputs match the dense model's.
* `BiasCompensation` — where no refit happened: add W[:, removed] ·
  mean(x_removed) (means from the dense model) to the consumer's bias,
  creating a bias when there is none. Exact for a linear consumer whose
  removed inputs are constant; for a padded Conv the border positions see
  fewer taps, so it is the interior mean.
* `BnRecalibration` — re-estimate BatchNormalization running mean and
  variance on the pruned model's activations (downstream of any change),
  in graph order.
* `OutputMatching` — the same for BN folded into convolutions: give each
  changed Conv/Gemm (not refit, not followed by a BN) the dense model's
  per-channel output mean and standard deviation by an affine map folded
  into its weight rows and bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import Consumer, consumer_for
from onnxprune.calibration.padding import row_mask
from onnxprune.calibration.stats import collect_statistics
from onnxprune.ir.editor import GraphEditor, copy_model
from onnxprune.ir.graph_view import reads
from onnxprune.ir.quant import QLINEAR_MIXING, qlinear_mixing
from onnxprune.passes import integer_weights
from onnxprune.passes import qoperator
from onnxprune.passes.protocol import NOTHING_TO_DO, Pass, PassResult
from onnxprune.runtime.progress import progress_iter

@dataclass
class ReconstructionContext:
    dense: onnx.ModelProto
    masks: dict[tuple[str, int], np.ndarray]  # (tensor, axis) -> keep mask, from Analysis.keep_masks
    fit: CalibrationSet
    holdout: CalibrationSet
    batch_size: int = 32
    per_sample: int | None = 64
    memory_cap: int = DEFAULT_MEMORY_CAP
    threads: int = 0
    seed: int = 0
    rewired: frozenset[str] = frozenset()  # nodes reading another activation than in the dense model (a drop)
    class_axis: int | None = None  # the first output's class axis when declared: top-1 agreement per position

    def collect(self, model, data, tensors=(), grams=(), target_model=None):
        return collect_statistics(model, data, tensors, grams, target_model=target_model,
                                  batch_size=self.batch_size, memory_cap=self.memory_cap,
                                  per_sample=self.per_sample, seed=self.seed, threads=self.threads)


@dataclass
class LayerRecord:
    node: str
    action: str  # refit, kept, bias, recalibrated, matched, skipped
    detail: str = ""
    features: int | None = None
    rows: int | None = None
    ridge: float | None = None
    error_before: float | None = None  # held-out relative squared error of the layer output
    error_after: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


# -- model editing ------------------------------------------------------------------------------------
# the QOperator format's mixing ops: the float op each computes is refit on its dequantized input
# (`passes.qoperator`), its integers rewritten in their scheme (`passes.integer_weights`)
QOPERATOR_CONSUMERS = tuple(op for _, op in QLINEAR_MIXING)


class ConsumerEditor(GraphEditor):
    """The graph editor, plus the weights and biases of consumers (Conv, Gemm, MatMul, and the QOperator
    ops that compute them) by node name.

    A weight or bias may be a float initializer or integers: behind a `DequantizeLinear` (QDQ) or read by
    a QOperator op (`passes.integer_weights`); integers are read as float and written back as integers
    in their own scheme (`weight_problem` says where that cannot be done). Writes are copy-on-write
    (`GraphEditor.write_const`): a weight or bias other nodes read too (a subgraph included) gets a
    private copy instead of being changed for all of them."""

    def consumer(self, node_name: str) -> Consumer | None:
        node = self.get_node(node_name)
        if node is None:
            return None
        if qlinear_mixing(node) is not None:
            found = qoperator.consumer(self, node)
            return found if isinstance(found, Consumer) else None
        # a weight or bias made by a DequantizeLinear of constants counts as a constant of its shape
        known = {name: self.initializers[name] for name in node.input if name in self.initializers}
        for name in node.input[1:3]:
            q = integer_weights.dequantized(self, name)
            if q is not None:
                known[name] = onnx.TensorProto(name=name, dims=self.initializers[q.data].dims)
        return consumer_for(node, known)

    def unsupported(self, node_name: str) -> str:
        """Why `node_name` is not a consumer the passes can refit."""
        node = self.get_node(node_name)
        why = qoperator.consumer(self, node) if node is not None else None
        return why if isinstance(why, str) else "not a Conv/Gemm/MatMul with a constant weight"

    def integers(self, c: Consumer) -> integer_weights.IntegerWeights:
        """Where c's weight and bias are integers, and which node reads them how (None each where float)."""
        return integer_weights.integer_weights(self, c, weight_out_axis(c))

    def weight_problem(self, c: Consumer) -> str | None:
        """Why `c`'s weight cannot be written back (an integer layout the passes do not requantize), or None."""
        return integer_weights.weight_problem(self, c, self.integers(c), weight_out_axis(c))

    def bias_problem(self, c: Consumer) -> str | None:
        """Why no bias can be written for `c` (an integer consumer without one, an odd int32 bias), or None."""
        return integer_weights.bias_problem(self, c, self.integers(c))

    def weight(self, c: Consumer) -> np.ndarray:
        """The consumer's weight as float64, in the weight's own layout (dequantized when it is integers)."""
        q = self.integers(c).weight
        return self.value(c.weight).astype(np.float64) if q is None else integer_weights.real_values(self, q)

    def bias_of(self, c: Consumer) -> np.ndarray:
        """The consumer's current bias in output units (zeros when it has none), shape (out,)."""
        if c.bias is None:
            return np.zeros(c.out_channels)
        q = self.integers(c).bias
        b = (self.value(c.bias).astype(np.float64) if q is None else integer_weights.real_values(self, q)).reshape(-1)
        if c.op_type == "Gemm":
            b = b * c.beta
        return np.broadcast_to(b, (c.out_channels,)).copy()

    def stored(self, c: Consumer, effective: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(effective weight, bias) as the model will compute with them once written: an integer weight and
        bias rounded to their integers, so a refit is judged by what it will be."""
        ints = self.integers(c)
        if ints.weight is None:
            return effective, bias
        new = integer_weights.requantize(self, ints, c.weight_from_effective(effective))
        weight = c.effective_weight(new.real(ints.weight.axis))
        if ints.bias is None:
            return weight, bias
        beta = c.beta if c.op_type == "Gemm" and c.beta != 0 else 1.0
        raw = self._bias_tensor(c, bias, beta)
        return weight, np.broadcast_to(integer_weights.stored_bias(self, ints.bias, raw, new.bias_scale).reshape(-1) * beta,
                                       (c.out_channels,)).copy()

    def _bias_tensor(self, c: Consumer, bias: np.ndarray, beta: float) -> np.ndarray:
        """`bias` (output units) divided by beta, shaped like c's bias tensor when it has as many values."""
        q = self.integers(c).bias
        shape = tuple(self.initializers[q.data if q is not None else c.bias].dims)
        value = bias / beta
        return value.reshape(shape) if int(np.prod(shape)) == len(value) else value

    def set_bias(self, c: Consumer, bias: np.ndarray) -> None:
        """Write `bias` (output units, shape (out,)) into the consumer, creating it if needed (where
        `bias_problem` allows)."""
        node = self.node(c.node)
        beta = c.beta if c.op_type == "Gemm" and c.beta != 0 and c.bias is not None else 1.0
        if c.op_type == "Gemm" and beta != c.beta:
            self.set_attr(node, "beta", 1.0)
        ints = self.integers(c)
        if ints.bias is not None:
            integer_weights.write_bias(self, ints.bias, self._bias_tensor(c, bias, beta))
            return
        # a float bias: in the weight's type (a QDQ weight's float bias keeps its own)
        dtype = self.value(c.bias if ints.weight is not None else c.weight).dtype
        if c.op_type == "Conv":
            self.write_const(node, 2, bias.astype(dtype), None if c.bias is not None else f"{node.name}.bias")
        elif c.op_type == "Gemm":
            value = self._bias_tensor(c, bias, beta) if c.bias is not None else bias
            self.write_const(node, 2, value.astype(dtype), None if c.bias is not None else f"{node.name}.bias")
        else:
            self.add_bias_after(node, bias.astype(dtype))

    def add_bias_after(self, node: onnx.NodeProto, bias: np.ndarray) -> None:
        """MatMul has no bias input: its output goes through a new Add(output, bias), placed right
        after it at the next `commit`."""
        out = node.output[0]
        pre = self.fresh_name(f"{out}__prebias")
        self.rename_output(node, 0, pre)
        bias_name = self.add_initializer(bias, f"{node.name}.bias")
        add = helper.make_node("Add", [pre, bias_name], [out], name=self.fresh_name(f"{node.name}/bias_add"))
        self.add_node(add, after=node.name)

    def set_weight(self, c: Consumer, effective: np.ndarray) -> None:
        """Write the (out, features) `effective` weight into the consumer: an integer weight as integers
        (its int32 bias re-derived for the new scale)."""
        self.set_raw_weight(c, c.weight_from_effective(effective))

    def set_raw_weight(self, c: Consumer, raw: np.ndarray) -> None:
        """Write `raw` (the weight in its own layout) into the consumer."""
        ints = self.integers(c)
        if ints.weight is not None:
            integer_weights.write_weight(self, ints, integer_weights.requantize(self, ints, raw))
            return
        old = self.value(c.weight)
        new = np.asarray(raw).astype(old.dtype)
        if new.shape != old.shape:
            raise ValueError(f"{c.op_type} '{c.node}': refit weight has shape {new.shape}, expected {old.shape}")
        self.write_const(self.node(c.node), 1, new)

    def set_tied(self, readers: list[Consumer], effective: np.ndarray, bias: np.ndarray | None) -> None:
        """Write one refit weight (and bias) for every reader of a tied weight, not a copy per reader."""
        c = readers[0]
        old = self.value(c.weight)
        new = c.weight_from_effective(effective).astype(old.dtype)
        if new.shape != old.shape:
            raise ValueError(f"{c.op_type} '{c.node}': refit weight has shape {new.shape}, expected {old.shape}")
        self.write_shared(c.weight, new)
        if bias is None:
            return
        if c.op_type == "Gemm" and c.bias is not None and c.beta != 0 and all(r.bias == c.bias for r in readers):
            shape = tuple(self.initializers[c.bias].dims)
            value = (bias / c.beta).astype(old.dtype)
            self.write_shared(c.bias, value.reshape(shape) if int(np.prod(shape)) == len(value) else value)
        else:
            for r in readers:
                self.set_bias(r, bias)


def shared_weight(weight: str, edit: GraphEditor) -> str:
    """Why a consumer is not refit: its weight is one tensor several nodes read (ALBERT's shared
    layers, a recurrence), and a refit per reader would store a copy per reader."""
    return f"weight '{weight}' is shared by {edit.reader_count(weight)} nodes; refitting it for one would copy it"


def preactivations(model: onnx.ModelProto, nodes: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """`model`, and where `nodes` hold QOperator consumers, a copy with the float twin of each: the tensor
    holding its output before requantization, by node (`passes.qoperator`; that output clips at the
    integer range, a fused Relu's 0 included, and the refit and the statistics want it unclipped).
    `model` itself when there are none."""
    edit = ConsumerEditor(model)
    layers = []
    for name in nodes:
        node = edit.get_node(name)
        c = edit.consumer(name) if node is not None and qlinear_mixing(node) is not None else None
        if c is not None:
            layers.append((c, edit.weight(c), edit.bias_of(c)))
    return qoperator.with_float_twins(model, layers) if layers else (model, {})


# -- the passes' common shape -------------------------------------------------------------------------
LAYER_CHANGES = {"refit": "refit", "bias": "compensated", "recalibrated": "recalibrated", "matched": "matched"}


class ReconstructionPass(Pass):
    """A reconstruction pass: `repair` edits the pass's own copy of the model and returns one record
    per layer it looked at (the pass record's details["layers"]). The model counts as changed
    when a layer was refit, compensated, recalibrated or matched."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        out = copy_model(model)
        layers = self.repair(out)
        details = {"layers": [layer.to_dict() for layer in layers]}
        changed = [layer for layer in layers if layer.action in LAYER_CHANGES]
        if not changed:
            summary = f"no layer changed ({len(layers)} looked at)" if layers else NOTHING_TO_DO
            return self.unchanged(model, summary, **details)
        verb = LAYER_CHANGES[changed[0].action]
        return self.changed(out, f"{len(changed)} layer(s) {verb}", **details)

    def repair(self, model: onnx.ModelProto) -> list[LayerRecord]:
        raise NotImplementedError


# -- what changed, and in which order ---------------------------------------------------------------
def rewired_nodes(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> frozenset[str]:
    """Nodes of both models that read a different activation in the pruned one: the readers of a
    dropped layer's output now read its input. (Initializers may be renamed by slicing: not counted.)"""
    def activations(model):
        inits = {t.name for t in model.graph.initializer}
        return {n.name: [i for i in n.input if i and i not in inits] for n in model.graph.node}

    before, after = activations(dense), activations(pruned)
    return frozenset(name for name, inputs in after.items() if name in before and before[name] != inputs)


def changed_tensors(model: onnx.ModelProto, masks: dict[tuple[str, int], np.ndarray],
                    rewired: frozenset[str] = frozenset()) -> set[str]:
    """Tensors whose values differ between the dense and the pruned model (on the dense graph)."""
    changed = {t for t, _ in masks}
    for node in model.graph.node:
        if node.name in rewired or any(i in changed for i in reads(node)):
            changed.update(o for o in node.output if o)
    return changed


def changed_consumers(model: onnx.ModelProto, masks: dict[tuple[str, int], np.ndarray],
                      rewired: frozenset[str] = frozenset()) -> list[str]:
    """Mixing nodes (by name, graph order) whose *input activation* differs after pruning."""
    changed = changed_tensors(model, masks, rewired)
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul", *QOPERATOR_CONSUMERS) and n.input and n.input[0] not in inits
            and (n.input[0] in changed or n.name in rewired)]


def levels(model: onnx.ModelProto, targets: list[str]) -> list[list[str]]:
    """Split `targets` (node names) into levels: a node's level is 1 + the deepest target upstream of it."""
    wanted = set(targets)
    depth: dict[str, int] = {}
    out: dict[int, list[str]] = {}
    for node in model.graph.node:
        d = max((depth.get(i, -1) for i in reads(node)), default=-1)
        if node.name in wanted:
            d += 1
            out.setdefault(d, []).append(node.name)
        for o in node.output:
            if o:
                depth[o] = d
    return [out[k] for k in sorted(out)]


def weight_out_axis(c: Consumer) -> int:
    if c.op_type == "Conv":
        return 0
    if c.op_type == "Gemm":
        return 0 if c.trans_b else 1
    return 1


# -- fidelity on held-out data ------------------------------------------------------------------------
class Fidelity:
    """Relative squared error of a model's float outputs against the dense model's, on held-out samples
    (sum over outputs of ||model - dense||^2 / ||dense||^2), plus the top-1 agreement of the first output
    when it holds class scores ([N, classes], or its class axis declared: per position) and, for a [N, sequence, features] output, the same error of its mean over the real positions of each
    sample (`last_pooled`): what a sentence embedding reads, which per-position error can rank the other
    way (measured on MiniLM: an allocation with 0.041 per-token error against 0.070 had 0.138 pooled
    error against 0.092, and the worse retrieval)."""

    def __init__(self, ctx: ReconstructionContext):
        self.ctx = ctx
        self.names = [o.name for o in ctx.dense.graph.output]
        self._reference: list[dict[str, np.ndarray]] | None = None
        self.last_agreement: float | None = None
        self.last_pooled: float | None = None

    def _dense_batches(self):
        if self._reference is not None:
            yield from self._reference
            return
        session = Capture(self.ctx.dense, self.names, threads=self.ctx.threads)
        cached, size = [], 0
        for feeds, n in self.ctx.holdout.batches(self.ctx.batch_size):
            out = session.run(feeds, n)
            size += sum(v.nbytes for v in out.values())
            if cached is not None:
                cached.append(out)
                if size > self.ctx.memory_cap // 4:
                    cached = None  # too big to keep: recompute next time
            yield out
        if cached is not None:
            self._reference = cached

    def __call__(self, model: onnx.ModelProto) -> float | None:
        if len(self.ctx.holdout) == 0:
            return None
        session = Capture(model, self.names, threads=self.ctx.threads)
        num = {n: 0.0 for n in self.names}
        den = {n: 0.0 for n in self.names}
        pooled = {n: [0.0, 0.0] for n in self.names}  # numerator, denominator of the pooled error
        agree = total = 0
        batches = self.ctx.holdout.batches(self.ctx.batch_size)
        for ref in self._dense_batches():
            feeds, n = next(batches)
            got = session.run(feeds, n)
            valid = self.ctx.holdout.real_positions(feeds, n)
            for name in self.names:
                r, g = ref[name], got[name]
                if r.dtype.kind != "f" or r.shape != g.shape:
                    continue
                keep = row_mask(r.shape, valid, rows_per_sample=True) if r.ndim >= 3 else None
                if r.ndim == 3 and len(r) == n:
                    _add_pooled(pooled[name], r, g, keep)
                if keep is not None:  # padded positions: neither an error nor a reference
                    r, g = r[keep], g[keep]
                num[name] += float(np.square(g.astype(np.float64) - r).sum())
                den[name] += float(np.square(r.astype(np.float64)).sum())
            r0 = ref[self.names[0]]
            axis = _class_axis_of(self.ctx.class_axis, r0)
            if axis is not None and got[self.names[0]].shape == r0.shape:
                same = got[self.names[0]].argmax(axis) == r0.argmax(axis)
                agree += int(same.sum())
                total += same.size
        self.last_agreement = agree / total if total else None
        pooled_parts = [a / b for a, b in pooled.values() if b > 0]
        self.last_pooled = float(np.mean(pooled_parts)) if pooled_parts else None
        parts = [num[n] / den[n] for n in self.names if den[n] > 0]
        return float(np.mean(parts)) if parts else 0.0


def _class_axis_of(ctx_axis: int | None, r: np.ndarray) -> int | None:
    """The axis of class scores in an output: 1 of a [N, classes] one; a declared one (`ctx_axis`)."""
    if r.dtype.kind != "f":
        return None
    if r.ndim == 2 and r.shape[1] > 1:
        return 1
    if ctx_axis is not None and r.ndim >= 3 and -r.ndim <= ctx_axis < r.ndim and r.shape[ctx_axis] > 1:
        return ctx_axis  # declared (--class-axis): a sequence of class scores, such as CTC logits
    return None


def _add_pooled(sums: list[float], r: np.ndarray, g: np.ndarray, keep: np.ndarray | None) -> None:
    """Add one batch's squared error of the per-sample means over real positions to `sums`."""
    weights = (keep if keep is not None else np.ones(r.shape[:2], bool)).astype(np.float64)[..., None]
    count = np.maximum(weights.sum(1), 1.0)
    r_mean, g_mean = (r * weights).sum(1) / count, (g * weights).sum(1) / count
    sums[0] += float(np.square(g_mean - r_mean).sum())
    sums[1] += float(np.square(r_mean).sum())


# -- bias compensation ---------------------------------------------------------------------------------
def removed_inputs(ctx: ReconstructionContext, analysis) -> dict[str, tuple[str, int, np.ndarray]]:
    """node -> (tensor, axis, keep mask) for every sink that loses input positions, and every QOperator
    consumer that does (the analysis records no sink between integer ops, where there is no float
    tensor to mask: their removed inputs are read from the keep mask of their integer input)."""
    out = {}
    for s in analysis.state.sinks:
        mask = ctx.masks.get((s.tensor, s.axis))
        if mask is not None and not mask.all():
            out[s.node] = (s.tensor, s.axis, mask)
    edit = ConsumerEditor(ctx.dense)
    for node in ctx.dense.graph.node:
        c = edit.consumer(node.name) if qlinear_mixing(node) is not None and node.name not in out else None
        shape = analysis.view.shape(c.input) if c is not None else None
        if shape:
            axis = c.feature_axis % len(shape)
            mask = ctx.masks.get((c.input, axis))
            if mask is not None and not mask.all():
                out[node.name] = (c.input, axis, mask)
    return out


def compensation(cd: Consumer, w: np.ndarray, mask: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """W[:, removed] . mean(x_removed) in output units, one entry per dense output channel."""
    removed = np.flatnonzero(~mask)
    mu = mean[removed].astype(np.float64)
    if cd.op_type == "Conv":
        ws = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2).astype(np.float64)  # (O, C/g)
        if cd.group == 1:
            return ws[:, removed] @ mu
        cg, og = ws.shape[1], ws.shape[0] // cd.group
        delta = np.zeros(ws.shape[0])
        for c, m in zip(removed.tolist(), mu.tolist()):
            g = c // cg
            delta[g * og:(g + 1) * og] += ws[g * og:(g + 1) * og, c % cg] * m
        return delta
    eff = cd.effective_weight(w.astype(np.float64))  # (O, K)
    return eff[:, removed] @ mu


class BiasCompensation(ReconstructionPass):
    """Add W[:, removed] · mean(x_removed) to the bias of every consumer that lost inputs
    (except those in `skip`, e.g. already refit), creating the bias if absent.

    Means are those of the dense model on the fit split (`stats`, a
    CalibrationStats holding the sink channels, is collected when not given).
    """

    name = "bias_compensation"

    def __init__(self, ctx: ReconstructionContext, analysis, skip: set[str] = frozenset(), stats=None):
        self.ctx, self.analysis, self.skip, self.stats = ctx, analysis, skip, stats

    def repair(self, model: onnx.ModelProto) -> list[LayerRecord]:
        ctx, stats = self.ctx, self.stats
        todo = {k: v for k, v in removed_inputs(ctx, self.analysis).items() if k not in self.skip}
        records: list[LayerRecord] = []
        if not todo:
            return records
        if stats is None or any(stats.get(t, a) is None for t, a, _ in todo.values()):
            stats = ctx.collect(ctx.dense, ctx.fit, tensors=sorted({(t, a) for t, a, _ in todo.values()}))
        dense_edit, edit = ConsumerEditor(ctx.dense), ConsumerEditor(model)
        for name, (tensor, axis, mask) in todo.items():
            cd, cp = dense_edit.consumer(name), edit.consumer(name)
            if cd is None or cp is None:
                records.append(LayerRecord(name, "skipped", edit.unsupported(name)))
                continue
            why = edit.bias_problem(cp)
            if why:
                records.append(LayerRecord(name, "skipped", why))
                continue
            mean = stats.channel(tensor, axis).mean
            if tensor == cd.input:  # an integer input (QOperator): its means in real values
                mean = cd.real_input(mean)
            delta = compensation(cd, dense_edit.weight(cd), mask, mean)
            out_mask = ctx.masks.get((cd.weight, weight_out_axis(cd)))
            if out_mask is not None:
                delta = delta[out_mask]
            edit.set_bias(cp, edit.bias_of(cp) + delta)
            records.append(LayerRecord(name, "bias", f"{int((~mask).sum())} removed input(s) compensated",
                                       features=int(mask.sum())))
        edit.commit()
        return records


# -- BatchNorm recalibration ---------------------------------------------------------------------------
class BnRecalibration(ReconstructionPass):
    """Re-estimate running mean/variance of BatchNormalization nodes downstream of a change, on the
    pruned model's own activations (fit split), in graph order (a BN sees its upstream BNs recalibrated).

    A BN right after a consumer in `skip` (refit by least squares to the dense model's outputs, which
    its training statistics already describe) is left alone. nodes: these BNs (names) instead."""

    name = "bn_recalibration"

    def __init__(self, ctx: ReconstructionContext, skip: set[str] = frozenset(), nodes: list[str] | None = None):
        self.ctx, self.skip, self.nodes = ctx, skip, nodes

    def repair(self, model: onnx.ModelProto) -> list[LayerRecord]:
        ctx, nodes = self.ctx, self.nodes
        if nodes is None:
            changed = changed_tensors(ctx.dense, ctx.masks, ctx.rewired)
            refit_outputs = {o for n in model.graph.node if n.name in self.skip for o in n.output}
            nodes = [n.name for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.input) >= 5
                     and (n.input[0] in changed or n.name in ctx.rewired) and n.input[0] not in refit_outputs]
        records: list[LayerRecord] = []
        edit = GraphEditor(model)
        for level in progress_iter(levels(model, nodes), "BatchNorm recalibration, level"):
            bns = [edit.node(n) for n in level]
            usable = [bn for bn in bns if edit.is_initializer(bn.input[3]) and edit.is_initializer(bn.input[4])]
            for bn in bns:
                if bn not in usable:
                    records.append(LayerRecord(bn.name, "skipped", "running statistics are not constants"))
            if not usable:
                continue
            stats = ctx.collect(model, ctx.fit, tensors=[(bn.input[0], 1) for bn in usable])
            for bn in usable:
                s = stats.channel(bn.input[0], 1)
                old_mean, old_var = edit.value(bn.input[3]), edit.value(bn.input[4])
                edit.write_const(bn, 3, s.mean.astype(old_mean.dtype).reshape(old_mean.shape))
                edit.write_const(bn, 4, s.var.astype(old_var.dtype).reshape(old_var.shape))
                shift = float(np.abs(s.mean - old_mean).mean() / (np.sqrt(old_var).mean() + 1e-12))
                records.append(LayerRecord(bn.name, "recalibrated", f"mean shift {shift:.3g} std",
                                           features=s.size, rows=s.count))
        return records


# -- output statistics matching (BatchNorm recalibration for folded BN) --------------------------------
MAX_MATCH_SCALE = 4.0


def _fed_only_to_bn(model: onnx.ModelProto) -> set[str]:
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in reads(n):
            readers.setdefault(i, []).append(n.op_type)
    return {t for t, ops in readers.items() if ops and all(op == "BatchNormalization" for op in ops)}


class OutputMatching(ReconstructionPass):
    """Per output channel, give each changed Conv/Gemm the dense model's output mean and standard deviation.

    This is BatchNorm recalibration for a model whose BN was folded into the
    convolutions: a recalibrated BN maps its input's new statistics back to
    the ones it was trained with, and so does the affine map
    y -> a * y + (mean_dense - a * mean_pruned), a = std_dense / std_pruned,
    folded into the consumer's weight rows and bias. Consumers whose output
    only feeds BatchNormalization (left to `BnRecalibration`) and those in
    `skip` (already refit) are left alone. Statistics come from the fit split;
    levels run in graph order, so each layer sees its upstream layers matched.
    The scale is clipped to [1/max_scale, max_scale]: a channel whose pruned
    output barely varies is shifted, not blown up.
    """

    name = "output_matching"

    def __init__(self, ctx: ReconstructionContext, skip: set[str] = frozenset(), nodes: list[str] | None = None,
                 max_scale: float = MAX_MATCH_SCALE):
        self.ctx, self.skip, self.nodes, self.max_scale = ctx, skip, nodes, max_scale

    def repair(self, model: onnx.ModelProto) -> list[LayerRecord]:
        ctx = self.ctx
        dense_edit, edit = ConsumerEditor(ctx.dense), ConsumerEditor(model)
        nodes = self.nodes
        if nodes is None:
            to_bn = _fed_only_to_bn(ctx.dense)
            nodes = [n for n in changed_consumers(ctx.dense, ctx.masks, ctx.rewired)
                     if n not in self.skip and edit.get_node(n) is not None
                     and dense_edit.node(n).output[0] not in to_bn]
        records, plan = self._plan(nodes, dense_edit, edit)
        if not plan:
            return records
        # a QOperator consumer's statistics are those of its output before requantization, in both models
        dense, dense_twins = preactivations(ctx.dense, list(plan))
        wanted = {name: dense_twins.get(name, cd.output) for name, (cd, _) in plan.items()}
        dense_stats = ctx.collect(dense, ctx.fit, tensors=sorted((t, 1) for t in wanted.values()))
        for level in progress_iter(levels(model, list(plan)), "output statistics matching, level"):
            specs = [edit.consumer(name) for name in level]
            measured, twins = preactivations(model, level)
            outputs = {cp.node: twins.get(cp.node, cp.output) for cp in specs}
            stats = ctx.collect(measured, ctx.fit, tensors=[(outputs[cp.node], 1) for cp in specs])
            for cp in specs:
                cd, kept = plan[cp.node]
                records.append(self._match(edit, cp, cd, kept, dense_stats.channel(wanted[cp.node], 1),
                                           stats.channel(outputs[cp.node], 1)))
            edit.commit()
        order = {n: i for i, n in enumerate(nodes)}
        records.sort(key=lambda r: order.get(r.node, len(order)))
        return records

    def _plan(self, nodes: list[str], dense_edit: ConsumerEditor, edit: ConsumerEditor
              ) -> tuple[list[LayerRecord], dict[str, tuple[Consumer, np.ndarray | None]]]:
        records: list[LayerRecord] = []
        plan: dict[str, tuple[Consumer, np.ndarray | None]] = {}
        for name in nodes:
            cd, cp = dense_edit.consumer(name), edit.consumer(name)
            if cd is None or cp is None or cd.op_type not in ("Conv", "Gemm"):
                why = edit.unsupported(name)
                records.append(LayerRecord(name, "skipped", why.replace("Conv/Gemm/MatMul", "Conv/Gemm")))
                continue
            why = edit.weight_problem(cp) or edit.bias_problem(cp)
            if why:
                records.append(LayerRecord(name, "skipped", why))
                continue
            if dense_edit.reader_count(cd.weight) > 1:
                records.append(LayerRecord(name, "skipped", shared_weight(cd.weight, dense_edit)))
                continue
            out_mask = self.ctx.masks.get((cd.weight, weight_out_axis(cd)))
            plan[name] = (cd, None if out_mask is None else np.flatnonzero(out_mask))
        return records, plan

    def _match(self, edit: ConsumerEditor, cp: Consumer, cd: Consumer, kept: np.ndarray | None, want, got
               ) -> LayerRecord:
        """Fold y -> scale * y + shift into `cp` so that its output channels get `want`'s mean and std."""
        mean_d, std_d = want.mean, np.sqrt(want.var)
        if kept is not None:
            mean_d, std_d = mean_d[kept], std_d[kept]
        std_p = np.sqrt(got.var)
        scale = np.where(std_p > 1e-12 * (std_d + 1e-30), std_d / np.maximum(std_p, 1e-30), 1.0)
        scale = np.clip(scale, 1.0 / self.max_scale, self.max_scale)
        shift = mean_d - scale * got.mean
        w = edit.weight(cp)
        shape = [1] * w.ndim
        shape[weight_out_axis(cp)] = -1
        bias = scale * edit.bias_of(cp) + shift  # read before a QDQ weight's new scale moves its bias scale
        edit.set_raw_weight(cp, w * scale.reshape(shape))
        edit.set_bias(cp, bias)
        drift = float(np.mean(np.abs(got.mean - mean_d) / (std_d + 1e-12)))
        return LayerRecord(cp.node, "matched", f"mean shift {drift:.3g} std, scale "
                           f"{float(scale.min()):.3g}..{float(scale.max()):.3g}", features=len(scale),
                           rows=got.count)
