"""Data-aware pruning and reconstruction: held-out accuracy, time and memory.

    python benchmarks/bench_calibration.py [--models digits,clutter] [--targets 0.3,0.5]
                                           [--criteria l1,apoz,mean_act,flap,wanda,thinet,ablation]
                                           [--strategy uniform|global]
    python benchmarks/bench_calibration.py --memory 256,2048      # calibration peak RSS at two sample counts
    python benchmarks/bench_calibration.py --resnet50 512         # statistics on the zoo ResNet-50 (random weights)

The accuracy table prunes each trained model to each FLOPs target with each
criterion (uniform allocation), then measures top-1 on its test split (never
used for calibration) without reconstruction, with the statistics passes
only (bias compensation, BatchNorm recalibration, output statistics
matching: no least squares), and with the full reconstruction (least
squares first), all calibrated on the model's calibration split:

* digits: `models/digits_resnet.onnx` (BN folded), `digits_calib.npz` (270),
  `digits_test.npz` (450);
* clutter: `models/clutter_vgg.onnx` (BN nodes kept), `clutter_calib.npz`
  (512), `clutter_test.npz` (1000).

Each row runs in a fresh process: "prune s" is the criterion's calibration
statistics + scoring + rewrite + full reconstruction, "peak RSS" the
process's peak resident memory at that point (imports included). `--memory`
runs, in a fresh process per sample count, the channel statistics of every
sink and then the full reconstruction of a 50%-FLOPs l1 pruning on the same
samples (the calibration split repeated to the count; "RSS before" includes
the data), and reports the peak RSS after each.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table  # noqa: E402

MODELS = {
    "digits": ("digits_resnet.onnx", "digits_calib.npz", "digits_test.npz"),
    "clutter": ("clutter_vgg.onnx", "clutter_calib.npz", "clutter_test.npz"),
}


def model_paths(name: str) -> tuple[str, str, str]:
    return tuple(str(ROOT / "models" / f) for f in MODELS[name])


def removed_roots(analysis, keep) -> set[int]:
    removed = set()
    for gid, kept in keep.items():
        flags = np.ones(analysis.groups[gid].size, dtype=bool)
        flags[kept] = False
        removed.update(int(r) for r in analysis.groups[gid].roots[flags])
    return removed


def prune_row(name: str, criterion: str, target: float, round_to: int, strategy: str = "uniform") -> dict:
    """Runs in a fresh process: one (model, criterion, target) row."""
    import resource

    from onnxprune.passes.reconstruction import reconstruct
    from onnxprune.cost import model_cost
    from onnxprune.importance import score_groups
    from onnxprune.importance.data_aware import criterion_statistics
    from onnxprune.passes.apply_plan import ApplyPlan
    from onnxprune.pipeline import build_analysis, prepare
    from onnxprune.runtime.evaluate import evaluate
    from onnxprune.runtime.inputs import concrete_input_shapes
    from onnxprune.strategy.allocate import Target, allocate
    from onnxprune.strategy.estimate import CostEstimator

    path, calib, test = model_paths(name)
    clock = time.perf_counter()
    dense, _ = prepare(path)
    analysis = build_analysis(dense)
    fixed = concrete_input_shapes(dense, None)
    cost = model_cost(dense, fixed)
    stats = criterion_statistics(criterion, dense, analysis, calib)
    stats_seconds = time.perf_counter() - clock
    scores = score_groups(analysis, analysis.prunable_groups(), criterion, stats=stats)
    keep = allocate(analysis, scores, Target(None, target, None, strategy, 0.9, round_to, [], []),
                    CostEstimator(analysis, cost))
    removed = removed_roots(analysis, keep)
    pruned = ApplyPlan(analysis, removed)(dense).model
    full, _ = reconstruct(dense, pruned, analysis, removed, calib)
    seconds = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    light, _ = reconstruct(dense, pruned, analysis, removed, calib, least_squares=False)
    top1 = {k: evaluate(m, test).accuracy["top1"] for k, m in (("dense", dense), ("free", pruned),
                                                               ("light", light), ("full", full))}
    return {"removed": 1 - model_cost(pruned, fixed).flops / cost.flops, "top1": top1,
            "stats_seconds": stats_seconds, "seconds": seconds, "peak": peak}


def accuracy_table(name: str, targets: list[float], criteria: list[str], round_to: int,
                   strategy: str = "uniform") -> str:
    rows, dense = [], None
    for target in targets:
        for criterion in criteria:
            out = subprocess.run([sys.executable, __file__, "--row", name, criterion, str(target), str(round_to),
                                  strategy], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            dense = r["top1"]["dense"]
            rows.append([f"{target:.0%}", f"{r['removed']:.1%}", criterion, f"{r['top1']['free']:.2%}",
                         f"{r['top1']['light']:.2%}", f"{r['top1']['full']:.2%}", f"{r['stats_seconds']:.1f}",
                         f"{r['seconds']:.1f}", f"{r['peak']:.0f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    _, calib, test = MODELS[name]
    header = ["target", "FLOPs removed", "criterion", "no reconstruction", "statistics passes only",
              "full reconstruction", "criterion statistics s", "prune s", "peak RSS MiB"]
    return (f"{MODELS[name][0]} ({strategy} allocation): dense top-1 {dense:.2%} on {test}; calibration on {calib}\n\n"
            + markdown_table(header, rows))


def child(kind: str, samples: int) -> None:
    """Runs in a fresh process: calibrate, print seconds and peak RSS (MiB)."""
    import resource

    from onnxprune.calibration import calibration_statistics
    from onnxprune.pipeline import build_analysis, prepare

    if kind in MODELS:
        path, calib, _ = model_paths(kind)
        model, _ = prepare(path)
        base = np.load(calib)["input"]
        data = {"input": np.resize(base, (samples,) + base.shape[1:])}  # the split repeated to `samples`
    else:
        from onnxprune.testing import materialize_zoo_model, zoo_models

        model, _ = prepare(materialize_zoo_model(next(p for p in zoo_models() if p.stem == "light_resnet50")))
        name = model.graph.input[0].name
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        data = {name: np.broadcast_to(image, (samples, *shape))}  # one image repeated: no memory for the data
    analysis = build_analysis(model)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stats = calibration_statistics(model, analysis, data)
    seconds = time.perf_counter() - clock
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    recon_seconds = recon_peak = float("nan")
    if kind in MODELS:  # then prune 50% of FLOPs (l1) and reconstruct on the same samples
        from onnxprune.passes.reconstruction import reconstruct
        from onnxprune.cost import model_cost
        from onnxprune.importance import score_groups
        from onnxprune.passes.apply_plan import ApplyPlan
        from onnxprune.runtime.inputs import concrete_input_shapes
        from onnxprune.strategy.allocate import Target, allocate
        from onnxprune.strategy.estimate import CostEstimator

        cost = model_cost(model, concrete_input_shapes(model, None))
        keep = allocate(analysis, score_groups(analysis, analysis.prunable_groups(), "l1"),
                        Target(None, 0.5, None, "uniform", 0.9, 1, [], []), CostEstimator(analysis, cost))
        removed = removed_roots(analysis, keep)
        clock = time.perf_counter()
        reconstruct(model, ApplyPlan(analysis, removed)(model).model, analysis, removed, data, max_samples=None)
        recon_seconds = time.perf_counter() - clock
        recon_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(seconds, after.ru_maxrss / 1024, base_rss, stats.passes, len(stats.channels), cpu, recon_seconds,
          recon_peak)


def measure(kind: str, samples: int) -> list[str]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(samples)], capture_output=True,
                         text=True, check=True).stdout.split()
    seconds, peak, before, passes, tensors, cpu, recon_seconds, recon_peak = (float(v) for v in out)
    recon = ["-", "-"] if np.isnan(recon_seconds) else [f"{recon_seconds:.1f}", f"{recon_peak:.0f}"]
    return [kind, str(samples), f"{tensors:.0f}", f"{passes:.0f}", f"{seconds:.1f}", f"{cpu:.1f}", f"{peak:.0f}",
            f"{before:.0f}"] + recon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,clutter")
    parser.add_argument("--targets", default="0.3,0.5")
    parser.add_argument("--criteria", default="l1,apoz,mean_act,flap,wanda,thinet,ablation")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--strategy", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--row", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--memory", help="sample counts for the calibration memory check of --models, e.g. 270,2160")
    parser.add_argument("--resnet50", type=int, help="calibration samples for the zoo ResNet-50 timing")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if args.row:
        name, criterion, target, round_to, strategy = args.row
        print(json.dumps(prune_row(name, criterion, float(target), int(round_to), strategy)))
        return
    header = ["model", "samples", "tensors", "passes", "statistics wall s", "CPU s", "peak RSS MiB",
              "RSS before MiB", "reconstruction s", "peak RSS after reconstruction MiB"]
    if args.memory or args.resnet50:
        rows = [measure(name, int(n)) for name in args.models.split(",")
                for n in (args.memory or "").split(",") if n]
        if args.resnet50:
            rows.append(measure("resnet50", args.resnet50))
        print(markdown_table(header, rows))
        return
    for name in args.models.split(","):
        print(accuracy_table(name, [float(t) for t in args.targets.split(",")], args.criteria.split(","),
                             args.round_to, args.strategy) + "\n")


if __name__ == "__main__":
    main()
