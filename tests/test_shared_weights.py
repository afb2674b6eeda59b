"""A tensor several nodes read stays ONE tensor: its readers are coupled and take the same slice,
the file shrinks, and the report counts it once.  Readers that would need different slices block
their units with a reason naming the tensor; exporter de-duplication of small vectors still prunes
each layer on its own."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from helpers import analysis_of, group_of, make_model, prune_matches_oracle, run, weight
from onnxprune.errors import OnnxPruneError
from onnxprune.ir.model_io import reshare_initializers, unique_parameters
from onnxprune.pipeline import prepare
from onnxprune.strategy.plan import GroupPlan, Plan

D, F = 8, 32  # hidden width; FFN width (ratio 0.5 with the default --round-to 8 keeps 16)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def readers_of(model: onnx.ModelProto, op_type: str, index: int) -> list[str]:
    return [n.input[index] for n in model.graph.node if n.op_type == op_type]


def albert_like(layers: int = 3) -> onnx.ModelProto:
    """x -> `layers` x (h + MatMul(Relu(MatMul(h, w1) + b1), w2) + b2), every layer reading the
    SAME w1, b1, w2, b2 (ALBERT's cross-layer sharing)."""
    nodes, h = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [h, "w1"], [f"up{i}"], name=f"up{i}"),
                  helper.make_node("Add", [f"up{i}", "b1"], [f"upb{i}"], name=f"up_bias{i}"),
                  helper.make_node("Relu", [f"upb{i}"], [f"act{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"act{i}", "w2"], [f"down{i}"], name=f"down{i}"),
                  helper.make_node("Add", [f"down{i}", "b2"], [f"downb{i}"], name=f"down_bias{i}"),
                  helper.make_node("Add", [h, f"downb{i}"], [f"h{i}"], name=f"residual{i}")]
        h = f"h{i}"
    nodes[-1].output[0] = "y"
    inits = [weight(D, F, name="w1"), weight(F, name="b1"), weight(F, D, name="w2"), weight(D, name="b2")]
    return make_model(nodes, [("x", ["N", 4, D])], [("y", ["N", 4, D])], inits)


def unrolled_rnn(steps: int = 3, hidden: int = 16) -> onnx.ModelProto:
    """h1 = tanh(x1 @ u + b); h_t = tanh(x_t @ u + h_{t-1} @ w + b); y = h_last @ v.
    `u` and `b` are read at every step, `w` at every step after the first."""
    nodes = []
    for t in range(1, steps + 1):
        nodes.append(helper.make_node("MatMul", [f"x{t}", "u"], [f"in{t}"], name=f"input_proj{t}"))
        pre = f"in{t}"
        if t > 1:
            nodes += [helper.make_node("MatMul", [f"h{t - 1}", "w"], [f"rec{t}"], name=f"recurrent{t}"),
                      helper.make_node("Add", [f"in{t}", f"rec{t}"], [f"sum{t}"], name=f"sum{t}")]
            pre = f"sum{t}"
        nodes += [helper.make_node("Add", [pre, "b"], [f"pre{t}"], name=f"bias{t}"),
                  helper.make_node("Tanh", [f"pre{t}"], [f"h{t}"], name=f"tanh{t}")]
    nodes.append(helper.make_node("MatMul", [f"h{steps}", "v"], ["y"], name="readout"))
    inits = [weight(6, hidden, name="u"), weight(hidden, hidden, name="w"), weight(hidden, name="b"),
             weight(hidden, 3, name="v")]
    return make_model(nodes, [(f"x{t}", [2, 6]) for t in range(1, steps + 1)], [("y", [2, 3])], inits)


def tied_lm(vocab: int = 50) -> onnx.ModelProto:
    """ids -> Gather(emb) -> x + FFN(x) -> MatMul(h, Transpose(emb)) -> logits: the LM head reads the
    embedding table through a Transpose (tied embeddings)."""
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["up"], name="up"),
             helper.make_node("Relu", ["up"], ["act"], name="relu"),
             helper.make_node("MatMul", ["act", "w2"], ["down"], name="down"),
             helper.make_node("Add", ["x", "down"], ["h"], name="residual"),
             helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, vocab])],
        initializer=[weight(vocab, D, name="emb"), weight(D, F, name="w1"), weight(F, D, name="w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def size_of(path) -> int:
    return path.stat().st_size


# -- one tensor, coupled readers ---------------------------------------------------------------------
def test_albert_layers_sharing_ffn_weights_are_one_group_cut_once_and_match_the_oracle():
    analysis, pruned, removed = prune_matches_oracle(albert_like())
    group = group_of(analysis, "up0")
    assert group.prunable and group.size == F
    assert {s.node for s in group.sources} == {"up0", "up1", "up2"}  # the readers are coupled
    kept = F - len(removed)
    weights = initializers(pruned)
    assert weights["w1"].shape == (D, kept) and weights["w2"].shape == (kept, D)
    assert readers_of(pruned, "MatMul", 1) == ["w1", "w2"] * 3  # every layer still reads the one tensor
    assert not [n for n in weights if n.startswith(("w1_", "w1__", "w2_", "w2__"))]


def test_prune_ratio_half_writes_one_copy_of_the_shared_weights_and_a_smaller_file(tmp_path):
    src, out = tmp_path / "albert.onnx", tmp_path / "small.onnx"
    onnx.save(albert_like(), str(src))
    _, report = onnxprune.prune(src, out, ratio=0.5)
    pruned = onnx.load(str(out))
    weights = initializers(pruned)
    assert sorted(weights) == ["b1", "b2", "w1", "w2"]  # the bias copies made for analysis merged back
    assert weights["w1"].shape == (D, F // 2) and weights["w2"].shape == (F // 2, D)
    assert weights["b1"].shape == (F // 2,)
    assert readers_of(pruned, "Add", 1)[::3] == ["b1"] * 3
    assert size_of(out) < size_of(src)
    dense = onnx.load(str(src))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, D)).astype(np.float32)}
    assert run(pruned, feeds)[0].shape == run(dense, feeds)[0].shape


def test_report_counts_a_shared_tensor_once():
    model = albert_like()
    _, report = onnxprune.prune(model, ratio=0.5)
    assert report.before.params == D * F + F + F * D + D  # not three times over
    assert report.after.params == D * F // 2 + F // 2 + F // 2 * D + D
    assert report.before.param_bytes == 4 * report.before.params
    assert onnxprune.analyze(model).stats.params == report.before.params


def test_calibration_repair_leaves_shared_weights_one_tensor():
    """Least squares refits one reader at a time: a shared weight is not refit (that would copy it)."""
    calib = {"x": np.random.default_rng(0).standard_normal((64, 4, D)).astype(np.float32)}
    pruned, report = onnxprune.prune(albert_like(), ratio=0.5, calib=calib)
    assert readers_of(pruned, "MatMul", 1) == ["w1", "w2"] * 3
    assert report.after.param_bytes < report.before.param_bytes


def test_unrolled_recurrence_steps_take_the_same_units_of_their_shared_weights():
    analysis, pruned, removed = prune_matches_oracle(unrolled_rnn())
    group = group_of(analysis, "input_proj1")
    assert group.prunable and group.size == 16
    assert {"input_proj1", "input_proj2", "input_proj3", "recurrent2", "recurrent3"} <= {s.node for s in group.sources}
    kept = 16 - len(removed)
    weights = initializers(pruned)
    assert weights["u"].shape == (6, kept) and weights["w"].shape == (kept, kept) and weights["v"].shape == (kept, 3)
    assert readers_of(pruned, "MatMul", 1).count("u") == 3 and readers_of(pruned, "MatMul", 1).count("w") == 2
    assert sum(a.size for a in weights.values()) < sum(a.size for a in initializers(unrolled_rnn()).values())


def test_tied_embedding_table_stays_one_tensor_and_the_ffn_is_pruned(tmp_path):
    src, out = tmp_path / "lm.onnx", tmp_path / "small.onnx"
    onnx.save(tied_lm(), str(src))
    onnxprune.prune(src, out, ratio=0.5)
    pruned = onnx.load(str(out))
    weights = initializers(pruned)
    assert sorted(weights) == ["emb", "w1", "w2"]  # no transposed copy of the table
    assert weights["emb"].shape == (50, D) and weights["w1"].shape == (D, F // 2)
    assert size_of(out) < size_of(src)


def test_tied_embedding_hidden_width_is_cut_from_the_one_table():
    """With --prune-hidden the embedding width is a group: the Gather and the head's Transpose
    read the same columns of the one table."""
    model = tied_lm()
    pruned, report = onnxprune.prune(model, ratio=0.5, prune_hidden=True, round_to=1)
    weights = initializers(pruned)
    assert sorted(weights) == ["emb", "w1", "w2"]
    assert weights["emb"].shape == (50, D // 2) and weights["w2"].shape[1] == D // 2
    assert report.after.params < report.before.params


def before_each_reader(model: onnx.ModelProto, tensor: str, op_type: str, **attrs) -> onnx.ModelProto:
    """Read `tensor` through its own `op_type` node right before each of its readers."""
    nodes = []
    for node in model.graph.node:
        if tensor in node.input:
            nodes.append(helper.make_node(op_type, [tensor], [f"{tensor}_{node.name}"], **attrs))
            node.input[list(node.input).index(tensor)] = f"{tensor}_{node.name}"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_identity_of_a_shared_weight_before_each_reader_is_read_directly():
    """An exporter's Identity per use of a shared weight: folding reads the weight itself, no copies."""
    working, _ = prepare(before_each_reader(albert_like(), "w1", "Identity"))
    assert readers_of(working, "MatMul", 1) == ["w1", "w2"] * 3
    assert "Identity" not in {n.op_type for n in working.graph.node}


def test_the_same_transpose_of_a_shared_weight_before_each_reader_is_folded_once():
    model = albert_like()
    model.graph.initializer[0].CopyFrom(weight(F, D, name="w1"))  # stored transposed, as Linear keeps it
    model = before_each_reader(model, "w1", "Transpose", perm=[1, 0])
    working, _ = prepare(model)
    first = readers_of(working, "MatMul", 1)[0]
    assert readers_of(working, "MatMul", 1) == [first, "w2"] * 3
    assert unique_parameters(working) == unique_parameters(model)


# -- readers that would need different slices ------------------------------------------------------
def divergent_readers(second: str) -> onnx.ModelProto:
    """'w' (H x H) is read by MatMul 'plain' on the graph input x (rows: nothing to prune there) and
    by `second` on r = relu(x2 @ v), whose features are prunable:
      second="matmul": r @ w    -> w's rows would follow v's units, 'plain' reads them whole;
      second="gemm":   Gemm(r, w, transB=1) -> w's rows are that Gemm's outputs, 'plain' reads them whole.
    """
    H = 16
    nodes = [helper.make_node("MatMul", ["x2", "v"], ["pv"], name="proj"),
             helper.make_node("Relu", ["pv"], ["r"], name="relu"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="plain"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("MatMul", ["ra", "za"], ["out_a"], name="head_a")]
    if second == "matmul":
        nodes.append(helper.make_node("MatMul", ["r", "w"], ["b"], name="second"))
    else:
        nodes.append(helper.make_node("Gemm", ["r", "w"], ["b"], name="second", transB=1))
    nodes += [helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
              helper.make_node("MatMul", ["rb", "zb"], ["out_b"], name="head_b")]
    inits = [weight(5, H, name="v"), weight(H, H, name="w"), weight(H, 3, name="za"), weight(H, 3, name="zb")]
    return make_model(nodes, [("x", [2, H]), ("x2", [2, 5])], [("out_a", [2, 3]), ("out_b", [2, 3])], inits)


@pytest.mark.parametrize("second", ["matmul", "gemm"])
@pytest.mark.parametrize("order", ["plain_first", "plain_last"])
def test_a_reader_that_takes_the_sliced_axis_whole_blocks_those_units_naming_tensor_and_readers(second, order):
    model = divergent_readers(second)
    if order == "plain_last":  # the rule of the whole-axis reader runs after the slicing one
        nodes = list(model.graph.node)
        plain = [n for n in nodes if n.name in ("plain", "relu_a", "head_a")]
        del model.graph.node[:]
        model.graph.node.extend([n for n in nodes if n not in plain] + plain)
    analysis = analysis_of(model)
    blocked = group_of(analysis, "proj" if second == "matmul" else "second")
    assert not blocked.prunable
    reason = next(r for r in blocked.blocked if "initializer 'w'" in r)
    assert "MatMul 'plain'" in reason and "'second'" in reason and "axis 0" in reason
    # the other axis of 'w' is taken up by both readers: still prunable, and pruned correctly
    free = group_of(analysis, "plain")
    assert free.prunable
    _, pruned, _ = prune_matches_oracle(model)
    assert readers_of(pruned, "MatMul", 1).count("w") + readers_of(pruned, "Gemm", 1).count("w") == 2


def test_divergent_readers_still_prune_end_to_end_without_copying_the_tensor(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "small.onnx"
    onnx.save(divergent_readers("gemm"), str(src))
    _, report = onnxprune.prune(src, out, ratio=0.5)
    weights = initializers(onnx.load(str(out)))
    assert sorted(weights) == ["v", "w", "za", "zb"]
    assert report.after.params < report.before.params


# -- exporter de-duplication of small vectors ------------------------------------------------------
def dedup_cnn(bias: np.ndarray | None = None) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> relu -> conv3: conv1 and conv2 read ONE bias (zeros by default), as
    the legacy TorchScript exporter writes identical tensors of unrelated layers."""
    c = 16
    bias = np.zeros(c, np.float32) if bias is None else bias
    nodes = [helper.make_node("Conv", ["x", "w1", "zero"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "zero"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", kernel_shape=[1, 1])]
    inits = [weight(c, 3, 3, 3, name="w1"), weight(c, c, 3, 3, name="w2"), weight(2, c, 1, 1, name="w3"),
             numpy_helper.from_array(bias, "zero")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 2, 8, 8])], inits)


def test_exporter_shared_zero_bias_leaves_unrelated_layers_independent():
    analysis, pruned, removed = prune_matches_oracle(dedup_cnn(), fraction=0.25)
    g1, g2 = group_of(analysis, "conv1"), group_of(analysis, "conv2")
    assert g1 is not g2 and g1.prunable and g2.prunable
    assert unique_parameters(pruned)[1] < unique_parameters(dedup_cnn())[1]


@pytest.mark.parametrize("keep2, versions", [(range(8), 1), (range(8, 16), 2)], ids=["same_units", "other_units"])
def test_bias_copies_that_kept_the_same_values_merge_back_the_others_stay_apart(keep2, versions):
    model = dedup_cnn(np.arange(16, dtype=np.float32))
    plan = Plan(groups=[GroupPlan("conv1", 16, list(range(8))), GroupPlan("conv2", 16, list(keep2))])
    pruned, report = onnxprune.prune(model, plan=plan)
    biases = {n.input[2] for n in pruned.graph.node if n.op_type == "Conv" and len(n.input) > 2}
    assert len(biases) == versions
    assert report.after.param_bytes < report.before.param_bytes


def test_reshare_merges_only_equal_copies_of_one_tensor():
    model = make_model([helper.make_node("Add", ["x", "b"], ["s1"], name="a1"),
                        helper.make_node("Add", ["s1", "b__a2_2"], ["s2"], name="a2"),
                        helper.make_node("Add", ["s2", "b__a3_3"], ["s3"], name="a3"),
                        helper.make_node("Add", ["s3", "c"], ["y"], name="a4")],
                       [("x", [2, 4])], [("y", [2, 4])],
                       [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("b", "b__a2_2", "c")]
                       + [numpy_helper.from_array(np.full(4, 2, np.float32), "b__a3_3")])
    assert reshare_initializers(model) == 1
    assert [n.input[1] for n in model.graph.node] == ["b", "b", "b__a3_3", "c"]  # 'c' is another tensor


# -- the guard -------------------------------------------------------------------------------------
def test_a_model_whose_distinct_parameters_grew_is_refused_before_writing(tmp_path, monkeypatch):
    """Simulate a rewrite that slices a shared weight per reader: nothing is written, the error
    names the tensor."""
    import onnxprune.pipeline.stages as pipeline

    real = pipeline.apply_removal

    def per_reader_copies(model, analysis, removed):
        pruned = real(model, analysis, removed)
        w1 = next(t for t in pruned.graph.initializer if t.name == "w1")
        for k, node in enumerate(n for n in pruned.graph.node if n.input[1:2] == ["w1"]):
            copy = numpy_helper.from_array(numpy_helper.to_array(w1) * (1 + k), f"w1__{node.name}")
            pruned.graph.initializer.append(copy)
            node.input[1] = copy.name
        return pruned

    monkeypatch.setattr(pipeline, "apply_removal", per_reader_copies)
    out = tmp_path / "small.onnx"
    with pytest.raises(OnnxPruneError, match=r"'w1' \(\d versions"):
        onnxprune.prune(albert_like(layers=6), out, ratio=0.25, round_to=1)
    assert not out.exists()
