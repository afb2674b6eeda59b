"""Facts about the bundled trained models that models/README.md quotes, measured on the committed files.

    python benchmarks/example_model.py

For `models/digits_resnet.onnx` (the example) and `models/clutter_vgg.onnx`
(the calibration benchmark's second model): op counts, parameters and MACs
(onnxprune's cost model: MACs of Conv and Gemm; digits has BatchNorm folded
into the convs, so it holds fewer parameters than the PyTorch model that
`models/train_digits.py` counts, while clutter keeps its BN running
statistics, so it holds more), and top-1 with onnxruntime on the shipped
splits, `models/<name>_test.npz` and `models/<name>_calib.npz`.
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

MODELS = {"digits": ROOT / "models" / "digits_resnet.onnx", "clutter": ROOT / "models" / "clutter_vgg.onnx"}


def facts(prefix: str, path: Path) -> str:
    model = onnx.load(str(path))
    cost = model_cost(model, concrete_input_shapes(model))
    ops = Counter(n.op_type for n in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rows = [["opset", str(opset)], ["ops", ", ".join(f"{k}:{v}" for k, v in ops.items())],
            ["parameters (ONNX initializers)", f"{cost.params:,}"], ["MACs per image", f"{cost.macs / 1e6:.1f} M"],
            ["FLOPs per image", f"{cost.flops / 1e6:.1f} M"]]
    for split in ("test", "calib"):
        result = onnxprune.evaluate(path, str(ROOT / "models" / f"{prefix}_{split}.npz"), threads=1)
        top1 = result.accuracy["top1"]
        rows.append([f"top-1 on {prefix}_{split}.npz",
                     f"{top1:.2%} ({round(top1 * result.samples)}/{result.samples})"])
    return markdown_table([f"models/{path.name}", "value"], rows)


def main() -> None:
    print("\n\n".join(facts(prefix, path) for prefix, path in MODELS.items()))


if __name__ == "__main__":
    main()
