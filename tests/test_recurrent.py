"""LSTM, GRU and RNN: the hidden size is one group. W, R (rows of every gate, and R's columns), B,
peepholes and initial states are sliced together; Y, Y_h and Y_c carry the units to their consumers;
both directions of a bidirectional op lose the same units, so hidden_size stays one number.
onnxruntime's int8 DynamicQuantizeLSTM prunes the same way, its transposed integer weights with
their per-row scales and zero points."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxprune
from helpers import (analysis_of, const, feeds_for, group_of, make_model, masked_quantized_reference,
                     prune_matches_oracle, random_removal, run, silence_removed_units, weight)
from onnxprune.cost import model_cost
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.strategy.estimate import CostEstimator
from onnxprune.testing import masked_reference

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH, FEATURES, WIDTH, HIDDEN, CLASSES = 5, 2, 6, 16, 16, 3


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def recurrent_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in GATES or n.op_type == "DynamicQuantizeLSTM")


def hidden_size(model: onnx.ModelProto) -> int:
    return helper.get_attribute_value(next(a for a in recurrent_node(model).attribute if a.name == "hidden_size"))


def kept_in(analysis, removed: set[int], source: str) -> int:
    group = group_of(analysis, source)
    return group.size - sum(int(r) in removed for r in group.roots.tolist())


def recurrent_model(op: str, directions: int = 1, *, head: str = "y_h", initial: str = "none",
                    peepholes: bool = False, layout: int = 0, **attrs) -> onnx.ModelProto:
    """x -> MatMul proj (WIDTH units) -> Relu -> op (HIDDEN) -> head.

    head "y_h": the final state, directions side by side, into a Gemm classifier: [batch, CLASSES].
    head "y": the sequence output, directions side by side, into a MatMul per step: [.., CLASSES].
    initial: "none", "const" (initializers) or "input" (graph inputs, run time).
    """
    gates = GATES[op]
    time_major = layout == 0
    x_shape = [SEQ, BATCH, FEATURES] if time_major else [BATCH, SEQ, FEATURES]
    inputs = [("x", x_shape)]
    inits = [weight(FEATURES, WIDTH, name="proj_w"),
             weight(directions, gates * HIDDEN, WIDTH, name="W"), weight(directions, gates * HIDDEN, HIDDEN, name="R"),
             weight(directions, 2 * gates * HIDDEN, name="B")]
    state_shape = [directions, BATCH, HIDDEN] if time_major else [BATCH, directions, HIDDEN]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    op_inputs = ["proj", "W", "R", "B", ""]
    if initial == "const":
        inits += [weight(*state_shape, name=s) for s in states]
        op_inputs += states
    elif initial == "input":
        inputs += [(s, state_shape) for s in states]
        op_inputs += states
    if peepholes:
        op_inputs += [""] * (7 - len(op_inputs)) + ["P"]
        inits.append(weight(directions, 3 * HIDDEN, name="P"))
    direction = "bidirectional" if directions == 2 else "forward"
    if layout:
        attrs["layout"] = layout
    outputs = ["seq", "last", "cell"] if op == "LSTM" else ["seq", "last"]
    nodes = [helper.make_node("MatMul", ["x", "proj_w"], ["proj_mm"], name="proj"),
             helper.make_node("Relu", ["proj_mm"], ["proj"], name="proj_relu"),
             helper.make_node(op, op_inputs, outputs, name="rnn", hidden_size=HIDDEN, direction=direction, **attrs)]
    width = directions * HIDDEN
    if head == "y_h":  # [directions, batch, H] -> [batch, directions * H]
        perm = [1, 0, 2] if time_major else [0, 1, 2]
        nodes += [helper.make_node("Transpose", ["last"], ["last_t"], name="last_t", perm=perm),
                  helper.make_node("Reshape", ["last_t", "flat"], ["features"], name="flatten"),
                  helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["y"], name="classifier", transB=1)]
        inits += [const([BATCH, width], "flat"), weight(CLASSES, width, name="fc_w"), weight(CLASSES, name="fc_b")]
        out_shape = [BATCH, CLASSES]
    else:  # [seq, directions, batch, H] -> [seq, batch, directions * H]
        perm = [0, 2, 1, 3] if time_major else [0, 1, 2, 3]
        steps = [SEQ, BATCH] if time_major else [BATCH, SEQ]
        nodes += [helper.make_node("Transpose", ["seq"], ["seq_t"], name="seq_t", perm=perm),
                  helper.make_node("Reshape", ["seq_t", "flat"], ["features"], name="merge_directions"),
                  helper.make_node("MatMul", ["features", "out_w"], ["y"], name="tagger")]
        inits += [const([0, 0, width], "flat"), weight(width, CLASSES, name="out_w")]
        out_shape = steps + [CLASSES]
    return make_model(nodes, inputs, [("y", out_shape)], inits, opset=14 if layout else 17)


CASES = [(op, directions, head) for op in GATES for directions in (1, 2) for head in ("y_h", "y")]


@pytest.mark.parametrize("op,directions,head", CASES,
                         ids=[f"{op}-{'bi' if d == 2 else 'uni'}-{head}" for op, d, head in CASES])
def test_hidden_units_are_cut_from_every_gate_and_match_the_masked_dense_model(op, directions, head):
    model = recurrent_model(op, directions, head=head, initial="const")
    analysis, pruned, removed = prune_matches_oracle(model)
    group = group_of(analysis, "rnn")
    assert group.prunable and group.size == HIDDEN
    kept = kept_in(analysis, removed, "rnn")
    gates = GATES[op]
    assert hidden_size(pruned) == kept
    assert initializer(pruned, "W").shape == (directions, gates * kept, kept_in(analysis, removed, "proj"))
    assert initializer(pruned, "R").shape == (directions, gates * kept, kept)
    assert initializer(pruned, "B").shape == (directions, 2 * gates * kept)
    assert initializer(pruned, "h0").shape == (directions, BATCH, kept)
    if op == "LSTM":
        assert initializer(pruned, "c0").shape == (directions, BATCH, kept)
    consumer_w, axis = ("fc_w", 1) if head == "y_h" else ("out_w", 0)
    assert initializer(pruned, consumer_w).shape[axis] == directions * kept


@pytest.mark.parametrize("op", list(GATES))
def test_the_input_features_are_sliced_out_of_w_like_a_matmul_sink(op):
    analysis, pruned, removed = prune_matches_oracle(recurrent_model(op, 2))
    proj = group_of(analysis, "proj")
    assert proj.prunable and "rnn" not in {s.node for s in proj.sources}
    kept = kept_in(analysis, removed, "proj")
    assert initializer(pruned, "proj_w").shape == (FEATURES, kept)
    assert initializer(pruned, "W").shape[2] == kept


def test_the_same_rows_of_every_gate_go_for_both_directions():
    model = recurrent_model("LSTM", 2, initial="const")
    analysis, pruned, removed = prune_matches_oracle(model)
    roots = group_of(analysis, "rnn").roots.tolist()
    kept = [j for j, r in enumerate(roots) if int(r) not in removed]
    rows = [g * HIDDEN + j for g in range(4) for j in kept]
    roots = group_of(analysis, "proj").roots.tolist()
    features = [j for j, r in enumerate(roots) if int(r) not in removed]
    dense_w, dense_r = initializer(model, "W"), initializer(model, "R")
    for d in range(2):
        np.testing.assert_array_equal(initializer(pruned, "W")[d], dense_w[d][rows][:, features])
        np.testing.assert_array_equal(initializer(pruned, "R")[d], dense_r[d][rows][:, kept])


def test_lstm_peepholes_are_sliced_per_gate():
    analysis, pruned, removed = prune_matches_oracle(recurrent_model("LSTM", 2, peepholes=True))
    kept = hidden_size(pruned)
    assert kept < HIDDEN and initializer(pruned, "P").shape == (2, 3 * kept)


def test_gru_with_the_reset_gate_applied_after_the_recurrent_product_prunes_the_same_way():
    _, pruned, _ = prune_matches_oracle(recurrent_model("GRU", 2, head="y", linear_before_reset=1))
    assert hidden_size(pruned) < HIDDEN


@pytest.mark.parametrize("op", list(GATES))
def test_batch_first_layout_keeps_the_hidden_axis_last(op):
    """layout=1 ([batch, seq, ..]): onnxruntime's CPU kernels refuse it, onnx's reference runs it."""
    model = recurrent_model(op, 2, head="y", initial="const", layout=1)
    working, _ = prepare(model)
    analysis = build_analysis(working)
    removed = random_removal(analysis, 0.5)
    pruned = ApplyPlan(analysis, removed)(working).model
    kept = kept_in(analysis, removed, "rnn")
    assert hidden_size(pruned) == kept and initializer(pruned, "h0").shape == (BATCH, 2, kept)
    feeds = feeds_for(working)
    got = ReferenceEvaluator(pruned).run(None, feeds)[0]
    want = ReferenceEvaluator(masked_reference(working, analysis, removed)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", list(GATES))
def test_initial_states_given_at_run_time_are_read_through_a_gather_of_the_kept_units(op):
    model = recurrent_model(op, 2, initial="input")
    analysis, pruned, _ = prune_matches_oracle(model)
    assert group_of(analysis, "rnn").prunable
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]  # inputs unchanged
    node = recurrent_node(pruned)
    gathers = {n.output[0]: n for n in pruned.graph.node if n.op_type == "Gather"}
    for index, state in zip((5, 6), ["h0", "c0"] if op == "LSTM" else ["h0"]):
        gather = gathers[node.input[index]]
        assert gather.input[0] == state
        assert len(initializer(pruned, gather.input[1])) == hidden_size(pruned)


def test_a_decoder_started_from_the_encoder_state_is_one_group_with_it():
    """encoder LSTM -> Y_h, Y_c -> initial state of the decoder LSTM -> its Y_h -> classifier."""
    inits = [weight(1, 4 * HIDDEN, FEATURES, name="enc_W"), weight(1, 4 * HIDDEN, HIDDEN, name="enc_R"),
             weight(1, 4 * HIDDEN, FEATURES, name="dec_W"), weight(1, 4 * HIDDEN, HIDDEN, name="dec_R"),
             const([BATCH, HIDDEN], "flat"), weight(CLASSES, HIDDEN, name="fc_w")]
    nodes = [helper.make_node("LSTM", ["x", "enc_W", "enc_R"], ["", "enc_h", "enc_c"], name="encoder",
                              hidden_size=HIDDEN),
             helper.make_node("LSTM", ["x", "dec_W", "dec_R", "", "", "enc_h", "enc_c"], ["", "dec_h"],
                              name="decoder", hidden_size=HIDDEN),
             helper.make_node("Reshape", ["dec_h", "flat"], ["features"], name="flatten"),
             helper.make_node("Gemm", ["features", "fc_w"], ["y"], name="classifier", transB=1)]
    model = make_model(nodes, [("x", [SEQ, BATCH, FEATURES])], [("y", [BATCH, CLASSES])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = group_of(analysis, "encoder")
    assert {s.node for s in group.sources} == {"encoder", "decoder"} and group.prunable
    sizes = {helper.get_attribute_value(a) for n in pruned.graph.node for a in n.attribute if a.name == "hidden_size"}
    assert sizes == {kept_in(analysis, removed, "encoder")}


@pytest.mark.parametrize("op", list(GATES))
def test_prune_at_half_ratio_validates_and_rewrites_hidden_size(op):
    pruned, report = onnxprune.prune(recurrent_model(op, 2, initial="input", head="y"), ratio=0.5)
    assert hidden_size(pruned) == HIDDEN // 2
    assert report is not None


def test_a_hidden_state_that_is_a_graph_output_is_blocked_with_the_reason():
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["seq"], name="rnn", hidden_size=HIDDEN)]
    inits = [weight(1, 4 * HIDDEN, FEATURES, name="W"), weight(1, 4 * HIDDEN, HIDDEN, name="R")]
    model = make_model(nodes, [("x", [SEQ, BATCH, FEATURES])], [("seq", [SEQ, 1, BATCH, HIDDEN])], inits)
    group = group_of(analysis_of(model), "rnn")
    assert not group.prunable
    assert any("reaches graph output 'seq'" in r for r in group.blocked)


def test_units_on_the_time_axis_of_x_are_kept_with_a_reason():
    """A Transpose moved the projection's units onto the time axis: the op steps over it, they stay."""
    inits = [weight(FEATURES, 4, name="proj_w"), weight(1, 4 * HIDDEN, SEQ, name="W"),
             weight(1, 4 * HIDDEN, HIDDEN, name="R"), const([BATCH, HIDDEN], "flat"),
             weight(CLASSES, HIDDEN, name="fc_w")]
    nodes = [helper.make_node("MatMul", ["x", "proj_w"], ["proj"], name="proj"),  # [SEQ, BATCH, 4]
             helper.make_node("Transpose", ["proj"], ["steps"], name="swap", perm=[2, 1, 0]),  # [4, BATCH, SEQ]
             helper.make_node("LSTM", ["steps", "W", "R"], ["", "last"], name="rnn", hidden_size=HIDDEN),
             helper.make_node("Reshape", ["last", "flat"], ["features"], name="flatten"),
             helper.make_node("Gemm", ["features", "fc_w"], ["y"], name="classifier", transB=1)]
    model = make_model(nodes, [("x", [SEQ, BATCH, FEATURES])], [("y", [BATCH, CLASSES])], inits)
    analysis = analysis_of(model)
    assert any("LSTM 'rnn' steps over axis 0 of 'steps'" in r for r in group_of(analysis, "proj").blocked)
    assert group_of(analysis, "rnn").prunable


@pytest.mark.parametrize("op", list(GATES))
def test_flops_count_w_and_r_at_every_step_and_the_estimate_of_a_removal_is_exact(op):
    """Targets are searched with the estimator: R shrinks on both axes, W on hidden and input."""
    working, _ = prepare(recurrent_model(op, 2, head="y"))
    dense = model_cost(working)
    gates = GATES[op]
    assert dense.by_node()["rnn"].macs == SEQ * BATCH * 2 * gates * HIDDEN * (WIDTH + HIDDEN)
    analysis = build_analysis(working)
    removed = random_removal(analysis, 0.5)
    flags = np.zeros(len(analysis.root_of), dtype=bool)
    flags[list(removed)] = True
    estimated, _ = CostEstimator(analysis, dense).estimate(flags)
    assert estimated == pytest.approx(model_cost(ApplyPlan(analysis, removed)(working).model).flops)


def unrolled_lstm(steps: int = 3) -> onnx.ModelProto:
    """An LSTM unrolled into Gemm/Split/Sigmoid/Tanh as torch exports an LSTMCell loop (crnn-captcha):
    W_ih, W_hh and their biases are one tensor read at every step, and the zero state h0 = c0 is
    ConstantOfShape([batch, HIDDEN]) with the batch read from x at run time."""
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
             helper.make_node("Gather", ["x_shape", "one"], ["batch"], name="batch", axis=0),
             helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch1"], name="batch1"),
             helper.make_node("Concat", ["batch1", "hidden"], ["state_shape"], name="state_shape", axis=0),
             helper.make_node("ConstantOfShape", ["state_shape"], ["zeros"], name="zeros",
                              value=numpy_helper.from_array(np.zeros(1, np.float32)))]
    h = c = "zeros"
    for t in range(steps):
        p = f"step{t}/"
        nodes += [helper.make_node("Gather", ["x", f"t{t}"], [p + "x"], name=p + "x", axis=0),
                  helper.make_node("Gemm", [h, "w_hh", "b_hh"], [p + "rec"], name=p + "recurrent", transB=1),
                  helper.make_node("Gemm", [p + "x", "w_ih", "b_ih"], [p + "in"], name=p + "input", transB=1),
                  helper.make_node("Add", [p + "rec", p + "in"], [p + "gates"], name=p + "gates"),
                  helper.make_node("Split", [p + "gates", "quarters"], [p + g for g in "ifgo"], name=p + "split",
                                   axis=1),
                  helper.make_node("Sigmoid", [p + "i"], [p + "si"], name=p + "si"),
                  helper.make_node("Sigmoid", [p + "f"], [p + "sf"], name=p + "sf"),
                  helper.make_node("Tanh", [p + "g"], [p + "tg"], name=p + "tg"),
                  helper.make_node("Sigmoid", [p + "o"], [p + "so"], name=p + "so"),
                  helper.make_node("Mul", [p + "sf", c], [p + "keep"], name=p + "forget"),
                  helper.make_node("Mul", [p + "si", p + "tg"], [p + "write"], name=p + "write"),
                  helper.make_node("Add", [p + "keep", p + "write"], [p + "c"], name=p + "cell"),
                  helper.make_node("Tanh", [p + "c"], [p + "tc"], name=p + "tc"),
                  helper.make_node("Mul", [p + "so", p + "tc"], [p + "h"], name=p + "h"),
                  helper.make_node("Unsqueeze", [p + "h", "zero_axis"], [p + "h1"], name=p + "h1")]
        h, c = p + "h", p + "c"
    nodes += [helper.make_node("Concat", [f"step{t}/h1" for t in range(steps)], ["seq"], name="seq", axis=0),
              helper.make_node("MatMul", ["seq", "out_w"], ["y"], name="readout")]
    inits = [const(1, "one"), const([0], "zero_axis"), const([HIDDEN], "hidden"), const([HIDDEN] * 4, "quarters"),
             weight(4 * HIDDEN, HIDDEN, name="w_hh"), weight(4 * HIDDEN, name="b_hh"),
             weight(4 * HIDDEN, FEATURES, name="w_ih"), weight(4 * HIDDEN, name="b_ih"),
             weight(HIDDEN, CLASSES, name="out_w")] + [const(t, f"t{t}") for t in range(steps)]
    return make_model(nodes, [("x", [steps, "batch", FEATURES])], [("y", [steps, "batch", CLASSES])], inits)


def test_an_unrolled_lstm_with_shared_weights_and_a_zero_state_prunes_as_one_group():
    analysis, pruned, removed = prune_matches_oracle(unrolled_lstm())
    group = group_of(analysis, "step0/recurrent")
    assert group.prunable and group.size == HIDDEN
    assert {s.node for s in group.sources} == {f"step{t}/{g}" for t in range(3) for g in ("recurrent", "input")}
    kept = kept_in(analysis, removed, "step0/recurrent")
    assert initializer(pruned, "w_hh").shape == (4 * kept, kept)  # still one tensor for every step
    assert initializer(pruned, "w_ih").shape == (4 * kept, FEATURES)
    fill = next(n for n in pruned.graph.node if n.op_type == "ConstantOfShape")
    shape = next(n for n in pruned.graph.node if n.output[0] == fill.input[0])
    assert initializer(pruned, shape.input[1]).tolist() == [kept]  # the zero state's width follows


def test_a_zero_fill_opens_no_group_of_its_own():
    """Its units only follow what they meet: here a graph output, which keeps them."""
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
             helper.make_node("Gather", ["x_shape", "one"], ["batch"], name="batch", axis=0),
             helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch1"], name="batch1"),
             helper.make_node("Concat", ["batch1", "hidden"], ["state_shape"], name="state_shape", axis=0),
             helper.make_node("ConstantOfShape", ["state_shape"], ["zeros"], name="zeros"),
             helper.make_node("Add", ["zeros", "x"], ["y"], name="add")]
    inits = [const(1, "one"), const([0], "zero_axis"), const([HIDDEN], "hidden")]
    model = make_model(nodes, [("x", [2, HIDDEN])], [("y", [2, HIDDEN])], inits)
    assert analysis_of(model).groups == []


def test_lossless_removes_dead_features_feeding_the_op_and_keeps_its_hidden_units():
    """Exact zeros are not followed through the recurrence: hidden units stay, even all-zero ones."""
    model = recurrent_model("LSTM", 2, head="y")
    for t in model.graph.initializer:
        values = numpy_helper.to_array(t).copy()
        if t.name == "proj_w":
            values[:, :8] = 0  # 8 dead projection features
        elif t.name in ("W", "R"):
            values[:, [g * HIDDEN + 3 for g in range(4)]] = 0  # hidden unit 3 reads nothing
        t.CopyFrom(numpy_helper.from_array(values, t.name))
    pruned, _ = onnxprune.prune(model, lossless=True)
    assert initializer(pruned, "W").shape == (2, 4 * HIDDEN, WIDTH - 8)
    assert hidden_size(pruned) == HIDDEN


# -- onnxruntime's int8 DynamicQuantizeLSTM (com.microsoft) ----------------------------------------------

def int8_lstm(tmp_path, *, per_channel: bool = False, **kwargs) -> onnx.ModelProto:
    """recurrent_model("LSTM", 2, ...) through onnxruntime's quantize_dynamic: the projection becomes a
    MatMulInteger, the LSTM a DynamicQuantizeLSTM with int8 W [2, WIDTH, 4 x HIDDEN] and R [2, HIDDEN,
    4 x HIDDEN] and their scales (per direction, or per direction and gate row with per_channel)."""
    from onnxruntime.quantization import quantize_dynamic
    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(recurrent_model("LSTM", 2, **kwargs), src)
    quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=True)
    model = onnx.load(dst)
    assert [n.op_type for n in model.graph.node].count("DynamicQuantizeLSTM") == 1
    return model


def silenced_reference(model, analysis, removed):
    """The masked quantized model (helpers.masked_quantized_reference) whose removed hidden units are
    also exactly 0 at every step (helpers.silence_removed_units): DynamicQuantizeLSTM quantizes the
    hidden state over the range of all its units at every step, so removed units must not move that
    range, as they cannot once removed.  X is quantized over a range that always holds 0, so a removed
    input feature masked to 0 is exact as it is."""
    reference = masked_quantized_reference(model, analysis, removed)
    silence_removed_units(reference, analysis, removed, "rnn_quant")
    return reference


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_direction", "per_gate_row"])
@pytest.mark.parametrize("head,initial", [("y_h", "none"), ("y", "const")])
def test_an_int8_lstm_prunes_its_hidden_units_like_the_masked_int8_model(tmp_path, per_channel, head, initial):
    model = int8_lstm(tmp_path, per_channel=per_channel, head=head, initial=initial)
    analysis, pruned, removed = prune_matches_oracle(model, oracle=silenced_reference, atol=0)
    group = group_of(analysis, "rnn_quant")
    assert group.prunable and group.size == HIDDEN
    hidden, features = kept_in(analysis, removed, "rnn_quant"), kept_in(analysis, removed, "proj_quant")
    assert hidden_size(pruned) == hidden
    node = recurrent_node(pruned)
    w, r = initializer(pruned, node.input[1]), initializer(pruned, node.input[2])
    assert w.dtype == np.int8 and w.shape == (2, features, 4 * hidden)  # transposed: [directions, input, rows]
    assert r.shape == (2, hidden, 4 * hidden)
    assert initializer(pruned, node.input[3]).shape == (2, 8 * hidden)
    for index in (8, 9, 10, 11):  # W and R scales and zero points
        assert initializer(pruned, node.input[index]).shape == ((2, 4 * hidden) if per_channel else (2,))


def test_an_int8_lstm_loses_the_same_rows_of_every_gate_as_its_float_original(tmp_path):
    model = int8_lstm(tmp_path, per_channel=True)
    analysis, pruned, removed = prune_matches_oracle(model, oracle=silenced_reference, atol=0)
    roots = group_of(analysis, "rnn_quant").roots.tolist()
    kept = [j for j, r in enumerate(roots) if int(r) not in removed]
    rows = [g * HIDDEN + j for g in range(4) for j in kept]
    node = recurrent_node(model)
    dense_r, dense_scale = initializer(model, node.input[2]), initializer(model, node.input[10])
    pruned_node = recurrent_node(pruned)
    np.testing.assert_array_equal(initializer(pruned, pruned_node.input[2]), dense_r[:, kept][:, :, rows])
    np.testing.assert_array_equal(initializer(pruned, pruned_node.input[10]), dense_scale[:, rows])


def test_run_time_initial_states_of_an_int8_lstm_are_gathered(tmp_path):
    model = int8_lstm(tmp_path, initial="input", head="y")
    working, _ = prepare(model)
    analysis = build_analysis(working)
    removed = random_removal(analysis, 0.5)
    pruned = ApplyPlan(analysis, removed)(working).model
    node = recurrent_node(pruned)
    gathers = {n.output[0]: n for n in pruned.graph.node if n.op_type == "Gather"}
    assert [gathers[node.input[i]].input[0] for i in (5, 6)] == ["h0", "c0"]
    feeds = {name: np.zeros_like(v) if name != "x" else v for name, v in feeds_for(working).items()}
    reference = silenced_reference(working, analysis, removed)  # zero states: removed units stay 0
    np.testing.assert_array_equal(run(pruned, feeds)[0], run(reference, feeds)[0])


def test_criteria_read_int8_lstm_weights_dequantized(tmp_path):
    """W and R as integers times their per-row scales are the float LSTM's weights (transposed)."""
    model = int8_lstm(tmp_path, per_channel=True)
    floats = onnx.load(tmp_path / "float.onnx")  # what int8_lstm quantized
    view = analysis_of(model).view
    node = recurrent_node(model)
    for index, name in ((1, "W"), (2, "R")):
        scale = initializer(model, node.input[8 if index == 1 else 10])
        real = view.weight(node.input[index])
        error = np.abs(real - initializer(floats, name).transpose(0, 2, 1))
        assert (error <= scale[:, None, :] / 2 + 1e-6).all()


def test_int8_lstm_flops_count_like_the_float_lstm_and_the_estimate_is_exact(tmp_path):
    working, _ = prepare(int8_lstm(tmp_path, head="y"))
    dense = model_cost(working)
    node = recurrent_node(working)
    assert dense.by_node()[node.name].macs == SEQ * BATCH * 2 * 4 * HIDDEN * (WIDTH + HIDDEN)
    analysis = build_analysis(working)
    removed = random_removal(analysis, 0.5)
    flags = np.zeros(len(analysis.root_of), dtype=bool)
    flags[list(removed)] = True
    estimated, _ = CostEstimator(analysis, dense).estimate(flags)
    assert estimated == pytest.approx(model_cost(ApplyPlan(analysis, removed)(working).model).flops)
