"""The one contract every graph transformation follows, and the combinators that compose them.

    result = ApplyPlan(analysis, removed)(model)
    result.model, result.modified, result.record.to_dict()

A pass is an object with a `name` that is called with a model and returns a
`PassResult`: the model after the pass, whether it differs from the input,
and a `PassRecord` saying what was done (plain data, JSON-ready, nested for
combinators). Passes are *functional*: the input model is never changed; a
pass that changes something returns a new model, and a pass with nothing to
do returns the very model it was given, with modified=False. Because inputs
are never changed, a model can be kept (the dense reference, the model
before a guarded pass) without copying it, and anything computed from a
model object (an analysis) stays true for that object.

Combinators are passes too: `Sequence` runs passes in order, `Guarded` keeps
a pass's result only if a judge accepts it (else returns the input), and
`FixedPoint` repeats a pass until it stops changing the model, at most a
bounded number of rounds. Their records list their children's.
"""
from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

NOTHING_TO_DO = "nothing to do"


@dataclass
class PassRecord:
    """What one pass did: plain data for reports (`to_dict` is JSON-ready)."""

    name: str
    modified: bool
    summary: str                                           # one line
    details: dict[str, Any] = field(default_factory=dict)  # plain values: numbers, strings, lists, dicts
    children: list[PassRecord] = field(default_factory=list)  # a combinator's passes, in the order they ran
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {"name": self.name, "modified": self.modified, "summary": self.summary,
               "seconds": round(self.seconds, 3), "details": _plain(self.details)}
        if self.children:
            out["passes"] = [c.to_dict() for c in self.children]
        return out


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool  # False: `model` is the input model itself
    record: PassRecord


class Pass(abc.ABC):
    """Base class: subclasses set `name` and implement `run`; calling the pass times it and
    checks the one promise a caller relies on (modified=False hands back the input model)."""

    name: str = ""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        result = self.run(model)
        result.record.seconds = time.perf_counter() - start
        if not result.modified and result.model is not model:
            raise AssertionError(f"pass '{self.name}' reports no change but returned another model")
        return result

    @abc.abstractmethod
    def run(self, model: onnx.ModelProto) -> PassResult:
        """The pass itself; must not change `model`."""

    def unchanged(self, model: onnx.ModelProto, summary: str = NOTHING_TO_DO, **details: Any) -> PassResult:
        return PassResult(model, False, PassRecord(self.name, False, summary, details))

    def changed(self, model: onnx.ModelProto, summary: str, **details: Any) -> PassResult:
        return PassResult(model, True, PassRecord(self.name, True, summary, details))


class Sequence(Pass):
    """Run `passes` in order, each on the model the previous one returned."""

    def __init__(self, name: str, passes: Iterable[Pass]):
        self.name = name
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto) -> PassResult:
        current, children = model, []
        for p in self.passes:
            result = p(current)
            current = result.model
            children.append(result.record)
        changed = [c.name for c in children if c.modified]
        summary = ("changed by " + ", ".join(changed)) if changed else NOTHING_TO_DO
        return PassResult(current, current is not model, PassRecord(self.name, current is not model, summary,
                                                                    children=children))


@dataclass
class Verdict:
    """A judge's answer on a pass's result: keep it or not, and why (details: the measurements)."""

    keep: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


Judge = Callable[[onnx.ModelProto, onnx.ModelProto], Verdict]  # (model before, model after) -> verdict


class Guarded(Pass):
    """Keep-or-undo: run `inner`; if it changed the model, ask `judge` and keep the result only when
    the judge accepts it, else return the input. A pass with nothing to do is not judged.

    The record (named like `inner`, with `inner`'s record as its child) says which happened:
    details["verdict"] is "kept", "undone" or "nothing to do", details["reason"] the judge's reason,
    plus the judge's measurements."""

    def __init__(self, inner: Pass, judge: Judge):
        self.inner = inner
        self.judge = judge
        self.name = inner.name

    def run(self, model: onnx.ModelProto) -> PassResult:
        tried = self.inner(model)
        if not tried.modified:
            record = PassRecord(self.name, False, NOTHING_TO_DO, {"verdict": NOTHING_TO_DO}, [tried.record])
            return PassResult(model, False, record)
        verdict = self.judge(model, tried.model)
        details = {"verdict": "kept" if verdict.keep else "undone", "reason": verdict.reason, **verdict.details}
        if verdict.keep:
            return PassResult(tried.model, True, PassRecord(self.name, True, f"kept: {verdict.reason}", details,
                                                            [tried.record]))
        summary = f"undone: {verdict.reason}: kept the model before it"
        return PassResult(model, False, PassRecord(self.name, False, summary, details, [tried.record]))


class FixedPoint(Pass):
    """Repeat `inner` until a round leaves the model unchanged, at most `max_rounds` rounds.

    A pass that keeps changing the model stops at the bound with the last model (each round's
    output is a valid model); the record says so (details["converged"] False)."""

    def __init__(self, inner: Pass, max_rounds: int):
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
        self.inner = inner
        self.max_rounds = max_rounds
        self.name = inner.name

    def run(self, model: onnx.ModelProto) -> PassResult:
        current, children, converged = model, [], False
        for _ in range(self.max_rounds):
            result = self.inner(current)
            children.append(result.record)
            if not result.modified:
                converged = True
                break
            current = result.model
        changes = sum(c.modified for c in children)
        if not converged:
            summary = f"stopped after {self.max_rounds} round(s), still changing the model"
        else:
            summary = f"{changes} round(s) changed the model" if changes else NOTHING_TO_DO
        record = PassRecord(self.name, current is not model, summary,
                            {"rounds": len(children), "converged": converged}, children)
        return PassResult(current, current is not model, record)


def _plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays, tuples and sets turned into JSON types (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
