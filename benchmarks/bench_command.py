"""Wall time and peak memory of the whole `onnxprune prune` command.

    python benchmarks/bench_command.py [--models resnet50,vgg19]

Each model is written to a temporary file, then `onnxprune prune` (analysis,
rewrite, validation, save) runs in a fresh process; peak RSS is that
process's maximum resident set size.  The import baseline (Python, numpy,
onnx, onnxruntime) is measured the same way and shown separately.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_models, markdown_table  # noqa: E402


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    script = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"r = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if out[2] != "0":
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg19")
    parser.add_argument("--target-flops", default="0.5")
    args = parser.parse_args()
    _, baseline = run_measured([sys.executable, "-c", "import onnxprune, onnxruntime, onnx, numpy"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in benchmark_models(args.models.split(",")).items():
            src, dst = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.pruned.onnx"
            onnx.save(model, src)
            del model
            size = src.stat().st_size / 2**20
            wall, peak = run_measured([sys.executable, "-m", "onnxprune", "prune", str(src), str(dst),
                                       "--target-flops", args.target_flops])
            rows.append([name, f"{size:.0f}", f"{wall:.1f}", f"{peak:.0f}", f"{peak / size:.2f}×",
                         f"{(peak - baseline) / size:.2f}×"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n`onnxprune prune --target-flops {args.target_flops}` in a fresh process; "
          f"import baseline {baseline:.0f} MiB\n")
    print(markdown_table(["model", "file MiB", "wall s", "peak RSS MiB", "peak / size", "(peak - baseline) / size"],
                         rows))


if __name__ == "__main__":
    main()
