"""Calibration samples: the evaluation data formats, limited, split, and fed in batches.

Calibration reuses `onnxprune.runtime.data` (``.npz``/``.npy`` arrays, image
folders, JSONL text, dicts of arrays): labels are not needed and are ignored.
A `CalibrationSet` is a bound dataset plus the sample indices it uses, so the
same data can be split into a *fit* part (statistics, least squares) and a
*held-out* part (the guard that rejects a reconstruction making things worse)
without copying it.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import onnx

from onnxprune.calibration.padding import find_mask_input, real_positions
from onnxprune.errors import DataError
from onnxprune.runtime.data import ArrayData, Dataset, InputSpec, first_non_finite, model_inputs, open_data


class CalibrationSet:
    """Samples `indices` of a bound `dataset`, fed to a model with inputs `specs`."""

    def __init__(self, dataset: Dataset, specs: list[InputSpec], indices: np.ndarray, mask_input: str | None = None):
        self.dataset = dataset
        self.specs = specs
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mask_input = mask_input if mask_input is not None else find_mask_input(specs)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, data: Any, model: onnx.ModelProto, *, max_samples: int | None = None,
             preprocess: Any = None, tokenizer: Any = None, max_length: int | None = None,
             mask_input: str | None = None) -> "CalibrationSet":
        """Open `data` (anything `open_data` takes, or a CalibrationSet) for `model`'s inputs.

        max_samples keeps the first N samples (the data's own order: shuffle the
        file if it is sorted by class). mask_input: the input marking padded positions
        (default: found by name, onnxprune.calibration.padding).
        """
        if isinstance(data, CalibrationSet):
            subset = data if max_samples is None else data.take(max_samples)
            return subset
        dataset = open_data(data, preprocess=preprocess, tokenizer=tokenizer, max_length=max_length)
        specs = model_inputs(model)
        dataset.bind(specs)
        n = len(dataset)
        if n == 0:
            raise DataError(f"{dataset.source} holds no samples: calibration needs at least one")
        if max_samples is not None:
            if max_samples < 1:
                raise DataError(f"the calibration sample limit must be at least 1, got {max_samples}")
            n = min(n, int(max_samples))
        return cls(dataset, specs, np.arange(n), find_mask_input(specs, mask_input))

    def take(self, count: int) -> "CalibrationSet":
        return CalibrationSet(self.dataset, self.specs, self.indices[:count], self.mask_input)

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(fit, held_out): a seeded random split; held_out is empty when there are fewer than 5 samples."""
        n = len(self.indices)
        n_hold = 0 if n < 5 or holdout <= 0 else min(n - 1, max(1, int(round(n * holdout))))
        order = np.random.default_rng(seed).permutation(n)
        hold = np.sort(self.indices[order[:n_hold]])
        fit = np.sort(self.indices[order[n_hold:]])
        return (CalibrationSet(self.dataset, self.specs, fit, self.mask_input),
                CalibrationSet(self.dataset, self.specs, hold, self.mask_input))

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def source(self) -> str:
        return self.dataset.source

    def real_positions(self, feeds: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        """bool [n, sequence]: the token (not padding) positions of a batch's real samples; None when the
        model has no attention mask or nothing is padded (onnxprune.calibration.padding)."""
        return real_positions(feeds, n, self.mask_input)

    def batch_counts(self, batch_size: int = 32) -> list[tuple[int, int]]:
        """(real samples, samples fed) of each batch `batches(batch_size)` yields, without reading the data
        (a static batch is fed padded to its size)."""
        static = self.static_batch()
        chunk = static or max(1, int(batch_size))
        return [(min(chunk, len(self.indices) - start), static or min(chunk, len(self.indices) - start))
                for start in range(0, len(self.indices), chunk)]

    def sample_shapes(self) -> dict[str, list[int]] | None:
        """The inputs' shapes for one sample as fed (a static batch's size on axis 0): what settles the
        dynamic sizes of the model's tensors to the data's (None: no samples)."""
        for feeds, _ in self.batches(1):
            return {name: list(value.shape) for name, value in feeds.items()}
        return None

    def static_batch(self) -> int | None:
        static = {s.static_batch for s in self.specs if s.static_batch is not None}
        if len(static) > 1:
            raise DataError(f"the inputs have different static batch sizes: {sorted(static)}")
        return static.pop() if static else None

    def batches(self, batch_size: int = 32) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feeds, n) per batch: feeds cast to the inputs' dtypes; only the first n rows are real
        (a model with a static batch size gets its last batch padded by repetition). A sample with
        NaN or infinite values raises DataError naming it."""
        static = self.static_batch()
        chunk = static or max(1, int(batch_size))
        for start in range(0, len(self.indices), chunk):
            idx = self.indices[start:start + chunk]
            arrays = self._gather(idx)
            feeds = {}
            for s in self.specs:
                a = np.ascontiguousarray(arrays[s.name], dtype=s.dtype)
                bad = first_non_finite(a)  # arrays are checked when bound; other datasets as they stream
                if bad is not None:
                    raise DataError(f"calibration sample {int(idx[bad])} of {self.source}, input '{s.name}', "
                                    "holds NaN or infinite values: every statistic and refit would be "
                                    "poisoned; fix or drop that sample")
                if static and len(a) < chunk:
                    a = np.concatenate([a, np.repeat(a[-1:], chunk - len(a), axis=0)])
                feeds[s.name] = a
            yield feeds, len(idx)

    def _gather(self, idx: np.ndarray) -> Mapping[str, np.ndarray]:
        if isinstance(self.dataset, ArrayData) and self.dataset.bound:
            return {name: np.asarray(a[idx]) for name, a in self.dataset.bound.items()}
        parts: list[dict[str, np.ndarray]] = []
        run_start = prev = int(idx[0])
        for i in [int(v) for v in idx[1:]] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(self.dataset.arrays(run_start, prev + 1))
            if i is not None:
                run_start = prev = i
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def as_calibration_set(data: Any, model: onnx.ModelProto, max_samples: int | None = None) -> CalibrationSet:
    return CalibrationSet.open(data, model, max_samples=max_samples)
