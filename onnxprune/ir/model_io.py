"""Loading and saving ONNX files without ever touching the input.

* load: external data is read into memory, Constant nodes become initializers,
  and IR-3 style initializer-inputs are taken out of the graph inputs (they are
  weights, not user inputs).  The original conventions are remembered in
  `model.metadata`-free form via `LoadedModel` so `save_model` can restore them.
* save: written to a temporary file in the target folder and renamed into place,
  so a crash never leaves a half-written model; large models (or models that
  came with external data) are written with external data next to them.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelLoadError, OutputError

# protobuf cannot serialise messages of 2 GiB or more; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class SourceInfo:
    """What we need to remember about the file a model came from."""

    path: Path | None = None
    used_external_data: bool = False
    initializers_were_inputs: bool = False
    file_size: int = 0


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def load_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, SourceInfo]:
    """Read `path` (external data included) and normalise it for analysis."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file. Check the path to the ONNX model.")
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; re-export it."
        ) from exc
    used_external = _uses_external_data(header)
    file_size = _file_size(path, header)  # before loading: that clears the external-data locations
    try:
        if used_external:
            onnx.load_external_data_for_model(header, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot read its external data ({exc}). Keep the .data file "
            "next to the model under the name recorded in the model."
        ) from exc
    if not header.graph.node:
        raise ModelLoadError(f"{path}: the graph has no nodes; is this an ONNX model?")
    info = SourceInfo(path=path, used_external_data=used_external, file_size=file_size)
    info.initializers_were_inputs = normalise(header)
    return header, info


# Initializers above this size that feed several nodes are treated as truly
# tied weights (shared embeddings); smaller ones are exporter de-duplication.
TIED_WEIGHT_ELEMENTS = 1 << 20


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give each consumer its own copy of a shared small initializer.

    The legacy TorchScript exporter merges identical tensors (zero biases, unit
    BN variances) across unrelated layers; slicing one for a layer must not
    slice it for the others.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    seen: dict[str, int] = {}
    copies = 0
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1 or _numel(inits[name]) > TIED_WEIGHT_ELEMENTS:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__{node.name or node.op_type}_{seen[name]}"
            graph.initializer.append(copy)
            node.input[idx] = copy.name
            copies += 1
    return copies


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


# Weights at least this large go to the external data file.  Integer tensors
# always stay inline: onnxruntime reads shape constants (Reshape targets,
# ReduceMean axes) only from the model file itself.
EXTERNAL_MIN_BYTES = 1024


def _externalise(model: onnx.ModelProto, data_path: Path, location: str) -> onnx.ModelProto:
    """A copy of `model` whose large float initializers point into `data_path`.

    Written tensor by tensor, so no second in-memory copy of the weights is made.
    """
    header = onnx.ModelProto()
    copy_fields(model, header, skip="graph")
    graph = header.graph
    copy_fields(model.graph, graph, skip="initializer")
    offset = 0
    with open(data_path, "wb") as data:
        for t in model.graph.initializer:
            payload = t.raw_data if t.HasField("raw_data") else None
            if payload is None or len(payload) < EXTERNAL_MIN_BYTES or t.data_type not in _FLOAT_TYPES:
                graph.initializer.append(t)
                continue
            pad = (-offset) % 4096  # page-aligned, as onnx's own writer does
            data.write(b"\0" * pad)
            offset += pad
            data.write(payload)
            ref = graph.initializer.add()
            ref.name = t.name
            ref.data_type = t.data_type
            ref.dims.extend(t.dims)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            offset += len(payload)
    return header


def _default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; give the output the permissions a normal write would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    data = path.parent / (path.name + ".data")
    if data.exists():
        os.chmod(data, 0o666 & ~umask)


def copy_fields(src, dst, skip: str) -> None:
    """Copy every field of message `src` into `dst` except `skip` (a field name)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _file_size(path: Path, model: onnx.ModelProto) -> int:
    size = path.stat().st_size
    locations = {
        entry.value
        for t in model.graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            size += data.stat().st_size
    return size


def normalise(model: onnx.ModelProto) -> bool:
    """Constant nodes -> initializers, initializer-inputs -> plain initializers.

    Returns whether initializers were listed as graph inputs (IR < 4 convention),
    so that saving can restore it.
    """
    graph = model.graph
    kept_nodes = []
    for node in graph.node:
        tensor = _constant_node_value(node)
        if tensor is None:
            kept_nodes.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    if len(kept_nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept_nodes)
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    were_inputs = len(real_inputs) != len(graph.input)
    if were_inputs:
        del graph.input[:]
        graph.input.extend(real_inputs)
        if model.ir_version < 4:
            model.ir_version = 4
    return were_inputs


def _constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    import numpy as np

    if attr.name == "value":
        return onnx.TensorProto.FromString(attr.t.SerializeToString())
    if attr.name == "value_float":
        return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
    if attr.name == "value_floats":
        return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
    if attr.name == "value_int":
        return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
    if attr.name == "value_ints":
        return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None  # sparse tensors and strings stay as nodes


def model_byte_size(model: onnx.ModelProto) -> int:
    """Serialized size without materialising a >2 GB protobuf."""
    # ByteSize() counts without serialising (reading t.raw_data would copy the bytes)
    return sum(t.ByteSize() for t in model.graph.initializer) + 4096 * len(model.graph.node)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source: SourceInfo | None = None,
    external_data: bool | None = None,
    serialized: bytes | None = None,
) -> int:
    """Write `model` to `path` atomically; returns the bytes written.

    external_data=None chooses: external when the source used it or when the
    model would exceed protobuf's limit.
    """
    path = Path(path)
    if source is not None and source.path is not None:
        if path.resolve() == source.path.resolve():
            raise OutputError(
                f"{path}: refusing to overwrite the input model; choose another output path."
            )
    if not path.parent.exists():
        raise OutputError(f"{path.parent}: output folder does not exist.")
    if external_data is None:
        external_data = bool(source and source.used_external_data) or (
            model_byte_size(model) > EXTERNAL_DATA_THRESHOLD
        )
    to_write = model

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = path.name + ".data"
    tmp_data = tmp.parent / (tmp.name + ".data")
    try:
        if external_data:
            header = _externalise(to_write, tmp_data, data_name)
            onnx.save_model(header, str(tmp))
            os.replace(tmp_data, path.parent / data_name)
        elif serialized is not None:  # validation already serialised it: no second copy
            tmp.write_bytes(serialized)
        else:
            onnx.save_model(to_write, str(tmp))
        _default_permissions(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write the model ({exc}).") from exc
    size = path.stat().st_size
    if external_data:
        size += (path.parent / data_name).stat().st_size
    return size
