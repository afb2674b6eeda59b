"""Least-squares refit: the reconstruction pass that gives each changed layer back its dense outputs.

`LeastSquaresRefit`: for each mixing op (Conv, Gemm, MatMul with a constant
weight) whose input changed, in graph order, refit the kept weights and the
bias so that its output on calibration data matches the dense model's
output, with inputs taken from the already-repaired pruned model (He et al.
2017, ThiNet's reconstruction step). Ridge regression towards the current
weights; the strength is chosen per layer on the held-out split, and the
current weights are kept when no refit beats them there. An integer weight (behind a
DequantizeLinear, or read by a QOperator op) is refit on its dequantized values, judged as
it will be stored (rounded to integers) and written back as integers
(`passes.integer_weights`). A QOperator op (QLinearConv, QLinearMatMul, QGemm) is fit
from its dequantized input to its dense output before requantization, which a float twin
of it in the dense model computes (`passes.qoperator`).

Layers are processed in *levels*: a consumer's level is one more than the
deepest refit consumer upstream of it, and every consumer of a level is fit
from the same pass over the data. Each level's inputs come from running only
the nodes no earlier level ran, from the tensors they left
(`calibration.incremental.IncrementalCapture`): one pass of the pruned model
in all. The dense targets at the sampled positions are read by one dense
pass per window of consecutive levels that fits in half the memory cap
(`DenseTargets`); a level too large for that reads its own dense pass.

A weight tied across readers of one level (an RNN's input projection,
unrolled over its steps by the exporter) is refit once, from every reader's
inputs and targets, and written once; readers at different depths (the
recurrent weight, each step feeding the next) are left as they are.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxprune.calibration.capture import Capture, plan_chunks, sample_bytes
from onnxprune.calibration.features import (
    Consumer,
    GramStats,
    GroupedGramStats,
    gram_for,
    input_rows,
    output_rows,
    pick_positions,
    real_rows,
    sample_rows,
)
from onnxprune.calibration.incremental import IncrementalCapture
from onnxprune.calibration.stats import GramRequest
from onnxprune.ir.shapes import infer_shapes, skeleton
from onnxprune.passes.reconstruct import (
    ConsumerEditor,
    LayerRecord,
    ReconstructionContext,
    ReconstructionPass,
    changed_consumers,
    levels,
    preactivations,
    shared_weight,
    weight_out_axis,
)
from onnxprune.runtime.progress import progress_iter

DEFAULT_RIDGE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def solve_ridge(fit: GramStats | GroupedGramStats, w0: np.ndarray, b0: np.ndarray,
                alpha: float, fit_bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """argmin ||X W^T + b - Y||^2 + lam ||W - W0||^2, lam = alpha * mean(diag(X^T X)); bias unregularised,
    or held at b0 when not `fit_bias` (a consumer with no bias it can write).
    A grouped Conv is solved group by group (its rows of W0 and b0 in group order)."""
    if isinstance(fit, GroupedGramStats):
        o = len(b0) // fit.groups
        parts = [solve_ridge(p, w0[i * o:(i + 1) * o], b0[i * o:(i + 1) * o], alpha, fit_bias)
                 for i, p in enumerate(fit.parts)]
        return np.concatenate([w for w, _ in parts]), np.concatenate([b for _, b in parts])
    a, c = fit.augmented()
    f = fit.features
    lam = alpha * max(float(np.trace(a[:f, :f])) / max(f, 1), 1e-12)
    reg = np.full(f + 1, lam)
    reg[f] = 0.0
    lhs = a + np.diag(reg)
    rhs = c + reg[:, None] * np.vstack([w0.T, b0[None, :]])
    if not fit_bias:  # the bias row is known: move its part of the sums to the right-hand side
        lhs, rhs = lhs[:f, :f], rhs[:f] - a[:f, f:] * b0[None, :]
    try:
        sol = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return sol[:f].T, (sol[f] if fit_bias else np.asarray(b0, np.float64))


class DenseTargets:
    """The dense model's outputs of the consumers to refit, at the sampled positions, for both splits.

    One dense pass (per memory chunk) serves a window of consecutive levels
    whose sampled targets fit in half the memory cap, instead of one pass per
    level; a level too large for that reads its targets from a dense pass of
    its own. The picks are kept so the pruned pass takes X at the same positions.
    """

    def __init__(self, ctx: ReconstructionContext, consumers: dict[str, tuple[Consumer, np.ndarray | None]]):
        self.ctx = ctx
        # shapes at the calibration data's sizes (a dynamic sequence is the data's), for one batch and one more
        self.fixed = ctx.fit.sample_shapes()
        self.fed = ctx.fit.static_batch() or 1
        self.shapes = infer_shapes(skeleton(ctx.dense), self.fixed)
        grown = infer_shapes(skeleton(ctx.dense), {k: [v[0] + 1, *v[1:]] for k, v in self.fixed.items()}) \
            if self.fixed and ctx.fit.static_batch() is None else self.shapes
        # outputs with the samples past axis 0 (time-major [time, batch, ...]): picks are kept by rows of
        # samples-first outputs, so these are measured level by level, from a dense pass of their own
        self.apart = {name for name, (cd, _) in consumers.items() if _batch_past_axis_0(
            self.shapes.get(cd.output), grown.get(cd.output))}
        self.plan = consumers  # the refit's plan: consumers it drops later (untied) are dropped here too
        self.index = {node: i for i, node in enumerate(self.consumers)}  # seeds each consumer's picks
        self.rows: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.real: dict[tuple[str, int], np.ndarray] = {}  # (node, split) -> token (not padding) flags per pick
        # the pruned model's inputs of each level, resumed from what the level before ran
        self.runner = IncrementalCapture((ctx.fit, ctx.holdout), ctx.batch_size, ctx.memory_cap // 2, ctx.threads)

    @property
    def consumers(self) -> dict[str, tuple[Consumer, np.ndarray | None]]:
        return {k: v for k, v in self.plan.items() if k not in self.apart}

    def bytes_of(self, node: str) -> int | None:
        """Bytes of a consumer's sampled targets over every sample; None when its output size is unknown."""
        cd, channels = self.plan[node]
        entry = self.shapes.get(cd.output)
        dims = None if entry is None else entry[1]
        if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
            return None
        positions = max(1, int(np.prod(dims)) // max(cd.out_channels, 1) // max(self.fed, 1))
        m = positions if self.ctx.per_sample is None else min(positions, self.ctx.per_sample)
        width = len(channels) if channels is not None else cd.out_channels
        return (len(self.ctx.fit) + len(self.ctx.holdout)) * m * (width * 2 + 8)  # float16 targets (_compact)

    def windows(self, levels_: list[list[str]]) -> list[tuple[list[list[str]], bool]]:
        """Consecutive levels grouped so that each group's targets fit in half the memory cap, with whether
        they do (a level larger than that alone, or of unknown size, reads its own dense pass)."""
        cap = self.ctx.memory_cap // 2
        out: list[tuple[list[list[str]], bool]] = []
        used = 0
        for level in levels_:
            sizes = [self.bytes_of(n) for n in level if n not in self.apart]
            size = None if None in sizes else sum(sizes)
            if size is None or size > cap:
                out.append(([level], False))
                used = cap + 1  # nothing joins a level read on its own
            elif out and out[-1][1] and used + size <= cap:
                out[-1][0].append(level)
                used += size
            else:
                out.append(([level], True))
                used = size
        return out

    def collect(self, nodes: list[str]) -> None:
        """The targets of `nodes` (held until the next collect)."""
        ctx = self.ctx
        self.rows, self.real = {}, {}
        mine = {k: v for k, v in self.consumers.items() if k in set(nodes)}
        names = [cd.output for cd, _ in mine.values()]
        plan = plan_chunks(sample_bytes(ctx.dense, names, self.fixed), ctx.batch_size, ctx.memory_cap,
                           ctx.fit.static_batch())
        parts: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for chunk in plan.chunks:
            capture = Capture(ctx.dense, chunk, threads=ctx.threads)
            wanted = [(node, cd, ch) for node, (cd, ch) in mine.items() if cd.output in chunk]
            for split, data in enumerate((ctx.fit, ctx.holdout)):
                rngs = {node: np.random.default_rng([ctx.seed, split, self.index[node]]) for node in mine}
                for feeds, n in data.batches(plan.batch_size):
                    valid = data.real_positions(feeds, n)
                    got = capture.run(feeds, n)
                    for node, cd, ch in wanted:
                        y = got[cd.output] if ch is None else np.take(got[cd.output], ch, axis=cd.output_axis)
                        pick = pick_positions(cd, y.shape, ctx.per_sample, rngs[node])
                        real = real_rows(cd, y, pick, valid)
                        parts.setdefault((node, split), []).append(
                            (np.array(pick), _compact(output_rows(cd, y, pick)),
                             np.ones(pick.shape, bool) if real is None else real.reshape(pick.shape)))
                    del got
            del capture
        # per sample: picks (samples, m), target rows (samples * m, channels) and whether each picked position
        # is a token rather than padding (samples, m), so any batch size can read them
        for key, chunks in parts.items():
            self.rows[key] = (np.concatenate([p for p, _, _ in chunks]), np.concatenate([y for _, y, _ in chunks]))
            self.real[key] = np.concatenate([r for _, _, r in chunks])

    def grams(self, model: onnx.ModelProto, specs: list[Consumer],
              tied: dict[str, list[str]] | None = None) -> list[dict[str, GramStats]]:
        """[fit grams, held-out grams] of `specs` (consumers of the pruned `model`) against the cached targets,
        by node name; the readers of a `tied` weight add to one, under the weight's name. The consumers'
        inputs come from the runner when it can resume from what the levels before ran, else from running
        the model's prefix."""
        ctx = self.ctx
        out: list[dict[str, GramStats]] = [{}, {}]
        names = [c.input for c in specs]
        key = {c.node: c.weight if tied and c.weight in tied else c.node for c in specs}
        if self.runner.advance(model, names):
            for split in (0, 1):
                self._accumulate(out[split], split, specs, self.runner.batches(split, names), key)
            return out
        plan = plan_chunks(sample_bytes(model, names, self.fixed), ctx.batch_size, ctx.memory_cap,
                           ctx.fit.static_batch())
        for chunk in plan.chunks:
            capture = Capture(model, chunk, threads=ctx.threads)
            mine = [c for c in specs if c.input in chunk]
            for split, data in enumerate((ctx.fit, ctx.holdout)):
                batches = ((n, capture.run(feeds, n)) for feeds, n in data.batches(plan.batch_size))
                self._accumulate(out[split], split, mine, batches, key)
            del capture
        return out

    def _accumulate(self, grams: dict[str, GramStats], split: int, specs: list[Consumer], batches,
                    key: dict[str, str]) -> None:
        """Gram matrices of `specs` (under `key[node]`) from (n, {input tensor: value}) batches against the
        cached targets at the same picks; the picks are read by rows (a Gemm on flattened tokens has
        several per sample)."""
        for c in specs:
            cached = self.rows.get((c.node, split))
            if key[c.node] not in grams:
                grams[key[c.node]] = gram_for(c, cached[1].shape[1] if cached else 0)
        start = dict.fromkeys((c.node for c in specs), 0)  # rows of picks read so far, per consumer
        for _, got in batches:
            for c in specs:
                picks, targets = self.rows[(c.node, split)]
                m, at = picks.shape[1], start[c.node]
                end = start[c.node] = at + sample_rows(c, got[c.input])
                real = self.real[(c.node, split)][at:end].reshape(-1)
                x = input_rows(c, got[c.input], picks[at:end])
                y = targets[at * m:end * m]
                if not real.all():  # padded positions are not fitted
                    x, y = x[real], y[real]
                grams[key[c.node]].update(x, y)
            del got


def _compact(rows: np.ndarray) -> np.ndarray:
    """Targets held as float16 where they fit its range: half the memory, so twice the levels per dense
    pass. Its 3 significant digits are far finer than any pruning error a refit corrects (a relative
    error of 5e-4 per value against the 1e-2 to 1e-1 of the outputs being repaired)."""
    rows = np.asarray(rows)
    if rows.size and np.isfinite(rows).all() and float(np.abs(rows).max()) < 6e4:
        return np.ascontiguousarray(rows, np.float16)
    return np.ascontiguousarray(rows, np.float32)


def _batch_past_axis_0(one, more) -> bool:
    """Whether an output's size along some axis past 0 follows the batch (inferred shapes at one batch
    size and at one more)."""
    if one is None or more is None or len(one[1]) != len(more[1]):
        return False
    return any(a != b for a, b in zip(one[1][1:], more[1][1:]))


class LeastSquaresRefit(ReconstructionPass):
    """Refit, layer by layer in graph order, each changed consumer's kept weights and bias.

    Inputs X: the consumer's input in the current (already repaired) pruned
    model. Targets Y: the dense model's output of the same node, on the kept
    output channels. Per layer, every ridge strength in `ridge` is tried and
    judged by the layer's squared error on the held-out split, against the
    current weights; the best wins (with no held-out data: ridge 1e-2).
    A grouped convolution is fit group by group (a depthwise one channel by
    channel). Unsupported consumers are skipped (see `BiasCompensation`).
    nodes: refit these (node names) instead of every changed consumer.
    """

    name = "least_squares"

    def __init__(self, ctx: ReconstructionContext, ridge: tuple[float, ...] = DEFAULT_RIDGE,
                 nodes: list[str] | None = None):
        self.ctx, self.ridge, self.nodes = ctx, ridge, nodes

    def repair(self, model: onnx.ModelProto) -> list[LayerRecord]:
        ctx = self.ctx
        dense_edit, edit = ConsumerEditor(ctx.dense), ConsumerEditor(model)
        targets = self.nodes if self.nodes is not None else [
            n for n in changed_consumers(ctx.dense, ctx.masks, ctx.rewired)
            if edit.get_node(n) is not None]  # not those of dropped layers
        records, plan, tied = self._plan(targets, dense_edit, edit)
        records += _untie_across_levels(model, targets, plan, tied)
        # a QOperator consumer's targets: its dense output before requantization, from a float twin
        dense, twins = preactivations(ctx.dense, list(plan))
        for name, tensor in twins.items():
            cd, kept = plan[name]
            plan[name] = (dataclasses.replace(cd, output=tensor), kept)
        ctx = dataclasses.replace(ctx, dense=dense)
        cache = DenseTargets(ctx, plan)
        windows = cache.windows(levels(model, [n for n in targets if n in plan]))
        apart = cache.apart | {n for window, fits in windows if not fits for level in window for n in level}
        if any(r in apart for readers in tied.values() for r in readers):
            # a level read on its own keeps a Gram matrix per reader: no joint refits
            records += _untie_across_levels(model, targets, plan, tied, always=True)
            windows = cache.windows(levels(model, [n for n in targets if n in plan]))
        for window, fits in progress_iter(windows, "least squares, levels"):
            if fits:
                cache.collect([n for level in window for n in level])
            for level in window:
                specs = [edit.consumer(name) for name in level]
                g_fits, g_holds = self._level_grams(ctx, model, specs, plan, cache if fits else None, tied)
                for readers in _by_weight(specs, tied):
                    key = readers[0].weight if readers[0].weight in tied else readers[0].node
                    records += _refit_layer(edit, readers, g_fits[key], g_holds.get(key), self.ridge)
                edit.commit()  # the next level runs the model: new bias Adds must be in place
        order = {n: i for i, n in enumerate(targets)}
        records.sort(key=lambda r: order.get(r.node, len(order)))
        return records

    @staticmethod
    def _level_grams(ctx: ReconstructionContext, model: onnx.ModelProto, specs: list[Consumer], plan: dict,
                     cache: "DenseTargets | None", tied: dict[str, list[str]]) -> tuple[dict, dict]:
        """Fit and held-out sums of a level's consumers: from the cached dense targets where it can, else
        from a dense (ctx.dense: with the float twins) and a pruned pass of this level's own."""
        fits: dict = {}
        holds: dict = {}
        apart = specs if cache is None else [c for c in specs if c.node in cache.apart]
        together = [c for c in specs if c not in apart]
        if together:
            fits, holds = cache.grams(model, together, tied)
        if apart:
            requests = [GramRequest(cp, plan[cp.node][0].output, plan[cp.node][1]) for cp in apart]
            fits.update(ctx.collect(model, ctx.fit, grams=requests, target_model=ctx.dense).grams)
            if len(ctx.holdout):
                holds.update(ctx.collect(model, ctx.holdout, grams=requests, target_model=ctx.dense).grams)
        return fits, holds

    def _plan(self, targets: list[str], dense_edit: ConsumerEditor, edit: ConsumerEditor
              ) -> tuple[list[LayerRecord], dict[str, tuple[Consumer, np.ndarray | None]], dict[str, list[str]]]:
        """Records of the targets that cannot be refit; for the others (dense consumer, kept rows); and the
        tied weights (weight -> its readers, all of them targets of one kind), refit as one problem."""
        records: list[LayerRecord] = []
        plan: dict[str, tuple[Consumer, np.ndarray | None]] = {}
        tied: dict[str, list[str]] = {}
        wanted = set(targets)
        for name in targets:
            cp, cd = edit.consumer(name), dense_edit.consumer(name)
            if cp is None or cd is None:
                records.append(LayerRecord(name, "skipped", edit.unsupported(name)))
                continue
            why = edit.weight_problem(cp)
            if why:  # an integer weight in a layout that is not requantized
                records.append(LayerRecord(name, "skipped", why))
                continue
            if edit.reader_count(cp.weight) > 1:
                readers = _tied_readers(edit, cp, wanted)
                if readers is None:
                    records.append(LayerRecord(name, "skipped", shared_weight(cp.weight, edit)))
                    continue
                tied[cp.weight] = readers
            out_mask = self.ctx.masks.get((cd.weight, weight_out_axis(cd)))
            plan[name] = (cd, None if out_mask is None else np.flatnonzero(out_mask))
        return records, plan, tied


def _tied_readers(edit: ConsumerEditor, cp: Consumer, targets: set[str]) -> list[str] | None:
    """The readers of `cp`'s weight when they can share one refit: every one a consumer to refit, of the
    same op, attributes and bias, reading the weight where `cp` does (the steps of an unrolled
    recurrence); else None."""
    readers = edit.readers(cp.weight)
    nodes = [node for node, _ in readers]
    if cp.group != 1:
        return None  # a grouped conv's sums are per group: not joined here
    if len({n.name for n in nodes}) != len(readers) or any(n.name not in targets for n in nodes):
        return None
    same = ("op_type", "weight", "trans_a", "trans_b", "alpha", "beta", "group", "feature_axis")
    consumers = [edit.consumer(n.name) for n in nodes]
    if any(c is None or any(getattr(c, k) != getattr(cp, k) for k in same) for c in consumers):
        return None
    bias = edit.bias_of(cp)
    if any(not np.array_equal(edit.bias_of(c), bias) for c in consumers):
        return None  # one refit serves readers that compute the same function only
    return [n.name for n in nodes]


def _untie_across_levels(model: onnx.ModelProto, targets: list[str], plan: dict, tied: dict[str, list[str]],
                         always: bool = False) -> list[LayerRecord]:
    """A tied weight is refit once, from all its readers' inputs at one level; readers at several depths
    (a recurrent weight, each step feeding the next) are left as they are (all of them with `always`)."""
    records: list[LayerRecord] = []
    while True:
        level_of = {n: k for k, names in enumerate(levels(model, [t for t in targets if t in plan]))
                    for n in names}
        spread = [w for w, readers in tied.items() if always or len({level_of[r] for r in readers}) > 1]
        if not spread:
            return records
        why = "their targets do not fit the memory cap" if always else "at different depths: a recurrence"
        for weight in spread:
            readers = tied.pop(weight)
            for r in readers:
                plan.pop(r, None)
                records.append(LayerRecord(r, "skipped", f"weight '{weight}' is tied across {len(readers)} readers "
                                                          f"({why}): no single refit"))


def _by_weight(specs: list[Consumer], tied: dict[str, list[str]]) -> list[list[Consumer]]:
    """The level's consumers, the readers of one tied weight together."""
    groups: dict[str, list[Consumer]] = {}
    for cp in specs:
        groups.setdefault(cp.weight if cp.weight in tied else cp.node, []).append(cp)
    return list(groups.values())


def _refit_layer(edit: ConsumerEditor, readers: list[Consumer], g_fit: GramStats | GroupedGramStats,
                 g_hold: GramStats | GroupedGramStats | None, ridge: tuple[float, ...]) -> list[LayerRecord]:
    """Refit one weight from its readers' sums (one reader, or the readers of a tied weight); a record each."""
    cp = readers[0]
    if g_hold is not None and (g_hold.n == 0 or g_hold.target_energy <= 0):
        g_hold = None
    w0 = cp.effective_weight(edit.weight(cp))
    b0 = edit.bias_of(cp)
    fit_bias = edit.bias_problem(cp) is None  # a QDQ consumer without a bias keeps none
    energy = g_hold.target_energy if g_hold is not None else 0.0
    before = g_hold.squared_error(w0, b0) / energy if g_hold is not None else None
    best = None
    for alpha in (ridge if g_hold is not None else (1e-2,)):
        w, b = solve_ridge(g_fit, w0, b0, alpha, fit_bias)
        # judged as it will be stored: an integer weight (and bias) rounded to its integers
        err = g_hold.squared_error(*edit.stored(cp, w, b)) / energy if g_hold is not None else None
        if best is None or (err is not None and err < best[0]):
            best = (err, alpha, w, b)
    err, alpha, w, b = best
    record = LayerRecord(cp.node, "refit", features=cp.in_features, rows=g_fit.n, ridge=alpha,
                         error_before=before, error_after=err)
    if before is not None and err is not None and err >= before:
        record.action, record.error_after = "kept", before
        record.detail = "no refit beat the current weights on held-out data"
    elif len(readers) > 1:
        edit.set_tied(readers, w, b if cp.op_type != "MatMul" or np.abs(b).max() > 0 else None)
        record.detail = f"weight '{cp.weight}' tied across {len(readers)} readers: one refit from all their inputs"
    else:
        edit.set_weight(cp, w)
        if fit_bias and (cp.op_type != "MatMul" or np.abs(b).max() > 0):
            edit.set_bias(cp, b)
    return [record] + [dataclasses.replace(record, node=r.node) for r in readers[1:]]
