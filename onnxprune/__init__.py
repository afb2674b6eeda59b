"""onnxprune: post-training structural pruning of ONNX graphs.

    import onnxprune
    model, report = onnxprune.prune("model.onnx", "model.pruned.onnx", target_flops=0.5)
    print(report.render_table())
    print(onnxprune.evaluate("model.pruned.onnx", "test.npz", reference="model.onnx").render_table())
    print(onnxprune.benchmark(["model.onnx", "model.pruned.onnx"]).render_table())
    print(onnxprune.sweep("model.onnx", [0.1, 0.3, 0.5], data="test.npz").render_table())
"""
from onnxprune.errors import (
    DataError,
    ModelLoadError,
    OnnxPruneError,
    OutputError,
    PlanError,
    ProviderError,
    UnsupportedModelError,
    UsageError,
    ValidationError,
)
from onnxprune.options import EvalOptions, PruneOptions
from onnxprune.pipeline import AnalysisReport, analyze, prune
from onnxprune.report import PruneReport
from onnxprune.runtime.bench import BenchResult, benchmark
from onnxprune.runtime.evaluate import EvalResult, evaluate
from onnxprune.runtime.gate import AccuracyDropError
from onnxprune.strategy.plan import Plan
from onnxprune.sweep import SweepResult, sweep

from onnxprune.version import __version__

__all__ = [
    "__version__",
    "AccuracyDropError",
    "AnalysisReport",
    "BenchResult",
    "DataError",
    "EvalOptions",
    "EvalResult",
    "ModelLoadError",
    "OnnxPruneError",
    "OutputError",
    "Plan",
    "PlanError",
    "ProviderError",
    "PruneOptions",
    "PruneReport",
    "SweepResult",
    "UnsupportedModelError",
    "UsageError",
    "ValidationError",
    "analyze",
    "benchmark",
    "evaluate",
    "prune",
    "sweep",
]
