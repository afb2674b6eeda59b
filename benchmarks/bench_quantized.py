"""Pruning an int8 model as it is vs pruning its float original and quantizing the result.

    python benchmarks/bench_quantized.py [--targets 0.1,0.3,0.5] [--models digits_resnet,clutter_vgg]
                                         [--criterion l1] [--round-to 8] [--format qdq|qoperator] [--calib]
                                         [--weights per-tensor,per-channel] [--reduce-range]

For each trained model of `models/` and each FLOPs target, two int8 models made with the same
onnxruntime quantization settings (quantize_static, QDQ or QOperator format, per-tensor and
per-channel weights, calibrated on 64 samples of the model's calibration split):

* int8 then pruned: `quantize(float)`, then `onnxprune prune --target-flops T` on the int8 model;
* pruned then int8: `onnxprune prune --target-flops T` on the float model, then `quantize(pruned)`;

Both formats take FLOPs targets: QLinearConv, QLinearMatMul and QGemm count the multiply-accumulates
of the float ops they replace, and QuantizeLinear/DequantizeLinear count nothing, so a target means
the same on the int8 model as on its float original.

and their top-1 accuracy on the held-out split.  A data-aware criterion reads the calibration
split.  Without `--calib` the reconstruction passes stay off on both sides; with it both sides prune
with `--calib` (the model's calibration split) and the default reconstruction: the float model is
repaired in float and then quantized, the int8 model is repaired in place (a QDQ weight is refit on
its dequantized values and requantized; a QOperator op from its dequantized input, its weights
written back as integers the same way).  The last column is the
difference in points (int8-then-pruned minus pruned-then-int8).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

import onnxprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table

CALIBRATION_SAMPLES = 64


class SplitReader(CalibrationDataReader):
    def __init__(self, path: Path, count: int):
        data = np.load(path)
        name = next(k for k in data.files if k != "labels")
        values = data[name].astype(np.float32)  # clutter_calib.npz stores float16
        self.samples = iter([{"input": values[i:i + 1]} for i in range(min(count, len(values)))])

    def get_next(self):
        return next(self.samples, None)


def quantize(model: onnx.ModelProto, calib: Path, per_channel: bool, folder: Path,
             quant_format: QuantFormat = QuantFormat.QDQ, reduce_range: bool = False) -> onnx.ModelProto:
    src, dst = folder / "float.onnx", folder / "int8.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), SplitReader(calib, CALIBRATION_SAMPLES), quant_format=quant_format,
                    per_channel=per_channel, reduce_range=reduce_range)
    return onnx.load(dst)


def top1(model, test: Path) -> float:
    return onnxprune.evaluate(model, str(test), threads=1).accuracy["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.1,0.3,0.5", help="fractions of FLOPs to remove")
    parser.add_argument("--models", default="digits_resnet,clutter_vgg")
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--format", choices=("qdq", "qoperator"), default="qdq")
    parser.add_argument("--weights", default="per-tensor,per-channel", help="weight scales to quantize with")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights: x86 int8 kernels add pairs of 8-bit products in int16 and saturate "
                             "otherwise (clutter_vgg per-channel loses 11 points of top-1 to it)")
    parser.add_argument("--calib", action="store_true",
                        help="repair both orders with the calibration split (default reconstruction passes)")
    args = parser.parse_args()
    quant_format = QuantFormat.QOperator if args.format == "qoperator" else QuantFormat.QDQ
    amount = "target_flops"
    rows = []
    for name in args.models.split(","):
        stem = name.split("_")[0]
        path, calib, test = (ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{stem}_calib.npz",
                             ROOT / "models" / f"{stem}_test.npz")
        dense = onnx.load(path)
        for per_channel in [w == "per-channel" for w in args.weights.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                int8 = quantize(dense, calib, per_channel, folder, quant_format, args.reduce_range)
                scales = "per-channel" if per_channel else "per-tensor"
                rows.append([name, scales, "0 (dense)", f"{top1(dense, test):.2%}", f"{top1(int8, test):.2%}", ""])
                for target in (float(t) for t in args.targets.split(",")):
                    # uniform on both sides: one allocation rule, so the orders differ only in what int8 changes
                    options = {amount: target, "criterion": args.criterion, "round_to": args.round_to,
                               "strategy": "uniform"}
                    if args.calib:
                        options.update(calib=str(calib))
                    elif args.criterion not in ("l1", "l2", "fpgm", "bn_scale", "random"):
                        options.update(calib=str(calib), least_squares=False, bias_correction=False,
                                       bn_recalibration=False)
                    direct, _ = onnxprune.prune(int8, **options)
                    pruned_float, _ = onnxprune.prune(dense, **options)
                    after = quantize(pruned_float, calib, per_channel, folder, quant_format, args.reduce_range)
                    a, b = top1(direct, test), top1(after, test)
                    rows.append([name, scales, f"{target:g}", f"{b:.2%}", f"{a:.2%}", f"{(a - b) * 100:+.2f}"])
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    repair = "--calib (default reconstruction on both sides)" if args.calib else "no reconstruction"
    print(f"\nquantize_static {args.format}{', reduce_range' if args.reduce_range else ''}, 64 calibration samples; "
          f"--criterion {args.criterion}, "
          f"--round-to {args.round_to}, {repair}; top-1 on the held-out split (dense row: float and int8 "
          "before pruning)\n")
    print(markdown_table(["model", "weights", "--" + amount.replace("_", "-"), "pruned then int8", "int8 then pruned",
                          "difference (points)"], rows))


if __name__ == "__main__":
    main()
