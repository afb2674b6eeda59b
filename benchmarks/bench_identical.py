"""Same input, same options: is the pruned model byte-identical to an earlier commit's, and how long did it take?

    python benchmarks/bench_identical.py [--base REV] [--repeats 3] [--cases zoo,fixtures,digits,transformers]

The safety net for refactors that must not change behaviour. Every case (the
onnx package's light model zoo with seeded random weights, the committed
fixtures, the trained example with and without calibration data, the
transformer fixtures, a plan replay, a layer drop) is pruned through the
public API (`onnxprune.prune(path, output, **options)`) by two source trees in
separate processes: the working tree, and REV checked out into a temporary git
worktree. The written files (model, external data, saved plan) are hashed;
a case is "identical" when both trees wrote the same bytes. The processes
alternate (base, current, base, ...) `--repeats` times and each case's prune
time is the median of its runs, so machine drift hits both alike.

Prints one Markdown table: case, identical, base s, current s, current/base.
Exit status 1 if any case differs (or fails in one tree only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
HEADS = {"heads": 0.25, "kv-groups": 0.5, "neurons": 0.3}


def cases() -> dict[str, tuple[str, dict]]:
    """name -> (model source, prune options). A source "zoo:NAME" is materialised with seed 0."""
    from onnxprune.testing import zoo_models

    out: dict[str, tuple[str, dict]] = {}
    for path in zoo_models():
        name = path.stem.replace("light_", "")
        out[f"zoo/{name} flops-0.5"] = (f"zoo:{path}", {"target_flops": 0.5})
        out[f"zoo/{name} ratio-0.3 global fpgm"] = (f"zoo:{path}", {"ratio": 0.3, "strategy": "global",
                                                                    "criterion": "fpgm"})
    out["zoo/resnet50 lossless"] = (out["zoo/resnet50 flops-0.5"][0], {"lossless": True})
    for path in sorted((MODELS / "fixtures").glob("*.onnx")):
        out[f"fixtures/{path.stem} ratio-0.3"] = (str(path), {"ratio": 0.3})
    for folder in ("transformers", "ort_fused"):
        for path in sorted((MODELS / "fixtures" / folder).glob("*.onnx")):
            out[f"{folder}/{path.stem} heads"] = (str(path), {"ratio": HEADS})
    out["transformers/bert_encoder_legacy hidden"] = (str(MODELS / "fixtures/transformers/bert_encoder_legacy.onnx"),
                                                      {"ratio": {"hidden": 0.25, "neurons": 0.3},
                                                       "prune_hidden": True})
    digits = str(MODELS / "digits_resnet.onnx")
    calib = str(MODELS / "digits_calib.npz")
    out["digits flops-0.5"] = (digits, {"target_flops": 0.5})
    # strategy named: with calib the default became adaptive (2026-11-30), and trees before it are compared
    out["digits flops-0.5 calib"] = (digits, {"target_flops": 0.5, "calib": calib, "calib_samples": 64,
                                              "strategy": "uniform"})
    out["digits flops-0.5 flap calib"] = (digits, {"target_flops": 0.5, "criterion": "flap", "calib": calib,
                                                   "calib_samples": 64, "strategy": "uniform"})
    out["digits drop-1 then ratio-0.3"] = (digits, {"drop_layers": 1, "ratio": 0.3})
    out["digits plan replay"] = (digits, {"plan": "<plan of digits flops-0.5>"})
    out["clutter_vgg params-0.4 bn_scale"] = (str(MODELS / "clutter_vgg.onnx"),
                                              {"target_params": 0.4, "criterion": "bn_scale"})
    return out


def _source_path(source: str, scratch: Path) -> str:
    if not source.startswith("zoo:"):
        return source
    import onnx

    from onnxprune.testing import materialize_zoo_model

    zoo = Path(source[4:])
    path = scratch / f"{zoo.stem}.onnx"
    if not path.exists():
        onnx.save(materialize_zoo_model(zoo), str(path))
    return str(path)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def worker(selected: list[str], scratch: Path) -> None:
    """Runs in the tree under test (PYTHONPATH): one JSON line per case on stdout."""
    import onnxprune

    known = cases()
    plans: dict[str, str] = {}
    for name in selected:
        source, options = known[name]
        options = dict(options)
        out_dir = Path(tempfile.mkdtemp(dir=scratch))
        if options.get("plan", "").startswith("<plan of "):
            options["plan"] = plans[options["plan"][len("<plan of "):-1]]
        else:
            options["save_plan"] = str(out_dir / "plan.json")
        path = _source_path(source, scratch)
        start = time.perf_counter()
        try:
            onnxprune.prune(path, str(out_dir / "pruned.onnx"), **options)
            result = {"digest": _digest(out_dir)}
        except Exception as exc:  # a failure is a result too: it must match across trees
            result = {"digest": f"error {type(exc).__name__}: {str(exc)[:200]}"}
        result.update(case=name, seconds=time.perf_counter() - start)
        if "save_plan" in options and Path(options["save_plan"]).exists():
            keep = scratch / f"plan-{len(plans)}.json"
            keep.write_bytes(Path(options["save_plan"]).read_bytes())
            plans[name] = str(keep)
        result["module"] = onnxprune.__file__
        print(json.dumps(result), flush=True)


def _run_tree(tree: Path, selected: list[str], scratch: Path) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", ONNXPRUNE_PROGRESS="0")
    run_dir = Path(tempfile.mkdtemp(dir=scratch))
    proc = subprocess.run([sys.executable, __file__, "--worker", "--scratch", str(run_dir), "--cases",
                           json.dumps(selected)], env=env, cwd=str(tree), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    strays = {r["module"] for r in rows if not Path(r["module"]).resolve().is_relative_to(tree.resolve())}
    if strays:  # an installed onnxprune shadowing PYTHONPATH would compare a tree with itself
        raise SystemExit(f"the worker for {tree} imported onnxprune from {strays.pop()}")
    return {r["case"]: r for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the commit to compare with (default HEAD)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree, alternating (default 3)")
    parser.add_argument("--cases", help="comma-separated prefixes of case names (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.cases), Path(args.scratch))
        return 0
    selected = [c for c in cases() if not args.cases or any(c.startswith(p) for p in args.cases.split(","))]
    if "digits plan replay" in selected and "digits flops-0.5" not in selected:
        selected.insert(selected.index("digits plan replay"), "digits flops-0.5")
    with tempfile.TemporaryDirectory(prefix="bench-identical-") as tmp:
        scratch = Path(tmp)
        base_tree = scratch / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            trees = {"base": base_tree, "current": ROOT}
            runs: dict[str, list[dict[str, dict]]] = {"base": [], "current": []}
            for i in range(args.repeats):
                for label, tree in trees.items():
                    runs[label].append(_run_tree(tree, selected, scratch))
                    print(f"run {i + 1}/{args.repeats} {label} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    return _print_table(selected, runs, args)


def _print_table(selected: list[str], runs: dict[str, list[dict[str, dict]]], args) -> int:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True,
                         text=True).stdout.strip()
    lines = [f"base {args.base} ({rev}) vs the working tree; median of {args.repeats} alternating runs per tree, "
             "one process per run, OMP_NUM_THREADS=1", "",
             "| case | identical | base s | current s | current / base |", "|---|---|---|---|---|"]
    differ = 0
    ratios = []
    for case in selected:
        digests = {label: {r[case]["digest"] for r in rs} for label, rs in runs.items()}
        same = digests["base"] == digests["current"] and len(digests["base"]) == 1
        differ += not same
        base_s = statistics.median(r[case]["seconds"] for r in runs["base"])
        cur_s = statistics.median(r[case]["seconds"] for r in runs["current"])
        ratios.append(cur_s / base_s)
        failed = next(iter(digests["current"])).startswith("error")
        verdict = ("yes" if same else "**NO**") + (" (both refuse)" if same and failed else "")
        lines.append(f"| {case} | {verdict} | {base_s:.2f} | {cur_s:.2f} | {cur_s / base_s:.2f} |")
    lines.append("")
    lines.append(f"{len(selected) - differ} of {len(selected)} cases identical; current/base time: median "
                 f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    print("\n".join(lines))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
