"""onnxruntime sessions with fixed threads and a chosen execution provider."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import ProviderError
from onnxprune.ir.model_io import EXTERNAL_DATA_THRESHOLD, EXTERNAL_MIN_BYTES, copy_fields, has_external_data, \
    load_model, model_byte_size, write_model


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
        return session_in_place(model, opts, provider)
    return session_through_file(model, opts, provider)


# Initializers handed to onnxruntime as buffers rather than inside the serialised model: float tensors
# stored as raw bytes, at least EXTERNAL_MIN_BYTES long (shape constants and small vectors stay inline).
_IN_PLACE_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                   onnx.TensorProto.DOUBLE: np.float64}


def session_in_place(model: onnx.ModelProto, opts: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """A session on an in-memory model without serialising its weights: the graph goes to onnxruntime
    as a small header whose large float initializers are marked external, and their values as
    buffers over the tensors' bytes (SessionOptions.add_external_initializers), which onnxruntime
    reads in place. Same graph, same values, same kernels as a session on the serialised model (the
    outputs are bit-identical), without the serialisation and the parse of every weight: on
    BERT-base this halves the cost of opening the session."""
    header, names, buffers = _split_initializers(model)
    if not names:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    opts.add_external_initializers(names, values)
    session = ort.InferenceSession(header.SerializeToString(), opts, providers=[provider])
    session._onnxprune_buffers = values  # read in place: they must live as long as the session
    return session


def _split_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """(header, names, values): the header is `model` with its large raw float initializers marked
    external (no bytes); `model` itself is not changed."""
    if sys.byteorder != "little":  # raw_data is little-endian: the buffers would need a byte swap
        return model, [], []
    graph = model.graph
    inputs = {i.name for i in graph.input}  # an initializer that is also an input is a default: left inline
    header = onnx.ModelProto()
    copy_fields(model, header, skip="graph")
    copy_fields(graph, header.graph, skip="initializer")
    names: list[str] = []
    buffers: list[np.ndarray] = []
    for t in graph.initializer:
        dtype = _IN_PLACE_TYPES.get(t.data_type)
        if dtype is None or t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") \
                or t.name in inputs:
            header.graph.initializer.append(t)
            continue
        numel = 1
        for d in t.dims:
            numel *= d
        if numel * np.dtype(dtype).itemsize < EXTERNAL_MIN_BYTES:
            header.graph.initializer.append(t)
            continue
        raw = t.raw_data
        if len(raw) != numel * np.dtype(dtype).itemsize:  # malformed: onnxruntime's own parse says so
            header.graph.initializer.append(t)
            continue
        ref = header.graph.initializer.add()
        ref.name = t.name
        ref.data_type = t.data_type
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "onnxprune-in-memory"), ("offset", "0"), ("length", str(len(raw)))):
            ref.external_data.add(key=key, value=value)
        names.append(t.name)
        buffers.append(np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims)))
    return header, names, buffers


def session_through_file(model: onnx.ModelProto, opts: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """>2 GB: protobuf cannot serialise it in memory, so go through a temporary
    file with external data, written without changing `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        write_model(model, path, external_data=True)
        return ort.InferenceSession(path, opts, providers=[provider])
