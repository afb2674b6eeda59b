"""The command line: analyze, prune, plans, and exit codes."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


def test_analyze_prints_groups_with_sizes_and_blocked_reasons(capsys):
    assert main(["analyze", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "blocked: reaches graph output 'logits'" in out
    assert "FLOPs" in out


def test_analyze_json_lists_groups(capsys):
    assert main(["analyze", str(EXAMPLE), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flops"] > 0 and data["params"] > 0
    assert {"name", "size", "params", "blocked"} <= set(data["groups"][0])


def test_prune_prints_the_before_after_table_and_writes_the_model(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    report = tmp_path / "r.json"
    assert main(["prune", str(EXAMPLE), str(out), "--target-flops", "0.4", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "Original" in text and "Pruned" in text and "FLOPs" in text
    onnx.checker.check_model(str(out))
    data = json.loads(report.read_text())
    assert data["after"]["flops"] <= 0.6 * data["before"]["flops"] * 1.05


def test_saved_plan_replays_to_the_same_model(tmp_path):
    plan = tmp_path / "plan.json"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["prune", str(EXAMPLE), str(a), "--ratio", "0.3", "--criterion", "fpgm", "--save-plan", str(plan)]) == 0
    assert main(["prune", str(EXAMPLE), str(b), "--plan", str(plan)]) == 0
    ta = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(a)).graph.initializer}
    tb = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_an_edited_plan_is_applied_as_written(tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["prune", str(EXAMPLE), str(tmp_path / "a.onnx"), "--ratio", "0.5", "--save-plan", str(plan)]) == 0
    data = json.loads(plan.read_text())
    data["groups"] = data["groups"][:1]
    data["groups"][0]["keep"] = [0, 1, 2]
    plan.write_text(json.dumps(data))
    assert main(["prune", str(EXAMPLE), str(tmp_path / "b.onnx"), "--plan", str(plan)]) == 0
    convs = [n for n in onnx.load(str(tmp_path / "b.onnx")).graph.node if n.op_type == "Conv"]
    assert convs  # structure kept; the group shrank to three units


def test_plan_for_another_model_is_refused(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "onnxprune-plan/1", "groups": [{"name": "nope", "size": 3, "keep": [0]}]}))
    assert main(["prune", str(EXAMPLE), str(tmp_path / "x.onnx"), "--plan", str(plan)]) == 5
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args", [["--ratio", "0.5", "--strategy", "global"],
                                  ["--target-params", "0.3", "--round-to", "8"],
                                  ["--ratio", "0.5", "--criterion", "bn_scale"],
                                  ["--ratio", "0.5", "--criterion", "l2", "--exclude", "/layer1*"],
                                  ["--ratio", "0.5", "--criterion", "random", "--include", "Conv"],
                                  ["--lossless"]])
def test_prune_options_give_valid_models(tmp_path, args):
    out = tmp_path / "p.onnx"
    assert main(["prune", str(EXAMPLE), str(out), *args]) == 0
    onnx.checker.check_model(str(out))


def test_impossible_target_exits_5_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", str(EXAMPLE), str(out), "--target-flops", "0.999"]) == 5
    assert "cannot remove 99.9% of FLOPs" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_model_exits_3(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert main(["analyze", str(bad)]) == 3
    assert "bad.onnx" in capsys.readouterr().err


def test_output_over_input_exits_6(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    assert main(["prune", str(src), str(src), "--ratio", "0.2"]) == 6


def test_bad_input_shape_spec_is_explained(tmp_path, capsys):
    assert main(["prune", str(EXAMPLE), str(tmp_path / "p.onnx"), "--ratio", "0.2", "--input-shape", "nope:1x2"]) == 2
    assert "model's inputs are" in capsys.readouterr().err


def test_ratio_per_unit_kind_on_the_command_line(tmp_path, capsys):
    bert = EXAMPLE.parent / "fixtures" / "transformers" / "bert_encoder_legacy.onnx"
    plan = tmp_path / "plan.json"
    assert main(["prune", str(bert), str(tmp_path / "p.onnx"), "--ratio", "heads=0.25,neurons=0.3",
                 "--save-plan", str(plan)]) == 0
    assert "ratio heads 0.25, neurons 0.3 of units removed" in capsys.readouterr().out
    assert json.loads(plan.read_text())["meta"]["ratio"] == {"heads": 0.25, "neurons": 0.3}
    with pytest.raises(SystemExit):  # argparse: "1.5 is not a fraction in [0, 1)"
        main(["prune", str(bert), str(tmp_path / "q.onnx"), "--ratio", "heads=1.5"])
    assert "1.5 is not a fraction" in capsys.readouterr().err


def test_version_names_onnx_and_onnxruntime(capsys):
    import pytest as _pytest

    with _pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("onnxprune ") and "onnxruntime" in out


def test_sigterm_while_writing_leaves_nothing_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import textwrap

    import onnx

    from test_model_io import wide_cnn

    src = tmp_path / "in.onnx"
    onnx.save(wide_cnn(), src, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    child = textwrap.dedent("""
        import sys, time
        from onnxprune.ir import model_io
        from onnxprune.cli import main
        real = model_io.write_model
        def slow(model, path, **kwargs):
            real(model, path, **kwargs)
            print("written", flush=True)
            time.sleep(60)
        model_io.write_model = slow
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, "prune", str(src), str(tmp_path / "out.onnx"),
                             "--ratio", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]
