"""The prune report: one object, rendered as a terminal table, JSON or Markdown."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.cost import ModelCost
from onnxprune.runtime.measures import LatencyStats, QualityStats
from onnxprune.text import box_table, change, human, human_bytes


@dataclass
class ModelStats:
    """One side of the before/after table.  `params` and `param_bytes` count distinct tensors
    (a weight read by several layers once, as the file stores it; see onnxprune.cost)."""

    params: int
    macs: int
    flops: int
    file_size: int
    op_counts: Counter
    param_bytes: int = 0

    @classmethod
    def from_cost(cls, cost: ModelCost, file_size: int) -> "ModelStats":
        return cls(cost.params, cost.macs, cost.flops, file_size, Counter(cost.op_counts), cost.param_bytes)

    def to_dict(self) -> dict:
        return {"params": self.params, "param_bytes": self.param_bytes, "macs": self.macs, "flops": self.flops,
                "file_size": self.file_size, "op_counts": dict(sorted(self.op_counts.items()))}


@dataclass
class GroupChange:
    name: str
    op_type: str
    before: int
    after: int


@dataclass
class AttentionChange:
    """One attention layer's head counts before and after pruning: what a runtime config calls
    num_attention_heads and num_key_value_heads (a generation loop allocates its cache from them)."""

    name: str                # the group: its first source node (the layer's query projection)
    heads: tuple[int, int]     # num_attention_heads: before, after
    kv_heads: tuple[int, int]  # num_key_value_heads: before, after

    @classmethod
    def of_groups(cls, groups, removed: set[int]) -> list["AttentionChange"]:
        """Every attention group (analysis.Group) in graph order, or [] when none lost heads."""
        out = []
        for g in groups:
            before = g.head_counts()
            if before is None:
                continue
            after = g.head_counts(sum(1 for r in g.roots.tolist() if int(r) not in removed))
            out.append(cls(g.name, (before[0], after[0]), (before[1], after[1])))
        return out if any(c.heads[0] != c.heads[1] or c.kv_heads[0] != c.kv_heads[1] for c in out) else []

    def to_dict(self) -> dict:
        return {"name": self.name, "num_attention_heads": list(self.heads), "num_key_value_heads": list(self.kv_heads)}


def attention_summary(changes: list[AttentionChange], cache: dict[str, int] | None) -> str:
    """One paragraph: the head counts per layer a runtime config needs, and whether the cache changed."""
    def counts(which: int) -> str:
        pairs = [(c.heads[which], c.kv_heads[which]) for c in changes]
        if len(set(pairs)) == 1:
            return f"{pairs[0][0]}/{pairs[0][1]} in each of {len(pairs)} layer(s)"
        return ", ".join(f"{q}/{kv}" for q, kv in pairs)

    text = (f"Attention heads per layer (num_attention_heads/num_key_value_heads), in graph order: {counts(1)} "
            f"(were {counts(0)}).")
    if cache:
        text += (" The key-value cache inputs and outputs now hold these KV heads: a generation loop allocates "
                 "past_key_values from them (per layer).")
        if len({(c.heads[1], c.kv_heads[1]) for c in changes}) > 1:
            # measured: onnxruntime-genai 0.14.1 sizes every layer from genai_config.json, 0.15.2 to 0.18.0 read
            # each layer's past_key_values shape from the model
            text += (" The layers now differ: a config with one num_key_value_heads for all layers cannot describe "
                     "them (transformers' config.json; onnxruntime-genai before 0.15 refuses the model), while "
                     "onnxruntime-genai 0.15 and later read each layer's count from the model; for one count in "
                     "every layer, prune with a uniform ratio (--ratio kv-groups=F).")
    return text


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
    quality: QualityStats | None = None  # with validate_data
    latency: LatencyStats | None = None  # with measure_latency
    depth: dict | None = None  # with drop_layers: strategy.depth.DepthReport.to_dict()
    steps: list[dict] | None = None  # a progressive run's steps (onnxprune.pipeline.progressive)
    passes: list[dict] = field(default_factory=list)  # every pass that ran, in order: PassRecord.to_dict()
    attention: list[AttentionChange] = field(default_factory=list)  # head counts per layer, when heads went
    cache: dict[str, int] | None = None  # prune_cache: cache input/output -> the heads it now holds

    @property
    def gate_passed(self) -> bool | None:
        """None when no accuracy budget was set."""
        return None if self.quality is None else self.quality.passed

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
            "quality": self.quality.to_dict() if self.quality is not None else None,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "depth": self.depth,
            "steps": self.steps,
            "passes": self.passes,
            "attention": [c.to_dict() for c in self.attention],
            "cache": self.cache,
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
        if self.quality is not None:
            rows += self.quality.rows()
        if self.latency is not None:
            rows += self.latency.rows()
        return rows

    def render_table(self) -> str:
        return box_table(("", "Original", "Pruned"), self.rows())

    def render_markdown(self) -> str:
        lines = ["| | Original | Pruned |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows()]
        if self.quality is not None:
            lines += ["", self.quality.verdict()]
        if self.latency is not None:
            lines += ["", f"Latency: {self.latency.describe()}."]
        return "\n".join(lines)

    def summary(self) -> str:
        changed = len(self.changes)
        text = (f"{self.mode}: {changed} of {self.groups_prunable} prunable groups changed "
                f"({self.groups_total - self.groups_prunable} blocked; `onnxprune analyze` says why). "
                f"Checks passed: {', '.join(self.checks)}.")
        if self.max_abs_diff is not None:
            text += f" Max |difference| from the dense model: {self.max_abs_diff:.3g}."
        if self.attention:
            text += "\n" + attention_summary(self.attention, self.cache)
        if self.quality is not None:
            text += "\n" + ("Accuracy gate: " if self.quality.max_drop is not None else "Validation: ") + \
                self.quality.verdict()
        if self.latency is not None:
            text += f"\nLatency: {self.latency.describe()}."
        return text


def print_report(report, json_path: str | None = None, markdown_path: str | None = None) -> None:
    """What `prune` and `sparsify` print (table, summary, notes) and the files they write on request.
    `report` is any report with render_table, summary, notes, to_dict and render_markdown."""
    print(report.render_table())
    print(report.summary())
    for note in report.notes:
        print(note)
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(report.render_markdown() + "\n")
