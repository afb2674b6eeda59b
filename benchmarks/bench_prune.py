"""Params, FLOPs and onnxruntime CPU latency before and after pruning.

    python benchmarks/bench_prune.py [--models resnet50,vgg19] [--threads 1] [--runs 20]

For every model and setting it prunes with onnxprune (L1, uniform), then times
the dense and pruned models side by side in one process (interleaved runs,
fixed intra-op threads, warm-up, median).  Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys

import onnxprune
from onnxprune.text import human

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import benchmark_models, markdown_table, paired_latency  # noqa: E402

SETTINGS = {
    "ratio 0.3": {"ratio": 0.3},
    "ratio 0.5": {"ratio": 0.5},
    "FLOPs -50%": {"target_flops": 0.5},
    # the same with other width roundings (default 8): odd widths run slower
    "FLOPs -50% round-to 1": {"target_flops": 0.5, "round_to": 1},
    "FLOPs -50% round-to 16": {"target_flops": 0.5, "round_to": 16},
}
DEFAULT_SETTINGS = ["ratio 0.3", "ratio 0.5", "FLOPs -50%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated (default: all)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma-separated from {list(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    models = benchmark_models(args.models.split(",") if args.models else None)
    rows = []
    for name, model in models.items():
        for setting in args.settings.split(","):
            try:
                pruned, report = onnxprune.prune(model, **SETTINGS[setting])
            except onnxprune.PlanError as exc:  # e.g. too few prunable groups for the target
                rows.append([name, setting, "–", str(exc).split(" (")[0], "", "", "", ""])
                continue
            dense_t, pruned_t = paired_latency([model, pruned], args.threads, args.runs)
            b, a = report.before, report.after
            rows.append([
                name, setting,
                f"{human(b.params)} → {human(a.params)}",
                f"{human(b.flops)} → {human(a.flops)} ({a.flops / b.flops:.0%})",
                f"{dense_t['median']:.2f}", f"{pruned_t['median']:.2f}",
                f"{dense_t['median'] / pruned_t['median']:.2f}×",
                f"{sum(report.timings.values()):.1f}",
            ])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nonnxruntime {__import__('onnxruntime').__version__}, CPU, intra-op threads {args.threads}, "
          f"median of {args.runs} interleaved runs (ms)\n")
    print(markdown_table(["model", "setting", "params", "FLOPs (kept)", "dense ms", "pruned ms", "speed-up",
                          "prune s"], rows))


if __name__ == "__main__":
    main()
