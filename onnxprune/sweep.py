"""`sweep()`: prune at several ratios and measure what each costs and buys.

    import onnxprune
    result = onnxprune.sweep("models/digits_resnet.onnx", [0.1, 0.2, 0.3], data="models/digits_test.npz")
    print(result.render_table())      # ratio, FLOPs kept, params kept, accuracy, latency, speed-up
    result.to_dict()                  # JSON-ready
    result.plot("sweep.png")          # accuracy vs FLOPs and vs latency (needs onnxprune[plot])

Method: the dense model runs over the data once; each ratio is pruned with
`onnxprune.prune` (same options, `target` saying what the ratio removes:
FLOPs, parameters, or units per group) and its outputs compared with the
dense ones as the prune gate does (onnxprune.runtime.gate: a custom metric
if given, else top-1 accuracy with labels, else the worst output's fidelity
to the dense model: top-1 agreement for class scores, mean cosine similarity
for other outputs). Latency: one
interleaved onnxruntime benchmark of the dense model and every pruned one
(onnxprune.runtime.bench), so drift hits all alike; speed-up = dense median /
pruned median. A ratio that cannot be pruned (an unreachable target) is
reported with its error and skipped. Every pruned model is held in memory
until the benchmark (or written to `output_dir`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import onnx

from onnxprune.errors import OnnxPruneError, PlanError, UsageError, ValidationError
from onnxprune.plotting import require_matplotlib
from onnxprune.options import CalibrationOptions, PruneOptions, ReconstructionOptions, with_keywords
from onnxprune.pipeline import finish
from onnxprune.pipeline.runner import run_stages
from onnxprune.pipeline.stages import DECIDE, LOAD, SCORE
from onnxprune.pipeline.state import PruneState
from onnxprune.runtime.measures import POINT_METRICS, QualityStats, metric_label
from onnxprune.text import box_table, threads_text
from onnxprune.runtime.gate import check_budget, compare_quality, pruned_outputs, reference_pass
from onnxprune.runtime.progress import Progress
from onnxprune.runtime.session import check_provider

ModelLike = str | os.PathLike | onnx.ModelProto
TARGETS = {  # --target: prune() keyword, table column, what a ratio is a fraction of
    "flops": ("target_flops", "FLOPs removed", "the model's FLOPs"),
    "params": ("target_params", "params removed", "the model's parameters"),
    "ratio": ("ratio", "units removed", "every group's units"),
}


@dataclass
class SweepPoint:
    """One ratio (ratio None: the dense model)."""

    ratio: float | None
    flops: int | None = None
    params: int | None = None
    flops_kept: float | None = None
    params_kept: float | None = None
    quality: QualityStats | None = None
    latency_ms: dict[str, float] | None = None  # median_ms, p90_ms, min_ms, mean_ms
    speedup: float | None = None
    output: str | None = None
    error: str | None = None

    @property
    def value(self) -> float | None:
        """The gated number (QualityStats.metric), dense included."""
        return None if self.quality is None else self.quality.after

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "flops": self.flops, "params": self.params, "flops_kept": self.flops_kept,
                "params_kept": self.params_kept, "quality": self.quality.to_dict() if self.quality else None,
                "latency_ms": None if self.latency_ms is None else {k: round(v, 4) for k, v in self.latency_ms.items()},
                "speedup": None if self.speedup is None else round(self.speedup, 4), "output": self.output,
                "error": self.error}


@dataclass
class SweepResult:
    model: str
    data: str
    samples: int
    target: str
    metric: str | None
    dense: SweepPoint
    points: list[SweepPoint]
    options: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None  # provider, threads, runs, warmup, input_shapes, onnxruntime
    max_drop: float | None = None

    @property
    def metric_label(self) -> str:
        return metric_label(self.metric).replace(" with the dense model", "").replace(" to the dense model", "")

    @property
    def in_points(self) -> bool:
        """Whether the gated number is a share: shown in %, changes and budget in points."""
        return self.metric in POINT_METRICS

    def _value(self, value: float | None) -> str:
        return _pct(value) if self.in_points else "" if value is None else f"{value:.4g}"

    def budget_text(self) -> str:
        return f"{self.max_drop * 100:g} pt" if self.in_points else f"{self.max_drop:g}"

    def best(self) -> SweepPoint | None:
        """The ratio removing the most FLOPs within the budget (None without a budget or if none is)."""
        ok = [p for p in self.points if p.quality is not None and p.quality.passed]
        return min(ok, key=lambda p: p.flops_kept) if ok else None

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "samples": self.samples, "target": self.target,
                "metric": self.metric, "max_drop": self.max_drop, "options": self.options, "latency": self.latency,
                "dense": self.dense.to_dict(), "points": [p.to_dict() for p in self.points],
                "best": None if self.best() is None else self.best().ratio}

    def rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        header = [TARGETS[self.target][1], "FLOPs kept", "params kept", self.metric_label, "change"]
        if self.latency is not None:
            header += ["latency ms", "speed-up"]
        if self.max_drop is not None:
            header.append(f"drop <= {self.budget_text()}")
        rows = []
        for p in [self.dense, *self.points]:
            label = "dense" if p.ratio is None else f"{p.ratio:g}"
            if p.error is not None:
                rows.append((label, f"failed: {p.error}", *[""] * (len(header) - 2)))
                continue
            q = p.quality
            change = "" if q is None or q.drop is None or p.ratio is None else \
                f"{0.0 - q.drop * 100:+.2f} pt" if self.in_points else f"{0.0 - q.drop:+.4g}"  # never "-0.00"
            cells = [label, _pct(p.flops_kept), _pct(p.params_kept), self._value(p.value), change]
            if self.latency is not None:
                cells += ["" if p.latency_ms is None else f"{p.latency_ms['median_ms']:.3f}",
                          "" if p.speedup is None else f"{p.speedup:.2f}x"]
            if self.max_drop is not None:
                cells.append("" if p.ratio is None or q is None else "yes" if q.passed else "no")
            rows.append(tuple(cells))
        return tuple(header), rows

    def header(self) -> str:
        text = (f"{self.model} on {self.data} ({self.samples} samples); each ratio removes that fraction of "
                f"{TARGETS[self.target][2]}")
        if self.options:
            text += " (" + ", ".join(f"{k} {v}" for k, v in self.options.items()) + ")"
        if self.latency is not None:
            lat = self.latency
            text += (f"; latency: onnxruntime {lat['onnxruntime']} {lat['provider'].replace('ExecutionProvider', '')}"
                     f", {threads_text(lat['threads'])}, median of {lat['runs']} interleaved runs")
        return text

    def summary(self) -> str | None:
        if self.max_drop is None:
            return None
        best = self.best()
        if best is None:
            return f"No ratio keeps the {self.metric_label} drop within {self.budget_text()}."
        budget = f"a {self.max_drop * 100:g}-point budget" if self.in_points else f"a budget of {self.max_drop:g}"
        return (f"Largest reduction within {budget}: {best.ratio:g} "
                f"({_pct(best.flops_kept)} of FLOPs kept, {self.metric_label} {self._value(best.value)}).")

    def render_table(self) -> str:
        header, rows = self.rows()
        lines = [self.header(), box_table(header, rows)]
        if self.summary():
            lines.append(self.summary())
        return "\n".join(lines)

    def render_markdown(self) -> str:
        header, rows = self.rows()
        lines = [self.header() + ":", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if self.summary():
            lines += ["", self.summary()]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        plot_sweep(self, path)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.2f}%"


def parse_ratios(text: str) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]; each a fraction in [0, 1)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--ratios '{text}': expected numbers separated by commas, e.g. 0.1,0.2,0.3") from None
    return check_ratios(values)


def check_ratios(ratios: Sequence[float]) -> list[float]:
    values = sorted(set(float(r) for r in ratios))
    if not values:
        raise UsageError("sweep needs at least one ratio")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise UsageError(f"ratios are fractions REMOVED in [0, 1); got {bad}")
    return values


def sweep(model: ModelLike, ratios: Sequence[float] | str, *, data: Any, target: str = "flops",
          output_dir: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
          options: PruneOptions | None = None, **keywords: Any) -> SweepResult:
    """Prune `model` at each of `ratios` (fractions REMOVED of `target`: "flops",
    "params" or "ratio" = units per group) and measure accuracy (or fidelity)
    on `data` and latency; see the module docstring. `output_dir` writes each
    pruned model as <stem>.<target><ratio>.onnx; `plot` writes accuracy vs
    FLOPs and vs latency as an image (needs matplotlib).

    Options are prune's (a PruneOptions and/or its fields as keywords:
    criterion, strategy, calib=DATA, ...), used at every ratio. Of the gate
    options, `max_accuracy_drop` marks which ratios stay within the budget
    (nothing is refused); `metric`, `batch_axis`, `class_axis` measure as
    prune's gate does. Latency is measured unless measure_latency=False.

    The model is loaded, sized, run over `data`, analysed and scored once;
    each ratio then only allocates, rewrites, validates (and repairs, with
    calibration data)."""
    opts = PruneOptions.build(options, **keywords)
    if target not in TARGETS:
        raise UsageError(f"target '{target}' is not one of {', '.join(TARGETS)}")
    ratios = parse_ratios(ratios) if isinstance(ratios, str) else check_ratios(ratios)
    if opts.target.steps > 1:
        raise UsageError("sweep prunes each ratio in one step; progressive pruning (steps) is prune's")
    if opts.target.width or opts.target.lossless or opts.target.plan is not None:
        raise UsageError("sweep sets the ratio or target itself (--ratios, --target): do not give ratio, "
                         "target_flops, target_params, lossless or plan")
    check_budget(opts.gate.max_accuracy_drop, opts.gate.metric is not None)
    if plot is not None:
        require_matplotlib()  # before the long work
    check_provider(opts.runtime.provider)
    key = TARGETS[target][0]
    quiet = with_keywords(opts, {key: ratios[0], "validate_data": None, "max_accuracy_drop": None,
                                 "measure_latency": False, "progress": False})  # sweep measures all together
    state = PruneState(quiet, model, None, probe_sizes=True)
    run_stages(state, LOAD + SCORE)
    rt, gate = opts.runtime, opts.gate
    reference = reference_pass(state.dense, _open(data, opts), batch_size=opts.data.batch_size,
                               provider=rt.provider, progress=rt.progress, metric=gate.metric, batch_axis=opts.data.batch_axis,
                               class_axis=gate.class_axis)
    cost = state.dense_cost
    dense_point = SweepPoint(None, cost.flops, cost.params, 1.0, 1.0, compare_quality(reference, reference.outputs))
    name = str(model) if not isinstance(model, onnx.ModelProto) else model.graph.name or "<ModelProto>"
    stem = Path(name).stem if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    points, pruned_models = [], []
    with Progress(len(ratios), "sweep", enabled=rt.progress) as bar:
        for r in ratios:
            bar.update(0, label=f"sweep: pruning at {r:g}")
            point = SweepPoint(r)
            out = None if output_dir is None else Path(output_dir) / f"{stem}.{target}{r:g}.onnx"
            try:
                pruned, report = finish(state.fork(with_keywords(quiet, {key: r}), out), DECIDE)
            except (PlanError, ValidationError) as exc:  # e.g. an unreachable target: report it, go on
                point.error = str(exc)
                points.append(point)
                bar.update()
                continue
            point.flops, point.params = report.after.flops, report.after.params
            point.flops_kept = report.after.flops / cost.flops if cost.flops else None
            point.params_kept = report.after.params / cost.params if cost.params else None
            point.output = None if out is None else str(out)
            point.quality = compare_quality(reference, pruned_outputs(reference, pruned, progress=False),
                                            gate.max_accuracy_drop)
            points.append(point)
            pruned_models.append((point, pruned))
            bar.update()
    result = SweepResult(name, reference.dataset.source, len(reference.dataset), target, reference.metric,
                         dense_point, points, _described(opts), None, gate.max_accuracy_drop)
    del reference
    if rt.measure_latency is not False:
        _measure_latency(result, state, pruned_models, target, opts)
    if plot is not None:
        plot_sweep(result, plot)
    return result


def _open(data: Any, opts: PruneOptions) -> Any:
    if isinstance(data, (str, os.PathLike)):
        from onnxprune.runtime.data import open_data

        return open_data(data, **opts.data.reading())
    return data


def _described(opts: PruneOptions) -> dict[str, Any]:
    """The options a sweep's header names: the selection, and calibration settings that differ from prune's."""
    t = opts.target
    out: dict[str, Any] = {"criterion": opts.scoring.criterion, "strategy": t.strategy, "round_to": t.round_to}
    calib = opts.calibration.calib
    if calib is not None:
        out["calibration"] = str(calib) if isinstance(calib, (str, os.PathLike)) else \
            getattr(calib, "source", "given arrays")
        defaults = {**flat_fields(CalibrationOptions()), **flat_fields(ReconstructionOptions())}
        given = {**flat_fields(opts.calibration), **flat_fields(opts.reconstruction)}
        out.update({k: v for k, v in given.items() if k != "calib" and v != defaults[k]})
    return out


def flat_fields(group: Any) -> dict[str, Any]:
    return {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}


def _measure_latency(result: SweepResult, state: PruneState, pruned_models: list, target: str,
                     opts: PruneOptions) -> None:
    """One interleaved benchmark of the dense model and every pruned one."""
    from onnxprune.runtime.bench import benchmark

    rt = opts.runtime
    bench = benchmark([state.dense, *(m for _, m in pruned_models)],
                      names=["dense", *(f"{target} {p.ratio:g}" for p, _ in pruned_models)],
                      provider=rt.provider, threads=rt.threads, runs=rt.latency_runs, warmup=rt.latency_warmup,
                      input_shapes=state.input_shapes.shapes, progress=rt.progress, seed=rt.seed)
    for p, entry in zip([result.dense, *(p for p, _ in pruned_models)], bench.entries):
        p.latency_ms = dict(entry.latency.__dict__)
        p.speedup = entry.speedup
    result.latency = {"provider": rt.provider, "threads": rt.threads, "runs": rt.latency_runs,
                      "warmup": rt.latency_warmup, "input_shapes": bench.entries[0].input_shapes,
                      "onnxruntime": bench.onnxruntime}


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> None:
    """Accuracy (or agreement) vs FLOPs kept, and vs median latency when measured; one PNG/SVG/PDF
    (the format follows the file's extension)."""
    Figure = require_matplotlib()
    done = [p for p in [result.dense, *result.points] if p.error is None and p.value is not None]
    if not done:
        raise OnnxPruneError("nothing to plot: no ratio was pruned and measured")
    panels = 2 if result.latency is not None else 1
    fig = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    scale = 100.0 if result.in_points else 1.0  # shares in %, other numbers as they are
    ylabel = f"{result.metric_label} (%)" if result.in_points else result.metric_label
    xs = [("FLOPs kept (% of dense)", lambda p: p.flops_kept * 100)]
    if result.latency is not None:
        xs.append((f"median latency (ms, {threads_text(result.latency['threads'])})", lambda p: p.latency_ms["median_ms"]))
    for ax, (xlabel, fx) in zip(axes, xs):
        pts = sorted((p for p in done if fx(p) is not None), key=fx)
        ax.plot([fx(p) for p in pts], [p.value * scale for p in pts], "o-", color="tab:blue")
        labels: dict[tuple, list[str]] = {}  # ratios that gave the same model share one label
        for p in pts:
            where = (round(fx(p), 6), round(p.value * scale, 6))
            labels.setdefault(where, []).append("dense" if p.ratio is None else f"{p.ratio:g}")
        for (x, y), names in labels.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if result.max_drop is not None and result.dense.value is not None:
            floor = (result.dense.value - result.max_drop) * scale
            ax.axhline(floor, linestyle="--", color="tab:red", linewidth=1, label=f"budget: -{result.budget_text()}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{Path(result.model).name} on {Path(result.data).name}: {result.metric_label} vs cost "
                 f"(labels: fraction of {TARGETS[result.target][2]} removed)", fontsize=10)
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise OnnxPruneError(f"cannot write the plot to {path}: {exc}") from exc
