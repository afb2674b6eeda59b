"""The working copy every mode starts from: loaded (weights left on disk), normalised,
constants folded, small shared tensors given one copy per reader, every node named."""
from __future__ import annotations

import os

import onnx

from onnxprune.ir.fold import fold_constants
from onnxprune.ir.graph_view import name_nodes
from onnxprune.ir.model_io import SourceInfo, check_output_path, load_model, normalise, unshare_initializers

ModelLike = str | os.PathLike | onnx.ModelProto


def prepare(model: ModelLike, output: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, SourceInfo]:
    """Our own normalised copy of the model: the caller's object or file is never touched.

    With `output`, an unusable output path (missing folder, the input itself, no
    room on disk) fails before the weights are read, not after the work is done.
    """

    def check_output(source: SourceInfo) -> None:
        if output is not None:
            check_output_path(output, source, estimated_bytes=source.file_size)

    if isinstance(model, onnx.ModelProto):
        working = onnx.ModelProto()
        working.CopyFrom(model)
        source = SourceInfo(file_size=working.ByteSize(), value_info=len(working.graph.value_info) > 0)
        check_output(source)
        normalise(working)
    else:
        working, source = load_model(model, before_data=check_output)
    fold_constants(working)
    unshare_initializers(working)
    name_nodes(working)
    return working, source
