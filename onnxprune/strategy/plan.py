"""A plan is plain data: for each group, the unit indices to keep.

It is what `--save-plan` writes and `--plan` replays: review it, edit it, apply
it again to the same model.  Groups are matched by name (the first source
node) and checked by size, so a plan made for another model fails loudly.

An optional "drop" list records the residual layers or blocks removed by
depth pruning (`--drop-layers`; `onnxprune.strategy.depth`), applied before
the groups (whose names then refer to the shallower model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.analysis import Analysis
from onnxprune.errors import PlanError

FORMAT = "onnxprune-plan/1"


@dataclass
class GroupPlan:
    name: str
    size: int
    keep: list[int]


@dataclass
class Plan:
    groups: list[GroupPlan] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    drop: list[dict] = field(default_factory=list)  # dropped residual units (strategy.depth), if any

    # -- conversion -------------------------------------------------------------
    @classmethod
    def from_keep(cls, analysis: Analysis, keep: dict[int, np.ndarray], meta: dict | None = None) -> "Plan":
        groups = []
        for gid in sorted(keep):
            g = analysis.groups[gid]
            kept = sorted(int(i) for i in keep[gid])
            if len(kept) < g.size:
                groups.append(GroupPlan(g.name, g.size, kept))
        return cls(groups, dict(meta or {}))

    def removed_roots(self, analysis: Analysis) -> set[int]:
        by_name = {g.name: g for g in analysis.groups}
        removed: set[int] = set()
        for gp in self.groups:
            g = by_name.get(gp.name)
            if g is None:
                raise PlanError(f"plan names group '{gp.name}', which this model does not have; "
                                "was the plan made for another model?")
            if g.size != gp.size:
                raise PlanError(f"group '{gp.name}' has {g.size} units here but {gp.size} in the plan")
            if g.blocked:
                raise PlanError(f"group '{gp.name}' cannot be pruned: {g.blocked[0]}")
            bad = [i for i in gp.keep if not 0 <= i < g.size]
            if bad:
                raise PlanError(f"group '{gp.name}': keep indices {bad[:5]} out of range 0..{g.size - 1}")
            if not gp.keep:
                raise PlanError(f"group '{gp.name}': the plan keeps no unit; keep at least one")
            keep = set(gp.keep)
            removed.update(int(r) for i, r in enumerate(g.roots) if i not in keep)
        return removed

    # -- files ------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "format": FORMAT,
            "meta": self.meta,
            "groups": [{"name": g.name, "size": g.size, "keep": g.keep} for g in self.groups],
        }
        if self.drop:
            out["drop"] = self.drop
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{path}: not an onnxprune plan (expected format '{FORMAT}')")
        try:
            groups = [GroupPlan(str(g["name"]), int(g["size"]), [int(i) for i in g["keep"]]) for g in data["groups"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{path}: malformed group entry ({exc})") from exc
        return cls(groups, data.get("meta", {}), _drop_entries(data.get("drop"), path))


def _drop_entries(entries, path) -> list[dict]:
    """The optional "drop" list: each entry names the dropped unit's residual nodes ("adds")."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise PlanError(f"{path}: 'drop' must be a list of dropped layers or blocks")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("adds"), list) or not e["adds"]:
            raise PlanError(f"{path}: malformed drop entry {e!r} (needs 'adds', the residual node names)")
        out.append(dict(e, adds=[str(a) for a in e["adds"]]))
    return out
