"""How long the repair after pruning takes (the reconstruction passes), and what it restores.

    python benchmarks/bench_repair.py [--models bert-small,minilm,digits,clutter] [--runs 3] [--base REV]
                                      [--samples 256] [--cache DIR] [--export-python PY]

Models, each pruned with calibration data (the default passes: least squares, bias
compensation, BN recalibration, each guarded on a held-out fifth of the samples):

* bert-small: a 22 M-parameter BERT-style sentence encoder (6 layers of 12 heads, FFN 1536,
  hidden 384: all-MiniLM-L6-v2's shape) exported with the TorchScript exporter by
  models/export_transformers.py --size small (needs torch: --export-python names an
  interpreter that has it). Random weights, so only the time means something. Calibration:
  --samples sequences of 128 token ids (seeded), 16 to 128 of them real and the rest padding.
  Pruned with ratio heads=0.25,neurons=0.3.
* minilm: the real-weights MiniLM-L3 encoder of ../shared/realzoo (minilm-l3-fixed, a fixed
  [1, 64] export whose Gemms read tokens as rows), with bench_real.py's man-page calibration
  texts; target_flops 0.3.
* digits, clutter: the trained models of models/ with their calibration splits; target_flops 0.5.

Every (tree, model) is one `onnxprune.prune` call in a fresh process (the working tree, and with
--base, REV checked out into a temporary git worktree), trees alternating run by run; the table
gives medians over --runs: the reconstruction's own seconds (its record in the report), the whole
call's wall time, and the held-out relative output error before and after the repair (the same
in both trees unless the repair itself changed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_stages import run_worker  # noqa: E402  (one process per run, in the tree under test)


def _bert_small(cache: Path, python: str, samples: int) -> tuple[str, str, dict]:
    model = cache / "bert_encoder_legacy.onnx"
    if not model.exists():
        export = [python, str(ROOT / "models" / "export_transformers.py"), "--size", "small", "--exporters",
                  "legacy", "--only", "bert_encoder", "--out", str(cache)]
        print("exporting:", " ".join(export), file=sys.stderr, flush=True)
        subprocess.run(export, check=True, stdout=sys.stderr, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    calib = cache / f"bert_small_calib_{samples}.npz"
    if not calib.exists():
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 30000, size=(samples, 128), dtype=np.int64)
        mask = (np.arange(128)[None, :] < rng.integers(16, 129, size=(samples, 1))).astype(np.int64)
        np.savez(calib, input_ids=ids * mask, attention_mask=mask)
    return str(model), str(calib), {"ratio": {"heads": 0.25, "neurons": 0.3}}


def _minilm(samples: int) -> tuple[str, str, dict]:
    import bench_real

    task = bench_real.TASKS["minilm"]
    zoo = bench_real.zoo_dir(None)
    calib, _ = task.build(task, zoo, False)
    return str(task.model(zoo)), str(calib), {"target_flops": 0.3, "calib_samples": samples}


def model_cases(names: list[str], cache: Path, python: str, samples: int) -> dict[str, tuple[str, str, dict]]:
    """name -> (model path, calibration data path, prune options)."""
    cases = {}
    for name in names:
        if name == "bert-small":
            cases[name] = _bert_small(cache, python, samples)
        elif name == "minilm":
            cases[name] = _minilm(samples)
        elif name in ("digits", "clutter"):
            stem = {"digits": "digits_resnet", "clutter": "clutter_vgg"}[name]
            cases[name] = (str(ROOT / "models" / f"{stem}.onnx"), str(ROOT / "models" / f"{name}_calib.npz"),
                           {"target_flops": 0.5, "calib_samples": samples})
        else:
            raise SystemExit(f"unknown model {name}: bert-small, minilm, digits, clutter")
    return cases


def worker(cases: dict[str, list]) -> None:
    """Runs in the tree under test (PYTHONPATH): one JSON line per model on stdout."""
    import onnxprune

    for name, (model, calib, options) in cases.items():
        start = time.perf_counter()
        # uniform: the repair of one plan (the default with calib, adaptive, repairs two)
        _, report = onnxprune.prune(model, None, calib=calib, strategy="uniform", **options)
        wall = time.perf_counter() - start
        repair = next(p for p in report.passes if p["name"] == "reconstruction")
        details = repair.get("details", {})
        print(json.dumps({"model": name, "repair": repair["seconds"], "total": wall, "module": onnxprune.__file__,
                          "samples": details.get("fit_samples", 0) + details.get("holdout_samples", 0),
                          "before": details.get("fidelity_before"), "after": details.get("fidelity_after")}),
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-small,minilm,digits,clutter")
    parser.add_argument("--runs", type=int, default=3, help="runs per tree, alternating (default 3)")
    parser.add_argument("--base", help="also time this commit, interleaved with the working tree")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--cache", help="folder for the exported model and its data (default: temporary)")
    parser.add_argument("--export-python", default=sys.executable, help="interpreter with torch for bert-small")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-repair-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        cases = model_cases(args.models.split(","), cache, args.export_python, args.samples)
        trees = {"current": ROOT}
        if args.base:
            trees = {"base": Path(tmp) / "base", "current": ROOT}
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees["base"]),
                            args.base], check=True)
        runs: dict[str, list[dict[str, dict]]] = {label: [] for label in trees}
        try:
            for i in range(args.runs):
                for label, tree in trees.items():
                    rows = run_worker(tree, __file__, ["--worker", json.dumps(cases)])
                    runs[label].append({r["model"]: r for r in rows})
                    print(f"run {i + 1}/{args.runs} {label} done", file=sys.stderr, flush=True)
        finally:
            if args.base:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["base"])],
                               check=False)
    print(_table(cases, runs, args))
    return 0


def _table(cases: dict, runs: dict[str, list[dict[str, dict]]], args) -> str:
    base = f"base {args.base} vs the working tree, alternating; " if args.base else ""
    lines = [f"prune with calibration data: {base}median of {args.runs} runs, one process per run, "
             f"{os.cpu_count()} cores; seconds; held-out error: relative squared error of the outputs against "
             "the dense model's on the held-out calibration samples", "",
             "| model | options | samples | tree | repair s | prune s | held-out error before | after |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for name, (_, _, options) in cases.items():
        medians = {}
        for label, rs in runs.items():
            rows = [r[name] for r in rs]
            medians[label] = {k: statistics.median(r[k] for r in rows) for k in ("repair", "total")}
            first = rows[0]
            err = "" if first["before"] is None else f"{first['before']:.4g} | {first['after']:.4g}"
            lines.append(f"| {name} | {json.dumps(options)} | {first['samples']} | {label} | "
                         f"{medians[label]['repair']:.1f} | {medians[label]['total']:.1f} | {err} |")
        if "base" in medians:
            lines.append(f"| {name} | | | base / current | **{medians['base']['repair'] / medians['current']['repair']:.1f}x**"
                         f" | {medians['base']['total'] / medians['current']['total']:.1f}x | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
