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

import hashlib
import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import ModelLoadError, OnnxPruneError, OutputError
from onnxprune.ir.subgraphs import outer_names

# protobuf cannot serialise messages of 2 GiB or more; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class SourceInfo:
    """What we need to remember about the file a model came from."""

    path: Path | None = None
    used_external_data: bool = False
    initializers_were_inputs: bool = False
    file_size: int = 0
    data_files: tuple[str, ...] = ()  # external data files, relative to the model's folder
    value_info: bool = True  # whether it listed intermediate shapes (the output then lists them again)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def load_model(path: str | os.PathLike, before_data: Callable[[SourceInfo], None] | None = None
               ) -> tuple[onnx.ModelProto, SourceInfo]:
    """Read `path` and normalise it for analysis.

    External data is NOT read: each external tensor keeps its reference, with
    the location made absolute, and its values are memory-mapped when a pass
    asks for them (`external_values`), so analysing a 4 GB model reads only
    the graph. Writers copy external tensors file to file (`_externalise`).
    `before_data` is called with what the header says of the file, before any
    work on the weights: checks that can fail early go there.
    """
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
    data_files = tuple(sorted(_data_locations(header)))
    info = SourceInfo(path=path, used_external_data=used_external, file_size=file_size, data_files=data_files)
    if before_data is not None:
        before_data(info)
    if used_external:  # the weights stay on disk: read (memory-mapped) when a pass needs them
        resolve_external_data(header, path)
    if not header.graph.node:
        raise ModelLoadError(f"{path}: the graph has no nodes; is this an ONNX model?")
    info.initializers_were_inputs = normalise(header)
    info.value_info = len(header.graph.value_info) > 0
    return header, info


# Which shared initializers get one copy per reader.  The legacy TorchScript
# exporter merges every pair of identical tensors, so unrelated layers end up
# reading one zero bias, one unit BN variance, one shape constant; slicing it
# for one layer must not slice it for the other, and coupling the two layers'
# channel groups through it would be wrong.  Those are vectors: a copy costs
# O(width), nothing next to the weights.  Matrices (ALBERT's shared layers, a
# recurrence's Gemm weight, a tied embedding table) cost O(width^2) per copy:
# they stay ONE tensor, and the analysis couples their readers so that every
# reader takes the same slice (analysis/shared.py).  Copies that still agree
# after pruning are merged back (`reshare_renames`), and the pipeline
# refuses a model whose distinct parameter bytes grew (`check_no_growth`).
SHARED_COPY_MAX_ELEMENTS = 1 << 16


def small_vector(dims) -> bool:
    """At most one axis longer than 1, and at most SHARED_COPY_MAX_ELEMENTS elements."""
    dims = [int(d) for d in dims]
    return sum(1 for d in dims if d > 1) <= 1 and int(np.prod(dims, dtype=np.int64)) <= SHARED_COPY_MAX_ELEMENTS


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give each reader of a shared small vector its own copy (see SHARED_COPY_MAX_ELEMENTS);
    shared matrices stay shared.  Copies are named `<tensor>__<reader>_<k>`."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    seen: dict[str, int] = {}
    copies = 0
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1 or not small_vector(inits[name].dims):
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__{node.name or node.op_type}_{seen[name]}"
            graph.initializer.append(copy)
            node.input[idx] = copy.name
            copies += 1
    return copies


def _family(name: str) -> str:
    """The tensor a name was derived from: our passes name copies `<tensor>__<suffix>`."""
    return name.split("__", 1)[0]


def _payload(t: onnx.TensorProto) -> bytes | tuple:
    """What identifies the values: the bytes, or for data not loaded, where they lie in which file."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return tuple((e.key, e.value) for e in t.external_data)
    if t.HasField("raw_data"):
        return t.raw_data
    bare = onnx.TensorProto()
    bare.CopyFrom(t)
    bare.name = ""
    bare.doc_string = ""
    return bare.SerializeToString()


def group_by_value(tensors: list[onnx.TensorProto]) -> list[list[onnx.TensorProto]]:
    """`tensors` grouped by value: each inner list holds tensors with identical type, shape and bytes
    (one stored tensor, or copies of it).  Only tensors whose type and shape collide are read, and
    a strided sample sorts them before any full hash: distinct weights cost one pass over a
    sample, copies one hash of their bytes."""
    by_shape: dict[tuple, list[onnx.TensorProto]] = {}
    for t in tensors:
        by_shape.setdefault((t.data_type, tuple(t.dims)), []).append(t)
    groups: list[list[onnx.TensorProto]] = []
    for same_shape in by_shape.values():
        if len(same_shape) == 1:
            groups.append(same_shape)
            continue
        by_sample: dict[object, list[onnx.TensorProto]] = {}
        for t in same_shape:  # one tensor's bytes in memory at a time
            by_sample.setdefault(_digest(_payload(t), sample=True), []).append(t)
        for candidates in by_sample.values():
            if len(candidates) == 1:
                groups.append(candidates)
                continue
            by_value: dict[object, list[onnx.TensorProto]] = {}
            for t in candidates:
                by_value.setdefault(_digest(_payload(t), sample=False), []).append(t)
            groups.extend(by_value.values())
    return groups


def _digest(payload: bytes | tuple, sample: bool) -> object:
    if isinstance(payload, tuple):
        return payload
    if sample:  # only sorts candidates
        return hashlib.sha1(payload[::997]).digest()
    return hashlib.blake2b(payload, digest_size=32).digest()  # equal digests are taken for equal values


def distinct_initializers(model: onnx.ModelProto) -> list[list[onnx.TensorProto]]:
    """The model's initializers grouped by value (`group_by_value`)."""
    return group_by_value(list(model.graph.initializer))


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of the values (sub-byte types rounded up per element; strings: their length)."""
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    try:
        size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        size = 4
    return _numel(t) * max(1, size)


def unique_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements, bytes) over distinct initializers: copies of one tensor count once."""
    groups = distinct_initializers(model)
    return sum(_numel(g[0]) for g in groups), sum(tensor_bytes(g[0]) for g in groups)


def reshare_renames(model: onnx.ModelProto) -> dict[str, str]:
    """Initializers derived from one tensor (`<tensor>__...` copies) that hold equal values: copy ->
    the tensor its readers can read instead (the original name, when present). Applied by the
    pass `passes.cleanup.ReshareInitializers`.

    Copies of a shared vector whose readers all kept the same units (ALBERT's shared biases)
    become one tensor again.  Tensors a subgraph mentions or a graph output names are left alone.
    """
    graph = model.graph
    families: dict[str, list[onnx.TensorProto]] = {}
    for t in graph.initializer:
        families.setdefault(_family(t.name), []).append(t)
    if all(len(f) == 1 for f in families.values()):
        return {}
    pinned = outer_names(graph) | {o.name for o in graph.output}
    renames: dict[str, str] = {}
    for base, members in families.items():
        if len(members) < 2:
            continue
        for same in group_by_value(members):
            keep = next((t for t in same if t.name == base), same[0])  # the original name, when present
            renames.update((t.name, keep.name) for t in same if t is not keep and t.name not in pinned)
    return renames


def check_no_growth(model: onnx.ModelProto, limit: int) -> None:
    """Raise OnnxPruneError when `model`'s distinct parameter bytes exceed `limit` (the input's),
    naming the tensors that now exist in several versions."""
    _, size = unique_parameters(model)
    if size <= limit:
        return
    families: dict[str, list[onnx.TensorProto]] = {}
    for t in model.graph.initializer:
        families.setdefault(_family(t.name), []).append(t)
    copied = sorted((f for f in families.values() if len(f) > 1),
                    key=lambda f: -sum(tensor_bytes(t) for t in f))
    if copied:
        what = "; ".join(f"'{_family(f[0].name)}' ({len(f)} versions: {', '.join(t.name for t in f[:4])}"
                         f"{', ...' if len(f) > 4 else ''}; {sum(tensor_bytes(t) for t in f):,} bytes)"
                         for f in copied[:5])
        cause = f"tensors were duplicated: {what}"
    else:
        largest = sorted(model.graph.initializer, key=lambda t: -tensor_bytes(t))[:5]
        cause = "no tensor has several versions; the largest are " + ", ".join(f"'{t.name}'" for t in largest)
    raise OnnxPruneError(
        f"the pruned model would hold {size:,} bytes of distinct parameters, more than the input's "
        f"{limit:,}: {cause}. Nothing was written. A shared tensor must take one slice for all its "
        "readers; exclude the layers that read it (--exclude) and report this model as a bug.")


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
    """A header copy of `model` whose large float initializers point into `data_path`.

    Written tensor by tensor, so no second in-memory copy of the weights is
    made, and `model` itself is never changed (onnx's own external-data writer
    converts the model it is given in place, which once left a caller holding
    tensors whose bytes had moved to a deleted temporary file).
    """
    header = onnx.ModelProto()
    copy_fields(model, header, skip="graph")
    graph = header.graph
    copy_fields(model.graph, graph, skip="initializer")
    offset = 0
    data = None  # opened at the first tensor that goes out: no empty data file beside a small model
    try:
        for t in model.graph.initializer:
            external = is_external(t)
            payload = t.raw_data if not external and t.HasField("raw_data") else None
            size = _external_ref(t)[2] if external else len(payload or b"")
            if not external and (payload is None or size < EXTERNAL_MIN_BYTES or t.data_type not in _FLOAT_TYPES):
                graph.initializer.append(t)
                continue
            if external and (size < EXTERNAL_MIN_BYTES or t.data_type not in _FLOAT_TYPES):
                graph.initializer.append(with_values(t))  # small or integer: inline, where onnxruntime reads it
                continue
            if data is None:
                data = open(data_path, "wb")
            pad = (-offset) % 4096  # page-aligned, as onnx's own writer does
            data.write(b"\0" * pad)
            offset += pad
            if external:
                _copy_external(t, data)  # file to file: the weights never sit in memory
            else:
                data.write(payload)
            ref = graph.initializer.add()
            ref.name = t.name
            ref.data_type = t.data_type
            ref.dims.extend(t.dims)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            offset += size
    finally:
        if data is not None:
            data.close()
    return header


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool,
                serialized: bytes | None = None) -> None:
    """Write `model` to `path` (and, with external data, `<path>.data` beside it,
    the one data file, named after the model) without changing `model`."""
    path = Path(path)
    external_data = external_data or has_external_data(model)  # weights still on disk go to the data file
    if external_data:
        header = _externalise(model, path.parent / (path.name + ".data"), path.name + ".data")
        onnx.save_model(header, str(path))
    elif serialized is not None:  # validation already serialised it: no second copy
        path.write_bytes(serialized)
    else:
        onnx.save_model(model, str(path))


def _default_permissions(path: Path) -> None:
    """Temporary files are created 0600; give the output the permissions a normal write would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


# -- external data that stays on disk --------------------------------------------------------------------

def resolve_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Make every external location absolute and check that its bytes are there."""
    sizes: dict[Path, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = Path(info.get("location", ""))
        file = location if location.is_absolute() else (path.parent / location)
        if file not in sizes:
            if not file.is_file():
                raise ModelLoadError(f"{path}: cannot read its external data: tensor '{t.name}' lies in "
                                     f"{location}, which is not there. Keep the data file(s) next to the model "
                                     "under the name(s) recorded in the model.")
            sizes[file] = file.stat().st_size
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0) or _nbytes_of(t))
        if offset + length > sizes[file]:
            raise ModelLoadError(f"{path}: external data file {location} is too short for tensor '{t.name}' "
                                 f"(needs bytes {offset}..{offset + length}, has {sizes[file]}); it is truncated "
                                 "or belongs to another export.")
        del t.external_data[:]
        for key, value in (("location", str(file.resolve())), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    """Tensors whose values are still on disk: such a model cannot be serialised in memory as a whole."""
    return any(is_external(t) for t in model.graph.initializer)


def _external_ref(t: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info.get("length", 0) or _nbytes_of(t))


def _nbytes_of(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def external_values(t: onnx.TensorProto) -> np.ndarray:
    """A read-only memory map of an external tensor (pages are read as they are touched)."""
    location, offset, _ = _external_ref(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    if _nbytes_of(t) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)


# numpy dtypes whose bytes are an initializer's raw_data as they are (little-endian machines)
_RAW_DTYPES = {np.dtype(d): onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d)) for d in
               (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                np.int64, np.uint64)}


def add_tensor(tensors, values: np.ndarray, name: str) -> onnx.TensorProto:
    """`tensors.add()` (a repeated TensorProto field) holding `values`: built in place, one copy of the
    bytes fewer than appending numpy_helper.from_array's tensor, which protobuf copies again."""
    data_type = _RAW_DTYPES.get(values.dtype) if sys.byteorder == "little" else None
    if data_type is None:
        tensors.append(numpy_helper.from_array(values, name))
        return tensors[-1]
    t = tensors.add()
    t.name, t.data_type = name, data_type
    t.dims.extend(values.shape)
    t.raw_data = np.ascontiguousarray(values).tobytes()
    return t


def with_values(t: onnx.TensorProto) -> onnx.TensorProto:
    """`t` itself, or for an external tensor an in-memory copy holding its bytes."""
    if not is_external(t):
        return t
    loaded = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    loaded.raw_data = np.ascontiguousarray(external_values(t)).tobytes()
    return loaded


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every tensor still on disk read into memory (for
    onnx.checker, onnx.save and other tools that expect self-contained models)."""
    if not has_external_data(model):
        return model
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.initializer.extend(with_values(t) for t in model.graph.initializer)
    return out


def _copy_external(t: onnx.TensorProto, out) -> int:
    """Copy an external tensor's bytes into `out` (a file opened for writing); returns the length.

    The kernel copies file to file where it can (os.copy_file_range: no trip through user space,
    and on some filesystems no copy at all); else a chunk at a time.
    """
    location, offset, length = _external_ref(t)
    with open(location, "rb") as src:
        left = length
        if hasattr(os, "copy_file_range"):
            out.flush()
            try:
                while left:
                    done = os.copy_file_range(src.fileno(), out.fileno(), left, offset + length - left)
                    if done == 0:
                        break
                    left -= done
            except OSError:  # not supported between these files: copy by hand from where it stopped
                pass
            out.seek(0, os.SEEK_END)
        src.seek(offset + length - left)
        while left:
            chunk = src.read(min(left, 64 << 20))
            if not chunk:
                raise OutputError(f"external data of tensor '{t.name}' ends early in {location}")
            out.write(chunk)
            left -= len(chunk)
    return length


class Spill:
    """A scratch data file for tensors computed from weights that were on disk
    (the slices of a large model's weights): written there as they are made and
    referenced as external data, so the pruned weights never all sit in memory.
    The file lives in a temporary folder removed when the process exits; the
    output's writer copies from it like from any other external data."""

    _folder: Path | None = None

    def __init__(self) -> None:
        if Spill._folder is None:
            Spill._folder = Path(tempfile.mkdtemp(prefix="onnxprune-spill-"))
            atexit.register(shutil.rmtree, Spill._folder, ignore_errors=True)
        fd, name = tempfile.mkstemp(suffix=".data", dir=Spill._folder)
        os.close(fd)
        self.path = Path(name)
        self._offset = 0

    def add(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        values = np.ascontiguousarray(values)
        ref = onnx.TensorProto(name=name, dims=list(values.shape),
                               data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
        ref.data_location = onnx.TensorProto.EXTERNAL
        with open(self.path, "ab") as out:
            out.write(memoryview(values).cast("B") if values.size else b"")
        for key, value in (("location", str(self.path)), ("offset", str(self._offset)),
                           ("length", str(values.nbytes))):
            ref.external_data.add(key=key, value=value)
        self._offset += values.nbytes
        return ref


class NewValues:
    """New values for some initializers of a model, each stored as the tensor it replaces was: in a
    scratch data file (`Spill`) when that one was on disk and the values are large, inline otherwise;
    cast to its dtype and shaped to its dims."""

    def __init__(self) -> None:
        self.tensors: dict[str, onnx.TensorProto] = {}
        self._spill: Spill | None = None

    def put(self, like: onnx.TensorProto, values: np.ndarray) -> None:
        values = np.asarray(values).astype(helper.tensor_dtype_to_np_dtype(like.data_type), copy=False)
        values = values.reshape(tuple(like.dims))
        if is_external(like) and values.nbytes >= EXTERNAL_MIN_BYTES:
            self._spill = self._spill or Spill()
            self.tensors[like.name] = self._spill.add(values, like.name)
        else:
            self.tensors[like.name] = numpy_helper.from_array(values, like.name)

    def applied_to(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A new model with these values (a new message: protobuf would keep the old bytes in its arena)."""
        out = onnx.ModelProto()
        copy_fields(model, out, skip="graph")
        copy_fields(model.graph, out.graph, skip="initializer")
        out.graph.initializer.extend(self.tensors.get(t.name, t) for t in model.graph.initializer)
        return out


def _data_locations(model: onnx.ModelProto) -> set[str]:
    """External data files named by the model (one, or one per tensor)."""
    return {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}


def _file_size(path: Path, model: onnx.ModelProto) -> int:
    size = path.stat().st_size
    for loc in _data_locations(model):
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
    return sum(tensor_bytes(t) if is_external(t) else _tensor_byte_size(t) for t in model.graph.initializer) \
        + 4096 * len(model.graph.node)


_RAW_FIELDS = [f for f in onnx.TensorProto.DESCRIPTOR.fields if f.name != "raw_data"]


def _tensor_byte_size(t: onnx.TensorProto) -> int:
    """t.ByteSize(), without encoding the raw bytes (upb's ByteSize serialises the whole message: 0.2 s
    per call on BERT-base): the other fields' size, plus the raw field's tag, length and bytes, their
    length taken from dims and type (reading t.raw_data would copy them)."""
    if not t.HasField("raw_data"):
        return t.ByteSize()
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return t.ByteSize()
    length = _numel(t) * itemsize
    if length < _ENCODE_BELOW or t.data_type in _SUB_BYTE_TYPES or t.data_type == onnx.TensorProto.STRING:
        return t.ByteSize()  # small: encoding it costs less than taking it apart
    bare = onnx.TensorProto()
    for f in _RAW_FIELDS:
        value = getattr(t, f.name)
        if f.is_repeated:
            if len(value):
                getattr(bare, f.name).extend(value)
        elif t.HasField(f.name):
            if f.message_type:
                getattr(bare, f.name).CopyFrom(value)
            else:
                setattr(bare, f.name, value)
    return bare.ByteSize() + 1 + _varint_size(length) + length  # field 9, wire type 2: a one-byte tag


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


_ENCODE_BELOW = 1 << 16
_SUB_BYTE_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                   if hasattr(onnx.TensorProto, n)}


def wants_external_data(model: onnx.ModelProto, source: SourceInfo | None) -> bool:
    """External data when the source used it or the model would exceed protobuf's limit."""
    return bool(source and source.used_external_data) or model_byte_size(model) > EXTERNAL_DATA_THRESHOLD


def check_output_path(path: str | os.PathLike, source: SourceInfo | None = None, estimated_bytes: int = 0) -> Path:
    """Refuse an unusable output before any work is done: the input itself, a
    missing or read-only folder, a folder, or a disk without room for it."""
    path = Path(path)
    if source is not None and source.path is not None:
        if path.resolve() == source.path.resolve():
            raise OutputError(f"{path}: refusing to overwrite the input model; choose another output path.")
        data = (path.parent / (path.name + ".data")).resolve()
        if any(data == (source.path.parent / f).resolve() for f in source.data_files):
            raise OutputError(f"{path}: its data file {data.name} would overwrite the input's external data; "
                              "choose another output name.")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give the output a file name, e.g. {path / 'pruned.onnx'}.")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist; create it first (mkdir -p {folder}).")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable; choose another output path.")
    free = shutil.disk_usage(folder).free
    if estimated_bytes and free < estimated_bytes:
        raise OutputError(f"{folder}: {free / 2**20:.0f} MiB free, the output needs up to "
                          f"{estimated_bytes / 2**20:.0f} MiB; free some space or write elsewhere.")
    return path


class StagedOutput:
    """The output written into a hidden temporary folder beside its destination,
    under its final file names (so the relative external-data location already
    reads right), where it can be checked from disk before it is moved into place.

    Use as a context manager: whatever was not committed is deleted on the way
    out, errors and interrupts (SIGINT, SIGTERM raised as an exception) included.
    """

    def __init__(self, model: onnx.ModelProto, destination: str | os.PathLike, *, external_data: bool,
                 serialized: bytes | None = None):
        self.destination = Path(destination)
        self.external_data = external_data
        self._folder = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".tmp",
                                             dir=self.destination.parent))
        self.path = self._folder / self.destination.name
        self._write(model, serialized)

    def _write(self, model: onnx.ModelProto, serialized: bytes | None) -> None:
        try:
            write_model(model, self.path, external_data=self.external_data, serialized=serialized)
        except OnnxPruneError:
            self.discard()
            raise
        except BaseException as exc:
            self.discard()
            if isinstance(exc, Exception):
                raise OutputError(f"{self.destination}: could not write the model ({exc}).") from exc
            raise

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.path, self._folder / (self.path.name + ".data")) if p.exists()]

    def commit(self) -> int:
        """Move into place (data file first, the model last); returns the bytes written."""
        size = 0
        for staged in reversed(self.files):
            _default_permissions(staged)
            size += staged.stat().st_size
            os.replace(staged, self.destination.parent / staged.name)
        self.discard()
        return size

    def discard(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source: SourceInfo | None = None,
    external_data: bool | None = None,
    serialized: bytes | None = None,
) -> int:
    """Write `model` to `path` atomically, unchecked; returns the bytes written.

    external_data=None chooses: external when the source used it or when the
    model would exceed protobuf's limit.  (`prune` saves through
    onnxprune.runtime.output.save_verified, which reads the staged file back
    and runs it before moving it into place.)
    """
    path = check_output_path(path, source)
    if external_data is None:
        external_data = wants_external_data(model, source)
    with StagedOutput(model, path, external_data=external_data, serialized=serialized) as staged:
        return staged.commit()
