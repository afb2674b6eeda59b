"""Run a model that is being repaired level by level, each level through only the nodes no level ran before.

Least squares refits the consumers of one level at a time, from the inputs
the pruned model gives them once the levels before were refit. Run from the
graph inputs each time, level k costs a prefix of the model: about depth / 2
full passes in all, the bulk of a transformer's repair time. But a node that
an earlier level j ran is an ancestor of a level-j input, and no consumer
refit since (level j or deeper) is among those ancestors: a consumer upstream
of a level-j input has a level below j. So the values of every node already
run are still right. Keep the tensors they produced that nodes not yet run
read (the frontier: a transformer's residual stream and its mask), and run
each new level from them: one full pass over the data in all.

The frontier of every calibration sample is held in memory; when it would
pass the cap, `advance` says no and the caller goes back to running
prefixes (`capture.Capture`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.capture import calibration_session, first_samples, needed_nodes
from onnxprune.calibration.data import CalibrationSet
from onnxprune.ir.graph_view import reads
from onnxprune.ir.editor import rebuilt


class IncrementalCapture:
    """Tensors of a model under repair, level by level, over fixed calibration splits (always in the
    same batches): `advance(model, wanted)` runs the nodes `wanted` needs that no earlier call ran,
    from the kept frontier; `batches(split, wanted)` then yields (n, {tensor: value}) per batch."""

    def __init__(self, splits: Sequence[CalibrationSet], batch_size: int, memory_cap: int, threads: int = 0):
        self.splits = list(splits)
        self.batch_size = batch_size
        self.memory_cap = memory_cap
        self.threads = threads
        self.done: set[str] = set()  # names of the nodes already run
        self.kept: dict[str, list[list[np.ndarray]]] = {}  # tensor -> per split, per batch (as fed)
        # per split, per batch: (real samples, samples fed: a static batch is padded)
        self.counts = [s.batch_counts(batch_size) for s in self.splits]
        self.spent = False  # gave up once (memory cap, unnamed nodes): prefixes from then on

    def advance(self, model: onnx.ModelProto, wanted: Sequence[str]) -> bool:
        """Run what `wanted` still needs; False (and spent) when it cannot: the kept tensors would pass the
        memory cap, or the graph's nodes are not named uniquely (they are tracked by name)."""
        if self.spent:
            return False
        names = [n.name for n in model.graph.node]
        if len(set(names)) != len(names) or "" in names:
            return self._give_up()
        segment, frontier = _segment(model, self.done, wanted)
        if any(t not in self.kept for t in frontier):
            return self._give_up()  # a tensor let go before (or a graph input): cannot resume from it
        ran = self.done | {n.name for n in segment.graph.node}
        later = {x for n in model.graph.node if n.name not in ran for x in reads(n)}
        outputs = list(dict.fromkeys(t for t in [*wanted, *(o for n in segment.graph.node for o in n.output
                                                             if o in later)] if t not in self.kept))
        if outputs and not self._run(segment, frontier, outputs):
            return self._give_up()
        self.done = ran
        for name in [t for t in self.kept if t not in later and t not in wanted]:
            del self.kept[name]  # no node left to run reads it
        return True

    def batches(self, split: int, wanted: Sequence[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(n, the wanted tensors' values for the batch's n real samples) per batch of `split`."""
        for b, (n, fed) in enumerate(self.counts[split]):
            yield n, {t: first_samples(self.kept[t][split][b], n, fed) for t in wanted}

    # -- internals --------------------------------------------------------------------------------
    def _run(self, segment: onnx.ModelProto, frontier: list[str], outputs: list[str]) -> bool:
        for t in frontier:
            sample = next(batches[0] for batches in self.kept[t] if batches)
            segment.graph.input.append(helper.make_tensor_value_info(
                t, helper.np_dtype_to_tensor_dtype(sample.dtype), None))
        segment.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        session = calibration_session(segment, threads=self.threads)
        graph_inputs = {i.name for i in session.get_inputs()} - set(frontier)
        new: dict[str, list[list[np.ndarray]]] = {t: [[] for _ in self.splits] for t in outputs}
        size = sum(a.nbytes for lists in self.kept.values() for batches in lists for a in batches)
        for s, data in enumerate(self.splits):
            for b, (feeds, _) in enumerate(data.batches(self.batch_size)):
                given = {k: v for k, v in feeds.items() if k in graph_inputs}
                given.update((t, self.kept[t][s][b]) for t in frontier)
                for t, value in zip(outputs, session.run(outputs, given)):
                    new[t][s].append(value)
                    size += value.nbytes
                if size > self.memory_cap:
                    return False
        self.kept.update(new)
        return True

    def _give_up(self) -> bool:
        self.spent, self.kept = True, {}
        return False


def _segment(model: onnx.ModelProto, done: set[str], wanted: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The nodes `wanted` needs that are not in `done`, as a model reading the graph inputs it uses and the
    frontier (the tensors those nodes read from `done` nodes); and that frontier."""
    graph = model.graph
    nodes, frontier = needed_nodes(model, wanted, done)
    used = {x for n in nodes for x in reads(n)}
    constants = {t.name for t in graph.initializer}
    return rebuilt(model, node=nodes, initializer=[t for t in graph.initializer if t.name in used],
                   input=[i for i in graph.input if i.name in used and i.name not in constants], output=[],
                   value_info=[]), frontier
