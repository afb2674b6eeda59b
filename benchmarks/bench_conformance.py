"""Conformance: `prune --lossless` on real transformers architectures with planted dead structure.

    python benchmarks/bench_conformance.py [--only bert_dynamo,gpt2_legacy] [--why] [--markdown]

Every model in models/conformance/ (written by models/export_conformance.py: tiny random-weight
Hugging Face models, both PyTorch exporters, with dead heads, KV groups, neurons, channels and
whole residual branches planted) is pruned with `--lossless`.  Per model and exporter:

* outputs equal: the pruned model's outputs against the dense (dead-planted) model's on fresh
  random inputs at two batch sizes and sequence lengths, max |diff| / max |dense| <= 1e-4;
* removed share: (params before - params after) / removable params, where removable is the
  parameter count of the dense file minus that of `<model>_removed.onnx` (the same model with
  the planted structures physically removed in PyTorch, exported the same way).  The issue's
  bar is 95 %.

Decoders with a key-value cache (qwen2_kv: past_key_values.* inputs, present.* outputs) are pruned
with the cache allowed to shrink (`--lossless --prune-cache`) and compared over three generation
steps from an empty cache: logits, and the presents' kept heads (the pruned model's presents hold
the heads the planted dead KV groups leave).

--why prints, for models below the bar, the reasons the analysis gives for the groups it keeps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, not an installed one
import onnxprune  # noqa: E402
from onnxprune.cost import unique_parameters  # noqa: E402
from onnxprune.runtime.session import make_session  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table  # noqa: E402

FOLDER = ROOT / "models" / "conformance"
REL_TOL = 1e-4
BAR = 0.95


def feeds_for(spec: list[dict], batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for entry in spec:
        shape = [batch if d == "batch" else seq if d == "sequence" else int(d) for d in entry["shape"]]
        if entry["dtype"] == "int64":
            if entry.get("mask"):
                mask = np.ones(shape, np.int64)
                for b in range(1, shape[0]):
                    mask[b, max(2, shape[1] - 2 * b):] = 0  # padding at the end of later rows
                feeds[entry["name"]] = mask
            else:
                feeds[entry["name"]] = rng.integers(0, entry.get("high", 2), shape).astype(np.int64)
        else:
            feeds[entry["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def params(model: onnx.ModelProto) -> int:
    return unique_parameters(model)[0]


def measure(name: str, entry: dict, folder: Path = FOLDER) -> dict:
    dense = onnx.load(str(folder / entry["file"]))
    removed = onnx.load(str(folder / entry["removed"]))
    before, floor = params(dense), params(removed)
    row = {"name": name, "model": entry["model"], "exporter": entry["exporter"], "params": before,
           "removable": before - floor}
    start = time.perf_counter()
    if "cache" in entry:
        return measure_cached(row, dense, entry, start)
    try:
        pruned, report = onnxprune.prune(dense, lossless=True)
    except Exception as exc:  # a refusal or a failed validation is a result too
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}", removed=0, equal=False)
        return row
    row["seconds"] = time.perf_counter() - start
    row["removed"] = before - params(pruned)
    worst = 0.0
    dense_session, pruned_session = make_session(dense), make_session(pruned)
    for batch, seq, seed in ((1, 16, 0), (3, 7, 1)):
        feeds = feeds_for(entry["inputs"], batch, seq, seed)
        want, got = dense_session.run(None, feeds), pruned_session.run(None, feeds)
        for w, g in zip(want, got):
            if w.shape != g.shape:
                worst = float("inf")
                continue
            worst = max(worst, float(np.max(np.abs(w - g)) / max(float(np.max(np.abs(w))), 1e-12)))
    row["rel_diff"] = worst
    row["equal"] = worst <= REL_TOL
    row["notes"] = report.notes
    return row


def generate(session, model: onnx.ModelProto, cache: dict, batch: int, steps, seed: int = 0):
    """Outputs of each of len(steps) generation steps from an empty cache (the model's declared head
    counts), each step's presents fed back."""
    declared = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
    past = {n: np.zeros((batch, declared[n][1], 0, declared[n][3]), np.float32) for n in cache["inputs"]}
    rng, start, outs = np.random.default_rng(seed), 0, []
    for length in steps:
        feeds = {"input_ids": rng.integers(0, 64, (batch, length)).astype(np.int64),
                 "attention_mask": np.ones((batch, start + length), np.int64),
                 "position_ids": np.tile(np.arange(start, start + length), (batch, 1)).astype(np.int64), **past}
        got = session.run(None, feeds)
        outs.append(got)
        past = dict(zip(cache["inputs"], got[1:]))
        start += length
    return outs


def measure_cached(row: dict, dense: onnx.ModelProto, entry: dict, start: float) -> dict:
    pruned, _ = onnxprune.prune(dense, lossless=True, prune_cache=True)
    row["seconds"] = time.perf_counter() - start
    row["removed"] = row["params"] - params(pruned)
    cache = entry["cache"]
    masks = {(n, cache["axis"]): keep for n, keep in kept_heads(entry).items()}
    steps = (1, 1, 1) if cache["sequence"] == 1 else (4, 2, 1)
    worst = 0.0
    for batch in (1, 3):
        runs = [generate(make_session(m), m, cache, batch, steps) for m in (dense, pruned)]
        for want, got in zip(*runs):
            for k, (w, g) in enumerate(zip(want, got)):
                name = "logits" if k == 0 else cache["outputs"][k - 1]
                if (name, cache["axis"]) in masks:
                    w = w[:, masks[(name, cache["axis"])]]
                if w.shape != g.shape:
                    worst = float("inf")
                    continue
                worst = max(worst, float(np.max(np.abs(w - g)) / max(float(np.max(np.abs(w))), 1e-12)))
    row.update(rel_diff=worst, equal=worst <= REL_TOL, notes=[])
    return row


def kept_heads(entry: dict) -> dict[str, np.ndarray]:
    """Cache output -> the heads it keeps once the planted dead KV groups are gone."""
    kv = entry["inputs"][-1]["shape"][1]
    dead = {int(layer): groups for layer, groups in entry["planted"]["kv_groups"].items()}
    return {n: np.array([h not in dead.get(int(n.split(".")[1]), []) for h in range(kv)])
            for n in entry["cache"]["outputs"]}


def share(row: dict) -> float:
    return row["removed"] / row["removable"] if row["removable"] else 1.0


def reasons(path: Path, limit: int = 6) -> list[str]:
    """The distinct block reasons of groups that hold planted units (approximated: all blocked groups)."""
    analysis = onnxprune.analyze(path).analysis
    seen: dict[str, int] = {}
    for g in analysis.groups:
        for r in g.blocked:
            key = r if len(r) < 220 else r[:217] + "..."
            seen[key] = seen.get(key, 0) + 1
    return [f"{n}x {r}" for r, n in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model_exporter names (default: all)")
    ap.add_argument("--why", action="store_true", help="print block reasons for models below the bar")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--folder", type=Path, default=FOLDER, help="where the models and manifest.json are")
    args = ap.parse_args(argv)
    manifest = json.loads((args.folder / "manifest.json").read_text())
    names = [n for n in args.only.split(",") if n] or list(manifest)
    rows = []
    for name in names:
        row = measure(name, manifest[name], args.folder)
        rows.append(row)
        status = row.get("error") or (f"rel diff {row['rel_diff']:.1e}, removed {row['removed']}/"
                                      f"{row['removable']} ({share(row):.1%}) in {row['seconds']:.1f} s")
        print(f"{name:22s} {status}", flush=True)
        if args.why and (not row["equal"] or share(row) < BAR):
            for r in reasons(args.folder / manifest[name]["file"]):
                print(f"    {r}")
    header = ["model", "exporter", "params", "removable", "outputs equal", "removed", "share of removable"]
    table = [[r["model"], r["exporter"], str(r["params"]), str(r["removable"]),
              "error" if r.get("error") else ("yes" if r["equal"] else f"no ({r['rel_diff']:.1e})"),
              str(r["removed"]), f"{share(r):.1%}"] for r in rows]
    if args.markdown:
        print(markdown_table(header, table))
    else:
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for t in table:
            print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    passed = sum(1 for r in rows if r.get("equal") and share(r) >= BAR)
    print(f"{passed}/{len(rows)} models keep their outputs and remove >= {BAR:.0%} of the removable params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
