"""Command line: `onnxprune analyze MODEL`, `onnxprune prune INPUT OUTPUT`,
`onnxprune eval MODEL --data DATA [--reference DENSE]`,
`onnxprune bench MODEL [MODEL ...]` and `onnxprune sweep MODEL --ratios R,R,... --data DATA`.

Exit codes: 0 success, 1 other error, 2 bad usage, 3 unreadable or
unsupported model, 4 validation failed (nothing written), 5 impossible plan or
target, 6 output cannot be written, 7 evaluation data unreadable or not
matching the model's inputs (DataError), 8 execution provider not available
(ProviderError), 9 accuracy gate: the drop on --validate-data exceeds
--max-accuracy-drop (AccuracyDropError; nothing written), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); an interrupted run leaves no file behind.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from onnxprune.errors import AccuracyDropError, OnnxPruneError, UsageError
from onnxprune.importance import CRITERIA
from onnxprune.pipeline import analyze, prune
from onnxprune.report import box_table, human, print_report
from onnxprune.runtime.inputs import parse_input_shapes
from onnxprune.sparsity import cli as sparsify_cli


def _version() -> str:
    import onnx
    import onnxruntime

    from onnxprune.version import __version__

    return f"onnxprune {__version__} (onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` and staged output cleans up on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1)")
    return value


def _ratio(text: str) -> float | dict[str, float]:
    """0.3, or per unit kind: heads=0.25,neurons=0.3."""
    if "=" not in text:
        return _fraction(text)
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        out[kind.strip()] = _fraction(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models after training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="list pruning groups, what blocks them, FLOPs and params")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--input-shape", help="fix dynamic input dims, e.g. input:1x3x224x224")
    a.add_argument("--all", action="store_true", help="list every blocked reason, not only the first")
    a.add_argument("--prune-hidden", action="store_true", help=PRUNE_HIDDEN_HELP)

    p = sub.add_parser("prune", help="remove channels/neurons and write a validated smaller model")
    p.add_argument("input")
    p.add_argument("output")
    what = p.add_mutually_exclusive_group()  # one of them, or --drop-layers alone (checked in main)
    what.add_argument("--ratio", type=_ratio,
                      help="fraction of units REMOVED per group (uniform) or overall (global); per unit kind: "
                           "heads=0.25,neurons=0.3 (kinds: channels, neurons, heads, kv-groups, hidden)")
    what.add_argument("--target-flops", type=_fraction, help="fraction of the model's FLOPs to REMOVE")
    what.add_argument("--target-params", type=_fraction, help="fraction of the model's parameters to REMOVE")
    what.add_argument("--lossless", action="store_true", help="remove only exactly-dead channels and zero branches")
    what.add_argument("--plan", help="apply a saved (possibly edited) plan JSON")
    depth = p.add_argument_group(
        "depth", "Remove whole residual layers: the N with the lowest block influence (1 - cosine similarity of "
                 "their input and output on --calib data, or on random inputs without it) go and their input "
                 "passes through. Alone, or before --ratio/--target-flops/--target-params.")
    depth.add_argument("--drop-layers", type=_positive, metavar="N", help="drop N residual layers (or --drop-unit)")
    depth.add_argument("--drop-unit", choices=["layer", "block", "attention", "mlp"], default="layer",
                       help="what --drop-layers counts: a transformer layer or ResNet block (default), any residual "
                            "sub-block, or only attention / feed-forward sub-blocks (pre-norm models)")
    _add_pruning_options(p)
    p.add_argument("--save-plan", help="write the plan that was applied as JSON")
    p.add_argument("--report", help="write the report as JSON")
    p.add_argument("--markdown", help="write the before/after table as Markdown")
    gate = p.add_argument_group(
        "validation gate",
        "With --validate-data, the dense and the pruned model run over DATA and the table adds top-1/top-5 accuracy "
        "(data with labels), the fidelity of every output to the dense model (cosine similarity, relative L2 error; "
        "top-1 agreement for outputs of class scores), a custom --metric if given, and latency (interleaved "
        "onnxruntime runs). With --max-accuracy-drop X, a drop of the gated number by more than X writes nothing and "
        "exits with code 9. The gated number: the custom --metric if given; else top-1 accuracy (labels); else, "
        "worst output first, 1 - top-1 agreement for class scores and 1 - mean cosine similarity for other outputs "
        "(maps, sequences, embeddings). X is absolute: 0.02 = 2 points of accuracy or agreement, a mean cosine of "
        "0.98, or 0.02 of the custom metric.")
    gate.add_argument("--validate-data", metavar="DATA",
                      help="data as `eval` reads it: .npz/.npy arrays, an image folder (ROOT/<class>/<image>) or .jsonl")
    gate.add_argument("--max-accuracy-drop", type=_budget, metavar="X",
                      help="refuse to write the model if the gated number drops by more than X (0.02 = 2 points of "
                           "top-1, a mean cosine of 0.98, or the custom --metric's own unit)")
    gate.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                      help="measure dense vs pruned latency (default: on with --validate-data)")
    _add_measure_options(gate)
    _add_eval_parser(sub)
    _add_bench_parser(sub)
    _add_sweep_parser(sub)
    sparsify_cli.add_parser(sub, _add_measure_options)
    return parser


def _budget(text: str) -> float:
    """At least 0; in [0, 1] unless a custom --metric sets the unit (checked by prune and sweep)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{value} is not a budget: a drop of at least 0 (0.02 = 2 points of top-1)")
    return value


def _class_axis(text: str) -> int | str:
    """An axis number, or "none": no output holds class scores."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an axis number or 'none'") from None


def _axis(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


BATCH_AXIS_HELP = ("the axis of the model's inputs that holds the samples (default 0; 1 for a time-major "
                   "[time, batch, ...] input). The data still holds samples first; outputs hold them on the axis "
                   "named like the inputs' batch dimension, else on this axis")
CLASS_AXIS_HELP = ("the class axis of outputs that hold class scores, in the model's layout (default: from the "
                   "labels, else only a [batch, classes] float output has one); 'none': no output holds class scores")


PRUNE_HIDDEN_HELP = ("also prune the hidden (residual-stream) width of transformers through LayerNorm/RMSNorm: "
                     "not lossless, their statistics change; name it in a ratio as hidden=R")


def _add_pruning_options(p) -> None:
    p.add_argument("--criterion", default="l1", choices=sorted(CRITERIA), help="importance criterion (default l1)")
    p.add_argument("--strategy", default="uniform", choices=["uniform", "global"],
                   help="same ratio in every group, or one global ranking (default uniform)")
    p.add_argument("--max-ratio", type=float, default=0.9, help="most any group may lose (default 0.9)")
    p.add_argument("--round-to", type=int, default=8,
                   help="keep a multiple of N units per group (default 8: CPU kernels run odd widths slowly)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="only prune groups whose source node name matches this glob, or op type")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="never prune groups whose source node name matches this glob, or op type")
    p.add_argument("--input-shape", help="fix dynamic input dims for validation, FLOPs and latency, "
                                         "e.g. input:1x3x224x224")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-hidden", action="store_true", help=PRUNE_HIDDEN_HELP)
    c = p.add_argument_group("calibration and reconstruction (data-aware pruning)")
    c.add_argument("--calib", metavar="DATA", help="calibration data (eval formats; labels ignored): enables the "
                   "data-aware criteria and reconstruction after pruning")
    c.add_argument("--calib-samples", type=int, default=512, help="at most this many calibration samples")
    c.add_argument("--ablation-samples", type=int, metavar="N",
                   help="calibration samples per ablated unit for --criterion ablation (default 64; lowered, with a note, "
                   "when all ablations would exceed the FLOP budget)")
    c.add_argument("--no-least-squares", dest="least_squares", action="store_false",
                   help="skip the least-squares refit of consumers")
    c.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                   help="skip bias compensation for removed inputs")
    c.add_argument("--no-bn-recalibration", dest="bn_recalibration", action="store_false",
                   help="skip BatchNorm statistics recalibration (and, for BN folded into convs, "
                   "per-channel output statistics matching)")


def _calibration_options(args) -> dict:
    """prune()'s calibration keywords from the options `_add_pruning_options` defines."""
    return {"calib": _open_data(args, args.calib) if args.calib else None, "calib_samples": args.calib_samples,
            "least_squares": args.least_squares, "bias_correction": args.bias_correction,
            "bn_recalibration": args.bn_recalibration, "ablation_samples": args.ablation_samples}


def _add_measure_options(g) -> None:
    """Reading the data and timing the models: shared by prune's gate and sweep."""
    g.add_argument("--batch-size", type=_positive, default=32,
                   help="samples per data pass run when the batch axis is dynamic (default 32; a model that refuses "
                        "a batch is fed one sample at a time)")
    g.add_argument("--batch-axis", type=_axis, default=0, metavar="N", help=BATCH_AXIS_HELP)
    g.add_argument("--class-axis", type=_class_axis, metavar="N|none", help=CLASS_AXIS_HELP)
    g.add_argument("--metric", metavar="FILE.py:FUNCTION",
                   help="a custom metric(outputs, labels) -> one number, higher is better, from a .py file or a "
                        "module (outputs: the first output, samples first; labels: the data's, or None). It becomes "
                        "the gated number: the drop is dense - pruned, and --max-accuracy-drop is in its unit")
    g.add_argument("--preprocess", help="image folders: a preset (imagenet, none), a JSON file or inline JSON "
                                        "(see `onnxprune eval --help`)")
    g.add_argument("--tokenizer", help="JSONL text: a tokenizers tokenizer.json")
    g.add_argument("--max-length", type=_positive, help="JSONL text: truncate sequences to this many tokens")
    g.add_argument("--text-key", default="text", help="JSONL text: the field holding the text (default text)")
    g.add_argument("--label-key", default="label", help="JSONL text: the field holding the class id (default label)")
    g.add_argument("--provider", default="CPUExecutionProvider",
                   help="onnxruntime execution provider for data passes and latency (default CPUExecutionProvider)")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    g.add_argument("--runs", type=_positive, default=50, help="timed latency runs per model (default 50)")
    g.add_argument("--warmup", type=int, default=5, help="untimed latency runs per model first (default 5)")
    _add_progress_option(g)


def _add_progress_option(g) -> None:
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: only when stderr is a terminal)")


def _open_data(args, data: str):
    from onnxprune.runtime.data import open_data

    return open_data(data, preprocess=args.preprocess, tokenizer=args.tokenizer, max_length=args.max_length,
                     text_key=args.text_key, label_key=args.label_key)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="accuracy on labelled data, and fidelity against a reference model",
        description="Accuracy (top-1/top-5) of MODEL on DATA and, with --reference, its fidelity to the reference "
                    "(top-1 agreement, cosine similarity, max/mean |error|, KL divergence). DATA: an .npz with one "
                    "array per model input plus 'labels' (a single-input model may name its array anything), an "
                    ".npy of inputs, a folder of images with one subfolder per class (needs onnxprune[images]), or "
                    ".jsonl text with --tokenizer (needs onnxprune[text]).")
    e.add_argument("model")
    e.add_argument("--data", required=True, help=".npz/.npy arrays, an image folder (ROOT/<class>/<image>) or .jsonl")
    e.add_argument("--reference", help="the model to compare against (e.g. the dense model)")
    e.add_argument("--batch-size", type=_positive, default=32,
                   help="samples per run when the batch axis is dynamic (default 32); a static batch is used as is, "
                        "and a model that refuses a batch is fed one sample at a time")
    e.add_argument("--batch-axis", type=_axis, default=0, metavar="N", help=BATCH_AXIS_HELP)
    e.add_argument("--output", help="which model output to evaluate (default the first)")
    e.add_argument("--class-axis", type=_class_axis, metavar="N|none", help=CLASS_AXIS_HELP)
    e.add_argument("--preprocess", help="image folders: a preset (imagenet, none), a JSON file or inline JSON with "
                                        "resize, crop, crop_ratio, mean, std, scale, layout, mode, interpolation")
    e.add_argument("--tokenizer", help="JSONL text: a tokenizers tokenizer.json")
    e.add_argument("--max-length", type=_positive, help="JSONL text: truncate sequences to this many tokens")
    e.add_argument("--text-key", default="text", help="JSONL text: the field holding the text (default text)")
    e.add_argument("--label-key", default="label", help="JSONL text: the field holding the class id (default label)")
    e.add_argument("--metric", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a custom metric(outputs, labels) -> number or dict, from a module or a .py file "
                        "(e.g. my_metrics.py:mae); repeatable")
    e.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider")
    e.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: onnxruntime chooses)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--markdown", help="also write the table as Markdown to this file")
    _add_progress_option(e)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="latency of one or more models side by side, with speed-ups",
        description="Latency with onnxruntime: warm-up, then RUNS interleaved runs of every model (so drift hits "
                    "all alike); median/p90/min in ms and speed-up relative to the first model.")
    b.add_argument("models", nargs="+", metavar="MODEL")
    b.add_argument("--provider", default="CPUExecutionProvider",
                   help="onnxruntime execution provider (default CPUExecutionProvider)")
    b.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    b.add_argument("--runs", type=_positive, default=50, help="timed runs per model (default 50)")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    b.add_argument("--batch", type=_positive, help="size of every dynamic batch (first) axis (default 1)")
    b.add_argument("--input-shape", help="fix input shapes, e.g. input:8x3x224x224,mask:8x128 (wins over --batch)")
    b.add_argument("--profile", action="store_true",
                   help="also print time per op type from onnxruntime's profiler (separate, untimed runs)")
    b.add_argument("--json", action="store_true", help="print JSON instead of tables")
    b.add_argument("--markdown", help="also write the latency table as Markdown to this file")
    _add_progress_option(b)


def _add_sweep_parser(sub) -> None:
    w = sub.add_parser(
        "sweep", help="prune at several ratios: accuracy, FLOPs, params and latency of each",
        description="Prunes MODEL at each ratio (as `prune` would, nothing written unless --output-dir), runs "
                    "every model over DATA and measures the gated number as prune's gate does (a custom --metric; "
                    "else top-1 accuracy with labels; else the worst output's fidelity to the dense model: top-1 "
                    "agreement for class scores, mean cosine similarity for other outputs) and times them together (interleaved onnxruntime runs); prints a table of ratio, "
                    "FLOPs kept, params kept, accuracy, latency and speed-up. --plot draws accuracy vs FLOPs and "
                    "vs latency (needs onnxprune[plot], i.e. matplotlib).")
    w.add_argument("model")
    w.add_argument("--ratios", required=True, help="fractions REMOVED, comma-separated, e.g. 0.1,0.2,0.3,0.5")
    w.add_argument("--target", choices=["flops", "params", "ratio"], default="flops",
                   help="what a ratio removes: FLOPs of the model (default), parameters, or units of every "
                        "group (as --target-flops, --target-params, --ratio of prune)")
    w.add_argument("--data", required=True,
                   help=".npz/.npy arrays, an image folder (ROOT/<class>/<image>) or .jsonl, as `eval` reads it")
    w.add_argument("--max-accuracy-drop", type=_budget, metavar="X",
                   help="mark the ratios whose drop of the gated number is at most X (0.02 = 2 points of top-1, "
                        "a mean cosine of 0.98, or the custom --metric's unit) and name the largest")
    w.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure latency (default on)")
    w.add_argument("--plot", metavar="FILE.png", help="plot accuracy vs FLOPs and vs latency (needs matplotlib)")
    w.add_argument("--output-dir", help="also write every pruned model here")
    w.add_argument("--json", action="store_true", help="print JSON instead of a table")
    w.add_argument("--report", help="write the results as JSON")
    w.add_argument("--markdown", help="write the table as Markdown")
    _add_pruning_options(w)
    _add_measure_options(w)


def cmd_analyze(args) -> int:
    report = analyze(args.model, parse_input_shapes(args.input_shape), prune_hidden=args.prune_hidden)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    groups = report.analysis.groups
    prunable = [g for g in groups if g.prunable]
    rows = []
    for g in groups:
        status = "prunable" if g.prunable else "blocked: " + (g.blocked[0] if not args.all else " | ".join(g.blocked))
        if g.prunable and g.inexact:
            status += " (not exact: " + g.inexact[0] + ")"
        first = g.sources[0]
        more = f" +{len(g.sources) - 1}" if len(g.sources) > 1 else ""
        rows.append((str(g.id), f"{first.op_type} {g.name}{more}", g.describe_units(), str(len(g.params)), status))
    print(box_table(("#", "group (source)", "units", "slices", "status"), rows))
    s = report.stats
    kinds = Counter(g.kind for g in prunable)
    print(f"{len(prunable)} of {len(groups)} groups prunable ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))}), "
          f"{sum(g.size for g in prunable)} units. Params {human(s.params)}, MACs {human(s.macs)}, FLOPs {human(s.flops)}.")
    for cause in report.causes:
        print("blocked: " + cause)
    if report.input_note:
        print(report.input_note)
    return 0


def cmd_prune(args) -> int:
    data = _open_data(args, args.validate_data) if args.validate_data is not None else None
    _, report = _prune(args, data)
    print_report(report, args.report, args.markdown)
    print(f"wrote {args.output}")
    return 0


def _prune(args, data):
    return prune(
        args.input,
        args.output,
        ratio=args.ratio,
        target_flops=args.target_flops,
        target_params=args.target_params,
        lossless=args.lossless,
        prune_hidden=args.prune_hidden,
        drop_layers=args.drop_layers,
        drop_unit=args.drop_unit,
        plan=args.plan,
        criterion=args.criterion,
        strategy=args.strategy,
        max_ratio=args.max_ratio,
        round_to=args.round_to,
        include=args.include,
        exclude=args.exclude,
        save_plan=args.save_plan,
        input_shapes=parse_input_shapes(args.input_shape),
        seed=args.seed,
        validate_data=data,
        **_calibration_options(args),
        max_accuracy_drop=args.max_accuracy_drop,
        measure_latency=args.latency,
        batch_size=args.batch_size,
        provider=args.provider,
        threads=args.threads,
        latency_runs=args.runs,
        latency_warmup=args.warmup,
        progress=args.progress,
        metric=_load_metric(args.metric) if args.metric else None,
        batch_axis=args.batch_axis,
        class_axis=args.class_axis,
    )


def _load_metric(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    import importlib
    import importlib.util

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"--metric '{spec}': expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loader is None or not Path(where).is_file():
                raise UsageError(f"--metric '{spec}': no such file {where}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except OnnxPruneError:
        raise
    except Exception as exc:
        raise UsageError(f"--metric '{spec}': cannot import {where} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--metric '{spec}': {where} has no function '{attr}'")
    return fn


def cmd_eval(args) -> int:
    from onnxprune.runtime.data import open_data
    from onnxprune.runtime.evaluate import evaluate

    data = open_data(args.data, preprocess=args.preprocess, tokenizer=args.tokenizer, max_length=args.max_length,
                     text_key=args.text_key, label_key=args.label_key)
    metrics = {spec.rpartition(":")[2]: _load_metric(spec) for spec in args.metric} or None
    result = evaluate(args.model, data, reference=args.reference, metric=metrics, batch_size=args.batch_size,
                      batch_axis=args.batch_axis, output=args.output, axis=args.class_axis, provider=args.provider,
                      threads=args.threads, progress=args.progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.render_table())
        print(result.summary())
    if args.markdown:
        Path(args.markdown).write_text(result.render_markdown() + "\n")
    return 0


def cmd_bench(args) -> int:
    from onnxprune.runtime.bench import benchmark

    result = benchmark(args.models, provider=args.provider, threads=args.threads, runs=args.runs,
                       warmup=args.warmup, batch=args.batch, input_shapes=parse_input_shapes(args.input_shape),
                       profile=args.profile, progress=args.progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.render_table())
        if args.profile:
            print("Time per op type (ms per run, as onnxruntime ran it after its fusions):")
            print(result.render_profile())
    if args.markdown:
        Path(args.markdown).write_text(result.render_markdown() + "\n")
    return 0


def cmd_sweep(args) -> int:
    from onnxprune.sweep import parse_ratios, require_matplotlib, sweep

    ratios = parse_ratios(args.ratios)
    if args.plot:
        require_matplotlib()  # fail before the long work
    result = sweep(args.model, ratios, data=_open_data(args, args.data), target=args.target,
                   criterion=args.criterion, strategy=args.strategy, max_ratio=args.max_ratio,
                   round_to=args.round_to, include=args.include, exclude=args.exclude,
                   prune_hidden=args.prune_hidden, input_shapes=parse_input_shapes(args.input_shape), seed=args.seed,
                   max_accuracy_drop=args.max_accuracy_drop, measure_latency=args.latency,
                   batch_size=args.batch_size, provider=args.provider, threads=args.threads,
                   latency_runs=args.runs, latency_warmup=args.warmup, output_dir=args.output_dir,
                   plot=args.plot, progress=args.progress, metric=_load_metric(args.metric) if args.metric else None,
                   batch_axis=args.batch_axis, class_axis=args.class_axis, **_calibration_options(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.render_table())
        if args.plot:
            print(f"wrote {args.plot}")
    if args.report:
        Path(args.report).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(result.render_markdown() + "\n")
    return 0


def _check_prune_mode(parser, args) -> None:
    width = args.ratio is not None or args.target_flops is not None or args.target_params is not None
    if args.drop_layers is None and not (width or args.lossless or args.plan is not None):
        parser.error("prune: one of --ratio, --target-flops, --target-params, --lossless, --plan or --drop-layers "
                     "is required")
    if args.drop_layers is not None and (args.lossless or args.plan is not None):
        parser.error("prune: --drop-layers combines with --ratio, --target-flops or --target-params, not with "
                     "--lossless or --plan (a saved plan records its dropped layers)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prune":
        _check_prune_mode(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "progress", None) is not None:  # --progress/--no-progress reach every bar, inner ones too
        os.environ["ONNXPRUNE_PROGRESS"] = "1" if args.progress else "0"
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        commands = {"analyze": cmd_analyze, "prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench,
                    "sweep": cmd_sweep, "sparsify": lambda a: sparsify_cli.run(a, _open_data, _load_metric)}
        return commands[args.command](args)
    except OnnxPruneError as exc:
        if isinstance(exc, AccuracyDropError) and exc.report is not None:  # what was measured; nothing written
            print(exc.report.render_table())
            print(exc.report.summary())
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("onnxprune: terminated; nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
