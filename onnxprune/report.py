"""The prune report: one object, rendered as a terminal table, JSON or Markdown."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from onnxprune.cost import ModelCost


@dataclass
class ModelStats:
    params: int
    macs: int
    flops: int
    file_size: int
    op_counts: Counter

    @classmethod
    def from_cost(cls, cost: ModelCost, file_size: int) -> "ModelStats":
        return cls(cost.params, cost.macs, cost.flops, file_size, Counter(cost.op_counts))

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "flops": self.flops, "file_size": self.file_size,
                "op_counts": dict(sorted(self.op_counts.items()))}


@dataclass
class GroupChange:
    name: str
    op_type: str
    before: int
    after: int


@dataclass
class PruneReport:
    input: str
    output: str | None
    mode: str
    before: ModelStats
    after: ModelStats
    groups_total: int
    groups_prunable: int
    changes: list[GroupChange] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "mode": self.mode,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "groups": {"total": self.groups_total, "prunable": self.groups_prunable,
                       "changed": [c.__dict__ for c in self.changes]},
            "validation": {"checks": self.checks, "max_abs_diff_vs_dense": self.max_abs_diff},
            "notes": self.notes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # -- rendering -------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for op in sorted(set(self.before.op_counts) | set(self.after.op_counts)):
            rows.append((op, str(self.before.op_counts.get(op, 0)), str(self.after.op_counts.get(op, 0))))
        rows.append(("Parameters", human(self.before.params), change(self.before.params, self.after.params)))
        rows.append(("MACs", human(self.before.macs), change(self.before.macs, self.after.macs)))
        rows.append(("FLOPs", human(self.before.flops), change(self.before.flops, self.after.flops)))
        rows.append(("Model size", human_bytes(self.before.file_size),
                     change(self.before.file_size, self.after.file_size, human_bytes)))
        return rows

    def render_table(self) -> str:
        return box_table(("", "Original", "Pruned"), self.rows())

    def render_markdown(self) -> str:
        lines = ["| | Original | Pruned |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows()]
        return "\n".join(lines)

    def summary(self) -> str:
        changed = len(self.changes)
        text = (f"{self.mode}: {changed} of {self.groups_prunable} prunable groups changed "
                f"({self.groups_total - self.groups_prunable} blocked; `onnxprune analyze` says why). "
                f"Checks passed: {', '.join(self.checks)}.")
        if self.max_abs_diff is not None:
            text += f" Max |difference| from the dense model: {self.max_abs_diff:.3g}."
        return text


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def change(before: float, after: float, fmt=human) -> str:
    if before == 0:
        return fmt(after)
    return f"{fmt(after)} ({(after - before) / before:+.1%})"


def box_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(l, m, r):
        return l + m.join("─" * (w + 2) for w in widths) + r

    def row(cells):
        return "│" + "│".join(f" {str(c):<{w}} " if i == 0 else f" {str(c):>{w}} "
                              for i, (c, w) in enumerate(zip(cells, widths))) + "│"

    out = [line("┌", "┬", "┐"), row(header), line("├", "┼", "┤")]
    out += [row(r) for r in rows]
    out.append(line("└", "┴", "┘"))
    return "\n".join(out)
