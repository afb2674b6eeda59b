"""Shared pieces of the benchmark scripts: models to measure and a latency timer."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.runtime.inputs import concrete_input_shapes, random_inputs
from onnxprune.runtime.session import make_session
from onnxprune.testing import materialize_zoo_model, zoo_models

ROOT = Path(__file__).resolve().parent.parent


def benchmark_models(names: list[str] | None = None) -> dict[str, onnx.ModelProto]:
    """The bundled example plus the onnx package's model-zoo graphs (random weights)."""
    models = {"digits_resnet": onnx.load(str(ROOT / "models" / "digits_resnet.onnx"))}
    for path in zoo_models():
        models[path.stem.replace("light_", "")] = None  # materialised lazily
    chosen = names or list(models)
    out = {}
    for name in chosen:
        if name not in models:
            raise SystemExit(f"unknown model {name}; choose from {sorted(models)}")
        out[name] = models[name] if models[name] is not None else materialize_zoo_model(
            next(p for p in zoo_models() if p.stem == f"light_{name}"))
    return out


def paired_latency(models: list, threads: int, runs: int, warmup: int = 3,
                   feeds: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Median/p90/min latency in ms of each model (ModelProto or path), runs interleaved so
    drift hits all alike; `feeds` (the same for all) or random inputs of the models' shapes."""
    sessions = [make_session(m, threads=threads) for m in models]
    if feeds is not None:
        feeds = [feeds] * len(models)
    else:
        feeds = [random_inputs(m, concrete_input_shapes(m)) for m in models]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t) * 1e3)
    return [{"median": statistics.median(t), "p90": float(np.percentile(t, 90)), "min": min(t)} for t in times]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
