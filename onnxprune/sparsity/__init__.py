"""Weight-level sparsity: zero individual weights of Conv/Gemm/MatMul (unstructured or N:M).

    from onnxprune.sparsity import sparsify

    model, report = sparsify("model.onnx", "sparse.onnx", pattern="2:4", calib="calib.npz")
    print(report.render_table())

Unlike `prune`, nothing is removed: shapes stay, weights become zeros, so
onnxruntime's CPU and CUDA providers run the model at the dense speed. What it
buys is a smaller compressed file and, for 2:4, TensorRT's sparse kernels.

Modules: `masks` (patterns, the reduction-axis layout, mask selection),
`sparsegpt` (the OBS update from a Gram matrix), `layers` (which weights,
one weight's solve), `sequential` (SparseGPT level by level on the partly
sparsified model), `api` (the command's pipeline), `report`, `cli`.
"""
from onnxprune.sparsity.api import sparsify
from onnxprune.sparsity.layers import CRITERIA, LayerResult
from onnxprune.sparsity.masks import Layout, Pattern, nm_violations
from onnxprune.sparsity.report import SparsifyReport

__all__ = ["CRITERIA", "LayerResult", "Layout", "Pattern", "SparsifyReport", "nm_violations", "sparsify"]
