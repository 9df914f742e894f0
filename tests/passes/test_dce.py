"""Tests of ``dce``: dead nodes, constants, Identity nodes and opset imports removed; IO never touched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, make_model, op_counts, random_feeds, run, tensor, value
from onnx import TensorProto, helper

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext
from onnxopt.passes.dce import DeadCodeElimination


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def dce(model: onnx.ModelProto):
    """Runs dce once; checks the pass contracts and onnx.checker on the result."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = DeadCodeElimination()(graph, PassContext(original=model))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


def dce_after_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """dce on a graph whose shapes and types were inferred first, as the pipeline runs it."""
    graph = ir.import_model(model)
    ir.infer_shapes(graph)
    DeadCodeElimination()(graph, PassContext(original=model))
    return ir.export_model(graph, model)


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]


def assert_idempotent(model: onnx.ModelProto) -> None:
    again, result = dce(model)
    assert not result.modified, result.stats
    assert op_counts(again) == op_counts(model)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


# ---------------------------------------------------------------------------------------------------
# Dead nodes


def test_dead_chain_is_removed():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y) {
      y = Relu(x)
      d1 = Neg(x)
      d2 = Abs(d1)
      d3 = Add(d2, y)
    }""")
    optimized, result = dce(model)
    assert op_counts(optimized) == {"Relu": 1}
    assert result.modified and result.stats["dead_nodes_removed"] == 3
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_graph_outputs_and_unused_inputs_are_kept():
    model = parse(HEADER + """
    g (float[2,3] x, float[4] unused) => (float[2,3] y, float[2,3] z) {
      y = Relu(x)
      z = Neg(x)
    }""")
    optimized, result = dce(model)
    assert not result.modified
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_unused_initializers_and_constant_nodes_are_dropped():
    model = parse(HEADER + """
    g (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}, float[3] spare = {4.0, 5.0, 6.0}> {
      y = Mul(x, w)
      c = Constant<value = float[3] {7.0, 8.0, 9.0}>()
      d = Add(c, spare)
    }""")
    optimized, result = dce(model)
    assert op_counts(optimized) == {"Mul": 1}
    assert [t.name for t in optimized.graph.initializer] == ["w"]
    assert result.modified
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_overridable_initializer_input_is_kept_when_unused():
    x, y = value("x", shape=[3]), value("y", shape=[3])
    model = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x, value("bias", shape=[3])], [y],
                              [tensor("bias", np.ones(3, np.float32))])
    model = helper.make_model(model, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    optimized, _ = dce(model)
    assert io_names(optimized) == io_names(model)
    assert [t.name for t in optimized.graph.initializer] == ["bias"]


# ---------------------------------------------------------------------------------------------------
# Identity


def test_identity_between_nodes_is_bypassed():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y) {
      a = Relu(x)
      b = Identity(a)
      c = Identity(b)
      y = Neg(c)
    }""")
    optimized, result = dce(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    assert result.stats["identities_removed"] == 2
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_identity_chain_feeding_a_graph_output_from_a_node_is_renamed_away():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      a = Relu(x)
      b = Identity(a)
      y = Identity(b)
      z = Abs(a)
    }""")
    optimized, _ = dce(model)
    assert op_counts(optimized) == {"Relu": 1, "Abs": 1}
    relu = next(n for n in optimized.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["y"]
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_identity_from_graph_input_to_graph_output_stays():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y) {
      a = Identity(x)
      y = Identity(a)
    }""")
    optimized, _ = dce(model)
    assert op_counts(optimized) == {"Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_identity_between_two_graph_outputs_stays():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      y = Relu(x)
      z = Identity(y)
    }""")
    optimized, result = dce(model)
    assert not result.modified
    assert op_counts(optimized) == {"Relu": 1, "Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_two_identities_of_one_value_feeding_two_graph_outputs():
    model = parse(HEADER + """
    g (float[2,3] x) => (float[2,3] y1, float[2,3] y2) {
      r = Relu(x)
      y1 = Identity(r)
      y2 = Identity(r)
    }""")
    optimized, _ = dce(model)
    # One output can take over the Relu; the other needs an Identity to keep its own name.
    assert op_counts(optimized) == {"Relu": 1, "Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_identity_of_an_initializer_feeding_a_graph_output_stays():
    model = parse(HEADER + """
    g (float[3] x) => (float[3] y, float[3] z) <float[3] w = {1.0, 2.0, 3.0}> {
      y = Add(x, w)
      z = Identity(w)
    }""")
    optimized, _ = dce(model)
    assert op_counts(optimized) == {"Add": 1, "Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Subgraphs


IF_CAPTURE = HEADER + """
g (float[2,3] x, bool c) => (float[2,3] y) {
  t = Relu(x)
  u = Neg(x)
  v = Sin(x)
  dead = Abs(x)
  y = If(c) <
    then_branch = g1 () => (float[2,3] a) { a = Sigmoid(t) },
    else_branch = g2 () => (float[2,3] b) { unused = Exp(t)  read_only_here = Cos(v)  b = Abs(u) }
  >
}"""


def test_values_captured_by_if_branches_stay_and_dead_branch_nodes_go():
    model = parse(IF_CAPTURE)
    optimized, result = dce(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1, "If": 1, "Sigmoid": 1, "Abs": 1}
    # Sin only fed a dead node of a branch: it goes in the same run, branches being pruned first.
    assert result.stats["dead_nodes_removed"] == 4
    for flag in (True, False):
        feeds = {"x": random_feeds(model)["x"], "c": np.array(flag)}
        assert_same_outputs(model, optimized, feeds)
    assert_idempotent(optimized)


def test_identity_read_only_inside_a_branch_is_bypassed():
    model = parse(HEADER + """
    g (float[2,3] x, bool c) => (float[2,3] y) {
      t = Relu(x)
      i = Identity(t)
      y = If(c) <
        then_branch = g1 () => (float[2,3] a) { a = Sigmoid(i) },
        else_branch = g2 () => (float[2,3] b) { j = Identity(i)  b = Abs(j) }
      >
    }""")
    optimized, _ = dce(model)
    assert op_counts(optimized) == {"Relu": 1, "If": 1, "Sigmoid": 1, "Abs": 1}
    for flag in (True, False):
        feeds = {"x": random_feeds(model)["x"], "c": np.array(flag)}
        assert_same_outputs(model, optimized, feeds)
    assert_idempotent(optimized)


def test_equal_identities_in_both_branches_are_bypassed():
    """Both branches hold ``j = Identity(x)`` of the outer ``x``: graphsurgeon compares nodes by value, and
    unlinking one from ``x``'s readers must not take the other's place."""
    model = parse(HEADER + """
    g (float[2,3] x, bool c) => (float[2,3] y) {
      y = If(c) <
        then_branch = g1 () => (float[2,3] a) { j = Identity(x)  a = Sigmoid(j) },
        else_branch = g2 () => (float[2,3] b) { j = Identity(x)  b = Abs(j) }
      >
    }""")
    optimized, result = dce(model)
    assert result.stats["identities_removed"] == 2
    assert op_counts(optimized) == {"If": 1, "Sigmoid": 1, "Abs": 1}
    for flag in (True, False):
        assert_same_outputs(model, optimized, {"x": random_feeds(model)["x"], "c": np.array(flag)})
    assert_idempotent(optimized)


def test_values_captured_by_a_nested_loop_body_stay():
    model = parse(HEADER + """
    g (float[2] x, int64 n, bool c) => (float[2] y) {
      w = Relu(x)
      d = Neg(x)
      y = Loop(n, c, x) <
        body = loop_body (int64 i, bool cond_in, float[2] acc) => (bool cond_out, float[2] acc_out) {
          cond_out = Identity(cond_in)
          dead_inner = Exp(acc)
          acc_out = If(cond_in) <
            then_branch = t1 () => (float[2] s) { s = Add(acc, w) },
            else_branch = e1 () => (float[2] s2) { s2 = Sub(acc, w) }
          >
        }
      >
    }""")
    optimized, _ = dce(model)
    counts = op_counts(optimized)
    assert counts["Relu"] == 1 and "Neg" not in counts and "Exp" not in counts
    feeds = {"x": np.array([1.0, -2.0], np.float32), "n": np.array(3, np.int64), "c": np.array(True)}
    assert_same_outputs(model, optimized, feeds)
    assert_idempotent(optimized)


def test_subgraph_output_identity_of_a_local_value_is_renamed_away():
    model = parse(HEADER + """
    g (float[2,3] x, bool c) => (float[2,3] y) {
      y = If(c) <
        then_branch = g1 () => (float[2,3] a) { r = Relu(x)  a = Identity(r) },
        else_branch = g2 () => (float[2,3] b) { b = Identity(x) }
      >
    }""")
    optimized, _ = dce(model)
    # The else branch's Identity gives an outer value the branch's output name: it must stay.
    assert op_counts(optimized) == {"If": 1, "Relu": 1, "Identity": 1}
    for flag in (True, False):
        assert_same_outputs(model, optimized, {"x": random_feeds(model)["x"], "c": np.array(flag)})
    assert_idempotent(optimized)


# ---------------------------------------------------------------------------------------------------
# Opset imports


def test_unused_custom_opset_import_is_dropped_and_default_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1, "com.microsoft" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
      y = Relu(x)
      dead = com.example.Frobnicate(x)
      also_dead = com.microsoft.Gelu(x)
    }""")
    optimized, result = dce(model)
    assert {op.domain for op in optimized.opset_import} == {""}
    assert result.stats["opset_imports_removed"] == 2
    # The original does not run (onnxruntime knows no com.example); the result must.
    np.testing.assert_allclose(run(optimized, {"x": -np.ones((2, 3), np.float32)})[0], np.zeros((2, 3)))
    assert_idempotent(optimized)


def test_used_custom_opset_import_is_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
      y = com.microsoft.Gelu(x)
    }""")
    optimized, result = dce(model)
    assert not result.modified
    assert {op.domain for op in optimized.opset_import} == {"", "com.microsoft"}
    assert_same_outputs(model, optimized)


def test_dce_on_a_graph_with_everything_is_idempotent():
    model = parse(IF_CAPTURE)
    once, first = dce(model)
    twice, second = dce(once)
    assert first.modified and not second.modified
    assert op_counts(twice) == op_counts(once)
    assert onnx.printer.to_text(twice.graph) == onnx.printer.to_text(once.graph)


def test_cast_to_the_type_a_value_already_has_is_bypassed_and_a_real_cast_stays():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cast", ["r"], ["same"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["same"], ["half"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [value("x", TensorProto.FLOAT, [2, 3])], [value("y", TensorProto.FLOAT, [2, 3])])
    optimized = dce_after_inference(model)
    assert [n.op_type for n in optimized.graph.node] == ["Relu", "Cast", "Cast"]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("op, constant, constant_first, removed", [
    ("Add", np.zeros(3, np.float32), False, True),
    ("Add", np.zeros(3, np.float32), True, True),
    ("Sub", np.zeros((1, 3), np.float32), False, True),
    ("Sub", np.zeros(3, np.float32), True, False),        # 0 - x is -x
    ("Mul", np.ones(3, np.float32), True, True),
    ("Div", np.ones(3, np.float32), False, True),
    ("Div", np.ones(3, np.float32), True, False),         # 1 / x
    ("Add", np.zeros((4, 2, 3), np.float32), False, False),  # broadcasting widens x
    ("Add", np.full(3, 1e-30, np.float32), False, False),
    ("Mul", np.array([1, 1, 2], np.float32), False, False),
])
def test_arithmetic_with_a_neutral_constant_is_bypassed(op, constant, constant_first, removed):
    inputs = ["c", "r"] if constant_first else ["r", "c"]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, inputs, ["a"]),
             helper.make_node("Neg", ["a"], ["y"])]
    model = make_model(nodes, [value("x", TensorProto.FLOAT, [2, 3])], [value("y", TensorProto.FLOAT, None)],
                       [tensor("c", constant)], check=False)
    optimized = dce_after_inference(model)
    assert (op not in [n.op_type for n in optimized.graph.node]) == removed
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("op, constant, removed", [
    ("And", np.ones(3, bool), True),
    ("And", np.array([True, False, True]), False),
    ("Or", np.zeros((1, 3), bool), True),
    ("Or", np.ones(3, bool), False),                      # x or true is true
    ("Xor", np.zeros(3, bool), True),
    ("And", np.ones((4, 2, 3), bool), False),             # broadcasting widens x
])
def test_logic_with_a_neutral_constant_is_bypassed(op, constant, removed):
    nodes = [helper.make_node("Greater", ["x", "t"], ["m"]), helper.make_node(op, ["m", "c"], ["a"]),
             helper.make_node("Not", ["a"], ["y"])]
    model = make_model(nodes, [value("x", TensorProto.FLOAT, [2, 3])], [value("y", TensorProto.BOOL, None)],
                       [tensor("c", constant), tensor("t", np.zeros(1, np.float32))], check=False)
    optimized = dce_after_inference(model)
    assert (op not in [n.op_type for n in optimized.graph.node]) == removed
    assert_same_outputs(model, optimized)


def recurrent_model(op: str, state: str) -> onnx.ModelProto:
    """x [5, B, 3] through an ``op`` of hidden size 4 whose initial states are built by ``state``:
    ``zeros`` (Keras' Shape -> Concat -> Expand of 0), ``fill`` (ConstantOfShape, default 0),
    ``ones`` (Expand of 1, which must stay)."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(0)
    fill = 1.0 if state == "ones" else 0.0
    build = "h0 = ConstantOfShape(shape)" if state == "fill" else "h0 = Expand(fill, shape)"
    states = "h0, h0" if op == "LSTM" else "h0"
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[5, B, 3] x) => (float[5, 1, B, 4] y, float[1, B, 4] y_h) <float fill = {{{fill}}},
          int64[1] one = {{1}}, int64[1] hidden = {{4}}, int64[1] zero = {{1}}, int64[1] end = {{2}}> {{
            full = Shape(x)
            batch = Slice(full, zero, end)
            shape = Concat <axis = 0> (one, batch, hidden)
            {build}
            y, y_h = {op} <hidden_size = 4> (x, w, r, b, , {states})
        }}""")
    weights = [tensor("w", rng.standard_normal((1, gates * 4, 3)).astype(np.float32)),
               tensor("r", rng.standard_normal((1, gates * 4, 4)).astype(np.float32)),
               tensor("b", rng.standard_normal((1, gates * 8)).astype(np.float32))]
    model.graph.initializer.extend(weights)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("state", ["zeros", "fill"])
def test_zero_initial_states_of_recurrent_operators_are_dropped(op, state):
    model = recurrent_model(op, state)
    optimized, result = dce(model)
    assert result.stats["zero_initial_states_dropped"] == (2 if op == "LSTM" else 1)
    assert op_counts(optimized) == {op: 1}
    node = optimized.graph.node[0]
    assert list(node.input) == ["x", "w", "r", "b"]
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).standard_normal((5, batch, 3)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)


def test_initial_states_that_are_not_zeros_stay():
    model = recurrent_model("LSTM", "ones")
    optimized, result = dce(model)
    assert result.stats["zero_initial_states_dropped"] == 0
    assert op_counts(optimized) == op_counts(model)
