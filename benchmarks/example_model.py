"""Facts about the bundled example that models/README.md quotes, measured on the committed files.

    python benchmarks/example_model.py

Op counts, parameters and MACs of `models/digits_resnet.onnx` (onnxprune's
cost model: MACs of Conv and Gemm; the file has BatchNorm folded into the
convs, so it holds fewer parameters than the PyTorch model that
`models/train_digits.py` counts), and its top-1 accuracy with onnxruntime on
the shipped splits, `models/digits_test.npz` and `models/digits_calib.npz`.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import onnx

import onnxprune
from onnxprune.cost import model_cost
from onnxprune.runtime.inputs import concrete_input_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table

MODEL = ROOT / "models" / "digits_resnet.onnx"


def main() -> None:
    model = onnx.load(str(MODEL))
    cost = model_cost(model, concrete_input_shapes(model))
    ops = Counter(n.op_type for n in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rows = [["opset", str(opset)], ["ops", ", ".join(f"{k}:{v}" for k, v in ops.items())],
            ["parameters (ONNX initializers)", f"{cost.params:,}"], ["MACs per image", f"{cost.macs / 1e6:.1f} M"],
            ["FLOPs per image", f"{cost.flops / 1e6:.1f} M"]]
    for split in ("test", "calib"):
        result = onnxprune.evaluate(MODEL, str(ROOT / "models" / f"digits_{split}.npz"), threads=1)
        top1 = result.accuracy["top1"]
        rows.append([f"top-1 on digits_{split}.npz", f"{top1:.2%} ({round(top1 * result.samples)}/{result.samples})"])
    print(markdown_table(["models/digits_resnet.onnx", "value"], rows))


if __name__ == "__main__":
    main()
