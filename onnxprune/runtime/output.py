"""Writing the output: what is written is what was validated.

The pruned model is staged beside its destination (onnxprune.ir.model_io.
StagedOutput) and checked from disk before it is moved into place. A
self-contained file is written from the very bytes validation checked and ran,
so reading back the same bytes is the whole check. A file with external data
is read back by a fresh onnxruntime session, run on the validation inputs and
compared with the outputs the validated in-memory model gave: this is what
catches a graph pointing at an external data file that is not there, or a data
file written empty. Only a file that passes is moved into place; anything else
is deleted and the command fails.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from onnxprune.errors import ValidationError
from onnxprune.ir.model_io import EXTERNAL_DATA_THRESHOLD, SourceInfo, StagedOutput, check_output_path, \
    has_external_data, model_byte_size, wants_external_data
from onnxprune.runtime.validate import ValidationResult, run_model

# The staged file runs with the same session options as validation (no graph
# optimisation, one thread): results agree to the last bit in practice; the
# tolerance only absorbs a different summation order, never a wrong weight.
READ_BACK_RTOL = 1e-5
READ_BACK_ATOL = 1e-6


def save_verified(model: onnx.ModelProto, path: str | os.PathLike, validation: ValidationResult, *,
                  source: SourceInfo | None = None) -> int:
    """Stage `model`, check it from disk against `validation`, move it into place; returns bytes written."""
    path = check_output_path(path, source)
    external = wants_external_data(model, source)
    with StagedOutput(model, path, external_data=external, serialized=validation.serialized) as staged:
        if validation.serialized is not None and not (external or has_external_data(model)):
            # one self-contained file, written from the validated bytes (write_model): that the same
            # bytes come back is the whole check (validation made them from the model it checked and
            # ran; onnx.checker read these very bytes)
            check_same_bytes(staged.path, validation.serialized, destination=path)
        else:
            check_read_back(staged.path, validation, destination=path)
        return staged.commit()


def check_same_bytes(path: str | os.PathLike, expected: bytes, destination: os.PathLike | None = None,
                     chunk: int = 4 << 20) -> None:
    """The file at `path` holds exactly `expected`, read a few MB at a time (small blocks reuse the
    same memory: no fresh pages to fault in for a second copy of the model)."""
    shown = destination or path
    offset, same = 0, True
    try:
        with open(path, "rb") as f:
            while same:
                block = f.read(chunk)
                if not block:
                    break
                same = expected[offset:offset + len(block)] == block
                offset += len(block)
    except OSError as exc:
        raise ValidationError(f"{shown}: the written file cannot be read back ({exc}); nothing was written.") \
            from exc
    if not same or offset != len(expected):
        raise ValidationError(f"{shown}: the written file is not the validated model ({offset:,} bytes read, "
                              f"{len(expected):,} expected); nothing was written.")


def stage_if_on_disk(model: onnx.ModelProto, path: str | os.PathLike | None, source: SourceInfo | None
                     ) -> StagedOutput | None:
    """A model whose weights are (partly) on disk, or over protobuf's limit, cannot be run from memory
    anyway: write it once, to its staging folder, and let validation run that file. Its outputs then
    come from disk by construction, and committing moves the very bytes that were checked."""
    if path is None or not (has_external_data(model) or model_byte_size(model) > EXTERNAL_DATA_THRESHOLD):
        return None
    path = check_output_path(path, source)
    return StagedOutput(model, path, external_data=True)


def check_read_back(path: str | os.PathLike, validation: ValidationResult, destination: os.PathLike | None = None
                    ) -> None:
    """Run the file at `path` (with its data file) and compare with the validated outputs."""
    shown = destination or path
    try:
        onnx.load(str(path), load_external_data=False)  # the header parses
        outputs = run_model(str(path), validation.feeds, "model read back from disk")
    except ValidationError as exc:
        raise ValidationError(f"{shown}: the written file does not load and run ({exc}); nothing was written.") \
            from exc
    except Exception as exc:
        raise ValidationError(f"{shown}: the written file cannot be read back ({exc}); nothing was written.") \
            from exc
    if len(outputs) != len(validation.outputs):
        raise ValidationError(f"{shown}: the written file has {len(outputs)} outputs, the validated model "
                              f"{len(validation.outputs)}; nothing was written.")
    for index, (got, want) in enumerate(zip(outputs, validation.outputs)):
        if not _same(np.asarray(got), np.asarray(want)):
            raise ValidationError(f"{shown}: output #{index} of the written file differs from the validated "
                                  "in-memory model; nothing was written (please report this model).")


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if got.dtype.kind in "fc":
        return bool(np.allclose(got, want, rtol=READ_BACK_RTOL, atol=READ_BACK_ATOL, equal_nan=True))
    return bool(np.array_equal(got, want))
