"""One exception family for everything the user can get wrong or we refuse to do.

Each error names the file, node or tensor involved and says how to fix it; the CLI
maps the class to a distinct exit code.
"""
from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(OnnxPruneError):
    """Options that cannot mean what the user wants (a ratio of 0, a filter matching
    nothing): the same exit code as a command line argparse rejects."""

    exit_code = 2


class ModelLoadError(OnnxPruneError):
    """The input file is missing, corrupt, truncated or not an ONNX model."""

    exit_code = 3


class UnsupportedModelError(OnnxPruneError):
    """The model cannot be analysed at all (e.g. shapes that cannot be inferred)."""

    exit_code = 3


class PlanError(OnnxPruneError):
    """A plan or target that cannot be applied to this model."""

    exit_code = 5


class ValidationError(OnnxPruneError):
    """The rewritten model failed a check; nothing was written."""

    exit_code = 4


class OutputError(OnnxPruneError):
    """The output path is unusable (same as the input, not writable...)."""

    exit_code = 6


class DataError(OnnxPruneError):
    """Evaluation data that cannot be read or does not fit the model's inputs
    (name, dtype, shape), or a missing optional extra needed to read it."""

    exit_code = 7


class ProviderError(OnnxPruneError):
    """The requested onnxruntime execution provider is not available here."""

    exit_code = 8


class AccuracyDropError(ValidationError):
    """The pruned model lost more accuracy (or fidelity) than the budget allows;
    nothing was written. `report` holds the full before/after measurements."""

    exit_code = 9

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class CalibrationRequired(DataError):
    """A data-aware criterion was asked for without calibration statistics."""


class AblationBudgetError(DataError):
    """Ablating every unit would cost more than the budget, even with the fewest samples allowed."""


class InputSizesRejected(UnsupportedModelError):
    """The dense model does not run at the input sizes assumed for its dynamic dims, but does at
    `found` (an onnxprune.runtime.inputs.InputShapes). prune raises it when the pruned model's
    validation run fails there, and catches it to start again at `found`; its message is for the
    caller that does not."""

    def __init__(self, message: str, found: object):
        super().__init__(message)
        self.found = found
