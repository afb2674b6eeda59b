from pathlib import Path

import onnxprune

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_bundled_example_prunes_to_half_the_flops(tmp_path):
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(MODELS / "digits_resnet.onnx", out, target_flops=0.5)
    assert out.is_file()
    assert report.after.flops <= 0.5 * report.before.flops * 1.02
    assert report.after.params < report.before.params


def test_readme_main_job_keeps_accuracy_with_calibration(tmp_path):
    """README's first command: half the FLOPs, reconstructed, gated at 2 points of top-1."""
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(MODELS / "digits_resnet.onnx", out, target_flops=0.5,
                                calib=MODELS / "digits_calib.npz", validate_data=MODELS / "digits_test.npz",
                                max_accuracy_drop=0.02, measure_latency=False)
    assert out.is_file()
    assert report.after.flops <= 0.5 * report.before.flops * 1.02
    assert any("least_squares: applied" in n for n in report.notes)
