"""Reconstruction passes: repair a pruned model with calibration data, without retraining.

Each pass is a pure function: it takes the current pruned model and returns a
new one (the input is not modified) plus a record per layer. They share a
`ReconstructionContext` (the dense model, the keep masks of the plan, the
fit and held-out calibration splits, batch/memory settings).

* `least_squares_refit` — for each mixing op (Conv, Gemm, MatMul with a
  constant weight) whose input changed, in graph order, refit the kept
  weights and the bias so that its output on calibration data matches the
  dense model's output, with inputs taken from the already-repaired pruned
  model (He et al. 2017, ThiNet's reconstruction step). Ridge regression
  towards the current weights; the strength is chosen per layer on the
  held-out split, and the current weights are kept when no refit beats
  them there.
* `bias_compensation` — where no refit happened: add W[:, removed] ·
  mean(x_removed) (means from the dense model) to the consumer's bias,
  creating a bias when there is none. Exact for a linear consumer whose
  removed inputs are constant; for a padded Conv the border positions see
  fewer taps, so it is the interior mean.
* `bn_recalibration` — re-estimate BatchNormalization running mean and
  variance on the pruned model's activations (downstream of any change),
  in graph order.
* `output_matching` — the same for BN folded into convolutions: give each
  changed Conv/Gemm (not refit, not followed by a BN) the dense model's
  per-channel output mean and standard deviation by an affine map folded
  into its weight rows and bias.

Layers are processed in *levels*: a consumer's level is one more than the
deepest refit consumer upstream of it, and every consumer of a level is fit
from the same pass over the data, so the number of passes is the depth of
the network, not its number of layers. Each level runs the pruned model
truncated to what the level needs (its prefix: the cost is about depth / 2
full passes). The dense targets at the sampled positions are read once for
all levels when they fit in half the memory cap (`DenseTargets`), else by a
dense pass per level.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture, plan_chunks, sample_bytes
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import (
    Consumer,
    GramStats,
    GroupedGramStats,
    consumer_for,
    gram_for,
    input_rows,
    output_positions,
    output_rows,
    pick_positions,
)
from onnxprune.calibration.stats import GramRequest, collect_statistics
from onnxprune.ir.graph_view import all_names, fresh_name, reads, tensor_values
from onnxprune.ir.shapes import infer_shapes, skeleton
from onnxprune.runtime.progress import progress_iter

DEFAULT_RIDGE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


@dataclass
class PassRecord:
    """One pass: applied (kept), rejected (undone by the held-out guard) or skipped (nothing to do)."""

    name: str
    applied: bool
    fidelity_before: float | None
    fidelity_after: float | None
    seconds: float
    layers: list[LayerRecord] = field(default_factory=list)
    note: str = ""
    skipped: bool = False
    agreement_before: float | None = None  # held-out top-1 agreement with the dense model (classifiers)
    agreement_after: float | None = None

    @property
    def status(self) -> str:
        return "applied" if self.applied else "skipped" if self.skipped else "rejected"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "applied": self.applied,
                "fidelity_before": self.fidelity_before,
                "fidelity_after": self.fidelity_after, "agreement_before": self.agreement_before,
                "agreement_after": self.agreement_after, "seconds": round(self.seconds, 3), "note": self.note,
                "layers": [l.to_dict() for l in self.layers]}


# -- model editing ------------------------------------------------------------------------------------
def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class Editor:
    """Reads and replaces initializers of a model, and adds biases, by node name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.uses: dict[str, int] = {}  # reads inside subgraphs count: a weight they read is copied, not refit in place
        for n in model.graph.node:
            for i in reads(n):
                self.uses[i] = self.uses.get(i, 0) + 1
        self.taken = all_names(model.graph)

    def value(self, name: str) -> np.ndarray:
        return np.array(tensor_values(self.inits[name]))

    def fresh(self, base: str) -> str:
        return fresh_name(self.taken, base)

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str | None = None) -> None:
        """Give input `index` of `node` the constant `value` (a private copy when the initializer is shared)."""
        while len(node.input) <= index:
            node.input.append("")
        name = node.input[index]
        if name and name in self.inits and self.uses.get(name, 0) == 1:
            self.inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return
        new = self.fresh(base or (f"{name}__{node.name}" if name else f"{node.name}.bias"))
        tensor = numpy_helper.from_array(np.asarray(value), new)
        self.model.graph.initializer.append(tensor)
        self.inits[new] = self.model.graph.initializer[-1]
        self.uses[new] = 1
        if name:
            self.uses[name] -= 1
        node.input[index] = new

    def add_bias_after(self, node: onnx.NodeProto, bias: np.ndarray) -> None:
        """MatMul has no bias input: route its output through a new Add(output, bias)."""
        out = node.output[0]
        pre = self.fresh(f"{out}__prebias")
        node.output[0] = pre
        bname = self.fresh(f"{node.name}.bias")
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(bias), bname))
        self.inits[bname] = self.model.graph.initializer[-1]
        add = helper.make_node("Add", [pre, bname], [out], name=self.fresh(f"{node.name}/bias_add"))
        nodes = list(self.model.graph.node)
        at = next(i for i, n in enumerate(nodes) if n is node or n.name == node.name)
        nodes.insert(at + 1, add)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self.nodes = {n.name: n for n in self.model.graph.node}

    def consumer(self, node_name: str) -> Consumer | None:
        node = self.nodes.get(node_name)
        return None if node is None else consumer_for(node, self.inits)

    def bias_of(self, c: Consumer) -> np.ndarray:
        """The consumer's current bias in output units (zeros when it has none), shape (out,)."""
        if c.bias is None:
            return np.zeros(c.out_channels)
        b = self.value(c.bias).astype(np.float64).reshape(-1)
        if c.op_type == "Gemm":
            b = b * c.beta
        return np.broadcast_to(b, (c.out_channels,)).copy()

    def set_bias(self, c: Consumer, bias: np.ndarray) -> None:
        """Write `bias` (output units, shape (out,)) into the consumer, creating it if needed."""
        node = self.nodes[c.node]
        dtype = self.value(c.weight).dtype
        if c.op_type == "Conv":
            self.set_input(node, 2, bias.astype(dtype))
        elif c.op_type == "Gemm":
            beta = c.beta
            if beta == 0 or c.bias is None:
                _set_attr(node, "beta", 1.0)
                beta = 1.0
            shape = tuple(self.inits[c.bias].dims) if c.bias is not None else (c.out_channels,)
            value = (bias / beta).astype(dtype)
            self.set_input(node, 2, value.reshape(shape) if int(np.prod(shape)) == len(value) else value)
        else:
            self.add_bias_after(node, bias.astype(dtype))

    def set_weight(self, c: Consumer, effective: np.ndarray) -> None:
        node = self.nodes[c.node]
        old = self.value(c.weight)
        new = c.weight_from_effective(effective).astype(old.dtype)
        if new.shape != old.shape:
            raise ValueError(f"{c.op_type} '{c.node}': refit weight has shape {new.shape}, expected {old.shape}")
        self.set_input(node, 1, new)


def shared_weight(weight: str, edit: Editor) -> str:
    """Why a consumer is not refit: its weight is one tensor several nodes read (ALBERT's shared
    layers, a recurrence), and a refit per reader would store a copy per reader."""
    return f"weight '{weight}' is shared by {edit.uses[weight]} nodes; refitting it for one would copy it"


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute(name, value))


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
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input and n.input[0] not in inits
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
    (sum over outputs of ||model - dense||^2 / ||dense||^2), plus top-1 agreement of a (N, classes) output."""

    def __init__(self, ctx: ReconstructionContext):
        self.ctx = ctx
        self.names = [o.name for o in ctx.dense.graph.output]
        self._reference: list[dict[str, np.ndarray]] | None = None
        self.last_agreement: float | None = None

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
        agree = total = 0
        batches = self.ctx.holdout.batches(self.ctx.batch_size)
        for ref in self._dense_batches():
            feeds, n = next(batches)
            got = session.run(feeds, n)
            for name in self.names:
                r, g = ref[name], got[name]
                if r.dtype.kind != "f" or r.shape != g.shape:
                    continue
                num[name] += float(np.square(g.astype(np.float64) - r).sum())
                den[name] += float(np.square(r.astype(np.float64)).sum())
            r0 = ref[self.names[0]]
            if r0.ndim == 2 and r0.shape[1] > 1 and r0.dtype.kind == "f":
                agree += int((got[self.names[0]].argmax(1) == r0.argmax(1)).sum())
                total += len(r0)
        self.last_agreement = agree / total if total else None
        parts = [num[n] / den[n] for n in self.names if den[n] > 0]
        return float(np.mean(parts)) if parts else 0.0


# -- least squares -----------------------------------------------------------------------------------
def solve_ridge(fit: GramStats | GroupedGramStats, w0: np.ndarray, b0: np.ndarray,
                alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin ||X W^T + b - Y||^2 + lam ||W - W0||^2, lam = alpha * mean(diag(X^T X)); bias unregularised.
    A grouped Conv is solved group by group (its rows of W0 and b0 in group order)."""
    if isinstance(fit, GroupedGramStats):
        o = len(b0) // fit.groups
        parts = [solve_ridge(p, w0[i * o:(i + 1) * o], b0[i * o:(i + 1) * o], alpha)
                 for i, p in enumerate(fit.parts)]
        return np.concatenate([w for w, _ in parts]), np.concatenate([b for _, b in parts])
    a, c = fit.augmented()
    f = fit.features
    lam = alpha * max(float(np.trace(a[:f, :f])) / max(f, 1), 1e-12)
    reg = np.full(f + 1, lam)
    reg[f] = 0.0
    lhs = a + np.diag(reg)
    rhs = c + reg[:, None] * np.vstack([w0.T, b0[None, :]])
    try:
        sol = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return sol[:f].T, sol[f]


class DenseTargets:
    """The dense model's outputs of the consumers to refit, at the sampled positions, for both splits.

    One dense pass (per memory chunk) serves every level, instead of one per
    level. The picks are kept so the pruned pass takes X at the same
    positions. Used when the sampled targets fit in half the memory cap;
    otherwise each level reads its targets from a dense pass of its own.
    """

    def __init__(self, ctx: ReconstructionContext, consumers: dict[str, tuple[Consumer, np.ndarray | None]]):
        self.ctx = ctx
        self.consumers = consumers
        self.rows: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def estimate_bytes(self) -> int | None:
        shapes = infer_shapes(skeleton(self.ctx.dense))
        total = 0
        n = len(self.ctx.fit) + len(self.ctx.holdout)
        for cd, channels in self.consumers.values():
            entry = shapes.get(cd.output)
            if entry is None or any(not isinstance(d, int) or d <= 0 for d in entry[1][1:]):
                return None
            per, positions = output_positions(cd, (1,) + tuple(entry[1][1:]))
            m = positions if self.ctx.per_sample is None else min(positions, self.ctx.per_sample)
            width = len(channels) if channels is not None else cd.out_channels
            total += n * m * (width * 4 + 8)
        return total

    def collect(self) -> None:
        ctx = self.ctx
        names = [cd.output for cd, _ in self.consumers.values()]
        plan = plan_chunks(sample_bytes(ctx.dense, names), ctx.batch_size, ctx.memory_cap, ctx.fit.static_batch())
        parts: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for chunk in plan.chunks:
            capture = Capture(ctx.dense, chunk, threads=ctx.threads)
            wanted = [(node, cd, ch) for node, (cd, ch) in self.consumers.items() if cd.output in chunk]
            for split, data in enumerate((ctx.fit, ctx.holdout)):
                rngs = {node: np.random.default_rng([ctx.seed, split, i]) for i, node in enumerate(self.consumers)}
                for feeds, n in data.batches(plan.batch_size):
                    got = capture.run(feeds, n)
                    for node, cd, ch in wanted:
                        y = got[cd.output] if ch is None else np.take(got[cd.output], ch, axis=cd.output_axis)
                        pick = pick_positions(cd, y.shape, ctx.per_sample, rngs[node])
                        parts.setdefault((node, split), []).append(
                            (np.array(pick), np.ascontiguousarray(output_rows(cd, y, pick), np.float32)))
                    del got
            del capture
        # per sample: picks (samples, m) and target rows (samples * m, channels), so any batch size can read them
        for key, chunks in parts.items():
            self.rows[key] = (np.concatenate([p for p, _ in chunks]), np.concatenate([y for _, y in chunks]))

    def grams(self, model: onnx.ModelProto, specs: list[Consumer]) -> list[dict[str, GramStats]]:
        """[fit grams, held-out grams] of `specs` (consumers of the pruned `model`) against the cached targets."""
        ctx = self.ctx
        out: list[dict[str, GramStats]] = [{}, {}]
        names = [c.input for c in specs]
        plan = plan_chunks(sample_bytes(model, names), ctx.batch_size, ctx.memory_cap, ctx.fit.static_batch())
        for chunk in plan.chunks:
            capture = Capture(model, chunk, threads=ctx.threads)
            mine = [c for c in specs if c.input in chunk]
            for split, data in enumerate((ctx.fit, ctx.holdout)):
                for c in mine:
                    cached = self.rows.get((c.node, split))
                    out[split][c.node] = gram_for(c, cached[1].shape[1] if cached else 0)
                start = 0
                for feeds, n in data.batches(plan.batch_size):
                    got = capture.run(feeds, n)
                    for c in mine:
                        picks, targets = self.rows[(c.node, split)]
                        m = picks.shape[1]
                        out[split][c.node].update(input_rows(c, got[c.input], picks[start:start + n]),
                                                  targets[start * m:(start + n) * m])
                    start += n
                    del got
            del capture
        return out


def least_squares_refit(model: onnx.ModelProto, ctx: ReconstructionContext, *,
                        ridge: tuple[float, ...] = DEFAULT_RIDGE,
                        nodes: list[str] | None = None) -> tuple[onnx.ModelProto, list[LayerRecord]]:
    """Refit, layer by layer in graph order, each changed consumer's kept weights and bias.

    Inputs X: the consumer's input in the current (already repaired) pruned
    model. Targets Y: the dense model's output of the same node, on the kept
    output channels. Per layer, every ridge strength in `ridge` is tried and
    judged by the layer's squared error on the held-out split, against the
    current weights; the best wins (with no held-out data: ridge 1e-2).
    A grouped convolution is fit group by group (a depthwise one channel by
    channel). Unsupported consumers are skipped (see `bias_compensation`).
    """
    model = copy_model(model)
    dense_edit, start_edit = Editor(ctx.dense), Editor(model)
    targets = nodes if nodes is not None else [n for n in changed_consumers(ctx.dense, ctx.masks, ctx.rewired)
                                               if n in start_edit.nodes]  # not those of dropped layers
    records: list[LayerRecord] = []
    plan: dict[str, tuple[Consumer, np.ndarray | None]] = {}
    for name in targets:
        cp, cd = start_edit.consumer(name), dense_edit.consumer(name)
        if cp is None or cd is None:
            records.append(LayerRecord(name, "skipped", "not a Conv/Gemm/MatMul with a constant weight"))
        elif start_edit.uses.get(cp.weight, 0) > 1:
            records.append(LayerRecord(name, "skipped", shared_weight(cp.weight, start_edit)))
        else:
            out_mask = ctx.masks.get((cd.weight, weight_out_axis(cd)))
            plan[name] = (cd, None if out_mask is None else np.flatnonzero(out_mask))
    cache = DenseTargets(ctx, plan)
    size = cache.estimate_bytes() if plan else None
    cached = size is not None and size <= ctx.memory_cap // 2
    if cached:
        cache.collect()
    for level in progress_iter(levels(model, [n for n in targets if n in plan]), "least squares, level"):
        edit = Editor(model)
        specs = [edit.consumer(name) for name in level]
        if cached:
            g_fits, g_holds = cache.grams(model, specs)
        else:
            requests = [GramRequest(cp, plan[cp.node][0].output, plan[cp.node][1]) for cp in specs]
            g_fits = ctx.collect(model, ctx.fit, grams=requests, target_model=ctx.dense).grams
            g_holds = ctx.collect(model, ctx.holdout, grams=requests, target_model=ctx.dense).grams \
                if len(ctx.holdout) else {}
        for cp in specs:
            records.append(_refit_layer(edit, cp, g_fits[cp.node], g_holds.get(cp.node), ridge))
    order = {n: i for i, n in enumerate(targets)}
    records.sort(key=lambda r: order.get(r.node, len(order)))
    return model, records


def _refit_layer(edit: Editor, cp: Consumer, g_fit: GramStats | GroupedGramStats,
                 g_hold: GramStats | GroupedGramStats | None,
                 ridge: tuple[float, ...]) -> LayerRecord:
    if g_hold is not None and (g_hold.n == 0 or g_hold.target_energy <= 0):
        g_hold = None
    w0 = cp.effective_weight(edit.value(cp.weight).astype(np.float64))
    b0 = edit.bias_of(cp)
    energy = g_hold.target_energy if g_hold is not None else 0.0
    before = g_hold.squared_error(w0, b0) / energy if g_hold is not None else None
    best = None
    for alpha in (ridge if g_hold is not None else (1e-2,)):
        w, b = solve_ridge(g_fit, w0, b0, alpha)
        err = g_hold.squared_error(w, b) / energy if g_hold is not None else None
        if best is None or (err is not None and err < best[0]):
            best = (err, alpha, w, b)
    err, alpha, w, b = best
    record = LayerRecord(cp.node, "refit", features=cp.in_features, rows=g_fit.n, ridge=alpha,
                         error_before=before, error_after=err)
    if before is not None and err is not None and err >= before:
        record.action, record.error_after = "kept", before
        record.detail = "no refit beat the current weights on held-out data"
        return record
    edit.set_weight(cp, w)
    if cp.op_type != "MatMul" or np.abs(b).max() > 0:
        edit.set_bias(cp, b)
    return record


# -- bias compensation ---------------------------------------------------------------------------------
def removed_inputs(ctx: ReconstructionContext, analysis) -> dict[str, tuple[str, int, np.ndarray]]:
    """node -> (tensor, axis, keep mask) for every sink that loses input positions."""
    out = {}
    for s in analysis.state.sinks:
        mask = ctx.masks.get((s.tensor, s.axis))
        if mask is not None and not mask.all():
            out[s.node] = (s.tensor, s.axis, mask)
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


def bias_compensation(model: onnx.ModelProto, ctx: ReconstructionContext, analysis, *,
                      skip: set[str] = frozenset(), stats=None) -> tuple[onnx.ModelProto, list[LayerRecord]]:
    """Add W[:, removed] · mean(x_removed) to the bias of every consumer that lost inputs
    (except those in `skip`, e.g. already refit), creating the bias if absent.

    Means are those of the dense model on the fit split (`stats`, a
    CalibrationStats holding the sink channels, is collected when not given).
    """
    model = copy_model(model)
    todo = {k: v for k, v in removed_inputs(ctx, analysis).items() if k not in skip}
    records: list[LayerRecord] = []
    if not todo:
        return model, records
    if stats is None or any(stats.get(t, a) is None for t, a, _ in todo.values()):
        stats = ctx.collect(ctx.dense, ctx.fit, tensors=sorted({(t, a) for t, a, _ in todo.values()}))
    dense_edit, edit = Editor(ctx.dense), Editor(model)
    for name, (tensor, axis, mask) in todo.items():
        cd, cp = dense_edit.consumer(name), edit.consumer(name)
        if cd is None or cp is None:
            records.append(LayerRecord(name, "skipped", "not a Conv/Gemm/MatMul with a constant weight"))
            continue
        delta = compensation(cd, dense_edit.value(cd.weight), mask, stats.channel(tensor, axis).mean)
        out_mask = ctx.masks.get((cd.weight, weight_out_axis(cd)))
        if out_mask is not None:
            delta = delta[out_mask]
        edit.set_bias(cp, edit.bias_of(cp) + delta)
        records.append(LayerRecord(name, "bias", f"{int((~mask).sum())} removed input(s) compensated",
                                   features=int(mask.sum())))
    return model, records


# -- BatchNorm recalibration ---------------------------------------------------------------------------
def bn_recalibration(model: onnx.ModelProto, ctx: ReconstructionContext, *, skip: set[str] = frozenset(),
                     nodes: list[str] | None = None) -> tuple[onnx.ModelProto, list[LayerRecord]]:
    """Re-estimate running mean/variance of BatchNormalization nodes downstream of a change, on the
    pruned model's own activations (fit split), in graph order (a BN sees its upstream BNs recalibrated).

    A BN right after a consumer in `skip` (refit by least squares to the dense model's outputs, which
    its training statistics already describe) is left alone."""
    model = copy_model(model)
    if nodes is None:
        changed = changed_tensors(ctx.dense, ctx.masks, ctx.rewired)
        refit_outputs = {o for n in model.graph.node if n.name in skip for o in n.output}
        nodes = [n.name for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.input) >= 5
                 and (n.input[0] in changed or n.name in ctx.rewired) and n.input[0] not in refit_outputs]
    records: list[LayerRecord] = []
    for level in progress_iter(levels(model, nodes), "BatchNorm recalibration, level"):
        edit = Editor(model)
        bns = [edit.nodes[n] for n in level]
        usable = [bn for bn in bns if bn.input[3] in edit.inits and bn.input[4] in edit.inits]
        for bn in bns:
            if bn not in usable:
                records.append(LayerRecord(bn.name, "skipped", "running statistics are not constants"))
        if not usable:
            continue
        stats = ctx.collect(model, ctx.fit, tensors=[(bn.input[0], 1) for bn in usable])
        for bn in usable:
            s = stats.channel(bn.input[0], 1)
            old_mean, old_var = edit.value(bn.input[3]), edit.value(bn.input[4])
            edit.set_input(bn, 3, s.mean.astype(old_mean.dtype).reshape(old_mean.shape))
            edit.set_input(bn, 4, s.var.astype(old_var.dtype).reshape(old_var.shape))
            shift = float(np.abs(s.mean - old_mean).mean() / (np.sqrt(old_var).mean() + 1e-12))
            records.append(LayerRecord(bn.name, "recalibrated", f"mean shift {shift:.3g} std", features=s.size,
                                       rows=s.count))
    return model, records


# -- output statistics matching (BatchNorm recalibration for folded BN) --------------------------------
MAX_MATCH_SCALE = 4.0


def _fed_only_to_bn(model: onnx.ModelProto) -> set[str]:
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in reads(n):
            readers.setdefault(i, []).append(n.op_type)
    return {t for t, ops in readers.items() if ops and all(op == "BatchNormalization" for op in ops)}


def output_matching(model: onnx.ModelProto, ctx: ReconstructionContext, *, skip: set[str] = frozenset(),
                    nodes: list[str] | None = None,
                    max_scale: float = MAX_MATCH_SCALE) -> tuple[onnx.ModelProto, list[LayerRecord]]:
    """Per output channel, give each changed Conv/Gemm the dense model's output mean and standard deviation.

    This is BatchNorm recalibration for a model whose BN was folded into the
    convolutions: a recalibrated BN maps its input's new statistics back to
    the ones it was trained with, and so does the affine map
    y -> a * y + (mean_dense - a * mean_pruned), a = std_dense / std_pruned,
    folded into the consumer's weight rows and bias. Consumers whose output
    only feeds BatchNormalization (left to `bn_recalibration`) and those in
    `skip` (already refit) are left alone. Statistics come from the fit split;
    levels run in graph order, so each layer sees its upstream layers matched.
    The scale is clipped to [1/max_scale, max_scale]: a channel whose pruned
    output barely varies is shifted, not blown up.
    """
    model = copy_model(model)
    dense_edit, present = Editor(ctx.dense), {n.name for n in model.graph.node}
    if nodes is None:
        to_bn = _fed_only_to_bn(ctx.dense)
        nodes = [n for n in changed_consumers(ctx.dense, ctx.masks, ctx.rewired)
                 if n not in skip and n in present and dense_edit.nodes[n].output[0] not in to_bn]
    records: list[LayerRecord] = []
    plan: dict[str, tuple[Consumer, np.ndarray | None]] = {}
    for name in nodes:
        cd = dense_edit.consumer(name)
        if cd is None or cd.op_type not in ("Conv", "Gemm"):
            records.append(LayerRecord(name, "skipped", "not a Conv/Gemm with a constant weight"))
            continue
        if dense_edit.uses.get(cd.weight, 0) > 1:
            records.append(LayerRecord(name, "skipped", shared_weight(cd.weight, dense_edit)))
            continue
        out_mask = ctx.masks.get((cd.weight, weight_out_axis(cd)))
        plan[name] = (cd, None if out_mask is None else np.flatnonzero(out_mask))
    if not plan:
        return model, records
    dense_stats = ctx.collect(ctx.dense, ctx.fit, tensors=sorted({(cd.output, 1) for cd, _ in plan.values()}))
    for level in progress_iter(levels(model, list(plan)), "output statistics matching, level"):
        edit = Editor(model)
        specs = [edit.consumer(name) for name in level]
        stats = ctx.collect(model, ctx.fit, tensors=[(cp.output, 1) for cp in specs])
        for cp in specs:
            cd, kept = plan[cp.node]
            want = dense_stats.channel(cd.output, 1)
            got = stats.channel(cp.output, 1)
            mean_d, std_d = want.mean, np.sqrt(want.var)
            if kept is not None:
                mean_d, std_d = mean_d[kept], std_d[kept]
            std_p = np.sqrt(got.var)
            scale = np.where(std_p > 1e-12 * (std_d + 1e-30), std_d / np.maximum(std_p, 1e-30), 1.0)
            scale = np.clip(scale, 1.0 / max_scale, max_scale)
            shift = mean_d - scale * got.mean
            w = edit.value(cp.weight)
            axis = weight_out_axis(cp)
            shape = [1] * w.ndim
            shape[axis] = -1
            edit.set_input(edit.nodes[cp.node], 1, (w * scale.reshape(shape)).astype(w.dtype))
            edit.set_bias(cp, scale * edit.bias_of(cp) + shift)
            drift = float(np.mean(np.abs(got.mean - mean_d) / (std_d + 1e-12)))
            records.append(LayerRecord(cp.node, "matched", f"mean shift {drift:.3g} std, scale "
                                       f"{float(scale.min()):.3g}..{float(scale.max()):.3g}",
                                       features=len(scale), rows=got.count))
    order = {n: i for i, n in enumerate(nodes)}
    records.sort(key=lambda r: order.get(r.node, len(order)))
    return model, records
