"""The sparsify report: per-layer sparsity and error, before/after, validation, gate and latency."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnxprune.runtime.measures import LatencyStats, QualityStats
from onnxprune.text import box_table, human, human_bytes
from onnxprune.sparsity.layers import LayerResult

# What onnxruntime does with zeros, said wherever the result is printed (measured: README).
DENSE_NOTE = ("onnxruntime's CPU and CUDA providers run zeroed weights as dense ones: expect no speed-up there. "
              "Sparsity pays in a compressed file (zip/zstd of the weights) and, for 2:4, in TensorRT's sparse "
              "kernels (README: Weight-level sparsity).")


@dataclass
class SparsifyReport:
    input: str
    output: str | None
    mode: str  # the pattern and criterion, e.g. "2:4, sparsegpt"
    layers: list[LayerResult]
    params: int  # all parameters of the model (distinct tensors)
    file_size_before: int
    file_size_after: int
    calibration_samples: int | None = None
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    quality: QualityStats | None = None
    latency: LatencyStats | None = None
    distillation: Any = None  # onnxprune.autodiff.distill.DistillResult

    @property
    def sparsified(self) -> list[LayerResult]:
        return [r for r in self.layers if r.skipped is None]

    @property
    def weights(self) -> int:
        """Entries of the sparsified weights."""
        return sum(r.weights for r in self.sparsified)

    @property
    def zeros_before(self) -> int:
        return sum(r.zeros_before for r in self.layers)

    @property
    def zeros_after(self) -> int:
        return sum(r.zeros_after for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Share of zeros in the sparsified weights."""
        weights = self.weights
        return sum(r.zeros_after for r in self.sparsified) / weights if weights else 0.0

    @property
    def gate_passed(self) -> bool | None:
        return None if self.quality is None else self.quality.passed

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "mode": self.mode,
            "params": self.params,
            "sparsified_weights": self.weights,
            "sparsity": round(self.sparsity, 6),
            "zeros": {"before": self.zeros_before, "after": self.zeros_after},
            "file_size": {"before": self.file_size_before, "after": self.file_size_after},
            "calibration_samples": self.calibration_samples,
            "layers": [r.to_dict() for r in self.layers],
            "validation": {"checks": self.checks},
            "quality": self.quality.to_dict() if self.quality is not None else None,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "distillation": self.distillation.to_dict() if self.distillation is not None else None,
            "notes": self.notes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # -- rendering -------------------------------------------------------------------------------------
    def layer_rows(self) -> list[tuple[str, ...]]:
        rows = []
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            if r.skipped is not None:
                rows.append((r.layer, r.op_type, shape, human(r.weights), "dense", r.skipped))
                continue
            error = "" if r.error is None else f"{r.error:.4f}"
            rows.append((r.layer, r.op_type, shape, human(r.weights), f"{r.sparsity:.1%}", error))
        return rows

    LAYER_HEADER = ("layer", "op", "weight", "weights", "sparsity", "rel. error on calib, or why dense")

    def rows(self) -> list[tuple[str, str, str]]:
        nonzero_before = self.params - self.zeros_before
        nonzero_after = self.params - self.zeros_after
        rows = [("Parameters", human(self.params), human(self.params)),
                ("Zeros in Conv/Gemm/MatMul weights", human(self.zeros_before), human(self.zeros_after)),
                ("Non-zero parameters", human(nonzero_before),
                 f"{human(nonzero_after)} ({(nonzero_after - nonzero_before) / max(nonzero_before, 1):+.1%})"),
                ("Model size (stored dense)", human_bytes(self.file_size_before), human_bytes(self.file_size_after))]
        if self.quality is not None:
            rows += self.quality.rows()
        if self.latency is not None:
            rows += self.latency.rows()
        return rows

    def render_table(self) -> str:
        return (box_table(self.LAYER_HEADER, self.layer_rows()) + "\n"
                + box_table(("", "Original", "Sparsified"), self.rows()))

    def render_markdown(self) -> str:
        lines = ["| " + " | ".join(self.LAYER_HEADER) + " |", "|---|---|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.layer_rows()]
        lines += ["", "| | Original | Sparsified |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows()]
        if self.quality is not None:
            lines += ["", self.quality.verdict()]
        if self.latency is not None:
            lines += ["", f"Latency: {self.latency.describe()}."]
        return "\n".join(lines)

    def summary(self) -> str:
        done = self.sparsified
        errors = [r.error for r in done if r.error is not None]
        text = (f"{self.mode}: {len(done)} of {len(self.layers)} weights sparsified, {self.sparsity:.1%} of their "
                f"{human(self.weights)} entries are zero")
        if errors:
            text += f"; relative output error per layer on calibration data: mean {sum(errors) / len(errors):.4f}, " \
                    f"worst {max(errors):.4f}"
        text += f". Checks passed: {', '.join(self.checks)}."
        if self.distillation is not None:
            text += "\n" + self.distillation.describe()
        if self.quality is not None:
            text += "\n" + ("Accuracy gate: " if self.quality.max_drop is not None else "Validation: ") + \
                self.quality.verdict()
        if self.latency is not None:
            text += f"\nLatency: {self.latency.describe()}."
        return text + "\n" + DENSE_NOTE
