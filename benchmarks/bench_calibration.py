"""Data-aware pruning and reconstruction: held-out accuracy, time and memory.

    python benchmarks/bench_calibration.py [--targets 0.3,0.5] [--criteria l1,apoz,mean_act,flap,wanda,ablation,thinet]
    python benchmarks/bench_calibration.py --memory 270,2160      # calibration peak RSS at two sample counts
    python benchmarks/bench_calibration.py --resnet50 512         # statistics on the zoo ResNet-50 (random weights)

The accuracy table prunes the bundled digits model (`models/digits_resnet.onnx`)
to each FLOPs target with each criterion (uniform allocation), then measures
top-1 on `models/digits_test.npz` (never used for calibration) without
reconstruction, with bias compensation + BN recalibration only, and with the
full reconstruction (least squares first), all calibrated on
`models/digits_calib.npz`. Each data-aware criterion's statistics (channel
statistics; ablation sensitivities; next-layer Gram matrices for thinet) are
collected once and timed. Memory figures are the peak RSS of a fresh process
running only the calibration.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table  # noqa: E402

DIGITS = ROOT / "models" / "digits_resnet.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"


def removed_roots(analysis, keep) -> set[int]:
    removed = set()
    for gid, kept in keep.items():
        flags = np.ones(analysis.groups[gid].size, dtype=bool)
        flags[kept] = False
        removed.update(int(r) for r in analysis.groups[gid].roots[flags])
    return removed


def accuracy_table(targets: list[float], criteria: list[str], round_to: int) -> str:
    from onnxprune.calibration import reconstruct
    from onnxprune.cost import model_cost
    from onnxprune.importance import CRITERIA, score_groups
    from onnxprune.importance.data_aware import criterion_statistics
    from onnxprune.passes.apply_plan import apply_removal
    from onnxprune.pipeline import build_analysis, prepare
    from onnxprune.runtime.evaluate import evaluate
    from onnxprune.runtime.inputs import concrete_input_shapes
    from onnxprune.strategy.allocate import Target, allocate
    from onnxprune.strategy.estimate import CostEstimator

    dense, _ = prepare(str(DIGITS))
    analysis = build_analysis(dense)
    fixed = concrete_input_shapes(dense, None)
    cost = model_cost(dense, fixed)
    collected: dict = {}  # collector -> (statistics, seconds)
    for criterion in criteria:
        collect = getattr(CRITERIA[criterion], "collect", None)
        if collect is not None and collect not in collected:
            clock = time.perf_counter()
            collected[collect] = (criterion_statistics(criterion, dense, analysis, str(CALIB)),
                                  time.perf_counter() - clock)
    dense_acc = evaluate(dense, str(TEST)).accuracy["top1"]
    rows = []
    for target in targets:
        for criterion in criteria:
            collect = getattr(CRITERIA[criterion], "collect", None)
            stats, stats_seconds = collected.get(collect, (None, 0.0))
            scores = score_groups(analysis, analysis.prunable_groups(), criterion, stats=stats)
            keep = allocate(analysis, scores, Target(None, target, None, "uniform", 0.9, round_to, [], []),
                            CostEstimator(analysis, cost))
            removed = removed_roots(analysis, keep)
            pruned = apply_removal(dense, analysis, removed)
            gone = 1 - model_cost(pruned, fixed).flops / cost.flops
            free = evaluate(pruned, str(TEST)).accuracy["top1"]
            light, _ = reconstruct(dense, pruned, analysis, removed, str(CALIB), least_squares=False)
            clock = time.perf_counter()
            full, report = reconstruct(dense, pruned, analysis, removed, str(CALIB))
            seconds = time.perf_counter() - clock
            rows.append([f"{target:.0%}", f"{gone:.1%}", criterion, f"{free:.2%}",
                         f"{evaluate(light, str(TEST)).accuracy['top1']:.2%}",
                         f"{evaluate(full, str(TEST)).accuracy['top1']:.2%}", f"{stats_seconds:.1f}", f"{seconds:.1f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["target", "FLOPs removed", "criterion", "no reconstruction", "bias comp. + BN",
              "least squares + bias + BN", "criterion statistics s", "reconstruction s"]
    return (f"digits_resnet, dense top-1 {dense_acc:.2%} on digits_test.npz (450 images); calibration on "
            "270 images (ablation: 64 of them)\n\n" + markdown_table(header, rows))


def child(kind: str, samples: int) -> None:
    """Runs in a fresh process: calibrate, print seconds and peak RSS (MiB)."""
    import resource

    from onnxprune.calibration import calibration_statistics
    from onnxprune.pipeline import build_analysis, prepare

    if kind == "digits":
        model, _ = prepare(str(DIGITS))
        base = np.load(CALIB)["input"]
        data = {"input": np.resize(base, (samples,) + base.shape[1:])}
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
    print(seconds, after.ru_maxrss / 1024, base_rss, stats.passes, len(stats.channels), cpu)


def measure(kind: str, samples: int) -> list[str]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(samples)], capture_output=True,
                         text=True, check=True).stdout.split()
    seconds, peak, before, passes, tensors, cpu = out
    return [kind, str(samples), tensors, passes, f"{float(seconds):.1f}", f"{float(cpu):.1f}", f"{float(peak):.0f}",
            f"{float(before):.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.3,0.5")
    parser.add_argument("--criteria", default="l1,apoz,mean_act,flap,wanda")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--memory", help="sample counts for the digits calibration memory check, e.g. 270,2160")
    parser.add_argument("--resnet50", type=int, help="calibration samples for the zoo ResNet-50 timing")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    header = ["model", "samples", "tensors", "passes", "wall s", "CPU s", "peak RSS MiB", "RSS before MiB"]
    if args.memory or args.resnet50:
        rows = [measure("digits", int(n)) for n in (args.memory or "").split(",") if n]
        if args.resnet50:
            rows.append(measure("resnet50", args.resnet50))
        print(markdown_table(header, rows))
        return
    print(accuracy_table([float(t) for t in args.targets.split(",")], args.criteria.split(","), args.round_to))


if __name__ == "__main__":
    main()
