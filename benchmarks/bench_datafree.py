"""Accuracy without data: the bundled digits model pruned by every data-free criterion.

    python benchmarks/bench_datafree.py [--targets 0.1,0.3,0.5] [--criteria l1,l2,fpgm,bn_scale,random]
                                        [--strategies uniform,global]

For each criterion and strategy it prunes `models/digits_resnet.onnx` to
each FLOPs target (`onnxprune prune --target-flops T --criterion C
--strategy S`, default round-to 8, no calibration data) and measures top-1
on `models/digits_test.npz` (450 held-out images). A cell shows the top-1
accuracy and, in brackets, the share of FLOPs actually removed (the
allocator moves in steps of 8 channels, so it can overshoot a target).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnxprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table

MODEL = ROOT / "models" / "digits_resnet.onnx"
TEST = ROOT / "models" / "digits_test.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.1,0.3,0.5", help="fractions of FLOPs to remove")
    parser.add_argument("--criteria", default="l1,l2,fpgm,bn_scale,random")
    parser.add_argument("--strategies", default="uniform,global")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    dense = onnxprune.evaluate(MODEL, str(TEST), threads=1).accuracy["top1"]
    rows = []
    for criterion in args.criteria.split(","):
        for strategy in args.strategies.split(","):
            row = [criterion, strategy]
            for target in targets:
                try:
                    pruned, report = onnxprune.prune(MODEL, None, target_flops=target, criterion=criterion,
                                                     strategy=strategy)
                except onnxprune.OnnxPruneError as exc:
                    row.append(f"– ({type(exc).__name__})")
                    continue
                top1 = onnxprune.evaluate(pruned, str(TEST), threads=1).accuracy["top1"]
                row.append(f"{top1:.2%} ({1 - report.after.flops / report.before.flops:.1%})")
            rows.append(row)
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\ndigits_resnet, dense top-1 {dense:.2%} on digits_test.npz (450 images); no calibration data; "
          "cells: top-1 (FLOPs actually removed)\n")
    print(markdown_table(["criterion", "strategy", *(f"--target-flops {t:g}" for t in targets)], rows))


if __name__ == "__main__":
    main()
