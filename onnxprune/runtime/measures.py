"""What a measurement found, as plain data: quality on validation data and latency, dense vs pruned
(built by onnxprune.runtime.gate; rendered in the prune, sparsify and sweep reports)."""
from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.text import threads_text


@dataclass
class QualityStats:
    """What pruning cost on validation data, dense vs pruned (onnxprune.runtime.gate).

    `metric` is the number the gate compares: "top1" (top-1 accuracy of the
    first output) when the data has labels; "custom:NAME" for a custom metric
    (its own unit, higher is better); otherwise fidelity to the dense model,
    worst output gated: "top1_agreement" (outputs of class scores),
    "cosine_similarity" (maps, sequences, embeddings), "exact_agreement"
    (integer outputs), or "fidelity" when the outputs mix them. `output` is
    the output the gated number comes from. `before` is the dense model's
    value (1 for fidelity), `after` the pruned model's; `drop` = before -
    after, in the same unit as `max_drop` (0.02 = 2 points of a fraction).
    `outputs` holds the fidelity of every output (pruned vs dense) and
    `gated` the measure each one is gated on.
    """

    data: str
    samples: int
    output: str
    metric: str | None
    before: float | None
    after: float | None
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)  # output -> fidelity to dense
    gated: dict[str, str] = field(default_factory=dict)  # output -> the fidelity key it is gated on
    max_drop: float | None = None
    custom_before: dict[str, float] = field(default_factory=dict)
    custom_after: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def fidelity(self) -> dict[str, float]:
        """The fidelity of `output` to the dense model."""
        return self.outputs.get(self.output, {})

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
    def in_points(self) -> bool:
        """Whether the gated number is a share, shown in % and its drop in points."""
        return self.metric in POINT_METRICS

    @property
    def metric_label(self) -> str:
        return metric_label(self.metric)

    def value_text(self, value: float | None) -> str:
        return _pct(value) if self.in_points else "" if value is None else f"{value:.4g}"

    def drop_text(self, drop: float | None = None) -> str:
        drop = self.drop if drop is None else drop
        return f"{drop * 100:.2f} points" if self.in_points else f"{drop:.4g}"

    def budget_text(self) -> str:
        return f"{self.max_drop * 100:.2f} points" if self.in_points else f"{self.max_drop:g}"

    def verdict(self) -> str:
        """One sentence: the measured drop, and the budget if there is one."""
        if self.drop is None:
            return f"{self.data} ({self.samples} samples): no output to compare, nothing to gate."
        where = "" if self.metric in ("top1",) or self.metric.startswith("custom:") or len(self.outputs) == 1 \
            else f" (output '{self.output}', the worst)"
        text = (f"{self.metric_label}{where} {self.value_text(self.before)} -> {self.value_text(self.after)} on "
                f"{self.data} ({self.samples} samples): a drop of {self.drop_text()}")
        if self.max_drop is not None:
            within = "within" if self.passed else "over"
            text += f", {within} the budget of {self.budget_text()} (--max-accuracy-drop {self.max_drop:g})"
        return " ".join([text + ".", *self.notes])

    def to_dict(self) -> dict:
        return {"data": self.data, "samples": self.samples, "output": self.output, "metric": self.metric,
                "before": self.before, "after": self.after, "drop": self.drop, "max_drop": self.max_drop,
                "passed": self.passed, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "custom_before": self.custom_before,
                "custom_after": self.custom_after, "fidelity_vs_dense": self.outputs, "gated": self.gated,
                "notes": self.notes}

    def rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for key, after in self.accuracy_after.items():
            before = self.accuracy_before.get(key)
            rows.append((f"Top-{key[3:]} accuracy", _pct(before), _pct_change(before, after)))
        for key, after in self.custom_after.items():
            before = self.custom_before.get(key)
            rows.append((f"{key} (custom metric)", _num(before), f"{_num(after)} ({after - before:+.4g})"))
        for name, fid in self.outputs.items():
            suffix = f" ('{name}')" if len(self.outputs) > 1 else ""
            for key in ("top1_agreement", "exact_agreement"):
                if key in fid:
                    label = "Top-1 agreement" if key == "top1_agreement" else "Exact agreement"
                    rows.append((f"{label} with dense{suffix}", _pct(1.0), _pct_change(1.0, fid[key])))
            if "cosine_similarity" in fid:
                rows.append((f"Cosine similarity to dense{suffix}", "1", f"{fid['cosine_similarity']:.4g}"))
                rows.append((f"Relative L2 error to dense{suffix}", "0", f"{fid['relative_l2_error']:.4g}"))
        if self.drop is not None:
            budget = "" if self.max_drop is None else \
                f" ({'within' if self.passed else 'OVER'} {self.budget_text().replace(' points', ' pt')})"
            rows.append((f"Gated drop: {self.gate_rule()}", "", self.drop_text().replace(" points", " pt") + budget))
        return rows

    def gate_rule(self) -> str:
        """What the gated drop is, in a few words."""
        if self.metric == "top1":
            return "top-1 accuracy"
        if self.metric and self.metric.startswith("custom:"):
            return f"{self.metric[7:]}, dense - pruned"
        measure = {"top1_agreement": "1 - top-1 agreement", "exact_agreement": "1 - exact agreement",
                   "cosine_similarity": "1 - cosine"}[self.gated[self.output]]
        return measure + (f", worst output '{self.output}'" if len(self.outputs) > 1 else "")


POINT_METRICS = ("top1", "top1_agreement", "exact_agreement")  # shares: shown in %, drops in points


def metric_label(metric: str | None) -> str:
    """How a gated metric (QualityStats.metric) reads in tables and sentences."""
    if metric and metric.startswith("custom:"):
        return f"{metric[7:]} (custom metric)"
    return {"top1": "top-1 accuracy", "top1_agreement": "top-1 agreement with the dense model",
            "exact_agreement": "exact agreement with the dense model",
            "cosine_similarity": "cosine similarity to the dense model",
            "fidelity": "fidelity to the dense model"}.get(metric or "", "no gated metric")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


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


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.2f}%"


def _pct_change(before: float | None, after: float | None) -> str:
    if after is None:
        return ""
    if before is None:
        return _pct(after)
    return f"{_pct(after)} ({(after - before) * 100:+.2f} pt)"
