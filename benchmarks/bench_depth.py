"""Depth pruning: block influence of every residual layer and block, and what dropping costs.

    python benchmarks/bench_depth.py [--samples 8]

1. For each transformer fixture (models/fixtures/transformers, random weights)
   and ResNet-50 from onnx's light model zoo (seeded random weights): the block
   influence (1 - mean cosine similarity of input and output, on random inputs
   of the right shapes) of every droppable layer and sub-block, which layer
   `--drop-layers 1` removes, FLOPs kept, the cosine similarity of the pruned
   model's output to the dense one on the same random inputs, and the time
   `prune` took.
2. The bundled digits model: block influence on models/digits_calib.npz and
   top-1 on models/digits_test.npz after `--drop-layers 1` (without and with
   the reconstruction passes) and 2, vs dense.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import onnxprune
from onnxprune.calibration.influence import random_batches
from onnxprune.pipeline import prepare
from onnxprune.runtime.session import make_session
from onnxprune.strategy.depth import scan_blocks
from onnxprune.testing import ZOO_DIR, materialize_zoo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table

FIXTURES = ROOT / "models" / "fixtures" / "transformers"
DIGITS = ROOT / "models" / "digits_resnet.onnx"


def output_cosine(dense, pruned, samples: int) -> float:
    feeds, _ = next(random_batches(dense, samples, {}, seed=1, batch=samples))
    a = make_session(dense).run(None, feeds)[0].astype(np.float64).ravel()
    b = make_session(pruned).run(None, feeds)[0].astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="random inputs for block influence")
    args = parser.parse_args()
    models = {p.stem: p for p in sorted(FIXTURES.glob("*.onnx"))}
    models["resnet50 (zoo)"] = materialize_zoo_model(ZOO_DIR / "light_resnet50.onnx")
    rows = []
    for name, src in models.items():
        dense, _ = prepare(src)
        found = scan_blocks(dense)
        row = [name, str(len(found.candidates("layer"))), str(len(found.candidates("block"))),
               str(len(found.not_droppable("block")))]
        start = time.perf_counter()
        pruned, report = onnxprune.prune(dense, drop_layers=1)
        seconds = time.perf_counter() - start
        layers = ", ".join(f"{c['influence']:.3f}" for c in report.depth["candidates"])
        blocks = "–"
        if found.candidates("block"):
            _, by_block = onnxprune.prune(dense, drop_layers=1, drop_unit="block")
            blocks = ", ".join(f"{c['influence']:.3f}" for c in by_block.depth["candidates"])
        (gone,) = report.depth["dropped"]
        row += [layers, blocks, gone["name"], f"{report.after.flops / report.before.flops:.0%}",
                f"{output_cosine(dense, pruned, args.samples):.3f}", f"{seconds:.1f}"]
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    print(f"\nBlock influence on {args.samples} random inputs (layers, then sub-blocks, in graph order); "
          "`--drop-layers 1`\n")
    print(markdown_table(["model", "droppable layers", "droppable blocks", "not droppable", "layer influence",
                          "block influence", "dropped", "FLOPs kept", "output cosine", "prune s"], rows))

    test = str(ROOT / "models" / "digits_test.npz")
    calib = ROOT / "models" / "digits_calib.npz"
    dense_top1 = onnxprune.evaluate(DIGITS, test, threads=1).accuracy["top1"]
    rows = [["dense", "–", "–", f"{dense_top1:.2%}"]]
    off = {"least_squares": False, "bias_correction": False, "bn_recalibration": False}
    for n, repair in ((1, False), (1, True), (2, True)):
        setting = f"--drop-layers {n} --calib" + ("" if repair else " --no-least-squares --no-bias-correction "
                                                                   "--no-bn-recalibration")
        try:
            pruned, report = onnxprune.prune(DIGITS, drop_layers=n, calib=calib, **({} if repair else off))
        except onnxprune.OnnxPruneError as exc:
            rows.append([setting, "refused", str(exc).split(":")[0], "–"])
            continue
        top1 = onnxprune.evaluate(pruned, test, threads=1).accuracy["top1"]
        dropped = ", ".join(f"{d['name']} ({d['influence']:.3f})" for d in report.depth["dropped"])
        rows.append([setting, dropped, f"{report.after.flops / report.before.flops:.0%}", f"{top1:.2%}"])
    print("\ndigits_resnet: block influence on digits_calib.npz, top-1 on digits_test.npz (450 images), without "
          "and with the reconstruction passes (refit to the outputs from before the drop)\n")
    print(markdown_table(["setting", "dropped (influence)", "FLOPs kept", "top-1"], rows))


if __name__ == "__main__":
    main()
