"""onnxruntime sessions with fixed threads and a chosen execution provider."""
from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

from onnxprune.ir.model_io import EXTERNAL_DATA_THRESHOLD, model_byte_size


def make_session(model: onnx.ModelProto | bytes, *, threads: int = 1, provider: str = "CPUExecutionProvider",
                 optimize: bool = True, prepack: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not prepack:  # validation runs once: skip the packed second copy of every weight
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=[provider])
    if model_byte_size(model) < EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
    with tempfile.TemporaryDirectory() as tmp:  # >2 GB: go through a file with external data
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, providers=[provider])
