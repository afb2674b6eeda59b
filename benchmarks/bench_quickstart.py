"""The README's quick start, measured: the main job on the bundled digits model.

    python benchmarks/bench_quickstart.py [--runs 50]

Runs what the quick-start command runs,

    onnxprune prune models/digits_resnet.onnx digits_pruned.onnx --target-flops 0.5 \
        --calib models/digits_calib.npz --validate-data models/digits_test.npz --max-accuracy-drop 0.02

through the Python API with the same options (nothing is written), and
prints the before/after table that command prints, as Markdown. Then the
same pruning without calibration data (no reconstruction, no gate), for
comparison, and one summary table of both.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import onnxprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table

MODEL, CALIB, TEST = "models/digits_resnet.onnx", "models/digits_calib.npz", "models/digits_test.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=50, help="interleaved latency runs (the command's default: 50)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the command's relative paths
    common = {"target_flops": args.target_flops, "validate_data": TEST, "latency_runs": args.runs}
    _, quick = onnxprune.prune(MODEL, None, calib=CALIB, max_accuracy_drop=0.02, **common)
    _, free = onnxprune.prune(MODEL, None, **common)
    print(f"`onnxprune prune models/digits_resnet.onnx digits_pruned.onnx --target-flops {args.target_flops:g} "
          f"--calib models/digits_calib.npz --validate-data models/digits_test.npz --max-accuracy-drop 0.02`:\n")
    print(quick.render_markdown() + "\n")
    rows = []
    for setting, report in (("with --calib (quick start)", quick), ("without data", free)):
        b, a, q = report.before, report.after, report.quality
        rows.append([setting, f"{1 - a.flops / b.flops:.1%}", f"{1 - a.params / b.params:.1%}",
                     f"{q.before:.2%} → {q.after:.2%}", f"{report.latency.speedup:.2f}×"])
    print(markdown_table([f"--target-flops {args.target_flops:g}", "FLOPs removed", "params removed",
                          "top-1 on digits_test.npz (450)", "speed-up"], rows))


if __name__ == "__main__":
    main()
