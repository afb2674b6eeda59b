"""Where `prune` spends its time: seconds per stage on ResNet-50 and BERT-base, optionally against a base commit.

    python benchmarks/bench_stages.py [--models resnet50,bert-base] [--runs 5] [--base REV]
                                      [--options '{"target_flops": 0.5}'] [--cache DIR] [--export-python PY]

Models: "resnet50" is the onnx package's light ResNet-50 with seeded random
weights (onnxprune.testing.materialize_zoo_model, seed 0; 1x3x224x224);
"bert-base" is BERT-base (110 M parameters, 12 layers of 12 heads, FFN 3072)
exported with the TorchScript exporter by models/export_transformers.py (needs
torch: --export-python names an interpreter that has it; the export is kept in
--cache when given); any other name is a path to an ONNX file. Each is pruned
through the public API, `onnxprune.prune(path, output, **options)` (default
options: target_flops=0.5, no calibration), output written to disk.

Every run is a fresh process per source tree (the working tree, and with
--base, REV checked out into a temporary git worktree), which imports
onnxprune, prunes a small model once to warm up, then prunes each model once
and reports the report's stage clock (load, analyze, score, allocate, rewrite,
validate, save), the wall time of the call and the CPU time the process spent
in it (all threads: less sensitive than wall time to other work on the machine). Each prune starts after
os.sync(), so no earlier run's output is still being written back. Trees alternate run by run
(base, current, base, ...) and every number is the median over --runs, so
drift on a shared machine hits both alike.

Prints one Markdown table: model, tree, seconds per stage, total.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["load", "analyze", "score", "allocate", "rewrite", "validate", "save"]
COLUMNS = STAGES + ["total", "cpu"]
WARM_UP = ROOT / "models" / "digits_resnet.onnx"


def _resnet50(cache: Path) -> Path:
    path = cache / "resnet50.onnx"
    if not path.exists():
        import onnx

        from onnxprune.testing import materialize_zoo_model, zoo_models

        zoo = next(p for p in zoo_models() if p.stem == "light_resnet50")
        onnx.save(materialize_zoo_model(zoo, seed=0), str(path))
    return path


def _bert_base(cache: Path, python: str) -> Path:
    path = cache / "bert_encoder_legacy.onnx"
    if not path.exists():
        export = [python, str(ROOT / "models" / "export_transformers.py"), "--size", "base", "--exporters", "legacy",
                  "--only", "bert_encoder", "--out", str(cache)]
        print("exporting:", " ".join(export), file=sys.stderr, flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(export, check=True, stdout=sys.stderr, env=env)
    return path


def model_paths(names: list[str], cache: Path, python: str) -> dict[str, str]:
    out = {}
    for name in names:
        if name == "resnet50":
            out[name] = str(_resnet50(cache))
        elif name == "bert-base":
            out[name] = str(_bert_base(cache, python))
        elif Path(name).is_file():
            out[Path(name).stem] = str(Path(name).resolve())
        else:
            raise SystemExit(f"unknown model {name}: resnet50, bert-base, or the path of an ONNX file")
    return out


def worker(models: dict[str, str], options: dict) -> None:
    """Runs in the tree under test (PYTHONPATH): one JSON line per model on stdout."""
    import onnxprune

    scratch = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    try:
        onnxprune.prune(str(WARM_UP), str(scratch / "warm.onnx"), **options)  # imports, first sessions
        for name, path in models.items():
            out = scratch / name
            out.mkdir()
            # the disk settles first: an earlier run's output still being written back would slow this
            # run's write by up to a second on a VM disk, a cost of the benchmark, not of one prune
            os.sync()
            start, cpu = time.perf_counter(), time.process_time()
            _, report = onnxprune.prune(path, str(out / "pruned.onnx"), **options)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            row = {s: report.timings.get(s, 0.0) for s in STAGES}
            row.update(model=name, total=wall, cpu=cpu, module=onnxprune.__file__,
                       flops_kept=report.after.flops / report.before.flops)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_worker(tree: Path, script: str, worker_args: list[str]) -> list[dict]:
    """Runs `script worker_args...` in a fresh process that imports onnxprune from `tree`; the JSON lines it
    prints (each with the onnxprune module it imported under "module")."""
    env = dict(os.environ, PYTHONPATH=str(tree), ONNXPRUNE_PROGRESS="0")
    proc = subprocess.run([sys.executable, script, *worker_args], env=env, cwd=str(tree), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:  # an installed onnxprune shadowing PYTHONPATH would time the wrong tree
        if not Path(r["module"]).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the worker for {tree} imported onnxprune from {r['module']}")
    return rows


def _run_tree(tree: Path, models: dict[str, str], options: dict) -> dict[str, dict]:
    rows = run_worker(tree, __file__, ["--worker", json.dumps(models), "--options", json.dumps(options)])
    return {r["model"]: r for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,bert-base", help="comma-separated (default resnet50,bert-base)")
    parser.add_argument("--runs", type=int, default=5, help="runs per tree, alternating (default 5)")
    parser.add_argument("--base", help="also time this commit, interleaved with the working tree")
    parser.add_argument("--options", default='{"target_flops": 0.5}', help="prune options as JSON")
    parser.add_argument("--cache", help="folder for the materialised and exported models (default: temporary)")
    parser.add_argument("--export-python", default=sys.executable,
                        help="interpreter with torch for the BERT-base export (default: this one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = json.loads(args.options)
    if args.worker:
        worker(json.loads(args.worker), options)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT))
        models = model_paths(args.models.split(","), cache, args.export_python)
        trees = {"current": ROOT}
        if args.base:
            base_tree = Path(tmp) / "base"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                           check=True)
            trees = {"base": base_tree, "current": ROOT}
        runs: dict[str, list[dict[str, dict]]] = {label: [] for label in trees}
        try:
            for i in range(args.runs):
                for label, tree in trees.items():
                    runs[label].append(_run_tree(tree, models, options))
                    print(f"run {i + 1}/{args.runs} {label} done", file=sys.stderr, flush=True)
        finally:
            if args.base:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    print(_table(models, runs, args, options))
    return 0


def _table(models: dict[str, str], runs: dict[str, list[dict[str, dict]]], args, options: dict) -> str:
    cores = os.cpu_count()
    base = ""
    if args.base:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True,
                             text=True).stdout.strip()
        base = f"base {args.base} ({rev}) vs the working tree, alternating; "
    lines = [f"prune({json.dumps(options)}): {base}median of {args.runs} runs, one process per run, {cores} cores; "
             "seconds (total: wall time of the call; cpu: CPU time of the process over it, every thread)", "",
             "| model | tree | " + " | ".join(STAGES) + " | total | cpu |",
             "|---|---|" + "---:|" * (len(STAGES) + 2)]
    for name in models:
        medians = {}
        for label, rs in runs.items():
            medians[label] = {k: statistics.median(r[name][k] for r in rs) for k in COLUMNS}
            lines.append(f"| {name} | {label} | " + " | ".join(f"{medians[label][k]:.2f}" for k in STAGES)
                         + f" | **{medians[label]['total']:.2f}** | {medians[label]['cpu']:.2f} |")
        if "base" in medians:
            ratio = [medians["current"][k] / medians["base"][k] if medians["base"][k] else float("nan")
                     for k in COLUMNS]
            lines.append(f"| {name} | current / base | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
