"""`onnxprune sparsify INPUT OUTPUT (--sparsity F | --pattern N:M) ...`: the subcommand.

onnxprune.cli registers it; its flags are generated from onnxprune.options
(SparsifyOptions), and the data and measuring flags shared with `prune` come
from there as `common_options`, so this package stays below the command line
in the import layers.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from onnxprune.options import GateOptions, RuntimeOptions, SparsifyOptions, SparsityOptions, add_options, \
    options_from
from onnxprune.report import print_report
from onnxprune.sparsity.api import sparsify
from onnxprune.sparsity.layers import CRITERIA


def add_parser(sub, common_options: Callable[[Any], None]) -> argparse.ArgumentParser:
    """The `sparsify` subparser; `common_options(group)` adds prune's data and measuring options."""
    s = sub.add_parser(
        "sparsify", help="zero individual weights (unstructured or N:M such as 2:4), validated like prune",
        description="Zeroes individual weights of every Conv, Gemm and MatMul weight: a fraction of them "
                    "(--sparsity) or N:M (--pattern 2:4: at most N non-zero weights in every M consecutive ones along "
                    "the reduction axis, the layout sparse tensor cores and TensorRT's sparsity option read). "
                    "SparseGPT (the default with --calib) updates the remaining weights to compensate, layer after "
                    "layer, from each layer's inputs on the calibration data in the model sparsified so far, towards "
                    "the dense model's outputs. Shapes do not change, so it "
                    "composes after `prune`. onnxruntime's CPU and CUDA providers run the zeros as dense weights "
                    "(no speed-up); the gain is a smaller compressed file and TensorRT's 2:4 kernels.")
    s.add_argument("input")
    s.add_argument("output")
    add_options(s, SparsityOptions, choices={"criterion": tuple(CRITERIA)})
    add_options(s, SparsifyOptions().calibration, only=("calib", "calib_samples"))
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


def run(args) -> int:
    """Run `onnxprune sparsify` from the parsed arguments."""
    _, report = sparsify(args.input, args.output, options_from(args, SparsifyOptions()))
    print_report(report, args.report, args.markdown)
    print(f"wrote {args.output}")
    return 0
