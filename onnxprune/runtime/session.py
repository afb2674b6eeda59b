"""onnxruntime sessions with fixed threads and a chosen execution provider."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxprune.errors import ProviderError
from onnxprune.ir.model_io import EXTERNAL_DATA_THRESHOLD, has_external_data, load_model, model_byte_size, write_model


def load_for_runtime(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """(model, display name) for eval and bench: a path is loaded with its external
    data (ModelLoadError if unreadable); a ModelProto is used as it is."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>"
    loaded, _ = load_model(model)
    return loaded, str(Path(model))


def session_source(model: str | os.PathLike | onnx.ModelProto, loaded: onnx.ModelProto
                   ) -> str | onnx.ModelProto:
    """What to open a session on: the user's file itself when they gave a path (onnxruntime reads its
    external data in place), else the ModelProto (whose weights may still be on disk, copied to a
    temporary file by make_session)."""
    return str(model) if isinstance(model, (str, os.PathLike)) else loaded


def check_provider(provider: str) -> None:
    """Raise ProviderError naming the providers this onnxruntime build has."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderError(
            f"execution provider '{provider}' is not available in this onnxruntime "
            f"({ort.__version__}); available: {', '.join(available)}. Install the onnxruntime "
            "package built for it (e.g. onnxruntime-gpu for CUDAExecutionProvider)."
        )


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, *, threads: int = 1, provider: str = "CPUExecutionProvider",
                 optimize: bool = True, prepack: bool = True, spinning: bool = True,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """The one way onnxprune opens an onnxruntime session (bytes, a file, or a
    ModelProto, whose weights may still be on disk).

    threads=0 lets onnxruntime choose; prepack=False skips the packed second
    copy of every weight (a session run once or twice); spinning=False keeps
    idle threads from spin-waiting (calibration does numpy work between runs on
    the same cores); profile_prefix turns on onnxruntime's profiler, writing its
    JSON trace to files starting with that prefix."""
    check_provider(provider)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not prepack:  # validation runs once: skip the packed second copy of every weight
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if isinstance(model, (bytes, str, os.PathLike)):  # serialized, or a file (its external data beside it)
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=[provider])
    if model_byte_size(model) < EXTERNAL_DATA_THRESHOLD and not has_external_data(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
    return session_through_file(model, opts, provider)


def session_through_file(model: onnx.ModelProto, opts: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """>2 GB: protobuf cannot serialise it in memory, so go through a temporary
    file with external data, written without changing `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        write_model(model, path, external_data=True)
        return ort.InferenceSession(path, opts, providers=[provider])
