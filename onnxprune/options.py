"""Every option of `prune`, `sweep` and `sparsify`, as plain frozen data, each default written once.

Options are grouped by concern. The Python API takes the groups
(`prune(model, out, target=TargetOptions(target_flops=0.5))`) or the same
names as flat keywords (`prune(model, out, target_flops=0.5)`): every field
name is unique across the groups, so a keyword says which group it sets.
The command line is generated from the same fields (onnxprune.cli
`add_options`): the flag (`--target-flops`), help text, parser and choices are
in each field's metadata, so an option and its default exist in one place.

Values here are what a user gave; checks that need only the options are the
groups' `check()` methods (they raise UsageError, exit code 2), and checks
that need the model or the data happen where those are read.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from onnxprune.errors import UsageError

UNIT_KINDS = ("channels", "neurons", "heads", "kv-groups", "hidden")
STRATEGIES = ("uniform", "global", "adaptive")
SCHEDULES = ("linear", "cubic")
SENSITIVITY_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)  # fractions of a group's units removed for its curve
DROP_UNITS = ("layer", "block", "attention", "mlp")


def option(default: Any = None, help: str = "", *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: tuple | None = None, metavar: str | None = None, exclusive: str | None = None,
           switch: bool = False, repeat: bool = False, cli: bool = True) -> Any:
    """A dataclass field that also describes its command-line flag.

    flag: the flag's name (default --field-name); parse: text -> value (argparse `type`); switch: a
    boolean with --flag / --no-flag (a default of True shows only --no-flag); repeat: the flag may be
    given several times, collecting a tuple; exclusive: fields with the same tag form one mutually
    exclusive group; cli=False: API only."""
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar,
            "exclusive": exclusive, "switch": switch, "repeat": repeat, "cli": cli}
    return field(default=default, metadata=meta)


# ---- parsers of command-line text (argparse `type`); ValueError becomes argparse's usage error ----

def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{value} is not a fraction in [0, 1)")
    return value


def ratio_text(text: str) -> float | dict[str, float]:
    """0.3, or per unit kind: heads=0.25,neurons=0.3."""
    if "=" not in text:
        return fraction(text)
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        out[kind.strip()] = fraction(value)
    return out


def grid_text(text: str) -> tuple[float, ...]:
    """'0.1,0.25,0.5' -> (0.1, 0.25, 0.5): fractions in (0, 1), sorted."""
    values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise ValueError(f"'{text}': fractions of units removed in (0, 1), comma-separated, e.g. 0.1,0.25,0.5")
    return values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} must be at least 0")
    return value


def budget(text: str) -> float:
    """At least 0; in [0, 1] unless a custom metric sets the unit (checked with the metric)."""
    value = float(text)
    if not value >= 0.0:
        raise ValueError(f"{value} is not a budget: a drop of at least 0 (0.02 = 2 points of top-1)")
    return value


def class_axis_text(text: str) -> int | str:
    """An axis number, or "none": no output holds class scores."""
    return "none" if text.strip().lower() == "none" else int(text)


def input_shapes_text(spec: str | None) -> dict[str, list[int]]:
    """'input:1x3x224x224,mask:1x128' -> {'input': [1, 3, 224, 224], 'mask': [1, 128]}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        name, sep, dims = part.strip().rpartition(":")
        if not sep or not name:
            raise UsageError(f"--input-shape '{part}': expected NAME:D1xD2x..., e.g. input:1x3x224x224")
        try:
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError as exc:
            raise UsageError(f"--input-shape '{part}': dimensions must be integers") from exc
    return out


# ---- the groups ----

@dataclass(frozen=True)
class TargetOptions:
    """What to remove, how much, and where."""

    ratio: float | Mapping[str, float] | None = option(
        None, "fraction of units REMOVED per group (uniform) or overall (global); per unit kind: "
              "heads=0.25,neurons=0.3 (kinds: channels, neurons, heads, kv-groups, hidden)",
        parse=ratio_text, exclusive="what")
    target_flops: float | None = option(None, "fraction of the model's FLOPs to REMOVE", parse=fraction,
                                        exclusive="what")
    target_params: float | None = option(None, "fraction of the model's parameters to REMOVE", parse=fraction,
                                         exclusive="what")
    lossless: bool = option(False, "remove only exactly-dead channels and zero branches", switch=True,
                            exclusive="what")
    plan: Any = option(None, "apply a saved (possibly edited) plan JSON", exclusive="what")
    strategy: str | None = option(None, "uniform: the same ratio in every group; global: one ranking of all "
                                            "units; adaptive: per-group ratios from measured sensitivity curves "
                                            "(the least predicted divergence per FLOP saved; needs --calib). "
                                            "Default: adaptive with --calib (one step, one ratio or target for "
                                            "all kinds), else uniform", choices=STRATEGIES)
    max_ratio: float = option(0.9, "most any group may lose", parse=float)
    round_to: int = option(8, "keep a multiple of N units per group (CPU kernels run odd widths slowly)", parse=int)
    include: tuple[str, ...] = option((), "only prune groups whose source node name matches this glob, or op type",
                                      metavar="PATTERN", repeat=True)
    exclude: tuple[str, ...] = option((), "never prune groups whose source node name matches this glob, or op type",
                                      metavar="PATTERN", repeat=True)
    steps: int = option(1, "reach the target in N steps, each re-scoring the current model, removing its share, "
                           "repairing and measuring; with --max-accuracy-drop it stops before the budget is "
                           "exceeded and keeps the last model within it", parse=positive, metavar="N")
    schedule: str = option("linear", "how the target is spread over --steps: linear, or cubic (larger steps "
                                     "first, smaller near the target)", choices=SCHEDULES)
    prune_hidden: bool = option(False, "also prune the hidden (residual-stream) width of transformers through "
                                       "LayerNorm/RMSNorm: not lossless, their statistics change; name it in a "
                                       "ratio as hidden=R", switch=True)
    prune_cache: bool = option(False, "let heads and KV groups go from a decoder's key-value cache too "
                                      "(past_key_values.* inputs, present.* outputs): the pruned model reads and "
                                      "writes fewer heads per layer, and the report states the "
                                      "num_attention_heads / num_key_value_heads a generation config needs",
                               switch=True)

    @property
    def width(self) -> bool:
        """A ratio or a FLOP/parameter target (width pruning by score), as opposed to lossless or a plan."""
        return self.ratio is not None or self.target_flops is not None or self.target_params is not None

    def check(self, depth: "DepthOptions") -> None:
        modes = [self.width, self.lossless, self.plan is not None]
        if depth.drop_layers is not None and (self.lossless or self.plan is not None):
            raise UsageError("drop_layers (--drop-layers) combines with a ratio or target, not with lossless "
                             "(dropped layers change the outputs) or a plan (a saved plan records its dropped layers)")
        if depth.drop_layers is None and sum(modes) != 1:
            raise UsageError("choose one of: a target (ratio / --ratio, target_flops / --target-flops, target_params "
                             "/ --target-params), lossless (--lossless), a plan (--plan), or drop_layers "
                             "(--drop-layers)")
        if self.steps < 1:
            raise UsageError(f"steps (--steps) must be at least 1, got {self.steps}")
        if self.prune_cache and self.steps > 1:
            raise UsageError("prune_cache (--prune-cache) changes the model's cache inputs and outputs, which the "
                             "steps of a progressive run (--steps) would each change again: prune in one step")
        if self.steps > 1 and not self.width:
            raise UsageError("steps (--steps) divide a ratio or target (--ratio, --target-flops, --target-params) "
                             "into parts; lossless elimination and plans are applied at once")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule '{self.schedule}' ({', '.join(SCHEDULES)})")
        if not self.width:
            return
        given = [v for v in (self.ratio, self.target_flops, self.target_params) if v is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of ratio, target_flops, target_params")
        if isinstance(self.ratio, Mapping):
            unknown = sorted(set(self.ratio) - set(UNIT_KINDS))
            if unknown:
                raise UsageError(f"unknown unit kind(s) {unknown} in the ratio; use {', '.join(UNIT_KINDS)}")
            if self.strategy not in (None, "uniform"):
                raise UsageError("ratios per unit kind need the uniform strategy")
        values = list(given[0].values()) if isinstance(given[0], Mapping) else given
        for value in values:
            if not 0.0 <= value < 1.0:
                raise UsageError(f"target {value} must be a fraction to remove, in [0, 1)")
        if not any(values):
            raise UsageError("a ratio or target of 0 removes nothing; give a fraction to REMOVE, e.g. --ratio 0.3 "
                             "or --target-flops 0.3 (--lossless removes only exactly-dead structure)")
        if not 0.0 < self.max_ratio <= 1.0:
            raise UsageError("max_ratio must be in (0, 1]")
        if self.round_to < 1:
            raise UsageError("round_to must be >= 1")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy '{self.strategy}' ({', '.join(STRATEGIES)})")

    def default_strategy(self, calibrated: bool) -> str:
        """What prune uses where no strategy was named: adaptive when calibration data can measure the
        sensitivity curves and the repair can check the plan against uniform's (one step, one ratio or
        target for every kind), else uniform."""
        if self.strategy is not None:
            return self.strategy
        adaptive = calibrated and self.width and not isinstance(self.ratio, Mapping) and self.steps == 1
        return "adaptive" if adaptive else "uniform"

    def describe(self, criterion: str, kept: str | None = None) -> str:
        """One line for the report: what was asked (and `kept`, the strategy whose plan was kept when it is
        not the one asked for)."""
        if isinstance(self.ratio, Mapping):
            what = "ratio " + ", ".join(f"{k} {v:g}" for k, v in self.ratio.items()) + " of units removed"
        elif self.ratio is not None:
            what = f"ratio {self.ratio:g} of units removed"
        elif self.target_flops is not None:
            what = f"target: {self.target_flops:.0%} of FLOPs removed"
        else:
            what = f"target: {self.target_params:.0%} of parameters removed"
        strategy = self.strategy if kept in (None, self.strategy) else f"{self.strategy}: the {kept} plan kept"
        return f"{what} ({criterion}, {strategy})"


@dataclass(frozen=True)
class ScoringOptions:
    """How units are ranked."""

    criterion: str = option("l1", "importance criterion")  # choices: importance.CRITERIA (cli)
    sensitivity_grid: tuple[float, ...] = option(
        SENSITIVITY_GRID, "fractions of each group's units removed to measure its sensitivity curve "
                          "(--strategy adaptive, `onnxprune sensitivity`)", parse=grid_text,
        metavar="R,R,...")
    sensitivity_samples: int = option(64, "calibration samples each sensitivity curve is measured on",
                                      parse=positive, metavar="N")


@dataclass(frozen=True)
class DepthOptions:
    """Whole residual layers removed before any width pruning."""

    drop_layers: int | None = option(None, "drop N residual layers (or --drop-unit)", parse=positive, metavar="N")
    drop_unit: str = option("layer", "what --drop-layers counts: a transformer layer or ResNet block, any "
                                     "residual sub-block, or only attention / feed-forward sub-blocks (pre-norm "
                                     "models)", choices=DROP_UNITS)


@dataclass(frozen=True)
class CalibrationOptions:
    """Unlabelled data the data-aware criteria and the reconstruction read."""

    calib: Any = option(None, "calibration data (eval formats; labels ignored): enables the data-aware criteria "
                              "and reconstruction after pruning", metavar="DATA")
    calib_samples: int | None = option(512, "at most this many calibration samples", parse=positive)
    ablation_samples: int | None = option(None, "calibration samples per ablated unit for --criterion ablation "
                                                "(default 64; lowered, with a note, when all ablations would exceed "
                                                "the FLOP budget)", parse=positive, metavar="N")
    mask_input: str | None = option(None, "the model input that marks padded token positions (an attention mask: "
                                          "1/0, or additive 0/-large), which then enter no statistic or fit "
                                          "(default: the one [batch, sequence] input whose name says 'mask')",
                                    metavar="NAME")

    def check(self) -> None:
        if self.ablation_samples is not None and self.ablation_samples < 1:
            raise UsageError(f"ablation_samples (--ablation-samples) must be at least 1, got {self.ablation_samples}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise UsageError(f"calib_samples (--calib-samples) must be at least 1, got {self.calib_samples}")


@dataclass(frozen=True)
class ReconstructionOptions:
    """Which repair passes run after the rewrite (with calibration data; each is undone if it hurts)."""

    least_squares: bool = option(True, "the least-squares refit of consumers", switch=True)
    bias_correction: bool = option(True, "bias compensation for removed inputs", switch=True)
    bn_recalibration: bool = option(True, "BatchNorm statistics recalibration (and, for BN folded into convs, "
                                          "per-channel output statistics matching)", switch=True)


@dataclass(frozen=True)
class DataOptions:
    """How data files are read and fed (validation, calibration, sweep and eval data)."""

    batch_size: int = option(32, "samples per data pass run when the batch axis is dynamic (a model that refuses "
                                 "a batch is fed one sample at a time)", parse=positive)
    batch_axis: int = option(0, "the axis of the model's inputs that holds the samples (1 for a "
                                "time-major [time, batch, ...] input). The data still holds samples first; outputs "
                                "hold them on the axis named like the inputs' batch dimension, else on this axis",
                             parse=non_negative, metavar="N")
    preprocess: Any = option(None, "image folders: a preset (imagenet, none), a JSON file or inline JSON with "
                                   "resize, crop, crop_ratio, mean, std, scale, layout, mode, interpolation")
    tokenizer: Any = option(None, "JSONL text: a tokenizers tokenizer.json")
    max_length: int | None = option(None, "JSONL text: truncate sequences to this many tokens", parse=positive)
    text_key: str = option("text", "JSONL text: the field holding the text")
    label_key: str = option("label", "JSONL text: the field holding the class id")

    def reading(self) -> dict[str, Any]:
        """open_data's keywords."""
        return {"preprocess": self.preprocess, "tokenizer": self.tokenizer, "max_length": self.max_length,
                "text_key": self.text_key, "label_key": self.label_key}


@dataclass(frozen=True)
class GateOptions:
    """Validation data, the gated number and its budget."""

    validate_data: Any = option(None, "data as `eval` reads it: .npz/.npy arrays, an image folder "
                                      "(ROOT/<class>/<image>) or .jsonl", metavar="DATA")
    max_accuracy_drop: float | None = option(None, "refuse to write the model if the gated number drops by more "
                                                   "than X (0.02 = 2 points of top-1, a mean cosine of 0.98, or the "
                                                   "custom --metric's own unit)", parse=budget, metavar="X")
    metric: Any = option(None, "a custom metric(outputs, labels) -> one number, higher is better, from a .py file "
                               "or a module (outputs: the first output, samples first; labels: the data's, or "
                               "None). It becomes the gated number: the drop is dense - pruned, and "
                               "--max-accuracy-drop is in its unit", metavar="FILE.py:FUNCTION")
    class_axis: int | str | None = option(None, "the class axis of outputs that hold class scores, in the model's "
                                                "layout (default: from the labels, else only a [batch, classes] "
                                                "float output has one); 'none': no output holds class scores. "
                                                "With --calib the repair's held-out check then also keeps the "
                                                "first output's top-1 agreement per position from dropping",
                                          parse=class_axis_text, metavar="N|none")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how onnxruntime runs the models; latency measurement; input sizes; randomness; progress."""

    input_shapes: Mapping[str, list[int]] | None = option(
        None, "fix dynamic input dims for validation, FLOPs and latency, e.g. input:1x3x224x224",
        flag="--input-shape", parse=input_shapes_text)
    seed: int = option(0, "seed of random inputs, calibration sampling and the random criterion", parse=int)
    provider: str = option("CPUExecutionProvider", "onnxruntime execution provider for data passes and latency")
    threads: int = option(1, "intra-op threads for latency", parse=non_negative)
    measure_latency: bool | None = option(None, "measure dense vs pruned latency (default: on with validation "
                                                "data)", flag="--latency", switch=True)
    latency_runs: int = option(50, "timed latency runs per model", flag="--runs", parse=positive)
    latency_warmup: int = option(5, "untimed latency runs per model first", flag="--warmup",
                                 parse=non_negative)
    progress: bool | None = option(None, "progress bars on stderr (default: only when stderr is a terminal)",
                                   switch=True)


SPARSEGPT_BLOCK = 128  # columns per lazy-update block
SPARSEGPT_DAMP = 0.01  # added to the Gram matrix's diagonal, as a fraction of its mean


@dataclass(frozen=True)
class SparsityOptions:
    """What `sparsify` zeroes, and how (weight-level sparsity: shapes do not change)."""

    sparsity: float | None = option(None, "fraction of each weight's entries zeroed, unstructured (0.5 = half)",
                                    parse=fraction, metavar="F", exclusive="how")
    pattern: str | None = option(None, "at most N non-zero weights in every M consecutive ones along the "
                                       "reduction axis (2:4 for sparse tensor cores)", metavar="N:M",
                                 exclusive="how")
    criterion: str | None = option(None, "magnitude (|w| per layer), wanda (|w| x input norm per output; needs "
                                         "--calib) or sparsegpt (zero and update the rest; needs --calib). "
                                         "Default: sparsegpt with --calib, else magnitude")
    positions_per_sample: int | None = option(256, "Conv output positions sampled per calibration sample for its "
                                                   "Gram matrix", parse=positive, metavar="N")
    include: tuple[str, ...] = option((), "only sparsify nodes whose name matches this glob, or of this op type",
                                      metavar="PATTERN", repeat=True)
    exclude: tuple[str, ...] = option((), "never sparsify nodes whose name matches this glob, or of this op type",
                                      metavar="PATTERN", repeat=True)
    block_size: int = option(SPARSEGPT_BLOCK, "SparseGPT: columns per lazy-update block", parse=positive)
    damp: float = option(SPARSEGPT_DAMP, "SparseGPT: damping added to the Gram matrix's diagonal, as a fraction "
                                         "of its mean", parse=float)
    distill: int = option(0, "epochs of distillation toward the dense model after zeroing: the kept weights, their "
                             "biases and the normalisation parameters fitted to the dense model's outputs on --calib, "
                             "zeros held, the best epoch on held-out samples kept (needs PyTorch: pip install "
                             "'onnxprune[distill]'); 0: none", parse=non_negative, metavar="EPOCHS")


@dataclass(frozen=True)
class SparsifyOptions:
    """Everything `sparsify` takes besides the model and the output path."""

    weights: SparsityOptions = field(default_factory=SparsityOptions)  # (a group named like its field would clash)
    # weight-level sparsity reads one Gram matrix per layer: fewer samples than structural repair needs
    calibration: CalibrationOptions = field(default_factory=lambda: CalibrationOptions(calib_samples=128))
    data: DataOptions = field(default_factory=DataOptions)
    gate: GateOptions = field(default_factory=GateOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @classmethod
    def build(cls, base: "SparsifyOptions | None" = None, **keywords: Any) -> "SparsifyOptions":
        return with_keywords(base if base is not None else cls(), keywords)


@dataclass(frozen=True)
class EvalOptions:
    """Everything `evaluate` takes besides the model, the data and the reference: how data is read, the class
    axis and custom metrics, and how onnxruntime runs. A PruneOptions serves too (its groups of those names)."""

    data: DataOptions = field(default_factory=DataOptions)
    gate: GateOptions = field(default_factory=GateOptions)
    # throughput over a data set, not single-stream latency: onnxruntime picks the threads
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(threads=0))

    @classmethod
    def build(cls, base: Any = None, **keywords: Any) -> "EvalOptions":
        """`base` (an EvalOptions or a PruneOptions; default all defaults) with flat or group keywords applied."""
        if base is not None and not isinstance(base, cls):
            base = cls(data=base.data, gate=base.gate, runtime=base.runtime)
        return with_keywords(base if base is not None else cls(), keywords)


@dataclass(frozen=True)
class PruneOptions:
    """Everything `prune` takes besides the model and the output path."""

    target: TargetOptions = field(default_factory=TargetOptions)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    depth: DepthOptions = field(default_factory=DepthOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    reconstruction: ReconstructionOptions = field(default_factory=ReconstructionOptions)
    data: DataOptions = field(default_factory=DataOptions)
    gate: GateOptions = field(default_factory=GateOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    save_plan: Any = option(None, "write the plan that was applied as JSON")

    @classmethod
    def build(cls, base: "PruneOptions | None" = None, **keywords: Any) -> "PruneOptions":
        """`base` (default: all defaults) with flat keywords (field names of any group) or whole groups
        (target=TargetOptions(...)) replaced; an unknown keyword is a UsageError naming the close ones."""
        return with_keywords(base if base is not None else cls(), keywords)

    def with_strategy(self) -> "PruneOptions":
        """These options with the strategy named (TargetOptions.default_strategy)."""
        strategy = self.target.default_strategy(self.calibration.calib is not None)
        return self if strategy == self.target.strategy else \
            dataclasses.replace(self, target=dataclasses.replace(self.target, strategy=strategy))

    def check(self) -> None:
        self.target.check(self.depth)
        self.calibration.check()
        if self.target.prune_cache and self.calibration.calib is not None:
            raise UsageError("prune_cache (--prune-cache) gives the pruned model a key-value cache of fewer heads, "
                             "and the repair does not yet feed calibration data's past_key_values at the kept "
                             "heads: drop --calib (validation data is fed that way: --validate-data works)")


def groups_of(options: Any) -> dict[str, Any]:
    """The option groups a container holds (name -> group instance)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if dataclasses.is_dataclass(getattr(options, f.name))}


def with_keywords(options: Any, keywords: Mapping[str, Any]) -> Any:
    """A copy of the container `options` with flat or group keywords applied."""
    groups = groups_of(options)
    owner = {f.name: name for name, group in groups.items() for f in dataclasses.fields(group)}
    parsers = {f.name: f.metadata.get("parse") for group in groups.values() for f in dataclasses.fields(group)}
    direct = {f.name for f in dataclasses.fields(options) if f.name not in groups}
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in keywords.items():
        if key in groups:
            if not isinstance(value, type(groups[key])):
                raise UsageError(f"{key}= takes a {type(groups[key]).__name__}, got {type(value).__name__}")
            top[key] = value
        elif key in direct:
            top[key] = value
        elif key in owner:
            changes.setdefault(owner[key], {})[key] = _normalise(_parsed(key, value, parsers[key]))
        else:
            import difflib

            close = difflib.get_close_matches(key, [*owner, *direct, *groups], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown option '{key}'{hint}")
    for name, fields_ in changes.items():
        base = top.get(name, groups[name])
        top[name] = dataclasses.replace(base, **fields_)
    return dataclasses.replace(options, **top)


def _parsed(key: str, value: Any, parse: Callable[[str], Any] | None) -> Any:
    """A string keyword means what the same text means on the command line (ratio="heads=0.25,neurons=0.3",
    input_shapes="x:1x3x224x224")."""
    if not isinstance(value, str) or parse is None or parse is str:
        return value
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{key}={value!r}: {exc}") from None


def _normalise(value: Any) -> Any:
    """Lists become tuples, so the frozen options hold nothing a caller can change later."""
    return tuple(value) if isinstance(value, list) else value


def flat(options: Any) -> dict[str, Any]:
    """Every field of every group of `options`, by name (for reports and for forwarding)."""
    out = {}
    for name, group in groups_of(options).items():
        out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
    return out


# ---- the command line, generated from the fields ----

def parser_of(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports ValueError as a usage error; our parsers also raise UsageError."""
    def parse_text(text: str):
        try:
            return parse(text)
        except (ValueError, UsageError) as exc:
            raise argparse.ArgumentTypeError(str(exc) if str(exc) else f"'{text}' is not valid") from None
    parse_text.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its messages
    return parse_text


def add_options(parser, group, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                defaults: dict | None = None, choices: dict | None = None, helps: dict | None = None) -> None:
    """Add one flag per field of the options dataclass `group` (a class, or an instance whose values are the
    defaults, as SparsifyOptions().calibration), from its metadata: one definition of every option, its
    default and its help. `only`/`skip` select fields; `defaults`, `choices` and `helps` override per field
    where a command means something else by it."""
    choices, helps = choices or {}, helps or {}
    if not isinstance(group, type):
        defaults = {**{f.name: getattr(group, f.name) for f in dataclasses.fields(group)}, **(defaults or {})}
    defaults = defaults or {}
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(group):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in skip or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, f.default)
        text = helps.get(f.name, meta["help"])
        if default not in (None, False, ()) and not meta["switch"]:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default {shown})"
        target = parser
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "help": text, "default": default}
        if meta["switch"] and default is True:
            kwargs.update(action="store_false", help="skip " + text)
            flag = "--no-" + flag[2:]
        elif meta["switch"] and default is False:
            kwargs.update(action="store_true")
        elif meta["switch"]:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif meta["repeat"]:
            kwargs.update(action="append", default=None)
        else:
            if meta["parse"] is not None:
                kwargs["type"] = parser_of(meta["parse"])
            if choices.get(f.name, meta["choices"]):
                kwargs["choices"] = choices.get(f.name, meta["choices"])
        if ("action" not in kwargs and "choices" not in kwargs) or meta["repeat"]:
            kwargs["metavar"] = meta["metavar"] or flag[2:].upper().replace("-", "_")
        target.add_argument(flag, **kwargs)


def options_from(args, container: Any) -> Any:
    """The options container (e.g. PruneOptions()) with every field the parsed `args` hold."""
    groups = groups_of(container)
    names = {f.name for group in groups.values() for f in dataclasses.fields(group)}
    names |= {f.name for f in dataclasses.fields(container) if f.name not in groups}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None or k in
             _NONE_MEANS_SOMETHING}
    return with_keywords(container, given)


_NONE_MEANS_SOMETHING = {"measure_latency", "progress"}  # None: decided later (by the data, by the terminal)
