"""Options are plain frozen data, each default written once; the command line is generated from them;
the pipeline is a list of stages that a sweep re-runs without re-loading or re-analysing the model."""
import dataclasses
from pathlib import Path

import pytest

import onnxprune
from onnxprune.cli import build_parser
from onnxprune.errors import UsageError
from onnxprune.options import CalibrationOptions, PruneOptions, TargetOptions, groups_of, options_from

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


def test_flat_keywords_set_the_group_that_owns_them():
    opts = PruneOptions.build(target_flops=0.5, criterion="flap", calib="c.npz", threads=2)
    assert opts.target.target_flops == 0.5
    assert opts.scoring.criterion == "flap"
    assert opts.calibration.calib == "c.npz"
    assert opts.runtime.threads == 2
    assert opts.calibration.calib_samples == CalibrationOptions().calib_samples  # the rest keep their default


def test_whole_groups_and_keywords_combine_and_keywords_win():
    base = PruneOptions(target=TargetOptions(ratio=0.3, round_to=4))
    opts = PruneOptions.build(base, round_to=1)
    assert (opts.target.ratio, opts.target.round_to) == (0.3, 1)
    assert base.target.round_to == 4  # the given options are not changed


def test_an_unknown_keyword_is_a_usage_error_that_suggests_the_close_name():
    with pytest.raises(UsageError, match="did you mean target_flops"):
        PruneOptions.build(target_flop=0.5)


def test_a_string_keyword_means_what_the_same_text_means_on_the_command_line():
    options = PruneOptions.build(ratio="heads=0.25,neurons=0.3", input_shapes="x:1x3x8x8", class_axis="none")
    assert options.target.ratio == {"heads": 0.25, "neurons": 0.3}
    assert options.runtime.input_shapes == {"x": [1, 3, 8, 8]}
    assert options.gate.class_axis == "none" and PruneOptions.build(calib="c.npz").calibration.calib == "c.npz"
    with pytest.raises(UsageError, match="ratio='half'"):
        PruneOptions.build(ratio="half")


def test_options_are_frozen_and_lists_become_tuples():
    opts = PruneOptions.build(ratio=0.3, include=["/stage1/*"])
    assert opts.target.include == ("/stage1/*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.target.ratio = 0.5


def _prune_parser_actions():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["prune"]._actions}


def test_every_prune_option_is_on_the_command_line_with_the_dataclass_default():
    actions = _prune_parser_actions()
    for name, group in groups_of(PruneOptions()).items():
        for f in dataclasses.fields(group):
            if not f.metadata.get("cli"):
                continue
            assert f.name in actions, f"{name}.{f.name} has no flag on `onnxprune prune`"
            default = actions[f.name].default
            assert default == f.default or (default is None and f.default == ()), f.name


def test_the_command_line_builds_the_same_options_as_the_keywords():
    args = build_parser().parse_args(["prune", "in.onnx", "out.onnx", "--target-flops", "0.4", "--criterion",
                                      "fpgm", "--include", "a*", "--include", "b*", "--no-least-squares",
                                      "--input-shape", "x:1x3x8x8", "--runs", "7"])
    from_cli = options_from(args, PruneOptions())
    from_api = PruneOptions.build(target_flops=0.4, criterion="fpgm", include=["a*", "b*"], least_squares=False,
                                  input_shapes={"x": [1, 3, 8, 8]}, latency_runs=7)
    assert from_cli == from_api


def test_bad_text_for_an_option_is_an_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["prune", "a", "b", "--target-flops", "1.5"])
    assert usage.value.code == 2
    assert "1.5 is not a fraction in [0, 1)" in capsys.readouterr().err


def test_a_sweep_analyses_and_scores_the_model_once(monkeypatch, tmp_path):
    import numpy as np

    import onnxprune.pipeline.stages as stages

    calls = {"analyze": 0, "score": 0}
    real_analysis, real_scores = stages.build_analysis, stages.score_groups

    def counting_analysis(*a, **k):
        calls["analyze"] += 1
        return real_analysis(*a, **k)

    def counting_scores(*a, **k):
        calls["score"] += 1
        return real_scores(*a, **k)

    monkeypatch.setattr(stages, "build_analysis", counting_analysis)
    monkeypatch.setattr(stages, "score_groups", counting_scores)
    data = {"input": np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)}
    result = onnxprune.sweep(EXAMPLE, [0.2, 0.3, 0.5], data=data, measure_latency=False)
    assert [p.error for p in result.points] == [None, None, None]
    assert calls == {"analyze": 1, "score": 1}


def test_a_sweep_point_is_the_model_prune_writes_at_that_target(tmp_path):
    import numpy as np

    data = {"input": np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)}
    onnxprune.sweep(EXAMPLE, [0.3, 0.5], data=data, measure_latency=False, output_dir=tmp_path / "sweep")
    onnxprune.prune(EXAMPLE, tmp_path / "alone.onnx", target_flops=0.5)
    swept = (tmp_path / "sweep" / "digits_resnet.flops0.5.onnx").read_bytes()
    assert swept == (tmp_path / "alone.onnx").read_bytes()
