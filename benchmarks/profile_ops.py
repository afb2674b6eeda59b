"""Where the time goes: onnxruntime time per op type, dense vs pruned.

    python benchmarks/profile_ops.py inception_v1 [--target-flops 0.5] [--runs 10]

Prunes one benchmark model (L1, uniform, round-to 8) and profiles both with
onnxprune.benchmark(profile=True): explains speed-ups smaller than the FLOP
reduction (LRN, Concat, per-op overhead).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnxprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    dense = benchmark_models([args.model])[args.model]
    pruned, _ = onnxprune.prune(dense, target_flops=args.target_flops)
    result = onnxprune.benchmark([dense, pruned], runs=args.runs, threads=1, profile=True)
    print(result.render_table())
    print(result.render_profile())


if __name__ == "__main__":
    main()
