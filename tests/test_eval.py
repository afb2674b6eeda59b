"""`onnxprune eval` / `onnxprune.evaluate`: data formats, accuracy, fidelity, errors."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.runtime.data import Dataset, ImageFolder, ImageSpec, InputSpec, JsonlText, open_data
from onnxprune.runtime.metrics import class_axis, fidelity, score_axis, topk_accuracy
from onnxprune.runtime.session import make_session

MODELS = Path(__file__).resolve().parent.parent / "models"
EXAMPLE = MODELS / "digits_resnet.onnx"
TEST = MODELS / "digits_test.npz"
MEAN, STD = 0.3062, 0.3238  # the digits model's normalisation (models/README.md)


@pytest.fixture(scope="module")
def digits():
    with np.load(TEST) as d:
        return d["input"], d["labels"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, digits):
    """The first 90 test samples: most tests need real data, not all of it (speed)."""
    path = tmp_path_factory.mktemp("data") / "digits_small.npz"
    np.savez(path, input=digits[0][:90], labels=digits[1][:90])
    return path


@pytest.fixture(scope="module")
def dense_result():
    return onnxprune.evaluate(EXAMPLE, TEST)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    path = tmp_path_factory.mktemp("pruned") / "digits_half.onnx"
    onnxprune.prune(EXAMPLE, path, target_flops=0.5)
    return path


def ort_logits(model, x):
    return make_session(onnx.load(str(model)), threads=0).run(None, {"input": x})[0]


# -- accuracy and fidelity on the bundled example ------------------------------------------------
def test_dense_model_top1_on_the_test_split(dense_result, digits):
    result = dense_result
    assert result.samples == 450 and result.output == "logits"
    assert result.accuracy["top1"] > 0.97
    assert result.accuracy["top5"] >= result.accuracy["top1"]
    x, y = digits[0][:90], digits[1][:90]
    small = onnxprune.evaluate(EXAMPLE, {"input": x, "labels": y})
    assert small.accuracy["top1"] == pytest.approx(np.mean(ort_logits(EXAMPLE, x).argmax(1) == y))
    assert "top-1 accuracy" in result.render_table()


def test_fidelity_of_a_model_against_itself_is_exact(small):
    result = onnxprune.evaluate(EXAMPLE, small, reference=EXAMPLE)
    f = result.fidelity
    assert f["top1_agreement"] == 1.0
    assert f["max_abs_error"] == 0.0 and f["mean_abs_error"] == 0.0
    assert f["kl_divergence"] == 0.0
    assert f["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert result.reference_accuracy == result.accuracy
    assert any("softmax" in n for n in result.notes)  # logits, not probabilities


def test_pruned_model_accuracy_and_fidelity_match_an_independent_computation(pruned, digits, small):
    x, y = digits[0][:90], digits[1][:90]
    result = onnxprune.evaluate(pruned, small, reference=EXAMPLE, batch_size=64)
    mine, dense = ort_logits(pruned, x), ort_logits(EXAMPLE, x)
    assert result.accuracy["top1"] == pytest.approx(np.mean(mine.argmax(1) == y))
    assert result.reference_accuracy["top1"] == pytest.approx(np.mean(dense.argmax(1) == y))
    assert result.fidelity["top1_agreement"] == pytest.approx(np.mean(mine.argmax(1) == dense.argmax(1)))
    assert result.fidelity["max_abs_error"] == pytest.approx(np.abs(mine - dense).max(), rel=1e-5)
    assert result.fidelity["max_abs_error"] > 0
    table = result.render_table()
    assert "reference" in table and "fidelity: top-1 agreement" in table


def test_batch_size_does_not_change_results(small, pruned):
    a = onnxprune.evaluate(pruned, small, batch_size=90)
    b = onnxprune.evaluate(pruned, small, batch_size=7, reference=pruned)
    assert a.accuracy == b.accuracy and b.fidelity["max_abs_error"] < 1e-4


def static_batch_copy(batch: int) -> onnx.ModelProto:
    model = onnx.load(str(EXAMPLE))
    for vi in (model.graph.input[0], model.graph.output[0]):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, 4])
def test_static_batch_is_looped_and_padded(digits, batch):
    x, y = digits[0][:30], digits[1][:30]  # 30 is not a multiple of 4: the last batch is padded
    data = {"input": x, "labels": y}
    static = onnxprune.evaluate(static_batch_copy(batch), data, batch_size=16)
    dynamic = onnxprune.evaluate(EXAMPLE, data)
    assert static.batch_size == batch and static.samples == 30
    assert static.accuracy == dynamic.accuracy
    exact = onnxprune.evaluate(static_batch_copy(batch), data, reference=EXAMPLE)
    assert exact.fidelity["top1_agreement"] == 1.0 and exact.fidelity["max_abs_error"] < 1e-4


def test_custom_metric_from_python(small):
    def errors(outputs, labels):
        return float(np.sum(outputs.argmax(1) != labels))

    def stats(outputs, labels):
        return {"n": len(outputs), "mean_logit": float(outputs.mean())}

    result = onnxprune.evaluate(EXAMPLE, small, metric=errors)
    assert result.custom["errors"] == pytest.approx(90 * (1 - result.accuracy["top1"]))
    both = onnxprune.evaluate(EXAMPLE, small, metric={"err": errors, "s": stats}, reference=EXAMPLE)
    assert both.custom["err"] == result.custom["errors"] and both.custom["n"] == 90
    assert both.reference_custom == both.custom



def test_evaluate_takes_the_options_prune_ran_with_and_their_fields_as_keywords(small, tmp_path):
    metric_file = tmp_path / "my_metric.py"
    metric_file.write_text("def errors(outputs, labels):\n    return float((outputs.argmax(1) != labels).sum())\n")
    options = onnxprune.PruneOptions.build(batch_size=7, metric=f"{metric_file}:errors")
    result = onnxprune.evaluate(EXAMPLE, small, options)
    assert result.batch_size == 7
    assert result.custom["errors"] == pytest.approx(90 * (1 - result.accuracy["top1"]))
    again = onnxprune.evaluate(EXAMPLE, small, onnxprune.EvalOptions(), batch_size=30)
    assert again.batch_size == 30 and again.accuracy == result.accuracy
    with pytest.raises(onnxprune.UsageError, match="did you mean batch_size"):
        onnxprune.evaluate(EXAMPLE, small, batch_sise=30)

# -- .npz / .npy matching the model's inputs -----------------------------------------------------
def test_single_input_model_accepts_any_array_name(tmp_path, digits):
    path = tmp_path / "any.npz"
    np.savez(path, pixels=digits[0][:40], labels=digits[1][:40])
    assert onnxprune.evaluate(EXAMPLE, path).accuracy["top1"] > 0.9


def test_float64_data_is_cast_to_the_model_dtype(digits):
    result = onnxprune.evaluate(EXAMPLE, {"input": digits[0][:40].astype(np.float64), "labels": digits[1][:40]})
    assert result.accuracy["top1"] > 0.9


def test_shape_mismatched_npz_raises_a_data_error_naming_the_input(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((5, 1, 28, 28), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"input 'input'.*\[batch, 1, 32, 32\].*\(5, 1, 28, 28\)"):
        onnxprune.evaluate(EXAMPLE, path)
    assert main(["eval", str(EXAMPLE), "--data", str(path)]) == DataError.exit_code == 7
    assert "input 'input'" in capsys.readouterr().err


def test_nan_in_the_data_is_a_data_error_naming_the_sample(tmp_path, capsys):
    path = tmp_path / "nan.npz"
    images = np.zeros((5, 1, 32, 32), np.float32)
    images[3, 0, 4, 4] = np.nan
    np.savez(path, input=images, labels=np.zeros(5, np.int64))
    assert main(["eval", str(EXAMPLE), "--data", str(path)]) == DataError.exit_code == 7
    assert "sample 3 of array 'input'" in capsys.readouterr().err


def test_rank_dtype_and_name_mismatches_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"input 'input'.*4 dims.*\(5, 32, 32\)"):
        onnxprune.evaluate(EXAMPLE, {"input": np.zeros((5, 32, 32), np.float32), "labels": np.zeros(5, int)})
    with pytest.raises(DataError, match=r"input 'input'.*float32.*uint8"):
        onnxprune.evaluate(EXAMPLE, {"input": np.zeros((5, 1, 32, 32), np.uint8), "labels": np.zeros(5, int)})
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((5, 1, 32, 32), np.float32), b=np.zeros((5, 1, 32, 32), np.float32))
    with pytest.raises(DataError, match=r"input 'input'.*no array.*'a', 'b'"):
        onnxprune.evaluate(EXAMPLE, path, reference=EXAMPLE)


def test_labels_that_do_not_fit_are_data_errors(digits):
    with pytest.raises(DataError, match="one label per sample"):
        onnxprune.evaluate(EXAMPLE, {"input": digits[0][:10], "labels": digits[1][:9]})
    with pytest.raises(DataError, match="10 classes"):
        onnxprune.evaluate(EXAMPLE, {"input": digits[0][:10], "labels": np.full(10, 12)})


def test_npy_without_labels_needs_a_reference(tmp_path, digits, pruned):
    path = tmp_path / "x.npy"
    np.save(path, digits[0][:50])
    with pytest.raises(DataError, match="no labels"):
        onnxprune.evaluate(EXAMPLE, path)
    result = onnxprune.evaluate(pruned, path, reference=EXAMPLE)
    assert result.accuracy == {} and 0 <= result.fidelity["top1_agreement"] <= 1


def test_missing_data_and_unknown_formats_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_data(tmp_path / "nope.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown data format"):
        open_data(tmp_path / "d.csv")


# -- metrics as pure functions --------------------------------------------------------------------
def test_topk_accuracy_on_known_scores():
    scores = np.array([[0.1, 0.9, 0, 0, 0, 0, 0], [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 2, 3, 4, 5, 6, 7.0]])
    labels = np.array([1, 4, 0])
    acc = topk_accuracy(scores, labels)
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top5"] == pytest.approx(2 / 3)
    assert "top5" not in topk_accuracy(scores[:, :5], labels)  # top-5 of 5 classes says nothing


def test_fidelity_on_known_values():
    ref = np.array([[0.4, 0.6], [0.2, 0.8]])
    out = np.array([[0.9, 0.1], [0.2, 0.8]])
    f = fidelity(out, ref, axis=1)
    assert f["softmax_applied"] is False  # probabilities are compared as they are
    kl_first = 0.4 * np.log(0.4 / 0.9) + 0.6 * np.log(0.6 / 0.1)
    assert f["kl_divergence"] == pytest.approx(kl_first / 2)
    assert f["max_abs_error"] == pytest.approx(0.5) and f["mean_abs_error"] == pytest.approx(0.25)
    assert f["top1_agreement"] == 0.5
    cos_first = (0.36 + 0.06) / (np.hypot(0.4, 0.6) * np.hypot(0.9, 0.1))
    assert f["cosine_similarity"] == pytest.approx((cos_first + 1) / 2)
    assert f["relative_l2_error"] == pytest.approx(np.hypot(0.5, 0.5) / np.linalg.norm(ref))
    logits = fidelity(np.array([[0.0, 3.0]]), np.array([[3.0, 0.0]]), axis=1)
    assert logits["softmax_applied"] is True and logits["kl_divergence"] > 1
    no_classes = fidelity(out, ref)  # no class axis given: no agreement, no KL
    assert set(no_classes) == {"cosine_similarity", "relative_l2_error", "max_abs_error", "mean_abs_error"}


def test_fidelity_of_outputs_held_in_blocks_of_different_shapes():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((2, 3, 4)), rng.standard_normal((1, 5, 4))]  # sequences padded per batch
    out = [ref[0][:1], ref[0][1:] * 2, -ref[1]]  # blocked another way: compared sample by sample
    f = fidelity(out, ref, axis=2)
    assert f["cosine_similarity"] == pytest.approx((1 + 1 - 1) / 3)
    assert f["top1_agreement"] == pytest.approx(6 / 11)  # 3 + 3 positions agree, 5 flipped ones do not
    with pytest.raises(DataError, match=r"shape \(1, 5, 4\) but the reference's has \(1, 3, 4\)"):
        fidelity([ref[1]], [ref[0][:1]])


def test_only_class_scores_have_a_class_axis_without_labels():
    assert score_axis(np.zeros((8, 10), np.float32)) == 1  # [batch, classes]
    assert score_axis(np.zeros((8, 1000, 1, 1), np.float32)) == 1
    assert score_axis(np.zeros((8, 1, 64, 64), np.float32)) is None  # a score map
    assert score_axis(np.zeros((8, 16, 32), np.float32)) is None  # a sequence of features
    assert score_axis(np.zeros((8, 1), np.float32)) is None  # one value per sample
    assert score_axis(np.zeros((8, 10), np.int64)) is None  # ids, compared by equality
    assert score_axis(np.zeros((8, 16, 32), np.float32), 2) == 2  # declared
    assert score_axis(np.zeros((8, 10), np.float32), "none") is None


def test_class_axis_from_labels():
    assert class_axis((8, 10), (8,)) == 1
    assert class_axis((8, 1000, 1, 1), (8,)) == 1  # squeezenet-style [N, C, 1, 1]
    assert class_axis((8, 5, 32, 32), (8, 32, 32)) == 1  # segmentation
    assert class_axis((8, 16, 3), (8, 16)) == 2  # token classification
    assert class_axis((8,)) is None
    with pytest.raises(DataError, match="do not fit"):
        class_axis((8, 10), (8, 3))


# -- image folders -------------------------------------------------------------------------------------
def write_digit_images(root: Path, x, y, per_class: int = 2, size: int = 32) -> int:
    from PIL import Image

    count = 0
    for digit in range(10):
        for k, i in enumerate(np.flatnonzero(y == digit)[:per_class]):
            pixels = np.clip(np.round((x[i, 0] * STD + MEAN) * 255), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L")
            if size != 32:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            (root / f"{digit}").mkdir(parents=True, exist_ok=True)
            img.save(root / f"{digit}" / f"{k}.png")
            count += 1
    return count


def test_image_folder_with_a_preprocessing_spec(tmp_path, digits):
    pytest.importorskip("PIL")
    n = write_digit_images(tmp_path / "imgs", *digits)
    spec = json.dumps({"mean": MEAN, "std": STD})
    result = onnxprune.evaluate(EXAMPLE, tmp_path / "imgs", preprocess=spec, batch_size=8)
    assert result.samples == n == 20
    assert result.accuracy["top1"] >= 0.9  # labels are the sorted subfolder names 0..9
    folder = ImageFolder(tmp_path / "imgs", {"mean": MEAN, "std": STD})
    folder.bind([InputSpec("input", np.dtype(np.float32), ("batch", 1, 32, 32))])
    x, y = digits
    first = folder.arrays(0, 1)["input"][0]
    assert first.shape == (1, 32, 32)
    assert np.abs(first - x[np.flatnonzero(y == 0)[0]]).max() < 0.02  # uint8 rounding only


def test_image_folder_resizes_and_crops(tmp_path, digits):
    pytest.importorskip("PIL")
    write_digit_images(tmp_path / "big", *digits, per_class=1, size=48)
    folder = ImageFolder(tmp_path / "big", ImageSpec(resize=36, crop=32, mean=[MEAN], std=[STD]))
    folder.bind([InputSpec("input", np.dtype(np.float32), ("batch", 1, 32, 32))])
    assert folder.arrays(0, 3)["input"].shape == (3, 1, 32, 32)
    nhwc = ImageFolder(tmp_path / "big", ImageSpec(resize=[32, 32], mode="RGB"))
    nhwc.bind([InputSpec("image", np.dtype(np.float32), (None, 32, 32, 3))])
    batch = nhwc.arrays(0, 2)["image"]
    assert batch.shape == (2, 32, 32, 3) and 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(DataError, match=r"input 'input'.*height 30 instead of 32"):
        onnxprune.evaluate(EXAMPLE, tmp_path / "big", preprocess={"resize": 40, "crop": 30})


def test_image_folder_on_a_zoo_classifier_with_probability_outputs(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from onnxprune.testing import materialize_zoo_model, zoo_models

    squeezenet = materialize_zoo_model(next(p for p in zoo_models() if "squeezenet" in p.name))
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "zoo" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (250, 300, 3), dtype=np.uint8)).save(tmp_path / "zoo" / cls / "a.jpg")
    result = onnxprune.evaluate(squeezenet, tmp_path / "zoo", preprocess="imagenet", reference=squeezenet)
    assert result.samples == 2 and set(result.accuracy) == {"top1", "top5"}
    assert result.fidelity["kl_divergence"] == 0.0 and result.fidelity["top1_agreement"] == 1.0
    assert any("probabilities" in n and "as given" in n for n in result.notes)


def test_image_folder_without_pillow_asks_for_the_extra(tmp_path, digits, monkeypatch):
    pytest.importorskip("PIL")
    write_digit_images(tmp_path / "imgs", *digits, per_class=1)
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(DataError, match=r"onnxprune\[images\]"):
        onnxprune.evaluate(EXAMPLE, tmp_path / "imgs")


def test_image_spec_presets_json_and_bad_keys(tmp_path):
    assert ImageSpec.parse("imagenet").crop_ratio == 0.875
    assert ImageSpec.parse('{"resize": 256, "crop": 224, "mean": 0.5}').mean == [0.5]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"layout": "NHWC", "std": [0.2, 0.2, 0.2]}))
    assert ImageSpec.parse(str(path)).layout == "NHWC"
    with pytest.raises(DataError, match="unknown keys"):
        ImageSpec.parse('{"size": 3}')


# -- JSONL text with a tokenizer ---------------------------------------------------------------------
VOCAB = {"[PAD]": 0, "[UNK]": 1, "good": 2, "great": 3, "bad": 4, "awful": 5, "the": 6, "movie": 7, "plot": 8}


def sentiment_model(seq=None) -> onnx.ModelProto:
    """Sum of masked word embeddings: positive words vote class 1, negative class 0.

    Padding (id 0) votes strongly for class 0, so ignoring the mask would fail."""
    table = np.zeros((len(VOCAB), 2), np.float32)
    table[0] = [50, 0]
    table[[2, 3], 1] = 1
    table[[4, 5], 0] = 1
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "two"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "one"], ["logits"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "sentiment",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq or "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq or "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(table, "emb"), numpy_helper.from_array(np.array([2], np.int64), "two"),
         numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def text_data(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    records = [("good", 1), ("the plot was bad and the movie awful", 0), ("great movie", 1),
               ("bad", 0), ("the movie was good , the plot great", 1), ("awful awful", 0), ("good good", 1)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in records))
    return data, tok_path


def test_jsonl_text_with_a_tokenizer(text_data, tmp_path):
    data, tok = text_data
    model = tmp_path / "sentiment.onnx"
    onnx.save(sentiment_model(), str(model))
    for batch in (1, 3, 7):  # short positives are padded next to long negatives
        assert onnxprune.evaluate(model, data, tokenizer=str(tok), batch_size=batch).accuracy == {"top1": 1.0}
    static = onnxprune.evaluate(sentiment_model(seq=8), data, tokenizer=str(tok), reference=model)
    assert static.accuracy == {"top1": 1.0} and static.fidelity["max_abs_error"] == 0.0
    assert main(["eval", str(model), "--data", str(data), "--tokenizer", str(tok), "--batch-size", "4"]) == 0


def test_jsonl_roles_padding_and_truncation(text_data):
    data, tok = text_data
    text = JsonlText(data, str(tok), max_length=3)
    i64 = np.dtype(np.int64)
    text.bind([InputSpec("input_ids", i64, ("b", "s")), InputSpec("attention_mask", i64, ("b", "s")),
               InputSpec("token_type_ids", np.dtype(np.int32), ("b", "s"))])
    arrays = text.arrays(0, 2)
    assert arrays["input_ids"].tolist() == [[2, 0, 0], [6, 8, 1]]  # "good" padded; the second truncated to 3
    assert arrays["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert arrays["token_type_ids"].dtype == np.int32 and not arrays["token_type_ids"].any()


def test_jsonl_errors_name_the_problem(text_data, tmp_path):
    data, tok = text_data
    with pytest.raises(DataError, match="needs a tokenizer"):
        onnxprune.evaluate(sentiment_model(), data)
    with pytest.raises(DataError, match=r"input 'input'.*float32.*token ids"):
        onnxprune.evaluate(EXAMPLE, data, tokenizer=str(tok))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": 1}\n{"label": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        open_data(bad, tokenizer=str(tok))


# -- the command line ---------------------------------------------------------------------------------
def test_cli_eval_json_with_reference_and_a_metric_file(tmp_path, pruned, small, capsys):
    metric = tmp_path / "my_metrics.py"
    metric.write_text("def wrong(outputs, labels):\n    return int((outputs.argmax(1) != labels).sum())\n")
    md = tmp_path / "eval.md"
    argv = ["eval", str(pruned), "--data", str(small), "--reference", str(EXAMPLE), "--json",
            "--metric", f"{metric}:wrong", "--markdown", str(md)]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 90 and data["reference_accuracy"]["top1"] > 0.97
    assert data["custom"]["wrong"] == pytest.approx(90 * (1 - data["accuracy"]["top1"]))
    assert set(data["fidelity"]) == {"top1_agreement", "cosine_similarity", "relative_l2_error", "max_abs_error",
                                     "mean_abs_error", "kl_divergence"}
    assert "| top-1 accuracy |" in md.read_text()


def test_cli_eval_table_and_reference_with_other_inputs(capsys, tmp_path, small):
    assert main(["eval", str(EXAMPLE), "--data", str(small), "--batch-size", "45"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "100.00%" in out and "90 samples" in out
    other = tmp_path / "other.onnx"
    onnx.save(sentiment_model(), str(other))
    assert main(["eval", str(EXAMPLE), "--data", str(small), "--reference", str(other)]) == 7
    assert "fidelity needs the same inputs" in capsys.readouterr().err


# -- models that refuse a batch, data that does not stack, time-major inputs -----------------------------
def _mlp(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def batch_one_only() -> onnx.ModelProto:
    """x[N, 4] -> MatMul -> Reshape to the constant [1, 3]: onnxruntime refuses any batch but 1."""
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])]
    return _mlp(nodes, [("x", ["N", 4])], [("y", [1, 3])], [w, shape])


def test_a_model_that_refuses_a_batch_is_fed_one_sample_at_a_time():
    model = batch_one_only()
    x = np.random.default_rng(6).standard_normal((9, 4)).astype(np.float32)
    labels = np.argmax(x @ numpy_helper.to_array(model.graph.initializer[0]), axis=1)
    result = onnxprune.evaluate(model, {"x": x, "labels": labels}, reference=model, batch_size=4)
    assert result.accuracy["top1"] == 1.0 and result.fidelity["cosine_similarity"] == 1.0
    assert result.batch_size == 1
    assert any("a batch of 4 samples failed (onnxruntime: node" in n and "one at a time" in n for n in result.notes)


class Sequences(Dataset):
    """Sequences of different lengths: a batch of more than one does not stack."""

    def __init__(self, lengths):
        rng = np.random.default_rng(8)
        self.samples = [rng.standard_normal((n, 4)).astype(np.float32) for n in lengths]
        self.source = "sequences"

    def bind(self, inputs):
        pass

    def __len__(self):
        return len(self.samples)

    def arrays(self, start, stop):
        return {"x": np.stack(self.samples[start:stop])}


def test_samples_that_do_not_stack_are_fed_one_at_a_time_and_compared_per_sample():
    w = numpy_helper.from_array(np.random.default_rng(9).standard_normal((4, 3)).astype(np.float32), "w")
    model = _mlp([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["N", "L", 4])], [("y", ["N", "L", 3])], [w])
    flipped = onnx.ModelProto()
    flipped.CopyFrom(model)
    flipped.graph.initializer[0].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), "w"))
    seen = []

    def lengths(outputs, labels):
        seen.append(outputs)
        return float(sum(len(block) for block in outputs))

    data = Sequences([3, 5, 5, 2])
    result = onnxprune.evaluate(flipped, data, reference=model, metric=lengths)
    assert result.custom["lengths"] == 4.0 and [b.shape for b in seen[0]] == [(1, 3, 3), (1, 5, 3), (1, 5, 3), (1, 2, 3)]
    assert result.fidelity["cosine_similarity"] == pytest.approx(-1.0) and result.fidelity["relative_l2_error"] == pytest.approx(2.0)
    assert "top1_agreement" not in result.fidelity  # a sequence of features holds no class scores
    assert any("its samples do not stack" in n for n in result.notes)


def time_major() -> onnx.ModelProto:
    """x[T, N, 4] -> MatMul -> y[T, N, 3]: the samples on axis 1."""
    w = numpy_helper.from_array(np.random.default_rng(10).standard_normal((4, 3)).astype(np.float32), "w")
    return _mlp([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["T", "N", 4])], [("y", ["T", "N", 3])], [w])


def test_batch_axis_moves_samples_in_and_out(tmp_path, capsys):
    model = time_major()
    x = np.random.default_rng(11).standard_normal((6, 5, 4)).astype(np.float32)  # samples first
    seen = []

    def keep(outputs, labels):
        seen.append(outputs)
        return 0.0

    onnxprune.evaluate(model, {"x": x}, metric=keep, batch_size=4, batch_axis=1)
    direct = make_session(model).run(None, {"x": np.moveaxis(x, 0, 1)})[0]  # [T, N, 3], all at once
    np.testing.assert_allclose(seen[0], np.moveaxis(direct, 1, 0), rtol=1e-6)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x)
    argv = ["eval", str(path), "--data", str(tmp_path / "x.npy"), "--reference", str(path), "--json"]
    assert main([*argv, "--batch-axis", "1", "--class-axis", "2"]) == 0
    fid = json.loads(capsys.readouterr().out)["fidelity"]
    assert fid["top1_agreement"] == 1.0 and fid["cosine_similarity"] == 1.0  # axis 2 declared: class scores
    assert main([*argv, "--batch-axis", "3"]) == 7
    assert "input 'x'" in capsys.readouterr().err
