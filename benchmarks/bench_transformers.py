"""Transformers: a quarter of the attention heads and 30% of the FFN neurons removed.

    python benchmarks/bench_transformers.py [--part fixtures|base|both] [--base bert_encoder,vit,...]
                                            [--threads 1] [--runs 20] [--seq 128]

Part "fixtures": every committed transformer fixture (models/fixtures/transformers:
both PyTorch exporters; models/fixtures/ort_fused: onnxruntime-fused graphs) is
pruned with ``--ratio heads=0.25,kv-groups=0.5,neurons=0.3`` (LLaMA's 2 KV groups
per layer can only lose a whole group: half its query heads), the pruned model
is compared with the masking oracle (the dense model with the removed units
zeroed; max abs difference), and dense and pruned are timed side by side at
batch --fixture-batch and their longest sequence (16 positions).

Part "base" (needs torch, like models/export_transformers.py): the same four
architectures at their published base sizes (BERT-base: 110 M parameters, 12
layers of 12 heads x 64, FFN 3072; LLaMA at that width with 4 KV heads) are
exported with the TorchScript exporter into a temporary folder, pruned with
``--ratio heads=0.25,kv-groups=0.25,neurons=0.3`` (3 of 12 heads, 1 of 4 KV
groups), and timed at batch 1 and sequence length --seq.  The pruning time is
split into load, analysis, rewrite (the numbers the 20 s target is about),
validation and save.

Latency: onnxruntime CPU, --threads intra-op threads, median of --runs
interleaved runs after warm-up.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.text import human
from onnxprune.runtime.session import make_session
from onnxprune.strategy.plan import Plan
from onnxprune.testing import masked_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, paired_latency  # noqa: E402

FIXTURE_DIRS = [ROOT / "models" / "fixtures" / "transformers", ROOT / "models" / "fixtures" / "ort_fused"]
FIXTURE_RATIO = {"heads": 0.25, "kv-groups": 0.5, "neurons": 0.3}
BASE_RATIO = {"heads": 0.25, "kv-groups": 0.25, "neurons": 0.3}
BASE_MODELS = ["bert_encoder", "vit", "gpt2_decoder", "llama_decoder"]


def feeds_for(model: onnx.ModelProto, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids below 100 (every vocabulary here is larger), an all-ones attention mask,
    images of the model's static size."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            shape = [batch, seq][: len(dims)]
            feeds[vi.name] = (np.ones(shape) if "mask" in vi.name else rng.integers(0, 100, shape)).astype(np.int64)
        else:
            shape = [batch] + [d for d in dims[1:]]
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def head_summary(report) -> str:
    """'heads 4→3, ffn 256→184' from the report's group changes."""
    seen = []
    for c in report.changes:
        entry = f"{c.before}→{c.after}"
        if entry not in seen:
            seen.append(entry)
    return ", ".join(seen)


def oracle_diff(path: Path, plan_path: Path, pruned: onnx.ModelProto, feeds) -> float:
    """max |pruned - dense with the removed units zeroed| on `feeds`."""
    working, _ = prepare(path)
    analysis = build_analysis(working)
    reference = masked_reference(working, analysis, Plan.load(plan_path).removed_roots(analysis))
    got = make_session(pruned).run(None, feeds)
    want = make_session(reference).run(None, feeds)
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))


def fixtures_part(args) -> None:
    rows = []
    for folder in FIXTURE_DIRS:
        for path in sorted(folder.glob("*.onnx")):
            with tempfile.TemporaryDirectory() as tmp:
                plan = Path(tmp) / "plan.json"
                pruned, report = onnxprune.prune(path, ratio=FIXTURE_RATIO, save_plan=plan)
                dense = onnx.load(str(path))
                feeds = feeds_for(dense, args.fixture_batch, 16)
                diff = oracle_diff(path, plan, pruned, feeds)
            dense_t, pruned_t = paired_latency([dense, pruned], args.threads, args.runs, feeds=feeds)
            b, a = report.before, report.after
            rows.append([f"{folder.name}/{path.stem}", head_summary(report),
                         f"{human(b.params)} → {human(a.params)}", f"{a.flops / b.flops:.0%}", f"{diff:.1e}",
                         f"{dense_t['median']:.3f}", f"{pruned_t['median']:.3f}",
                         f"{dense_t['median'] / pruned_t['median']:.2f}×"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nFixtures: --ratio heads=0.25,kv-groups=0.5,neurons=0.3; batch {args.fixture_batch}, sequence 16; "
          f"onnxruntime {__import__('onnxruntime').__version__} CPU, {args.threads} thread(s), median of "
          f"{args.runs} interleaved runs (ms)\n")
    print(markdown_table(["fixture", "units per group (heads, FFN)", "params", "FLOPs kept", "oracle max diff",
                          "dense ms", "pruned ms", "speed-up"], rows))


def base_part(args) -> None:
    names = args.base.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export = [sys.executable, str(ROOT / "models" / "export_transformers.py"), "--size", "base",
                  "--exporters", "legacy", "--only", ",".join(names), "--out", tmp]
        print("exporting:", " ".join(export), file=sys.stderr, flush=True)
        subprocess.run(export, check=True, stdout=sys.stderr)
        for name in names:
            path = Path(tmp) / f"{name}_legacy.onnx"
            clock = time.perf_counter()
            pruned_path = Path(tmp) / f"{name}_pruned.onnx"
            pruned, report = onnxprune.prune(path, pruned_path, ratio=BASE_RATIO)
            wall = time.perf_counter() - clock
            t = report.timings
            del pruned
            dense = onnx.load(str(path), load_external_data=False)
            feeds = feeds_for(dense, 1, args.seq)
            del dense
            dense_t, pruned_t = paired_latency([str(path), str(pruned_path)], args.threads, args.runs, feeds=feeds)
            b, a = report.before, report.after
            rows.append([name, head_summary(report), f"{human(b.params)} → {human(a.params)}",
                         f"{a.flops / b.flops:.0%}", f"{t['analyze']:.1f}", f"{t['rewrite']:.1f}", f"{wall:.1f}",
                         f"{dense_t['median']:.1f}", f"{pruned_t['median']:.1f}",
                         f"{dense_t['median'] / pruned_t['median']:.2f}×"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nBase sizes: --ratio heads=0.25,kv-groups=0.25,neurons=0.3; batch 1, sequence {args.seq} "
          f"(ViT: 197 patches); onnxruntime CPU, {args.threads} thread(s), median of {args.runs} interleaved "
          "runs (ms); times in s (total: load, analysis, scoring, rewrite, validation)\n")
    print(markdown_table(["model", "units per group (heads, FFN)", "params", "FLOPs kept", "analysis s",
                          "rewrite s", "total s", "dense ms", "pruned ms", "speed-up"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fixtures", "base", "both"], default="both")
    parser.add_argument("--base", default=",".join(BASE_MODELS), help="comma-separated from " + ",".join(BASE_MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the base-size runs")
    parser.add_argument("--fixture-batch", type=int, default=8)
    args = parser.parse_args()
    if args.part in ("fixtures", "both"):
        fixtures_part(args)
    if args.part in ("base", "both"):
        base_part(args)


if __name__ == "__main__":
    main()
