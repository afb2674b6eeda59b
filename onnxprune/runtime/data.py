"""Evaluation data: model inputs (and labels) from .npz/.npy files, image folders or JSONL text.

Formats (`open_data` picks one from the path):

* ``.npz``: one array per model input, named after the input, plus an optional
  ``labels`` array (integer class ids, one per sample, or one per output
  position for dense outputs). A model with a single input may name its one
  array anything. The first axis of every array is the sample axis, also
  for a model whose batch axis is another one (a time-major [time, batch,
  features] input, `--batch-axis 1`): the data holds samples first and the
  evaluation moves them to the model's batch axis (`InputSpec.samples_first`).
* ``.npy``: the inputs of a single-input model, without labels (measure
  fidelity with a reference model, or save an .npz with ``labels``).
* a folder of images, ``ROOT/<class>/<image>``: class ids are the subfolder
  names in sorted order (as torchvision's ImageFolder); images directly in
  ROOT with no subfolders are read without labels. Needs Pillow
  (``pip install 'onnxprune[images]'``). See `ImageSpec` for preprocessing.
* ``.jsonl``: one JSON object per line, ``{"text": "...", "label": 1}``
  (``label`` optional, an integer; ``text_pair`` optional), tokenised with a
  `tokenizers.Tokenizer` (``pip install 'onnxprune[text]'``). See `JsonlText`.

How data must match the model's inputs (checked before anything runs; a
mismatch raises DataError naming the input and what the model expects):

* every model input has an array (or, for images and text, a role);
* dtypes of the same kind are cast (float64 data feeds a float32 input, int32
  a int64 one); other kinds are refused (float data for token ids, integer
  pixels for a float input: preprocessing is missing);
* the data has the model input's rank, the first axis being the samples;
  every static dimension after it must be equal, dynamic ones take any size;
* float data holds no NaN or infinity (the error names the first bad sample).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
JSONL_EXTENSIONS = {".jsonl", ".ndjson"}
LABELS_KEY = "labels"


# -- the model's side --------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """A model input: dtype and dims (int if static, the symbol name or None if dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple

    @property
    def static_batch(self) -> int | None:
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) else None

    def describe(self) -> str:
        dims = ", ".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.dtype} [{dims}]"

    def samples_first(self, batch_axis: int) -> "InputSpec":
        """This input as the data holds it: the model's batch axis moved to the front."""
        if batch_axis == 0:
            return self
        if not 0 < batch_axis < len(self.shape):
            raise DataError(f"input '{self.name}' ({self.describe()}) has no axis {batch_axis} to hold the samples; "
                            f"--batch-axis must be in 0..{len(self.shape) - 1}")
        shape = list(self.shape)
        return InputSpec(self.name, self.dtype, (shape.pop(batch_axis), *shape))


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds (initializers listed as inputs are weights, not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise DataError(f"input '{vi.name}' is not a tensor; evaluation feeds tensors only")
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), tuple(dims)))
    return specs


def first_non_finite(array: np.ndarray) -> int | None:
    """The index (axis 0) of the first sample holding NaN or an infinity, or None (also for non-floats)."""
    if array.dtype.kind not in "fc" or np.isfinite(array).all():
        return None
    return int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])


def check_array(spec: InputSpec, array: np.ndarray, where: str) -> None:
    """Raise DataError unless `array` (samples on axis 0) can feed `spec`."""
    want = spec.describe()
    kinds = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(spec.dtype.kind, spec.dtype.kind)
    if array.dtype.kind not in kinds:
        hint = ""
        if spec.dtype.kind == "f" and array.dtype.kind in "iub":
            hint = " (raw integer pixels? apply the model's preprocessing and save float32)"
        elif spec.dtype.kind in "iu":
            hint = " (token ids and indices must be integers)"
        raise DataError(f"input '{spec.name}': the model expects {want}; {where} has dtype {array.dtype}{hint}")
    if array.ndim != len(spec.shape):
        raise DataError(
            f"input '{spec.name}': the model expects {want} ({len(spec.shape)} dims, the first one the samples); "
            f"{where} has shape {tuple(array.shape)}"
        )
    for axis in range(1, array.ndim):
        dim = spec.shape[axis]
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise DataError(
                f"input '{spec.name}': the model expects {want}; {where} has shape {tuple(array.shape)} "
                f"(axis {axis} is {array.shape[axis]}, the model needs {dim})"
            )
    bad = first_non_finite(array)
    if bad is not None:
        raise DataError(f"input '{spec.name}': sample {bad} of {where} holds NaN or infinite values; fix or drop it")


# -- datasets ------------------------------------------------------------------------------------
class Dataset:
    """Samples for a model's inputs, with optional labels.

    `bind(inputs)` checks the data against the model's inputs (and configures
    what depends on them) and must be called before `arrays`.
    """

    source: str = "data"
    labels: np.ndarray | None = None

    def bind(self, inputs: list[InputSpec]) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Feeds for samples start..stop-1, keyed by model input name."""
        raise NotImplementedError


class ArrayData(Dataset):
    """In-memory (or memory-mapped) arrays: the .npz/.npy format, or a dict from Python."""

    def __init__(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None = None, source: str = "arrays"):
        self.raw = {k: np.asarray(v) for k, v in arrays.items()}
        self.labels = None if labels is None else np.asarray(labels)
        self.source = source
        self.bound: dict[str, np.ndarray] = {}
        if not self.raw:
            raise DataError(f"{source} holds no input arrays")

    @classmethod
    def from_file(cls, path: str | os.PathLike, labels_key: str = LABELS_KEY) -> "ArrayData":
        path = Path(path)
        try:
            if path.suffix == ".npy":
                return cls({"": np.load(path, mmap_mode="r", allow_pickle=False)}, None, str(path))
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise DataError(f"{path}: not a readable numpy file ({type(exc).__name__}: {exc})") from exc
        labels = arrays.pop(labels_key, None)
        return cls(arrays, labels, str(path))

    def bind(self, inputs: list[InputSpec]) -> None:
        raw = self.raw
        if len(inputs) == 1 and inputs[0].name not in raw and len(raw) == 1:
            raw = {inputs[0].name: next(iter(raw.values()))}  # a single-input model: any name will do
        bound = {}
        for spec in inputs:
            if spec.name not in raw:
                have = ", ".join(f"'{k}'" for k in self.raw if k) or "one unnamed array"
                raise DataError(
                    f"input '{spec.name}' ({spec.describe()}) has no array in {self.source}, which holds {have}"
                    f"{' and labels' if self.labels is not None else ''}; name the arrays after the model's inputs "
                    f"({', '.join(s.name for s in inputs)})"
                )
            array = raw[spec.name]
            key = spec.name if spec.name in self.raw else next(iter(self.raw))
            check_array(spec, array, f"array '{key}' in {self.source}" if key else self.source)
            bound[spec.name] = array
        counts = {name: len(a) for name, a in bound.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"{self.source}: the input arrays hold different numbers of samples: {counts}")
        n = next(iter(counts.values()))
        if self.labels is not None and (self.labels.ndim == 0 or len(self.labels) != n):
            raise DataError(
                f"{self.source}: '{LABELS_KEY}' has shape {tuple(self.labels.shape)}, expected one label per "
                f"sample ({n} samples)"
            )
        self.bound = bound

    def __len__(self) -> int:
        return len(next(iter(self.bound.values()))) if self.bound else len(next(iter(self.raw.values())))

    def arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(a[start:stop]) for name, a in self.bound.items()}


# -- images ----------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSpec:
    """How an image file becomes a model input, applied in this order:

    1. open and convert to `mode` ("RGB" or "L" for grayscale; default: from
       the model's channel count, 1 -> L, 3 -> RGB);
    2. resize: an int resizes the shorter side to it keeping the aspect ratio,
       [h, w] resizes to exactly that; with neither `resize` nor `crop` given
       the image is resized to the model's input height and width;
       `crop_ratio` (e.g. 0.875) instead resizes the shorter side to
       model_size / crop_ratio and centre-crops to the model size;
    3. crop: centre crop to an int (square) or [h, w]; an int `resize`
       without `crop` is centre-cropped to the model's height and width;
    4. pixels x `scale` (default 1/255), then (x - mean) / std per channel
       (one value or one per channel);
    5. layout "NCHW" or "NHWC" (default: from the model input's shape:
       NCHW when axis 1 has 1, 3 or 4 channels, else NHWC when axis 3 has).

    The result must have the model input's static height and width (else
    DataError). A model whose input is uint8 gets the raw pixels (step 4 is
    skipped).

    Example (the bundled digits model, grayscale 32x32 normalised with the
    training mean and std): {"mean": 0.3062, "std": 0.3238}.
    Presets: "imagenet" (shorter side to size/0.875, centre crop, ImageNet
    mean/std, RGB) and "none" (all defaults). `ImageSpec.parse` also reads a
    JSON object with these field names, inline or from a .json file.
    """

    resize: int | list[int] | None = None
    crop: int | list[int] | None = None
    crop_ratio: float | None = None
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    scale: float = 1.0 / 255.0
    layout: str | None = None
    mode: str | None = None
    interpolation: str = "bilinear"

    @classmethod
    def imagenet(cls) -> "ImageSpec":
        return cls(crop_ratio=0.875, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), mode="RGB")

    @classmethod
    def parse(cls, text: "str | Mapping | ImageSpec | None") -> "ImageSpec":
        if text is None:
            return cls()
        if isinstance(text, ImageSpec):
            return text
        if isinstance(text, Mapping):
            values = dict(text)
        else:
            presets = {"imagenet": cls.imagenet, "none": cls}
            if text.strip().lower() in presets:
                return presets[text.strip().lower()]()
            source = text
            if not text.lstrip().startswith("{"):
                if not Path(text).is_file():
                    raise DataError(f"preprocessing spec '{text}': not a preset ({', '.join(presets)}), "
                                    "a JSON file or an inline JSON object")
                source = Path(text).read_text()
            try:
                values = json.loads(source)
            except json.JSONDecodeError as exc:
                raise DataError(f"preprocessing spec '{text}': invalid JSON ({exc})") from exc
            if not isinstance(values, dict):
                raise DataError(f"preprocessing spec '{text}': expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DataError(f"preprocessing spec: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**values)
        for key in ("mean", "std"):
            value = getattr(spec, key)
            setattr(spec, key, [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value])
        if spec.layout is not None and spec.layout.upper() not in ("NCHW", "NHWC"):
            raise DataError(f"preprocessing spec: layout '{spec.layout}' must be NCHW or NHWC")
        if spec.mode is not None and spec.mode.upper() not in ("RGB", "L"):
            raise DataError(f"preprocessing spec: mode '{spec.mode}' must be RGB or L")
        return spec

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install 'onnxprune[images]'") from None
    return Image


def _hw(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


class ImageFolder(Dataset):
    """ROOT/<class>/<image> (labels from sorted class names), or ROOT/<image> (no labels)."""

    def __init__(self, root: str | os.PathLike, spec: ImageSpec | str | Mapping | None = None):
        self.root = Path(root)
        self.source = str(self.root)
        self.spec = ImageSpec.parse(spec)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = [p.name for p in subdirs]
        self.files: list[Path] = []
        labels = []
        for index, folder in enumerate(subdirs):
            images = _images_in(folder)
            self.files += images
            labels += [index] * len(images)
        if subdirs:
            self.labels = np.asarray(labels, dtype=np.int64)
        else:
            self.files = _images_in(self.root)
            self.labels = None
        if not self.files:
            raise DataError(
                f"{self.root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in "
                "ROOT/<class>/ subfolders, or directly in ROOT)"
            )
        self.input: InputSpec | None = None

    def bind(self, inputs: list[InputSpec]) -> None:
        if len(inputs) != 1:
            raise DataError(
                f"an image folder feeds one input, the model has {len(inputs)} "
                f"({', '.join(s.name for s in inputs)}); save the inputs as an .npz instead"
            )
        spec, (inp,) = self.spec, inputs
        if len(inp.shape) != 4:
            raise DataError(f"input '{inp.name}': the model expects {inp.describe()}, not a 4-d image batch")
        if inp.dtype.kind not in "fu":
            raise DataError(f"input '{inp.name}': the model expects {inp.describe()}, not image pixels")
        layout = (spec.layout or "").upper() or _guess_layout(inp.shape)
        c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
        channels = inp.shape[c_axis]
        mode = (spec.mode or "").upper() or {1: "L", 3: "RGB"}.get(channels if isinstance(channels, int) else 3)
        if mode is None:
            raise DataError(
                f"input '{inp.name}' ({inp.describe()}, {layout}) has {channels} channels; images give 1 (L) or 3 "
                "(RGB): set layout or mode in the preprocessing spec"
            )
        want_c = 1 if mode == "L" else 3
        if isinstance(channels, int) and channels != want_c:
            raise DataError(f"input '{inp.name}': the model expects {inp.describe()} ({layout}, {channels} channels); "
                            f"mode {mode} gives {want_c} channels")
        for key in ("mean", "std"):
            if len(getattr(spec, key)) not in (1, want_c):
                raise DataError(f"preprocessing spec: {key} has {len(getattr(spec, key))} values, "
                                f"expected 1 or {want_c} (mode {mode})")
        model_hw = (inp.shape[h_axis], inp.shape[w_axis])
        static_hw = all(isinstance(d, int) for d in model_hw)
        resize, crop = spec.resize, spec.crop
        if spec.crop_ratio is not None and resize is None and crop is None:
            if not static_hw:
                raise DataError(f"input '{inp.name}' ({inp.describe()}) has a dynamic height/width: "
                                "crop_ratio needs a crop size in the preprocessing spec")
            crop = list(model_hw)
            resize = int(round(min(model_hw) / spec.crop_ratio))
        if resize is None and crop is None:
            if not static_hw:
                raise DataError(f"input '{inp.name}' ({inp.describe()}) has a dynamic height/width: "
                                "give resize (and crop) in the preprocessing spec")
            resize = list(model_hw)
        final = _hw(crop) if crop is not None else (_hw(resize) if not isinstance(resize, int) else None)
        if final is None:
            if not static_hw:
                raise DataError(f"resize {resize} keeps the aspect ratio, so image sizes vary; add a crop "
                                f"to feed input '{inp.name}' ({inp.describe()})")
            crop = list(model_hw)
            final = _hw(crop)
        for want, got, what in zip(model_hw, final, ("height", "width")):
            if isinstance(want, int) and want != got:
                raise DataError(
                    f"input '{inp.name}': the model expects {inp.describe()} ({layout}); the preprocessing gives "
                    f"{what} {got} instead of {want}: fix resize/crop in the preprocessing spec"
                )
        if spec.interpolation not in INTERPOLATIONS:
            raise DataError(f"preprocessing spec: interpolation '{spec.interpolation}' is not one of "
                            f"{', '.join(INTERPOLATIONS)}")
        self.input = inp
        self._resolved = dict(layout=layout, mode=mode, resize=resize, crop=crop)

    def __len__(self) -> int:
        return len(self.files)

    def arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        batch = np.stack([self.load(p) for p in self.files[start:stop]])
        return {self.input.name: batch}

    def load(self, path: Path) -> np.ndarray:
        """One preprocessed image, without the batch axis."""
        Image = _pillow()
        r, spec = self._resolved, self.spec
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
        try:
            with Image.open(path) as opened:
                img = opened.convert(r["mode"])
        except Exception as exc:
            raise DataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
        if r["resize"] is not None:
            w, h = img.size
            if isinstance(r["resize"], int):
                s = r["resize"] / min(w, h)
                size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
            else:
                rh, rw = _hw(r["resize"])
                size = (rw, rh)
            if size != img.size:
                img = img.resize(size, resample[spec.interpolation])
        if r["crop"] is not None:
            ch, cw = _hw(r["crop"])
            w, h = img.size
            if ch > h or cw > w:
                raise DataError(f"{path}: {w}x{h} after resizing is smaller than the crop {cw}x{ch}")
            left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
        pixels = np.asarray(img)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.input.dtype.kind == "u":
            x = pixels.astype(self.input.dtype)
        else:
            x = pixels.astype(np.float32) * np.float32(spec.scale)
            x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if r["layout"] == "NCHW" else x)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _guess_layout(shape: tuple) -> str:
    if shape[1] in (1, 3, 4):
        return "NCHW"
    if shape[3] in (1, 3, 4):
        return "NHWC"
    return "NCHW"


# -- text ------------------------------------------------------------------------------------------
class JsonlText(Dataset):
    """JSONL text tokenised with a `tokenizers.Tokenizer` (object or tokenizer.json path).

    Model inputs get their role from their name: a name containing "mask"
    gets the attention mask (1 for tokens, 0 for padding), "type" or
    "segment" the token type ids, "position" the positions 0..L-1, and the
    remaining one the token ids. All must be integer [batch, sequence]
    inputs. Sequences are padded (with the tokenizer's padding id, else the id
    of [PAD] or <pad>, else 0) to the model's static sequence length, or else to
    the longest in each batch; they are truncated to that static length or to
    `max_length`.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, *, text_key: str = "text",
                 pair_key: str = "text_pair", label_key: str = "label", max_length: int | None = None):
        self.path = Path(path)
        self.source = str(self.path)
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length = max_length
        texts, pairs, labels = [], [], []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read ({exc})") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}:{number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{self.path}:{number}: expected an object with a string '{text_key}'")
            texts.append(record[text_key])
            pairs.append(record.get(pair_key))
            label = record.get(label_key)
            if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
                raise DataError(f"{self.path}:{number}: '{label_key}' must be an integer class id, got {label!r}")
            labels.append(label)
        if not texts:
            raise DataError(f"{self.path}: no records")
        have = [label is not None for label in labels]
        if any(have) and not all(have):
            raise DataError(f"{self.path}: '{label_key}' is on some lines only (line {have.index(False) + 1} "
                            "has none); label every line or none")
        self.texts, self.pairs = texts, pairs
        self.labels = np.asarray(labels, dtype=np.int64) if all(have) else None
        self.roles: dict[str, str] = {}
        self.length: int | None = None

    def bind(self, inputs: list[InputSpec]) -> None:
        roles = {}
        for spec in inputs:
            if spec.dtype.kind not in "iu" or len(spec.shape) != 2:
                raise DataError(f"input '{spec.name}': the model expects {spec.describe()}; JSONL text gives "
                                "integer [batch, sequence] token ids and masks")
            low = spec.name.lower()
            roles[spec.name] = ("mask" if "mask" in low else "type" if ("type" in low or "segment" in low)
                                else "position" if "position" in low else "ids")
        ids = [n for n, r in roles.items() if r == "ids"]
        if len(ids) != 1:
            raise DataError(
                f"cannot tell which input takes the token ids: {ids or 'none of ' + str(list(roles))}; inputs are "
                "matched by name ('mask', 'type'/'segment', 'position', and one ids input)"
            )
        static = {s.shape[1] for s in inputs if isinstance(s.shape[1], int)}
        if len(static) > 1:
            raise DataError(f"the inputs have different static sequence lengths {sorted(static)}")
        self.length = static.pop() if static else None
        limit = self.length or self.max_length
        encode = [(t, p) if p is not None else t for t, p in zip(self.texts, self.pairs)]
        try:
            encodings = self.tokenizer.encode_batch(encode)
        except Exception as exc:
            raise DataError(f"{self.source}: the tokenizer failed ({type(exc).__name__}: {exc})") from exc
        self.ids = [list(e.ids)[:limit] if limit else list(e.ids) for e in encodings]
        self.type_ids = [list(e.type_ids)[:len(i)] for e, i in zip(encodings, self.ids)]
        self.pad_id = _pad_id(self.tokenizer)
        self.roles = roles
        self.dtypes = {s.name: s.dtype for s in inputs}

    def __len__(self) -> int:
        return len(self.texts)

    def arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rows = self.ids[start:stop]
        length = self.length or max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        types = np.zeros((len(rows), length), dtype=np.int64)
        for i, (row, tt) in enumerate(zip(rows, self.type_ids[start:stop])):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
            types[i, :len(tt)] = tt
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape)
        values = {"ids": ids, "mask": mask, "type": types, "position": positions}
        return {name: values[role].astype(self.dtypes[name]) for name, role in self.roles.items()}


def load_tokenizer(tokenizer: Any):
    """A tokenizers.Tokenizer from a tokenizer.json path; an object with encode_batch is used as is."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer
    if tokenizer is None:
        raise DataError("JSONL text needs a tokenizer: --tokenizer path/to/tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("reading JSONL text needs the tokenizers package: pip install 'onnxprune[text]'") from None
    try:
        return Tokenizer.from_file(str(tokenizer))
    except Exception as exc:
        raise DataError(f"{tokenizer}: not a readable tokenizers file ({exc})") from exc


def _pad_id(tokenizer) -> int:
    padding = getattr(tokenizer, "padding", None)
    if isinstance(padding, dict) and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<PAD>"):
        found = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None
        if found is not None:
            return int(found)
    return 0


# -- entry point --------------------------------------------------------------------------------------
def open_data(data: Any, *, preprocess: ImageSpec | str | Mapping | None = None, tokenizer: Any = None,
              max_length: int | None = None, text_key: str = "text", label_key: str = "label",
              labels_key: str = LABELS_KEY) -> Dataset:
    """A Dataset from a path (.npz, .npy, image folder, .jsonl), a dict of arrays
    (optionally with `labels_key`), a single array, or a Dataset (returned as is)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        arrays = dict(data)
        labels = arrays.pop(labels_key, None)
        return ArrayData(arrays, labels, "the given arrays")
    if isinstance(data, np.ndarray):
        return ArrayData({"": data}, None, "the given array")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if tokenizer is not None:
            raise DataError("a tokenizer applies to JSONL text, not to an image folder")
        return ImageFolder(path, preprocess)
    if preprocess is not None:
        raise DataError(f"{path}: a preprocessing spec applies to image folders only")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        if tokenizer is not None:
            raise DataError(f"{path}: a tokenizer applies to JSONL text only")
        return ArrayData.from_file(path, labels_key)
    if suffix in JSONL_EXTENSIONS:
        return JsonlText(path, tokenizer, text_key=text_key, label_key=label_key, max_length=max_length)
    raise DataError(f"{path}: unknown data format; use .npz/.npy arrays, a folder of images (one subfolder per "
                    "class) or .jsonl text")
