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
from onnxprune.ir.subgraphs import subgraphs
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
                 profile_prefix: str | None = None, serialized: bytes | None = None) -> ort.InferenceSession:
    """The one way onnxprune opens an onnxruntime session (bytes, a file, or a
    ModelProto, whose weights may still be on disk).

    threads=0 lets onnxruntime choose; prepack=False skips the packed second
    copy of every weight (a session run once or twice); spinning=False keeps
    idle threads from spin-waiting (calibration does numpy work between runs on
    the same cores); profile_prefix turns on onnxruntime's profiler, writing its
    JSON trace to files starting with that prefix. `serialized`: the ModelProto's
    own bytes when the caller has them (validation does), used instead of
    serialising it again. An in-memory model run without graph optimisation
    (validation, the dense probe) hands its weights over in place
    (session_in_place)."""
    check_provider(provider)
    opts = session_options(threads=threads, optimize=optimize, prepack=prepack, spinning=spinning,
                           profile_prefix=profile_prefix)
    if isinstance(model, (bytes, str, os.PathLike)):  # serialized, or a file (its external data beside it)
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=[provider])
    if model_byte_size(model) < EXTERNAL_DATA_THRESHOLD and not has_external_data(model):
        if optimize or model_byte_size(model) < IN_PLACE_MIN_BYTES:
            # graph optimisations see the weights as they are in a file; a small model's are quicker
            # parsed than handed over
            return ort.InferenceSession(serialized or model.SerializeToString(), opts, providers=[provider])
        return session_in_place(model, opts, provider, serialized)
    return session_through_file(model, opts, provider)


def session_options(*, threads: int = 1, optimize: bool = True, prepack: bool = True, spinning: bool = True,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """make_session's options (see there)."""
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
    return opts


def session_through_file(model: onnx.ModelProto, opts: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """>2 GB: protobuf cannot serialise it in memory, so go through a temporary
    file with external data, written without changing `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        write_model(model, path, external_data=True)
        return ort.InferenceSession(path, opts, providers=[provider])


# Below this size a model's weights are quicker parsed by onnxruntime than handed over (a few ms either
# way; on ResNet-50, 100 MB, handing them over opens the session 3-5 times faster).
IN_PLACE_MIN_BYTES = 8 << 20

# Initializers fed to onnxruntime as buffers rather than inside the serialised model: float tensors
# stored as raw bytes, at least EXTERNAL_MIN_BYTES long (shape constants and small vectors stay inline).
_IN_PLACE_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                   onnx.TensorProto.DOUBLE: np.float64}


def session_in_place(model: onnx.ModelProto, opts: ort.SessionOptions, provider: str,
                     serialized: bytes | None = None) -> "ort.InferenceSession | WeightsFed":
    """A session on an in-memory model without serialising its weights or copying them: the graph goes
    to onnxruntime as a small header in which the large float initializers are graph inputs, and every
    run feeds them from buffers over the tensors' bytes, or over their place in `serialized` (the
    model's bytes, when given). onnxruntime reads fed inputs where they are; initializers handed over
    (add_external_initializers) it copies into its own tensors (on BERT-base 0.2 s and 300 MB more).
    Same graph, same values, same kernels as a session on the serialised model, for a run without
    graph optimisation or prepacking (the outputs are bit-identical). Options that optimise or prepack
    get a session on the serialised model: both work on constant weights only."""
    if not _runs_as_written(opts):
        return ort.InferenceSession(serialized or model.SerializeToString(), opts, providers=[provider])
    return InPlaceModel.of(model, serialized).open(opts, provider)


def _runs_as_written(opts: ort.SessionOptions) -> bool:
    """No graph optimisation and no prepacking: a weight fed as an input runs the very kernels its
    initializer would."""
    try:
        unpacked = opts.get_session_config_entry("session.disable_prepacking") == "1"
    except Exception:  # onnxruntime raises when the entry was never set
        unpacked = False
    return unpacked and opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


class WeightsFed:
    """An onnxruntime session whose large weights are graph inputs, fed with every run: `run` and
    `get_inputs` show the model's own inputs only; everything else is the session's."""

    def __init__(self, session: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self._session, self._weights = session, weights

    def run(self, output_names, input_feed: dict, run_options=None) -> list:
        return self._session.run(output_names, {**input_feed, **self._weights}, run_options)

    def get_inputs(self) -> list:
        return [i for i in self._session.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class InPlaceModel:
    """A ModelProto taken apart for session_in_place: a header (the model with its large weights as
    graph inputs) and the weights' buffers. Taking it apart reads the model; opening the session reads
    only the header."""

    def __init__(self, header: onnx.ModelProto, names: list[str], buffers: list[np.ndarray],
                 whole: bytes | None = None):
        self.header, self.names, self.buffers = header, names, buffers
        self._whole = whole  # the model serialised, when no weight could be handed over

    @classmethod
    def of(cls, model: onnx.ModelProto, serialized: bytes | None = None) -> "InPlaceModel":
        """`model` taken apart; a small one (under IN_PLACE_MIN_BYTES) is serialised whole instead."""
        if model_byte_size(model) < IN_PLACE_MIN_BYTES:
            header = onnx.ModelProto()
            header.CopyFrom(model)
            return cls(header, [], [], serialized or model.SerializeToString())
        header, names, buffers = _split_initializers(model, serialized)
        if names:
            return cls(header, names, buffers)
        return cls(header, [], [], serialized or model.SerializeToString())

    def open(self, opts: ort.SessionOptions, provider: str) -> "ort.InferenceSession | WeightsFed":
        if not self.names:
            return ort.InferenceSession(self._whole, opts, providers=[provider])
        session = ort.InferenceSession(self.header.SerializeToString(), opts, providers=[provider])
        return WeightsFed(session, dict(zip(self.names, self.buffers)))


def _read_by_other_domains(graph: onnx.GraphProto) -> set[str]:
    """What nodes outside the default domain read (in subgraphs too): contrib kernels may require a
    weight to be a constant (MatMulNBits' scales), so theirs stay initializers."""
    names: set[str] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names |= _read_by_other_domains(sub)
    return names


def _split_initializers(model: onnx.ModelProto, serialized: bytes | None = None
                        ) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """(header, names, values): the header is `model` with its large raw float initializers turned into
    graph inputs (declared with their type and dims, no bytes); `model` itself is not changed. Values
    are views of `serialized` where it holds the tensor, else copies of the tensors' raw bytes."""
    if sys.byteorder != "little":  # raw_data is little-endian: the buffers would need a byte swap
        return model, [], []
    graph = model.graph
    # an initializer that is also an input is a default: left inline; so is a contrib op's weight
    inline = {i.name for i in graph.input} | _read_by_other_domains(graph)
    places = raw_data_places(serialized) if serialized is not None else {}
    header = onnx.ModelProto()
    copy_fields(model, header, skip="graph")
    copy_fields(graph, header.graph, skip="initializer")
    names: list[str] = []
    buffers: list[np.ndarray] = []
    for t in graph.initializer:
        dtype = _IN_PLACE_TYPES.get(t.data_type)
        if dtype is None or t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") \
                or t.name in inline:
            header.graph.initializer.append(t)
            continue
        numel = 1
        for d in t.dims:
            numel *= d
        size = numel * np.dtype(dtype).itemsize
        if size < EXTERNAL_MIN_BYTES:
            header.graph.initializer.append(t)
            continue
        place = places.get(t.name)
        if place is not None and place[1] == size:
            values = np.frombuffer(serialized, dtype=dtype, count=numel, offset=place[0])
        else:
            raw = t.raw_data
            if len(raw) != size:  # malformed: onnxruntime's own parse says so
                header.graph.initializer.append(t)
                continue
            values = np.frombuffer(raw, dtype=dtype)
        header.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        names.append(t.name)
        buffers.append(values.reshape(tuple(t.dims)))
    return header, names, buffers


# -- where a serialised model keeps its initializers' raw bytes --------------------------------------------
# Protobuf's wire format: a field is a varint key (number << 3 | wire type) and its value; wire type 2
# (length-delimited: messages, strings, bytes) is a varint length and that many bytes.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9


def raw_data_places(data: bytes) -> dict[str, tuple[int, int]]:
    """initializer name -> (offset, length) of its raw_data in `data`, a serialised ModelProto: the
    main graph's initializers that hold raw bytes (within a tensor a field's last value wins, as in
    protobuf; a name two initializers share is left out). Empty when `data` does not parse as expected."""
    try:
        places: dict[str, tuple[int, int] | None] = {}
        graph = None
        for number, start, end in _fields(data, 0, len(data)):
            if number == _MODEL_GRAPH and start >= 0:
                graph = (start, end)
        if graph is None:
            return {}
        for number, start, end in _fields(data, *graph):
            if number != _GRAPH_INITIALIZER or start < 0:
                continue
            name = raw = None
            for field, f_start, f_end in _fields(data, start, end):
                if field == _TENSOR_NAME and f_start >= 0:
                    name = data[f_start:f_end].decode("utf-8")
                elif field == _TENSOR_RAW_DATA and f_start >= 0:
                    raw = (f_start, f_end - f_start)
            if name is not None and raw is not None:
                places[name] = None if name in places else raw  # a name given twice: neither is trusted
        return {name: place for name, place in places.items() if place is not None}
    except (IndexError, ValueError, UnicodeDecodeError):
        return {}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes, pos: int, end: int):
    """(field number, start, end) of each field in data[pos:end]; start is -1 for a field that is not
    length-delimited (its value is skipped)."""
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield number, pos, pos + length
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
            yield number, -1, -1
        elif wire == 1:
            pos += 8
            yield number, -1, -1
        elif wire == 5:
            pos += 4
            yield number, -1, -1
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("truncated field")
