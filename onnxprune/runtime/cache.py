"""A decoder's key-value cache whose heads were pruned (`prune_cache`): what changes at the model's interface.

A decoder exported with a cache (optimum, onnxruntime-genai) reads `past_key_values.{i}.key`
and `.value` (batch, KV heads, past, head_dim) and writes `present.{i}.key` / `.value`. When
heads or KV groups go from the cache too, the pruned model reads and writes only the kept heads:
a caller allocates its cache from the new head counts (the pruned file declares them; the prune
report lists them per layer). Everything else about the interface stays.

Both layouts reach this module the same way, as the analysis' `cache_inputs` / `cache_outputs`: the
plain one (MatMul/Softmax attention, a Concat appending to the cache: analysis/rules/concat.py) and
onnxruntime-genai's (com.microsoft.GroupQueryAttention reading past_key / past_value and writing
present_key / present_value: analysis/rules/contrib.py).

`CacheChange` says which heads each cache input and output keeps, and turns what was measured
on the dense model into what the pruned one must show: its input shapes, its feeds (the kept
heads of the dense feeds), its expected output shapes and outputs (the kept heads of the dense
presents). In lossless mode the reference must be a cache the model could have written: a dead
KV group's cached values are zero (the analysis relies on it), so a non-empty random past is
zeroed at the removed heads before the dense model runs on it (`zeroed`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis import Analysis
from onnxprune.errors import UsageError


@dataclass
class CacheChange:
    """Per cache input and output: the head axis and which of its positions the pruned model keeps."""

    inputs: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    #: lossless with a non-empty past: the dense feeds with the removed heads' cache zero, and the dense
    #: model's outputs on them (None: the dense model's outputs on its validation feeds already are)
    reference: tuple[dict[str, np.ndarray], list[np.ndarray]] | None = None

    @classmethod
    def of(cls, analysis: Analysis, removed_roots: set[int]) -> "CacheChange | None":
        """The cache inputs and outputs that lose heads when `removed_roots` go (None: none does)."""
        state = analysis.state
        if not removed_roots or not (state.cache_inputs or state.cache_outputs):
            return None
        masks = analysis.keep_masks(removed_roots)

        def lost(caches: dict[str, int]) -> dict[str, tuple[int, np.ndarray]]:
            return {name: (axis, masks[(name, axis)]) for name, axis in caches.items() if (name, axis) in masks}

        change = cls(lost(state.cache_inputs), lost(state.cache_outputs))
        return change if change.inputs or change.outputs else None

    # -- the pruned model's side of what was measured on the dense one ---------------------------------
    def input_shapes(self, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
        """Concrete input shapes with the kept head counts on the cache inputs."""
        out = {name: list(dims) for name, dims in shapes.items()}
        for name, (axis, keep) in self.inputs.items():
            if name in out:
                out[name][axis] = int(keep.sum())
        return out

    def output_shapes(self, names: list[str], shapes: list[tuple] | None) -> list[tuple] | None:
        """Expected output shapes (None for a dim not to compare) with the kept head counts on the cache
        outputs."""
        if shapes is None:
            return None
        out = []
        for name, dims in zip(names, shapes):
            if name in self.outputs:
                axis, keep = self.outputs[name]
                dims = tuple(int(keep.sum()) if i == axis else d for i, d in enumerate(dims))
            out.append(dims)
        return out

    def kept_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The dense model's feeds as the pruned model takes them: the cache inputs' kept heads."""
        return {name: _take(value, *self.inputs[name]) if name in self.inputs else value
                for name, value in feeds.items()}

    def kept_outputs(self, names: list[str], outputs: list[np.ndarray]) -> list[np.ndarray]:
        """The dense model's outputs as the pruned model must give them: the cache outputs' kept heads."""
        return [_take(value, *self.outputs[name]) if name in self.outputs else value
                for name, value in zip(names, outputs)]

    def kept_reference(self, reference):
        """The dense model's outputs on validation data (a runtime.gate.DenseReference) as the pruned model
        must give them: each cache output's kept heads (its samples on axis 0, as the data passes hold them)."""
        outputs = {}
        for name, blocks in reference.outputs.items():
            if name not in self.outputs:
                outputs[name] = blocks
                continue
            if reference.output_axes.get(name, 0) != 0:
                raise UsageError(f"prune_cache (--prune-cache) with validation data: cache output '{name}' holds "
                                 "the samples past its first axis; validate the pruned model with a generation "
                                 "loop of your own")
            axis, keep = self.outputs[name]
            outputs[name] = _take(blocks, axis, keep) if isinstance(blocks, np.ndarray) else \
                [_take(b, axis, keep) for b in blocks]
        return dataclasses.replace(reference, outputs=outputs)

    def zeroed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The dense feeds with the removed heads' cache zero (what a model whose removed heads are dead
        would have cached)."""
        out = dict(feeds)
        for name, (axis, keep) in self.inputs.items():
            if name in out:
                value = np.array(out[name], copy=True)
                index = [slice(None)] * value.ndim
                index[axis] = np.flatnonzero(~keep)
                value[tuple(index)] = 0
                out[name] = value
        return out

    def holds_values(self, feeds: dict[str, np.ndarray]) -> bool:
        """Whether any cache input in `feeds` is non-empty (a past of length 0 holds nothing)."""
        return any(feeds[name].size for name in self.inputs if name in feeds)

    def heads(self) -> dict[str, int]:
        """Cache input or output -> the heads it now holds."""
        return {name: int(keep.sum()) for name, (_, keep) in {**self.inputs, **self.outputs}.items()}


def _take(value: np.ndarray, axis: int, keep: np.ndarray) -> np.ndarray:
    return np.take(value, np.flatnonzero(keep), axis=axis)
