"""What the prune stages read and write: one object, filled in stage by stage.

Stages communicate only through this state, so a stage can run again with
other options (a sweep's ratios, progressive steps, a search's trials) from a
`fork()` that keeps what did not change: the loaded model, the input sizes,
the dense reference outputs, the analysis and the scores.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis import Analysis
from onnxprune.cost import ModelCost
from onnxprune.ir.model_io import SourceInfo
from onnxprune.options import PruneOptions
from onnxprune.report import GroupChange, ModelStats
from onnxprune.runtime.cache import CacheChange
from onnxprune.runtime.inputs import InputShapes
from onnxprune.runtime.progress import StageClock
from onnxprune.strategy.plan import Plan

ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass
class PruneState:
    options: PruneOptions
    model: ModelLike                      # what the caller gave (never modified; latency runs the dense from it)
    output: str | os.PathLike | None
    # load
    dense: onnx.ModelProto | None = None    # our normalised copy of the caller's model
    working: onnx.ModelProto | None = None  # what the next stage works on: dense, then without dropped layers,
                                            # then pruned
    source: SourceInfo | None = None
    input_shapes: InputShapes | None = None  # given: sizes an earlier attempt found the dense model runs at
    probe_sizes: bool = False               # run the dense model at its planned sizes while loading (a sweep
                                            # validates many models there); else validation finds out
    dense_cost: ModelCost | None = None
    before: ModelStats | None = None
    expected_shapes: list | None = None     # output dims inference can tell (some depend on the data)
    validate_data: Any = None               # opened datasets and the loaded metric
    calib_data: Any = None
    metric: Any = None
    measure_latency: bool = False
    dense_ref: Any = None                   # the dense model's outputs on the validation data
    # decide
    given_plan: Plan | None = None
    reference: onnx.ModelProto | None = None  # the model before layers were dropped, for the repair
    depth: Any = None                       # DepthReport of dropped layers
    analysis: Analysis | None = None
    statistics: Any = None                  # calibration statistics of a data-aware criterion
    scores: dict[int, np.ndarray] | None = None
    curves: Any = None                      # sensitivity curves (adaptive allocation)
    adaptive_by_default: bool = False       # adaptive because calibration data came and no strategy was named
    keep: dict[int, np.ndarray] | None = None
    candidates: dict[str, dict] = field(default_factory=dict)  # allocations to repair and compare (adaptive)
    removed: set[int] | None = None
    plan: Plan | None = None
    mode: str = ""
    changes: list[GroupChange] = field(default_factory=list)
    groups_total: int = 0
    groups_prunable: int = 0
    notes: list[str] = field(default_factory=list)
    reconstructed: bool = False
    passes: list = field(default_factory=list)  # PassRecords of the passes that ran, in order (the report's)
    cache: CacheChange | None = None        # a key-value cache that lost heads (prune_cache): the new interface
    attention: list = field(default_factory=list)  # AttentionChange per attention layer, when heads went
    # validate, measure, save
    staged: Any = None                      # a large model's output, written once and validated from disk
    validation: Any = None
    after: ModelStats | None = None
    quality: Any = None
    latency: Any = None
    report: Any = None
    clock: StageClock = field(default_factory=StageClock)

    def __post_init__(self) -> None:
        if isinstance(self.options, PruneOptions):  # every prune run names its strategy (alone, swept, in steps)
            defaulted = self.options.target.strategy is None
            self.options = self.options.with_strategy()
            if defaulted:
                self.adaptive_by_default = self.options.target.strategy == "adaptive"

    @property
    def width(self) -> bool:
        return self.options.target.width

    # what the shared load and finish stages ask of a run (a sparsify run answers differently)
    @property
    def lossless(self) -> bool:
        """Whether the result must reproduce the dense outputs (validated against them)."""
        return self.options.target.lossless

    @property
    def plan_path(self):
        """Where the applied plan is written (None: nowhere)."""
        return self.options.save_plan

    @property
    def gate_advice(self) -> str:
        return "prune less (a smaller ratio or target), exclude sensitive layers, or raise the budget."

    def fork(self, options: PruneOptions, output: str | os.PathLike | None = None) -> "PruneState":
        """A state for another run over the same loaded model: keeps what the load stages made, and the
        analysis and scores when the options they depend on are the same; the rest starts empty."""
        kept = PruneState(options, self.model, output, dense=self.dense, working=self.dense, source=self.source,
                          input_shapes=self.input_shapes, dense_cost=self.dense_cost,
                          before=copy.copy(self.before), expected_shapes=self.expected_shapes,
                          validate_data=self.validate_data, calib_data=self.calib_data, metric=self.metric,
                          measure_latency=self.measure_latency, dense_ref=self.dense_ref)
        same = self.options
        unchanged_model = options.depth.drop_layers is None and same.depth.drop_layers is None
        if (unchanged_model and options.target.prune_hidden == same.target.prune_hidden
                and options.target.prune_cache == same.target.prune_cache
                and options.target.plan is None and same.target.plan is None):
            kept.analysis = self.analysis
            if options.scoring == same.scoring and options.calibration == same.calibration:
                kept.statistics, kept.scores = self.statistics, self.scores
                same_groups = (options.target.include, options.target.exclude) == (same.target.include,
                                                                                   same.target.exclude)
                kept.curves = self.curves if same_groups else None
        return kept
