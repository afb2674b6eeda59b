"""The prune report: one object, rendered as a terminal table, JSON or Markdown."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from onnxprune.cost import ModelCost


@dataclass
class ModelStats:
    """One side of the before/after table.  `params` and `param_bytes` count distinct tensors
    (a weight read by several layers once, as the file stores it; see onnxprune.cost)."""

    params: int
    macs: int
    flops: int
    file_size: int
    op_counts: Counter
    param_bytes: int = 0

    @classmethod
    def from_cost(cls, cost: ModelCost, file_size: int) -> "ModelStats":
        return cls(cost.params, cost.macs, cost.flops, file_size, Counter(cost.op_counts), cost.param_bytes)

    def to_dict(self) -> dict:
        return {"params": self.params, "param_bytes": self.param_bytes, "macs": self.macs, "flops": self.flops,
                "file_size": self.file_size, "op_counts": dict(sorted(self.op_counts.items()))}


@dataclass
class GroupChange:
    name: str
    op_type: str
    before: int
    after: int


@dataclass
class QualityStats:
    """What pruning cost on validation data: accuracy (labelled data) or
    fidelity to the dense model (no labels), dense vs pruned.

    `metric` is the number the gate compares: "top1" (top-1 accuracy) when the
    data has labels, else "top1_agreement" (share of samples where the pruned
    model's top-1 class equals the dense model's; the dense model's is 1 by
    definition); None when the output has no class axis (no gate possible).
    Values are fractions (0.9978 = 99.78%); `drop` = before - after, in the
    same unit as `max_drop` (0.02 = 2 points).
    """

    data: str
    samples: int
    output: str
    metric: str | None
    before: float | None
    after: float | None
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)  # pruned vs dense
    max_drop: float | None = None

    @property
    def drop(self) -> float | None:
        return None if self.before is None or self.after is None else self.before - self.after

    @property
    def passed(self) -> bool | None:
        """None without a budget; else whether the drop is within it."""
        if self.max_drop is None or self.drop is None:
            return None
        return self.drop <= self.max_drop + 1e-9

    @property
    def metric_label(self) -> str:
        return {"top1": "top-1 accuracy", "top1_agreement": "top-1 agreement with the dense model"}.get(
            self.metric or "", "no top-1 metric")

    def verdict(self) -> str:
        """One sentence: the measured drop, and the budget if there is one."""
        if self.drop is None:
            return f"{self.data} ({self.samples} samples): output '{self.output}' has no class axis, no top-1 metric."
        text = (f"{self.metric_label} {_pct(self.before)} -> {_pct(self.after)} on {self.data} "
                f"({self.samples} samples): a drop of {self.drop * 100:.2f} points")
        if self.max_drop is None:
            return text + "."
        if self.passed:
            return text + f", within the budget of {self.max_drop * 100:.2f} points (--max-accuracy-drop {self.max_drop:g})."
        return text + f", over the budget of {self.max_drop * 100:.2f} points (--max-accuracy-drop {self.max_drop:g})."

    def to_dict(self) -> dict:
        return {"data": self.data, "samples": self.samples, "output": self.output, "metric": self.metric,
                "before": self.before, "after": self.after, "drop": self.drop, "max_drop": self.max_drop,
                "passed": self.passed, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "fidelity_vs_dense": self.fidelity}

    def rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for key, after in self.accuracy_after.items():
            before = self.accuracy_before.get(key)
            rows.append((f"Top-{key[3:]} accuracy", _pct(before), _pct_change(before, after)))
        if "top1_agreement" in self.fidelity:
            rows.append(("Top-1 agreement with dense", _pct(1.0), _pct_change(1.0, self.fidelity["top1_agreement"])))
        elif not self.accuracy_after and "cosine_similarity" in self.fidelity:
            rows.append(("Cosine similarity to dense", "1", f"{self.fidelity['cosine_similarity']:.4g}"))
        return rows


@dataclass
class LatencyStats:
    """Dense vs pruned latency from one interleaved onnxruntime benchmark
    (onnxprune.runtime.bench): milliseconds per run, speed-up of the medians."""

    provider: str
    threads: int
    runs: int
    warmup: int
    input_shapes: dict[str, list[int]]
    before: dict[str, float]  # median_ms, p90_ms, min_ms, mean_ms
    after: dict[str, float]
    onnxruntime: str = ""

    @property
    def speedup(self) -> float:
        after = self.after["median_ms"]
        return self.before["median_ms"] / after if after > 0 else float("nan")

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes.values())
        return (f"onnxruntime {self.onnxruntime} {self.provider.replace('ExecutionProvider', '')}, "
                f"{threads_text(self.threads)}, inputs {shapes}, median of {self.runs} interleaved runs")

    def to_dict(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "runs": self.runs, "warmup": self.warmup,
                "onnxruntime": self.onnxruntime, "input_shapes": self.input_shapes,
                "before": {k: round(v, 4) for k, v in self.before.items()},
                "after": {k: round(v, 4) for k, v in self.after.items()}, "speedup": round(self.speedup, 4)}

    def rows(self) -> list[tuple[str, str, str]]:
        where = f"{self.provider.replace('ExecutionProvider', '')}, {threads_text(self.threads)}"
        return [(f"Latency median ({where})", f"{self.before['median_ms']:.3f} ms",
                 f"{self.after['median_ms']:.3f} ms ({self.speedup:.2f}x)"),
                ("Latency p90", f"{self.before['p90_ms']:.3f} ms", f"{self.after['p90_ms']:.3f} ms")]


def threads_text(n: int) -> str:
    return "threads chosen by onnxruntime" if n == 0 else f"{n} thread" + ("s" if n != 1 else "")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.2f}%"


def _pct_change(before: float | None, after: float | None) -> str:
    if after is None:
        return ""
    if before is None:
        return _pct(after)
    return f"{_pct(after)} ({(after - before) * 100:+.2f} pt)"


@dataclass
class PruneReport:
    input: str
    output: str | None
    mode: str
    before: ModelStats
    after: ModelStats
    groups_total: int
    groups_prunable: int
    changes: list[GroupChange] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    quality: QualityStats | None = None  # with validate_data
    latency: LatencyStats | None = None  # with measure_latency
    depth: dict | None = None  # with drop_layers: strategy.depth.DepthReport.to_dict()

    @property
    def gate_passed(self) -> bool | None:
        """None when no accuracy budget was set."""
        return None if self.quality is None else self.quality.passed

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "mode": self.mode,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "groups": {"total": self.groups_total, "prunable": self.groups_prunable,
                       "changed": [c.__dict__ for c in self.changes]},
            "validation": {"checks": self.checks, "max_abs_diff_vs_dense": self.max_abs_diff},
            "quality": self.quality.to_dict() if self.quality is not None else None,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "depth": self.depth,
            "notes": self.notes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # -- rendering -------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for op in sorted(set(self.before.op_counts) | set(self.after.op_counts)):
            rows.append((op, str(self.before.op_counts.get(op, 0)), str(self.after.op_counts.get(op, 0))))
        rows.append(("Parameters", human(self.before.params), change(self.before.params, self.after.params)))
        rows.append(("MACs", human(self.before.macs), change(self.before.macs, self.after.macs)))
        rows.append(("FLOPs", human(self.before.flops), change(self.before.flops, self.after.flops)))
        rows.append(("Model size", human_bytes(self.before.file_size),
                     change(self.before.file_size, self.after.file_size, human_bytes)))
        if self.quality is not None:
            rows += self.quality.rows()
        if self.latency is not None:
            rows += self.latency.rows()
        return rows

    def render_table(self) -> str:
        return box_table(("", "Original", "Pruned"), self.rows())

    def render_markdown(self) -> str:
        lines = ["| | Original | Pruned |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows()]
        if self.quality is not None:
            lines += ["", self.quality.verdict()]
        if self.latency is not None:
            lines += ["", f"Latency: {self.latency.describe()}."]
        return "\n".join(lines)

    def summary(self) -> str:
        changed = len(self.changes)
        text = (f"{self.mode}: {changed} of {self.groups_prunable} prunable groups changed "
                f"({self.groups_total - self.groups_prunable} blocked; `onnxprune analyze` says why). "
                f"Checks passed: {', '.join(self.checks)}.")
        if self.max_abs_diff is not None:
            text += f" Max |difference| from the dense model: {self.max_abs_diff:.3g}."
        if self.quality is not None:
            text += "\n" + ("Accuracy gate: " if self.quality.max_drop is not None else "Validation: ") + \
                self.quality.verdict()
        if self.latency is not None:
            text += f"\nLatency: {self.latency.describe()}."
        return text


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def change(before: float, after: float, fmt=human) -> str:
    if before == 0:
        return fmt(after)
    return f"{fmt(after)} ({(after - before) / before:+.1%})"


def box_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(l, m, r):
        return l + m.join("─" * (w + 2) for w in widths) + r

    def row(cells):
        return "│" + "│".join(f" {str(c):<{w}} " if i == 0 else f" {str(c):>{w}} "
                              for i, (c, w) in enumerate(zip(cells, widths))) + "│"

    out = [line("┌", "┬", "┐"), row(header), line("├", "┼", "┤")]
    out += [row(r) for r in rows]
    out.append(line("└", "┴", "┘"))
    return "\n".join(out)
