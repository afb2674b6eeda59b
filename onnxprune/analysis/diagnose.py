"""Why little or nothing is prunable, in words a user can act on.

Two kinds of cause, most telling first: families of ops the pruner does not
handle (onnxruntime's fused int8 ops, spectrogram front ends), counted by op type with
advice (onnxprune.ops); then the most frequent blocking reasons over the groups,
with how many groups each blocks and one example.
"""
from __future__ import annotations

import re
from collections import Counter

import onnx

from onnxprune.analysis import Analysis
from onnxprune.ops import UNSUPPORTED_FAMILIES

_QUOTED = re.compile(r"'[^']*'")


def op_family_causes(model: onnx.ModelProto) -> list[str]:
    """'quantized operator ops (MatMulIntegerToFloat x12, QAttention x4): ... prune the float model, then
    quantize it'."""
    counts = Counter(n.op_type for n in model.graph.node)
    lines = []
    for family in UNSUPPORTED_FAMILIES:
        found = sorted(((op, counts[op]) for op in family.op_types if counts[op]), key=lambda e: (-e[1], e[0]))
        if found:
            ops = ", ".join(f"{op} ×{n}" for op, n in found[:4]) + (", …" if len(found) > 4 else "")
            lines.append(f"{family.name} ({ops}): {family.advice}")
    return lines


def top_blocking_reasons(analysis: Analysis, limit: int = 3) -> list[str]:
    """The most frequent first blocking reason over blocked groups (names stripped to compare)."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for group in analysis.groups:
        if not group.blocked:
            continue
        key = " ".join(_QUOTED.sub("…", group.blocked[0]).split())
        counts[key] += 1
        example.setdefault(key, group.blocked[0])
    return [f"{n} group{'s' if n > 1 else ''}: {example[key]}" for key, n in counts.most_common(limit)]


def prunability_causes(analysis: Analysis) -> list[str]:
    """Op families first, then the top blocking reasons; empty when nothing blocks."""
    lines = op_family_causes(analysis.view.model)
    blocked = sum(1 for g in analysis.groups if g.blocked)
    if blocked:
        lines.append(f"{blocked} of {len(analysis.groups)} groups blocked; most often: "
                     + "; ".join(top_blocking_reasons(analysis)))
    elif not analysis.groups:
        lines.append("no layer opens a prunable group (no Conv, Gemm or MatMul with constant weights)")
    return lines


def headline(analysis: Analysis) -> str:
    """The first cause, short, for the first line of a refusal: an op family with its counts, else
    the most frequent blocking reason with its names left out ("ReduceSum … reduces over axis 1 …")."""
    families = op_family_causes(analysis.view.model)
    if families:
        return families[0].split(":")[0]
    reasons = Counter(" ".join(_QUOTED.sub("…", g.blocked[0]).split()) for g in analysis.groups if g.blocked)
    if not reasons:
        return ""
    reason, count = reasons.most_common(1)[0]
    reason = reason.split(" (")[0]
    return f"{count} group{'s' if count > 1 else ''}: {reason[:120]}"


def explain(analysis: Analysis) -> str:
    """Causes as an indented block, for the end of an error message."""
    causes = prunability_causes(analysis)
    return "" if not causes else "\nWhy:\n  - " + "\n  - ".join(causes)
