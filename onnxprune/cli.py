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
from onnxprune.options import CalibrationOptions, DataOptions, DepthOptions, EvalOptions, GateOptions, PruneOptions, \
    ReconstructionOptions, RuntimeOptions, ScoringOptions, TargetOptions, add_options, options_from, parser_of, \
    positive
from onnxprune.report import print_report
from onnxprune.text import box_table, human
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models after training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="list pruning groups, what blocks them, FLOPs and params")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--all", action="store_true", help="list every blocked reason, not only the first")
    add_options(a, RuntimeOptions, only=("input_shapes",))
    add_options(a, TargetOptions, only=("prune_hidden", "prune_cache"))

    p = sub.add_parser("prune", help="remove channels/neurons and write a validated smaller model")
    p.add_argument("input")
    p.add_argument("output")
    add_options(p, TargetOptions, only=("ratio", "target_flops", "target_params", "lossless", "plan"))
    depth = p.add_argument_group(
        "depth", "Remove whole residual layers: the N with the lowest block influence (1 - cosine similarity of "
                 "their input and output on --calib data, or on random inputs without it) go and their input "
                 "passes through. Alone, or before --ratio/--target-flops/--target-params.")
    add_options(depth, DepthOptions)
    _add_pruning_options(p)
    add_options(p, TargetOptions, only=("prune_cache",))
    progressive = p.add_argument_group(
        "progressive pruning", "Reach the target in steps, each re-scoring the model the last one left, removing "
                               "its share, repairing (with --calib) and measuring (with --validate-data); past "
                               "--max-accuracy-drop the run stops and keeps the step before.")
    add_options(progressive, TargetOptions, only=("steps", "schedule"))
    add_options(p, PruneOptions, only=("save_plan",))
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
    add_options(gate, GateOptions, only=("validate_data", "max_accuracy_drop"))
    add_options(gate, RuntimeOptions, only=("measure_latency",))
    _add_measure_options(gate)
    _add_eval_parser(sub)
    _add_bench_parser(sub)
    _add_sweep_parser(sub)
    _add_sensitivity_parser(sub)
    sparsify_cli.add_parser(sub, _add_measure_options)
    return parser


def _add_pruning_options(p) -> None:
    """How units are chosen and repaired: prune and sweep."""
    add_options(p, ScoringOptions, choices={"criterion": tuple(sorted(CRITERIA))})
    add_options(p, TargetOptions, only=("strategy", "max_ratio", "round_to", "include", "exclude", "prune_hidden"))
    add_options(p, RuntimeOptions, only=("input_shapes", "seed"))
    c = p.add_argument_group("calibration and reconstruction (data-aware pruning)")
    add_options(c, CalibrationOptions)
    add_options(c, ReconstructionOptions)


def _add_measure_options(g) -> None:
    """Reading the data and timing the models: shared by prune's gate, sweep and sparsify."""
    add_options(g, DataOptions)
    add_options(g, GateOptions, only=("class_axis", "metric"))
    add_options(g, RuntimeOptions, only=("provider", "threads", "latency_runs", "latency_warmup", "progress"))


def cmd_analyze(args) -> int:
    report = analyze(args.model, args.input_shapes, prune_hidden=args.prune_hidden, prune_cache=args.prune_cache)
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
    _, report = prune(args.input, args.output, options_from(args, PruneOptions()))
    print_report(report, args.report, args.markdown)
    print(f"wrote {args.output}")
    return 0


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
    e.add_argument("--output", help="which model output to evaluate (default the first)")
    e.add_argument("--metric", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a custom metric(outputs, labels) -> number or dict, from a module or a .py file "
                        "(e.g. my_metrics.py:mae); repeatable")
    add_options(e, DataOptions)
    add_options(e, GateOptions, only=("class_axis",))
    # eval measures throughput over a data set, not single-stream latency: onnxruntime picks the threads
    add_options(e, RuntimeOptions, only=("provider", "threads", "progress"), defaults={"threads": 0},
                helps={"threads": "intra-op threads (0: onnxruntime chooses)"})
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--markdown", help="also write the table as Markdown to this file")


def _add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="latency of one or more models side by side, with speed-ups",
        description="Latency with onnxruntime: warm-up, then RUNS interleaved runs of every model (so drift hits "
                    "all alike); median/p90/min in ms and speed-up relative to the first model.")
    b.add_argument("models", nargs="+", metavar="MODEL")
    add_options(b, RuntimeOptions, only=("provider", "threads", "latency_runs", "latency_warmup", "input_shapes",
                                         "progress"),
                helps={"input_shapes": "fix input shapes, e.g. input:8x3x224x224,mask:8x128 (wins over --batch)"})
    b.add_argument("--batch", type=parser_of(positive), help="size of every dynamic batch (first) axis (default 1)")
    b.add_argument("--profile", action="store_true",
                   help="also print time per op type from onnxruntime's profiler (separate, untimed runs)")
    b.add_argument("--json", action="store_true", help="print JSON instead of tables")
    b.add_argument("--markdown", help="also write the latency table as Markdown to this file")


def _add_sweep_parser(sub) -> None:
    w = sub.add_parser(
        "sweep", help="prune at several ratios: accuracy, FLOPs, params and latency of each",
        description="Prunes MODEL at each ratio (as `prune` would, nothing written unless --output-dir), runs "
                    "every model over DATA and measures the gated number as prune's gate does (a custom --metric; "
                    "else top-1 accuracy with labels; else the worst output's fidelity to the dense model: top-1 "
                    "agreement for class scores, mean cosine similarity for other outputs) and times them together "
                    "(interleaved onnxruntime runs); prints a table of ratio, FLOPs kept, params kept, accuracy, "
                    "latency and speed-up. --plot draws accuracy vs FLOPs and vs latency (needs onnxprune[plot], "
                    "i.e. matplotlib).")
    w.add_argument("model")
    w.add_argument("--ratios", required=True, help="fractions REMOVED, comma-separated, e.g. 0.1,0.2,0.3,0.5")
    w.add_argument("--target", choices=["flops", "params", "ratio"], default="flops",
                   help="what a ratio removes: FLOPs of the model (default), parameters, or units of every "
                        "group (as --target-flops, --target-params, --ratio of prune)")
    w.add_argument("--data", required=True,
                   help=".npz/.npy arrays, an image folder (ROOT/<class>/<image>) or .jsonl, as `eval` reads it")
    add_options(w, GateOptions, only=("max_accuracy_drop",),
                helps={"max_accuracy_drop": "mark the ratios whose drop of the gated number is at most X (0.02 = 2 "
                                            "points of top-1, a mean cosine of 0.98, or the custom --metric's unit) "
                                            "and name the largest"})
    add_options(w, RuntimeOptions, only=("measure_latency",), helps={"measure_latency": "measure latency (default on)"})
    w.add_argument("--plot", metavar="FILE.png", help="plot accuracy vs FLOPs and vs latency (needs matplotlib)")
    w.add_argument("--output-dir", help="also write every pruned model here")
    w.add_argument("--json", action="store_true", help="print JSON instead of a table")
    w.add_argument("--report", help="write the results as JSON")
    w.add_argument("--markdown", help="write the table as Markdown")
    _add_pruning_options(w)
    _add_measure_options(w)


def _add_sensitivity_parser(sub) -> None:
    n = sub.add_parser(
        "sensitivity", help="per-group sensitivity curves on calibration data (what --strategy adaptive reads)",
        description="For every prunable group: the divergence of the model's outputs from the dense ones on "
                    "calibration data (KL for class scores, relative MSE otherwise) when the group loses a fraction "
                    "r of its units, r on --sensitivity-grid, the criterion choosing which units; and what one unit "
                    "costs as a share of the model's FLOPs. --plot draws the curves (needs onnxprune[plot]).")
    n.add_argument("model")
    add_options(n, CalibrationOptions, only=("calib", "calib_samples", "mask_input"))
    add_options(n, ScoringOptions, choices={"criterion": tuple(sorted(CRITERIA))})
    add_options(n, TargetOptions, only=("include", "exclude", "prune_hidden"))
    add_options(n, RuntimeOptions, only=("input_shapes", "seed", "progress"))
    add_options(n, DataOptions, skip=("batch_size", "batch_axis"))
    n.add_argument("--json", action="store_true", help="print JSON instead of a table")
    n.add_argument("--report", help="write the curves as JSON")
    n.add_argument("--plot", metavar="FILE.png", help="plot the curves (needs matplotlib)")


def cmd_sensitivity(args) -> int:
    from onnxprune.pipeline.sensitivity import sensitivity
    from onnxprune.plotting import require_matplotlib

    if args.calib is None:
        raise UsageError("sensitivity is measured on calibration data: give --calib DATA")
    if args.plot:
        require_matplotlib()  # fail before the long work
    result = sensitivity(args.model, options_from(args, PruneOptions()))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.render_table())
        for note in result.notes:
            print(note)
    if args.report:
        Path(args.report).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_eval(args) -> int:
    from onnxprune.runtime.evaluate import evaluate

    result = evaluate(args.model, args.data, options_from(args, EvalOptions()), reference=args.reference,
                      output=args.output)
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

    result = benchmark(args.models, provider=args.provider, threads=args.threads, runs=args.latency_runs,
                       warmup=args.latency_warmup, batch=args.batch, input_shapes=args.input_shapes,
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
    from onnxprune.plotting import require_matplotlib
    from onnxprune.sweep import parse_ratios, sweep

    ratios = parse_ratios(args.ratios)
    if args.plot:
        require_matplotlib()  # fail before the long work
    result = sweep(args.model, ratios, data=args.data, target=args.target, output_dir=args.output_dir,
                   plot=args.plot, options=options_from(args, PruneOptions()))
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "progress", None) is not None:  # --progress/--no-progress reach every bar, inner ones too
        os.environ["ONNXPRUNE_PROGRESS"] = "1" if args.progress else "0"
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        commands = {"analyze": cmd_analyze, "prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench,
                    "sweep": cmd_sweep, "sensitivity": cmd_sensitivity, "sparsify": sparsify_cli.run}
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

