"""Figures are optional: matplotlib comes with the `plot` extra, and a missing one is a clear error."""
from __future__ import annotations

from onnxprune.errors import OnnxPruneError

PLOT_HINT = "pip install 'onnxprune[plot]' (matplotlib)"


def require_matplotlib():
    """matplotlib.figure.Figure, or an error saying how to install the `plot` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OnnxPruneError(f"plotting needs matplotlib: {PLOT_HINT}") from None
    return Figure
