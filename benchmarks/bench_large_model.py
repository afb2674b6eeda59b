"""A model over 2 GB with one external file per tensor: `analyze` and `prune`
wall time and peak memory, and the output loaded and run from disk in a new process.

    python benchmarks/bench_large_model.py [--dir DIR] [--keep] [--layers 22]

The model is a LLaMA-architecture decoder with TinyLlama-1.1B's sizes and
random weights (onnxprune.testing.write_llama_decoder: 4.4 GB of float32 in 202
files, written one tensor at a time). Each command runs in a fresh process;
peak RSS is that process's maximum resident set size. Targets (issue 10):
analyze under 10 s and 1 GB; prune under 30 s and 1.5x the model's size.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_command import run_measured  # noqa: E402
from common import markdown_table  # noqa: E402

from onnxprune.testing import LlamaShape, write_llama_decoder  # noqa: E402

RUN_FROM_DISK = (
    "import sys, numpy as np, onnxruntime as ort\n"
    "s = ort.InferenceSession(sys.argv[1])\n"
    "print(s.run(None, {'input_ids': np.arange(8, dtype=np.int64).reshape(1, 8)})[0].shape)\n"
)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="work folder (default: a temporary one); the model is reused if there")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama-1.1B, 4.4 GB)")
    parser.add_argument("--ratio", default="kv-groups=0.25,neurons=0.3")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="onnxprune-large-"))
    src_dir, out_dir = work / "model", work / "out"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / "model.onnx"
    try:
        if not src.exists():
            print(f"writing the model to {src_dir} ...", file=sys.stderr, flush=True)
            write_llama_decoder(src, LlamaShape(layers=args.layers))
        size = folder_size(src_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        out = out_dir / "pruned.onnx"
        cli = [sys.executable, "-m", "onnxprune"]
        _, baseline = run_measured([sys.executable, "-c", "import onnxprune, onnxruntime, onnx, numpy"])
        rows = []
        for name, cmd in (("analyze", [*cli, "analyze", str(src)]),
                          (f"prune --ratio {args.ratio}", [*cli, "prune", str(src), str(out), "--ratio", args.ratio])):
            wall, peak = run_measured(cmd)
            rows.append([name, f"{wall:.1f}", f"{peak:.0f}", f"{peak * 2**20 / size:.2f}×"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        wall, peak = run_measured([sys.executable, "-c", RUN_FROM_DISK, str(out)])
        shape = subprocess.run([sys.executable, "-c", RUN_FROM_DISK, str(out)], capture_output=True, text=True,
                               check=True).stdout.strip()
        rows.append([f"load + run the output in a new process: logits {shape}", f"{wall:.1f}", f"{peak:.0f}",
                     f"{peak * 2**20 / size:.2f}×"])
        files = sorted(p.name for p in out_dir.iterdir())
        print(f"\nLLaMA-architecture decoder, {LlamaShape(layers=args.layers).params() / 1e9:.2f} B parameters, "
              f"{size / 2**30:.2f} GiB in {len(list(src_dir.iterdir())) - 1} external files; output: "
              f"{', '.join(files)} ({folder_size(out_dir) / 2**30:.2f} GiB); import baseline {baseline:.0f} MiB\n")
        print(markdown_table(["command (fresh process)", "wall s", "peak RSS MiB", "peak / model size"], rows))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
