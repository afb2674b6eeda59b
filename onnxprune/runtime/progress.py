"""A tiny progress bar for long work (data passes, benchmarks, sweeps), on stderr.

Shown only when stderr is a terminal, so logs, pipes, CI and tests stay
clean; ``ONNXPRUNE_PROGRESS=0`` turns it off and ``ONNXPRUNE_PROGRESS=1``
forces it on. The bar redraws at most ten times a second and erases itself
when the work is done, so the tables printed afterwards start on a clean line.

    with Progress(len(batches), "pruned model on data") as bar:
        for batch in batches:
            ...
            bar.update()
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterator, Sequence, TextIO, TypeVar

T = TypeVar("T")

WIDTH = 24
REDRAW_S = 0.1


def progress_enabled(stream: TextIO | None = None) -> bool:
    """ONNXPRUNE_PROGRESS=0/1 if set, else whether `stream` (default stderr) is a terminal."""
    forced = os.environ.get("ONNXPRUNE_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """`total` steps labelled `label`; `enabled=None` decides with `progress_enabled`."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(self.stream) if enabled is None else enabled
        self.total = max(int(total), 0)
        self.label = label
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0

    def __enter__(self) -> "Progress":
        self.draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, label: str | None = None) -> None:
        self.done += n
        if label is not None:
            self.label = label
        self.draw(force=label is not None)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(round(frac * WIDTH))
            bar = "#" * filled + "." * (WIDTH - filled)  # ASCII: any terminal encoding
            return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s"
        return f"{self.label} {self.done} {elapsed:.1f}s"

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < REDRAW_S and self.done < self.total:
            return
        self._last = now
        text = self.line()
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def progress_iter(items: Sequence[T], label: str, *, enabled: bool | None = None) -> Iterator[T]:
    """Iterate `items` with a bar labelled `label` (shown as `progress_enabled` decides)."""
    with Progress(len(items), label, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()


class StageClock:
    """Seconds spent in each named stage: `lap(name)` closes the stage that ran since the last lap (and
    adds to that name's seconds when it ran before)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now
