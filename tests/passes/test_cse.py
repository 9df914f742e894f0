"""Tests of ``cse``: duplicate nodes and identical constants merged; outputs, randomness and scopes kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, make_model, op_counts, run, tensor, value
from onnx import TensorProto, helper

import onnxopt
from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext
from onnxopt.passes.cse import CommonSubexpressionElimination


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def cse(model: onnx.ModelProto):
    """Runs cse once; checks the pass contracts and onnx.checker on the result."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = CommonSubexpressionElimination()(graph, PassContext(original=model))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


def assert_unchanged(model: onnx.ModelProto, feeds=None) -> None:
    optimized, result = cse(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == op_counts(model)
    if feeds is not False:
        assert_same_outputs(model, optimized, feeds)


def assert_idempotent(model: onnx.ModelProto) -> None:
    again, result = cse(model)
    assert not result.modified, result.stats
    assert op_counts(again) == op_counts(model)


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]


# ---------------------------------------------------------------------------------------------------
# Nodes


def test_duplicate_nodes_are_merged():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      a = Relu(x)
      b = Relu(x)
      y = Add(a, b)
    }""")
    optimized, result = cse(model)
    assert op_counts(optimized) == {"Relu": 1, "Add": 1}
    assert result.stats["nodes_merged"] == 1
    add = optimized.graph.node[1]
    assert list(add.input) == ["a", "a"]
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_duplicate_chains_are_merged_in_one_run():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <float[3] w1 = {1., 2., 3.}, float[3] w2 = {1., 2., 3.}> {
      a = Mul(x, w1)
      b = Mul(x, w2)
      a2 = Transpose<perm = [1, 0]>(a)
      b2 = Transpose<perm = [1, 0]>(b)
      a3 = Softmax<axis = 0>(a2)
      b3 = Softmax<axis = 0>(b2)
      s = Sub(a3, b3)
      y = Transpose<perm = [1, 0]>(s)
    }""")
    optimized, result = cse(model)
    assert op_counts(optimized) == {"Mul": 1, "Transpose": 2, "Softmax": 1, "Sub": 1}
    assert result.stats == {"nodes_merged": 3, "constants_merged": 1}
    assert len(optimized.graph.initializer) == 1
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_multi_output_duplicates_are_merged():
    model = parse("""
    g (float[4,6] x) => (float[4,3] y) {
      a1, a2 = Split<axis = 1, num_outputs = 2>(x)
      b1, b2 = Split<axis = 1, num_outputs = 2>(x)
      p = Add(a1, b2)
      q = Add(b1, a2)
      y = Mul(p, q)
    }""", opset=18)
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"Split": 1, "Add": 1, "Mul": 1}
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("first,second,second_type", [
    ("Transpose<perm = [1, 0]>(x)", "Transpose<perm = [0, 1]>(x)", "float"),
    ("LeakyRelu<alpha = 0.1>(x)", "LeakyRelu<alpha = 0.2>(x)", "float"),
    ("Softmax<axis = 0>(x)", "Softmax<axis = 1>(x)", "float"),
    ("ReduceSum(x, empty)", "ReduceSum<noop_with_empty_axes = 1>(x, empty)", "float"),
    ("Cast<to = 1>(x)", "Cast<to = 11>(x)", "double"),
], ids=["perm", "alpha", "axis", "default-vs-set", "cast-to"])
def test_nodes_with_different_attributes_are_not_merged(first, second, second_type):
    model = parse("""
    g (float[3,3] x) => (float[M,N] a, %s[P,Q] b) <int64[1] axes = {0}, int64[0] empty = {}> {
      a = %s
      b = %s
    }""" % (second_type, first, second))
    optimized, result = cse(model)
    assert not result.modified
    assert op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized)


def test_non_commutative_nodes_with_swapped_inputs_are_not_merged():
    model = parse("""
    g (float[2] x, float[2] z) => (float[2] y) {
      p = Sub(x, z)
      q = Sub(z, x)
      m = MatMul(p, q)
      n = MatMul(q, p)
      d = Div(m, n)
      y = Add(p, d)
    }""")
    assert_unchanged(model)


def test_nodes_reading_different_inputs_are_not_merged():
    model = parse("""
    g (float[2] x, float[2] z) => (float[2] y) {
      p = Relu(x)
      q = Relu(z)
      y = Sub(p, q)
    }""")
    assert_unchanged(model)


def test_random_nodes_and_dropout_are_never_merged():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y, float[2,3] w, float[2,3] u) {
      a = RandomNormalLike(x)
      b = RandomNormalLike(x)
      y = Sub(a, b)
      d1 = Dropout(x)
      d2 = Dropout(x)
      w = Add(d1, d2)
      u1 = RandomUniform<shape = [2, 3]>()
      u2 = RandomUniform<shape = [2, 3]>()
      u = Sub(u1, u2)
      n1 = RandomNormal<shape = [2, 3], seed = 1.>()
      n2 = RandomNormal<shape = [2, 3], seed = 1.>()
    }""")
    assert_unchanged(model, feeds=False)


def test_custom_domain_nodes_are_not_merged():
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>' + """
    g (float[2] x) => (float[2] y) {
      a = custom.domain.Sample(x)
      b = custom.domain.Sample(x)
      y = Sub(a, b)
    }""")
    optimized, result = cse(model)
    assert not result.modified
    assert op_counts(optimized) == {"Sample": 2, "Sub": 1}


def test_nodes_with_subgraphs_are_not_merged():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      a = If(c) <then_branch = t1 () => (float[2] p1) { p1 = Relu(x) },
                 else_branch = e1 () => (float[2] q1) { q1 = Neg(x) }>
      b = If(c) <then_branch = t2 () => (float[2] p2) { p2 = Relu(x) },
                 else_branch = e2 () => (float[2] q2) { q2 = Neg(x) }>
      y = Add(a, b)
    }""")
    optimized, result = cse(model)
    assert not result.modified
    assert op_counts(optimized)["If"] == 2


def test_duplicates_that_are_both_graph_outputs_keep_both_names():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      y = Relu(x)
      z = Relu(x)
    }""")
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"Relu": 1, "Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_duplicate_that_is_a_graph_output_takes_over_the_kept_node():
    model = parse("""
    g (float[2,3] x) => (float[2,3] z, float[2,3] w) {
      y = Relu(x)
      z = Relu(x)
      w = Neg(y)
    }""")
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    relu = next(n for n in optimized.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["z"]
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Constants


def test_identical_initializers_are_merged_and_different_ones_are_not():
    # d has a's values in another shape; e has a's bytes as another type.
    model = parse("""
    g (float[2] x) => (float[1,2] y) <float[2] a = {1., 2.}, float[2] b = {1., 2.}, float[2] c = {1., 3.},
                                     float[1,2] d = {1., 2.}, int32[2] e = {1065353216, 1073741824}> {
      p = Add(x, a)
      q = Add(p, b)
      r = Mul(q, c)
      s = Add(r, d)
      ef = Cast<to = 1>(e)
      y = Add(s, ef)
    }""")
    optimized, result = cse(model)
    assert result.stats["constants_merged"] == 1
    assert sorted(t.name for t in optimized.graph.initializer) == ["a", "c", "d", "e"]
    assert_same_outputs(model, optimized)
    assert_idempotent(optimized)


def test_identical_constant_nodes_are_merged():
    model = parse("""
    g (float[2] x) => (float[2] y) {
      a = Constant<value = float[2] {1., 2.}>()
      b = Constant<value = float[2] {1., 2.}>()
      c = Constant<value = float[2] {2., 1.}>()
      p = Add(x, a)
      q = Mul(p, b)
      y = Sub(q, c)
    }""")
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"Constant": 2, "Add": 1, "Mul": 1, "Sub": 1}
    assert_same_outputs(model, optimized)


def float8_tensor(name: str, data_type: int) -> onnx.TensorProto:
    return helper.make_tensor(name, data_type, [2], bytes([0x38, 0x40]), raw=True)


@pytest.mark.parametrize("as_nodes", [False, True], ids=["initializers", "constant-nodes"])
def test_constants_with_the_same_bytes_and_different_types_are_not_merged(as_nodes):
    # 0x38 is 1.0 as float8e4m3fn and 0.5 as float8e4m3fnuz.
    first, second = float8_tensor("a", TensorProto.FLOAT8E4M3FN), float8_tensor("b", TensorProto.FLOAT8E4M3FNUZ)
    nodes = [helper.make_node("Cast", ["a"], ["fa"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["b"], ["fb"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["fa", "fb"], ["y"])]
    if as_nodes:
        nodes[:0] = [helper.make_node("Constant", [], ["a"], value=first),
                     helper.make_node("Constant", [], ["b"], value=second)]
    model = make_model(nodes, [], [value("y", TensorProto.FLOAT, [2])], [] if as_nodes else [first, second],
                       opset=19)
    optimized, result = cse(model)
    assert not result.modified
    np.testing.assert_array_equal(run(optimized, {})[0], [1.5, 3])
    assert_same_outputs(model, optimized, {})


def test_string_constant_nodes_are_compared_by_content():
    words = [f"word {i}".encode() for i in range(40)]
    nodes = [helper.make_node("Constant", [], [f"c{i}"], value=helper.make_tensor(f"t{i}", TensorProto.STRING, [1],
                                                                                [w]))
             for i, w in enumerate(words + words[:2])]
    nodes.append(helper.make_node("Concat", [f"c{i}" for i in range(len(nodes))], ["y"], axis=0))
    model = make_model(nodes, [], [value("y", TensorProto.STRING, [len(nodes) - 1])])
    optimized, result = cse(model)
    assert result.stats["nodes_merged"] == 2
    assert run(optimized, {})[0].tolist() == run(model, {})[0].tolist()


def test_overridable_and_output_constants_are_not_merged():
    model = parse("""
    g (float[2] x, float[2] w) => (float[2] y, float[2] k) <float[2] w = {1., 2.}, float[2] v = {1., 2.},
                                                            float[2] k = {1., 2.}> {
      p = Add(x, w)
      q = Add(p, v)
      y = Add(q, k)
    }""")
    optimized, result = cse(model)
    assert not result.modified
    assert io_names(optimized) == io_names(model)
    feeds = {"x": np.ones(2, np.float32)}
    assert_same_outputs(model, optimized, feeds)
    assert_same_outputs(model, optimized, {**feeds, "w": np.array([7, 8], np.float32)})


# ---------------------------------------------------------------------------------------------------
# Subgraphs


def test_duplicates_inside_a_branch_are_merged():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) <then_branch = t () => (float[2] a) { p = Relu(x)  q = Relu(x)  a = Add(p, q) },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
    }""")
    optimized, result = cse(model)
    assert result.stats["nodes_merged"] == 1
    assert op_counts(optimized) == {"If": 1, "Relu": 1, "Add": 1, "Neg": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})
    assert_idempotent(optimized)


def test_duplicate_branch_outputs_keep_their_names():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y, float[2] z) {
      y, z = If(c) <then_branch = t () => (float[2] a, float[2] a2) { a = Relu(x)  a2 = Relu(x) },
                    else_branch = e () => (float[2] b, float[2] b2) { b = Neg(x)  b2 = Abs(x) }>
    }""")
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"If": 1, "Relu": 1, "Identity": 1, "Neg": 1, "Abs": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_branch_reader_of_a_merged_outer_value():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      p = Relu(x)
      q = Relu(x)
      y = If(c) <then_branch = t () => (float[2] a) { a = Add(p, q) },
                 else_branch = e () => (float[2] b) { b = Neg(q) }>
    }""")
    optimized, _ = cse(model)
    assert op_counts(optimized) == {"Relu": 1, "If": 1, "Add": 1, "Neg": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_identical_constants_of_sibling_branches_that_reuse_names():
    # Sibling branches may use the same names: merging j into the then-branch's k must not let the
    # else-branch read its own, different k in place of j.
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) <then_branch = t () => (float[2] a) <float[2] k = {1., 2.}> { a = Add(x, k) },
                 else_branch = e () => (float[2] b) <float[2] j = {1., 2.}, float[2] k = {5., 6.}> {
                   b0 = Mul(x, j)
                   b = Add(b0, k)
                 }>
    }""")
    optimized, _ = cse(model)
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


# ---------------------------------------------------------------------------------------------------
# In a pipeline


def exporter_style_model() -> onnx.ModelProto:
    """A CNN head as exporters write it: repeated shape computations, duplicate constants, Constant nodes."""
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(4).astype(np.float32),
        "bn_scale": rng.uniform(0.5, 2, 4).astype(np.float32), "bn_bias": rng.standard_normal(4).astype(np.float32),
        "bn_mean": rng.standard_normal(4).astype(np.float32), "bn_var": rng.uniform(0.5, 2, 4).astype(np.float32),
        "fc_w": rng.standard_normal((64, 5)).astype(np.float32), "fc_b": rng.standard_normal(5).astype(np.float32),
    }
    text = """
    g (float[N,3,8,8] x) => (float[N,5] y, float[N,5] y2)
        <int64 zero = {0}, int64 zero_again = {0}, int64[1] axes = {0}, int64[1] axes_again = {0},
         int64[1] minus_one = {-1}, int64[2] pool = {2, 2}> {
      c = Conv<pads = [1, 1, 1, 1]>(x, conv_w, conv_b)
      n = BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var)
      r = Relu(n)
      p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r)
      s1 = Shape(p)
      b1 = Gather(s1, zero)
      u1 = Unsqueeze(b1, axes)
      t1 = Concat<axis = 0>(u1, minus_one)
      flat = Reshape(p, t1)
      s2 = Shape(p)
      b2 = Gather(s2, zero_again)
      u2 = Unsqueeze(b2, axes_again)
      t2 = Concat<axis = 0>(u2, minus_one)
      flat2 = Reshape(p, t2)
      wt = Transpose<perm = [1, 0]>(fc_w_t)
      mm = MatMul(flat, wt)
      y = Add(mm, fc_b)
      mm2 = MatMul(flat2, wt)
      bias2 = Identity(fc_b)
      y2_pre = Add(mm2, bias2)
      scale = Constant<value = float {1.}>()
      y2 = Mul(y2_pre, scale)
      unused = Neg(x)
    }"""
    graph = onnx.parser.parse_graph(text)
    graph.initializer.extend(tensor(name, array) for name, array in weights.items())
    graph.initializer.append(tensor("fc_w_t", weights["fc_w"].T.copy()))
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "fc_w"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_default_pipeline_on_exporter_style_redundancy():
    model = exporter_style_model()
    optimized = onnxopt.optimize(model, passes="fold,cse,fuse,dce")
    onnx.checker.check_model(optimized, full_check=True)
    counts = op_counts(optimized)
    assert counts.get("Shape", 0) <= 1 and counts.get("Gather", 0) <= 1
    assert "BatchNormalization" not in counts and "Identity" not in counts and "Neg" not in counts
    assert "Transpose" not in counts and "Constant" not in counts
    assert sum(counts.values()) < sum(op_counts(model).values())
    assert io_names(optimized) == io_names(model)
    for batch in (1, 5):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)
