"""`onnxprune sparsify INPUT OUTPUT (--sparsity F | --pattern N:M) ...`: the subcommand.

onnxprune.cli registers it; the options shared with `prune` (reading data,
the custom metric, provider, threads, latency runs, progress) come from there
as `common_options`, and reading data and loading a metric as callables, so
this package stays below the command line in the import layers.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from onnxprune.report import print_report
from onnxprune.options import GateOptions, RuntimeOptions, add_options
from onnxprune.sparsity.api import sparsify
from onnxprune.sparsity.layers import CRITERIA
from onnxprune.sparsity.sparsegpt import DEFAULT_BLOCK, DEFAULT_DAMP


def add_parser(sub, common_options: Callable[[Any], None]) -> argparse.ArgumentParser:
    """The `sparsify` subparser; `common_options(group)` adds prune's data and measuring options."""
    s = sub.add_parser(
        "sparsify", help="zero individual weights (unstructured or N:M such as 2:4), validated like prune",
        description="Zeroes individual weights of every Conv, Gemm and MatMul weight: a fraction of them "
                    "(--sparsity) or N:M (--pattern 2:4: at most N non-zero weights in every M consecutive ones along "
                    "the reduction axis, the layout sparse tensor cores and TensorRT's sparsity option read). "
                    "SparseGPT (the default with --calib) updates the remaining weights to compensate, from the "
                    "Gram matrices of each layer's inputs on the calibration data. Shapes do not change, so it "
                    "composes after `prune`. onnxruntime's CPU and CUDA providers run the zeros as dense weights "
                    "(no speed-up); the gain is a smaller compressed file and TensorRT's 2:4 kernels.")
    s.add_argument("input")
    s.add_argument("output")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--sparsity", type=float, metavar="F", help="fraction of each weight's entries zeroed, "
                      "unstructured (0.5 = half)")
    what.add_argument("--pattern", metavar="N:M", help="at most N non-zero weights in every M consecutive ones along "
                      "the reduction axis (2:4 for sparse tensor cores)")
    s.add_argument("--criterion", choices=CRITERIA, help="magnitude (|w| per layer), wanda (|w| x input norm per "
                   "output; needs --calib) or sparsegpt (zero and update the rest; needs --calib). Default: sparsegpt "
                   "with --calib, else magnitude")
    s.add_argument("--calib", metavar="DATA", help="calibration data (eval formats; labels ignored)")
    s.add_argument("--calib-samples", type=int, default=128, help="at most this many calibration samples "
                   "(default 128)")
    s.add_argument("--positions-per-sample", type=int, default=256, metavar="N",
                   help="Conv output positions sampled per calibration sample for its Gram matrix (default 256)")
    s.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="only sparsify nodes whose name matches this glob, or of this op type")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="never sparsify nodes whose name matches this glob, or of this op type")
    s.add_argument("--block-size", type=int, default=DEFAULT_BLOCK,
                   help=f"SparseGPT: columns per lazy-update block (default {DEFAULT_BLOCK})")
    s.add_argument("--damp", type=float, default=DEFAULT_DAMP,
                   help=f"SparseGPT: damping added to the Gram matrix's diagonal, as a fraction of its mean "
                        f"(default {DEFAULT_DAMP})")
    add_options(s, RuntimeOptions, only=("input_shapes", "seed"))
    s.add_argument("--report", help="write the report as JSON")
    s.add_argument("--markdown", help="write the tables as Markdown")
    gate = s.add_argument_group(
        "validation gate", "As prune's: with --validate-data the dense and the sparsified model run over DATA "
                           "(accuracy with labels, else fidelity of every output), and --max-accuracy-drop X "
                           "writes nothing (exit code 9) past the budget.")
    add_options(gate, GateOptions, only=("validate_data", "max_accuracy_drop"))
    add_options(gate, RuntimeOptions, only=("measure_latency",))
    common_options(gate)
    return s


def run(args, open_data: Callable[[Any, str], Any], load_metric: Callable[[str], Any]) -> int:
    """Run `onnxprune sparsify`; `open_data(args, path)` and `load_metric(spec)` read data and metrics
    as the other commands do."""
    _, report = sparsify(
        args.input, args.output, sparsity=args.sparsity, pattern=args.pattern, criterion=args.criterion,
        calib=open_data(args, args.calib) if args.calib else None, calib_samples=args.calib_samples,
        positions_per_sample=args.positions_per_sample, include=args.include, exclude=args.exclude,
        block_size=args.block_size, damp=args.damp, input_shapes=args.input_shapes,
        seed=args.seed,
        validate_data=open_data(args, args.validate_data) if args.validate_data else None,
        max_accuracy_drop=args.max_accuracy_drop, measure_latency=args.measure_latency, batch_size=args.batch_size,
        provider=args.provider, threads=args.threads, latency_runs=args.latency_runs, latency_warmup=args.latency_warmup,
        progress=args.progress, metric=load_metric(args.metric) if args.metric else None,
        batch_axis=args.batch_axis, class_axis=args.class_axis)
    print_report(report, args.report, args.markdown)
    print(f"wrote {args.output}")
    return 0
