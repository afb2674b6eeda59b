"""Command line: `onnxprune analyze MODEL` and `onnxprune prune INPUT OUTPUT`.

Exit codes: 0 success, 1 other error, 2 bad usage, 3 unreadable or
unsupported model, 4 validation failed (nothing written), 5 impossible plan or
target, 6 output cannot be written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from onnxprune.errors import OnnxPruneError
from onnxprune.importance import CRITERIA
from onnxprune.pipeline import analyze, prune
from onnxprune.report import box_table, human
from onnxprune.runtime.inputs import parse_input_shapes


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models after training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="list pruning groups, what blocks them, FLOPs and params")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--input-shape", help="fix dynamic input dims, e.g. input:1x3x224x224")
    a.add_argument("--all", action="store_true", help="list every blocked reason, not only the first")

    p = sub.add_parser("prune", help="remove channels/neurons and write a validated smaller model")
    p.add_argument("input")
    p.add_argument("output")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ratio", type=_fraction, help="fraction of units REMOVED per group (uniform) or overall (global)")
    what.add_argument("--target-flops", type=_fraction, help="fraction of the model's FLOPs to REMOVE")
    what.add_argument("--target-params", type=_fraction, help="fraction of the model's parameters to REMOVE")
    what.add_argument("--lossless", action="store_true", help="remove only exactly-dead channels and zero branches")
    what.add_argument("--plan", help="apply a saved (possibly edited) plan JSON")
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
    p.add_argument("--save-plan", help="write the plan that was applied as JSON")
    p.add_argument("--report", help="write the report as JSON")
    p.add_argument("--markdown", help="write the before/after table as Markdown")
    p.add_argument("--input-shape", help="fix dynamic input dims for validation and FLOPs, e.g. input:1x3x224x224")
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_analyze(args) -> int:
    report = analyze(args.model, parse_input_shapes(args.input_shape))
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
        rows.append((str(g.id), f"{first.op_type} {g.name}{more}", str(g.size), str(len(g.params)), status))
    print(box_table(("#", "group (source)", "units", "slices", "status"), rows))
    s = report.stats
    print(f"{len(prunable)} of {len(groups)} groups prunable, {sum(g.size for g in prunable)} units. "
          f"Params {human(s.params)}, MACs {human(s.macs)}, FLOPs {human(s.flops)}.")
    return 0


def cmd_prune(args) -> int:
    _, report = prune(
        args.input,
        args.output,
        ratio=args.ratio,
        target_flops=args.target_flops,
        target_params=args.target_params,
        lossless=args.lossless,
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
    )
    print(report.render_table())
    print(report.summary())
    for note in report.notes:
        print(note)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report.render_markdown() + "\n")
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return {"analyze": cmd_analyze, "prune": cmd_prune}[args.command](args)
    except OnnxPruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
