"""Calibration: activation statistics from sample data, and reconstruction of pruned models.

    from onnxprune.calibration import calibration_statistics, reconstruct

    stats = calibration_statistics(dense, analysis, "calib.npz")       # for data-aware criteria
    repaired, report = reconstruct(dense, pruned, analysis, removed, "calib.npz")

Modules: `data` (CalibrationSet: the eval formats, limited and split),
`capture` (intermediate tensors as extra onnxruntime outputs, chunked under a
memory cap), `features` (consumer input rows: Gemm/MatMul vectors, Conv
patches at sampled positions; Gram sums), `stats` (streaming per-channel
statistics), `reconstruction` (the guarded sequence of reconstruction passes
from `onnxprune.passes.reconstruct`).
"""
from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture, expose
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import Consumer, GramStats, consumer_for, consumers_of, rows
from onnxprune.calibration.stats import (
    CalibrationStats,
    ChannelStats,
    GramRequest,
    calibration_statistics,
    collect_statistics,
    sink_tensors,
)
from onnxprune.calibration.reconstruction import ReconstructionReport, reconstruct  # noqa: E402  (imports passes)

__all__ = [
    "DEFAULT_MEMORY_CAP",
    "CalibrationSet",
    "CalibrationStats",
    "Capture",
    "ChannelStats",
    "Consumer",
    "GramRequest",
    "GramStats",
    "ReconstructionReport",
    "calibration_statistics",
    "collect_statistics",
    "consumer_for",
    "consumers_of",
    "expose",
    "reconstruct",
    "rows",
    "sink_tensors",
]
