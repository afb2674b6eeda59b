"""Calibration: activation statistics from sample data.

    from onnxprune.calibration import calibration_statistics

    stats = calibration_statistics(dense, analysis, "calib.npz")       # for data-aware criteria

(Reconstruction of pruned models, which uses these statistics, is a pass:
onnxprune.passes.reconstruction.reconstruct.)

Modules: `data` (CalibrationSet: the eval formats, limited and split),
`capture` (intermediate tensors as extra onnxruntime outputs, chunked under a
memory cap), `features` (consumer input rows: Gemm/MatMul vectors, Conv
patches at sampled positions; Gram sums), `stats` (streaming per-channel
statistics), `ablation` (zero-ablation sensitivity
of every unit through one gated session) and `removal_error` (next-layer
reconstruction error of removing input channels, for ThiNet's greedy).
"""
from onnxprune.calibration.ablation import AblationBudgetError, Sensitivity, ablation_sensitivity, gated_model
from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture, expose
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import Consumer, GramStats, consumer_for, consumers_of, rows
from onnxprune.calibration.removal_error import RemovalErrors, removal_errors
from onnxprune.calibration.stats import (
    CalibrationStats,
    ChannelStats,
    GramRequest,
    calibration_statistics,
    collect_statistics,
    sink_tensors,
)

__all__ = [
    "DEFAULT_MEMORY_CAP",
    "AblationBudgetError",
    "CalibrationSet",
    "CalibrationStats",
    "Capture",
    "ChannelStats",
    "Consumer",
    "GramRequest",
    "GramStats",
    "RemovalErrors",
    "Sensitivity",
    "ablation_sensitivity",
    "calibration_statistics",
    "collect_statistics",
    "consumer_for",
    "consumers_of",
    "expose",
    "gated_model",
    "removal_errors",
    "rows",
    "sink_tensors",
]
