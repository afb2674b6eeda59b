"""onnxprune: post-training structural pruning of ONNX graphs.

    import onnxprune
    model, report = onnxprune.prune("model.onnx", "model.pruned.onnx", target_flops=0.5)
    print(report.render_table())
"""
from onnxprune.errors import (
    ModelLoadError,
    OnnxPruneError,
    OutputError,
    PlanError,
    UnsupportedModelError,
    ValidationError,
)
from onnxprune.pipeline import AnalysisReport, analyze, prune
from onnxprune.report import PruneReport
from onnxprune.strategy.plan import Plan

__version__ = "0.1.0"

__all__ = [
    "AnalysisReport",
    "ModelLoadError",
    "OnnxPruneError",
    "OutputError",
    "Plan",
    "PlanError",
    "PruneReport",
    "UnsupportedModelError",
    "ValidationError",
    "analyze",
    "prune",
]
