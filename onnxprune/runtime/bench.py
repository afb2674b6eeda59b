"""Latency of one or more models with onnxruntime, side by side.

    import onnxprune
    result = onnxprune.benchmark(["dense.onnx", "pruned.onnx"], runs=100, batch=8, profile=True)
    print(result.render_table())      # median/p90/min ms and speed-up vs the first model
    print(result.render_profile())    # time per op type

Method: one session per model with a fixed number of intra-op threads
(default 1) on the chosen execution provider; random inputs of the
concrete shapes (`--input-shape` / `batch` fix dynamic axes; other dynamic
axes default as in onnxprune.runtime.inputs); `warmup` untimed runs each;
then `runs` timed rounds, each running every model once, in an order that
rotates by one every round, so drift (thermal, other load) hits all models
alike. Reported: median, 90th percentile, min and mean of the per-run wall
times, and speed-up = median of the first model / median of this one.

Profiling (`profile=True`) uses a separate onnxruntime session with its
profiler on, after the timed runs (the profiler slows runs down, so it never
touches the timed ones): `warmup` runs, then min(runs, 20) profiled runs;
kernel times are summed per op type as onnxruntime ran it (after its own
graph fusions, so e.g. a Conv with a fused Relu counts as Conv) and divided
by the number of profiled runs.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.text import box_table
from onnxprune.runtime.data import model_inputs
from onnxprune.runtime.inputs import concrete_input_shapes, random_inputs
from onnxprune.runtime.progress import Progress
from onnxprune.runtime.session import check_provider, load_for_runtime, make_session, session_source

ModelLike = str | os.PathLike | onnx.ModelProto
MAX_PROFILED_RUNS = 20


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float

    @classmethod
    def from_times(cls, times_ms: Sequence[float]) -> "Latency":
        return cls(statistics.median(times_ms), float(np.percentile(times_ms, 90)), min(times_ms),
                   statistics.fmean(times_ms))


@dataclass
class BenchEntry:
    name: str
    input_shapes: dict[str, list[int]]
    latency: Latency
    speedup: float = 1.0
    op_times_ms: dict[str, float] | None = None  # per run, by op type, largest first

    def to_dict(self) -> dict:
        out = {"name": self.name, "input_shapes": self.input_shapes,
               **{k: round(v, 4) for k, v in self.latency.__dict__.items()}, "speedup": round(self.speedup, 4)}
        if self.op_times_ms is not None:
            out["op_times_ms"] = {k: round(v, 4) for k, v in self.op_times_ms.items()}
        return out


@dataclass
class BenchResult:
    entries: list[BenchEntry]
    provider: str
    threads: int
    runs: int
    warmup: int
    onnxruntime: str = ort.__version__
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "runs": self.runs, "warmup": self.warmup,
                "onnxruntime": self.onnxruntime, "models": [e.to_dict() for e in self.entries]}

    def header(self) -> str:
        return (f"onnxruntime {self.onnxruntime}, {self.provider}, {self.threads} intra-op thread(s), "
                f"{self.runs} interleaved runs after {self.warmup} warm-up")

    def rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        header = ("model", "inputs", "median ms", "p90 ms", "min ms", "speed-up")
        rows = []
        for e in self.entries:
            lat = e.latency
            rows.append((e.name, _shapes(e.input_shapes), f"{lat.median_ms:.3f}", f"{lat.p90_ms:.3f}",
                         f"{lat.min_ms:.3f}", f"{e.speedup:.2f}x"))
        return header, rows

    def render_table(self) -> str:
        header, rows = self.rows()
        return self.header() + "\n" + box_table(header, rows)

    def render_markdown(self) -> str:
        header, rows = self.rows()
        lines = [self.header() + ":", "", "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 4]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    def render_profile(self) -> str:
        """Per-op-type time (ms per run and share of kernel time), one column per model."""
        profiled = [e for e in self.entries if e.op_times_ms is not None]
        if not profiled:
            return "no profile (run with profile=True / --profile)"
        ops = list(dict.fromkeys(op for e in profiled for op in e.op_times_ms))
        header = ("op type", *[e.name for e in profiled])
        rows = []
        totals = [sum(e.op_times_ms.values()) for e in profiled]
        for op in ops:
            cells = []
            for e, total in zip(profiled, totals):
                t = e.op_times_ms.get(op)
                cells.append("" if t is None else f"{t:.3f} ms ({t / total:.0%})" if total else f"{t:.3f} ms")
            rows.append((op, *cells))
        rows.append(("total kernel time", *[f"{t:.3f} ms" for t in totals]))
        return box_table(header, rows)


def _shapes(shapes: dict[str, list[int]]) -> str:
    dims = ["x".join(map(str, s)) for s in shapes.values()]
    return dims[0] if len(dims) == 1 else ", ".join(f"{n} {d}" for n, d in zip(shapes, dims))


def _names(models: Sequence[ModelLike], given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(models):
            raise UsageError(f"{len(given)} names for {len(models)} models")
        return list(given)
    full = [str(m) if not isinstance(m, onnx.ModelProto) else (m.graph.name or f"model{i}")
            for i, m in enumerate(models)]
    short = [os.path.basename(n) for n in full]
    names = short if len(set(short)) == len(short) else full
    if len(set(names)) != len(names):  # the same model twice: number them
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def input_shapes_for(model: onnx.ModelProto, batch: int | None = None,
                     given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Concrete shapes of the model's (real) inputs: `given` per input, then
    `batch` for every dynamic first axis, then the defaults of runtime.inputs."""
    given = dict(given or {})
    stub = onnx.ModelProto()
    for spec, vi in zip(model_inputs(model), _real_inputs(model)):
        copy = stub.graph.input.add()
        copy.CopyFrom(vi)
        if batch is None or spec.name in given or not spec.shape:
            continue
        if spec.static_batch is None:
            dim = copy.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = batch
        elif spec.static_batch != batch:
            raise UsageError(f"input '{spec.name}' has a static batch of {spec.static_batch} "
                                 f"({spec.describe()}); --batch {batch} cannot change it")
    return concrete_input_shapes(stub, given)


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def benchmark(
    models: Sequence[ModelLike] | ModelLike,
    *,
    names: Sequence[str] | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    batch: int | None = None,
    input_shapes: dict[str, list[int]] | Sequence[dict[str, list[int]] | None] | None = None,
    profile: bool = False,
    seed: int = 0,
    progress: bool | None = None,
) -> BenchResult:
    """Latency of each model (see the module docstring); speed-ups relative to the first.
    progress: a bar of rounds done on stderr (None: only when stderr is a terminal). input_shapes: one
    dict for every model, or one per model (a pruned key-value cache holds fewer heads than the dense one)."""
    if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
        models = [models]
    if not models:
        raise UsageError("benchmark needs at least one model")
    if runs < 1 or warmup < 0 or threads < 0 or (batch is not None and batch < 1):
        raise UsageError("runs and batch must be at least 1, warm-up and threads at least 0")
    check_provider(provider)
    loaded = [load_for_runtime(m)[0] for m in models]
    labels = _names(models, names)
    given = list(input_shapes) if isinstance(input_shapes, (list, tuple)) else [input_shapes] * len(loaded)
    shapes = [input_shapes_for(m, batch, g) for m, g in zip(loaded, given)]
    stubs = [_stub(m) for m in loaded]
    feeds = [random_inputs(stub, s, seed) for stub, s in zip(stubs, shapes)]
    sessions = []
    for given, model, label in zip(models, loaded, labels):
        try:
            sessions.append(make_session(session_source(given, model), threads=threads, provider=provider))
        except OnnxPruneError:
            raise
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime cannot load {label}: {exc}") from exc
    for session, feed, label in zip(sessions, feeds, labels):
        for _ in range(max(warmup, 1)):  # at least one untimed run: it also checks the model runs
            _run(session, feed, label)
    times: list[list[float]] = [[] for _ in sessions]
    count = len(sessions)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with Progress(runs, f"latency of {count} model(s)", enabled=progress) as bar:
            for r in range(runs):
                for k in range(count):
                    i = (r + k) % count
                    start = time.perf_counter()
                    sessions[i].run(None, feeds[i])
                    times[i].append((time.perf_counter() - start) * 1e3)
                bar.update()  # between rounds, never inside a timed run
    finally:
        if gc_was_enabled:
            gc.enable()
    del sessions
    entries = [BenchEntry(label, s, Latency.from_times(t)) for label, s, t in zip(labels, shapes, times)]
    for e in entries:
        e.speedup = entries[0].latency.median_ms / e.latency.median_ms if e.latency.median_ms > 0 else float("nan")
    if profile:
        for entry, model, feed in zip(entries, loaded, feeds):
            entry.op_times_ms = profile_ops(model, feed, provider=provider, threads=threads, warmup=warmup,
                                            runs=min(runs, MAX_PROFILED_RUNS))
    return BenchResult(entries, provider, threads, runs, warmup)


def _stub(model: onnx.ModelProto) -> onnx.ModelProto:
    stub = onnx.ModelProto()
    stub.graph.input.extend(_real_inputs(model))
    return stub


def _run(session, feed, label):
    try:
        session.run(None, feed)
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime failed to run {label} on inputs "
                             f"{ {k: list(v.shape) for k, v in feed.items()} }: {exc}") from exc


def profile_ops(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, provider: str = "CPUExecutionProvider",
                threads: int = 1, warmup: int = 5, runs: int = MAX_PROFILED_RUNS) -> dict[str, float]:
    """Milliseconds per run spent in each op type (largest first), from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(model, threads=threads, provider=provider,
                               profile_prefix=os.path.join(tmp, "onnxprune"))
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    return summarize_profile(events, skip_runs=warmup)


def summarize_profile(events: list[dict], skip_runs: int = 0) -> dict[str, float]:
    """Kernel time per op type in ms per run, ignoring the first `skip_runs` runs."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    if not kept:
        return {}
    start = kept[0]["ts"]
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e.get("ts", 0) >= start:
            total[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0) / 1e3
    per_run = {op: t / len(kept) for op, t in total.items()}
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]))
