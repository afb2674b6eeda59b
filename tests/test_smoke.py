from pathlib import Path

import onnxprune

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_bundled_example_prunes_to_half_the_flops(tmp_path):
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(MODELS / "digits_resnet.onnx", out, target_flops=0.5)
    assert out.is_file()
    assert report.after.flops <= 0.5 * report.before.flops * 1.02
    assert report.after.params < report.before.params
