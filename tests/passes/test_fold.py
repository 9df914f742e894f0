"""Tests of ``fold``: constant folding, shape folding, constant-condition If inlining and the size guard."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, make_model, op_counts, run, tensor, value
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext
from onnxopt.passes import fold as fold_module
from onnxopt.passes.fold import ConstantFolding

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def fold(model: onnx.ModelProto, **options):
    """Runs fold once; checks the pass contracts and onnx.checker on the result."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = ConstantFolding(**options)(graph, PassContext(original=model))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


def assert_unchanged(model: onnx.ModelProto, feeds=None) -> None:
    optimized, result = fold(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized, feeds)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]


# ---------------------------------------------------------------------------------------------------
# Constant chains


def test_constant_chain_folds_into_one_initializer():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <float[2,3] c = {1., 2., 3., 4., 5., 6.}, float k = {2.}> {
      d = Add(c, c)
      e = Mul(d, k)
      f = Sqrt(e)
      y = Add(x, f)
    }""")
    optimized, result = fold(model)
    assert op_counts(optimized) == {"Add": 1}
    assert result.stats["folded"] == 3
    folded = optimized.graph.node[0].input[1]
    np.testing.assert_allclose(initializers(optimized)[folded], np.sqrt(np.arange(1, 7).reshape(2, 3) * 4.0),
                               rtol=1e-6)
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_constant_nodes_become_initializers():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      c = Constant<value = float[2,3] {1., 2., 3., 4., 5., 6.}>()
      k = Constant<value_floats = [1., 2., 3.]>()
      y0 = Add(x, c)
      y = Mul(y0, k)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1, "Mul": 1}
    values = initializers(optimized)
    assert values["c"].dtype == np.float32 and values["c"].shape == (2, 3)
    np.testing.assert_array_equal(values["k"], [1, 2, 3])
    assert_same_outputs(model, optimized)


def test_scalars_stay_0d():
    model = parse("""
    g (float[3] x) => (float[3] y, float s, int64 i) {
      k = Constant<value_float = 2.>()
      s = Mul(k, k)
      n = Constant<value_int = 7>()
      i = Add(n, n)
      y = Mul(x, s)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Mul": 1}
    values = initializers(optimized)
    assert values["s"].shape == () and values["s"] == 4
    assert values["i"].shape == () and values["i"].dtype == np.int64 and values["i"] == 14
    assert_same_outputs(model, optimized)


def test_folded_graph_outputs_keep_their_names_and_order():
    model = parse("""
    g (float[2] x) => (float[2] a, float[2] y, float[2] b) <float[2] c = {1., -2.}> {
      a = Neg(c)
      y = Relu(x)
      b = Abs(c)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Relu": 1}
    assert io_names(optimized) == io_names(model)
    values = initializers(optimized)
    np.testing.assert_array_equal(values["a"], [-1, 2])
    np.testing.assert_array_equal(values["b"], [1, 2])
    assert_same_outputs(model, optimized)


def test_constant_read_by_a_folded_node_and_a_graph_output_stays():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] d) {
      c = Constant<value = float[2] {1., 2.}>()
      d = Neg(c)
      y = Add(x, c)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_a_graph_without_constants_is_left_alone():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      r = Relu(x)
      y = Neg(r)
    }""")
    assert_unchanged(model)


# ---------------------------------------------------------------------------------------------------
# Never folded


def test_random_operators_are_not_folded():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y, float[2,3] u) <int64[2] s = {2, 3}> {
      r = RandomNormal<shape = [2, 3], seed = 1.>()
      u = RandomUniformLike<seed = 2.>(r)
      y = Add(x, r)
    }""")
    optimized, result = fold(model)
    assert not result.modified
    assert op_counts(optimized) == op_counts(model)


def test_quantize_and_dequantize_are_not_folded():
    # Folding DequantizeLinear of an int8 weight would store the weight as float: four times larger.
    model = parse("""
    g (float[4] x) => (float[4] y) <float[4] w = {1., 2., 3., 4.}, float s = {0.5}, int8 z = {0}> {
      q = QuantizeLinear(w, s, z)
      d = DequantizeLinear(q, s, z)
      y = Add(x, d)
    }""")
    assert_unchanged(model)


def test_custom_domain_nodes_are_not_folded():
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>' + """
    g (float[2] x) => (float[2] y) <float[2] c = {1., 2.}> {
      k = custom.domain.Scale(c)
      y = Add(x, k)
    }""")
    optimized, result = fold(model)
    assert not result.modified
    assert op_counts(optimized) == {"Scale": 1, "Add": 1}


def test_an_overridable_initializer_is_not_folded():
    # An initializer that is also a graph input is a default the caller may replace.
    model = parse("""
    g (float[3] x, float[3] w) => (float[3] y) <float[3] w = {1., 2., 3.}> {
      n = Neg(w)
      y = Add(x, n)
    }""")
    optimized, result = fold(model)
    assert not result.modified
    assert op_counts(optimized) == {"Neg": 1, "Add": 1}
    assert io_names(optimized) == io_names(model)
    feeds = {"x": np.ones(3, np.float32)}
    assert_same_outputs(model, optimized, feeds)
    assert_same_outputs(model, optimized, {**feeds, "w": np.array([5, 6, 7], np.float32)})


# ---------------------------------------------------------------------------------------------------
# Data types


def test_float16_weights_stay_float16():
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [value("x", TensorProto.FLOAT16, [4, 3])], [value("y", TensorProto.FLOAT16, [4, 2])],
                       [tensor("w", weight)])
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"MatMul": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.FLOAT16}
    np.testing.assert_array_equal(initializers(optimized)["wt"], weight.T)
    assert_same_outputs(model, optimized)


def bfloat16_tensor(name: str, values) -> onnx.TensorProto:
    array = np.asarray(values, np.float32).astype(ml_dtypes.bfloat16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)


def test_bfloat16_weights_keep_their_type():
    model = make_model(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("Identity", ["w"], ["wi"]),
         helper.make_node("MatMul", ["x", "wt"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y1"]),
         helper.make_node("MatMul", ["y1", "wi"], ["y"])],
        [value("x", TensorProto.BFLOAT16, [4, 3])], [value("y", TensorProto.BFLOAT16, [4, 3])],
        [bfloat16_tensor("w", np.arange(9).reshape(3, 3) / 4), bfloat16_tensor("b", [0.5, 1.5, -2])])
    optimized, _ = fold(model)
    types = {t.name: t.data_type for t in optimized.graph.initializer}
    assert set(types.values()) == {TensorProto.BFLOAT16}, types
    for init in optimized.graph.initializer:
        assert len(init.raw_data) == 2 * int(np.prod(init.dims)) or init.int32_data
    feeds = {"x": (np.arange(12).reshape(4, 3) / 8).astype(ml_dtypes.bfloat16)}
    reference = onnx.reference.ReferenceEvaluator
    want = reference(model).run(None, feeds)[0].astype(np.float32)
    got = reference(optimized).run(None, feeds)[0].astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_cast_from_bfloat16_folds_to_float():
    model = make_model([helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
                        helper.make_node("Add", ["x", "wf"], ["y"])],
                       [value("x", TensorProto.FLOAT, [3])], [value("y", TensorProto.FLOAT, [3])],
                       [bfloat16_tensor("w", [1, 2.5, -3])])
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1}
    assert initializers(optimized)["wf"].dtype == np.float32
    assert_same_outputs(model, optimized)


def string_model() -> onnx.ModelProto:
    words = helper.make_tensor("words", TensorProto.STRING, [3], [b"a", b"bc", b"def"])
    nodes = [helper.make_node("Gather", ["words", "idx"], ["picked"], axis=0),
             helper.make_node("Identity", ["picked"], ["s"]),
             helper.make_node("Concat", ["s", "x"], ["y"], axis=0)]
    return make_model(nodes, [value("x", TensorProto.STRING, [2])],
                      [value("y", TensorProto.STRING, [6]), value("s", TensorProto.STRING, [4])],
                      [words, tensor("idx", np.array([2, 0, 1, 2]))])


def test_string_tensors_fold():
    model = string_model()
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Concat": 1}
    assert initializers(optimized)["s"].tolist() == ["def", "a", "bc", "def"]
    assert next(t for t in optimized.graph.initializer if t.name == "s").data_type == TensorProto.STRING
    feeds = {"x": np.array(["x", "y"], dtype=object)}
    assert [o.tolist() for o in run(optimized, feeds)] == [o.tolist() for o in run(model, feeds)]


# ---------------------------------------------------------------------------------------------------
# Size guard


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile"])
def test_tensor_expanded_from_tiny_inputs_stays_a_node(op):
    sources = {
        "ConstantOfShape": "c = ConstantOfShape<value = float[1] {1.}>(s)",
        "Expand": "c = Expand(one, s)",
        "Tile": "c = Tile(one, s)",
    }
    model = parse("""
    g (float[1024,1024] x) => (float[1024,1024] y) <int64[2] s = {1024, 1024}, float[1,1] one = {1.}> {
      %s
      y = Add(x, c)
    }""" % sources[op])
    optimized, result = fold(model)
    assert op_counts(optimized) == {op: 1, "Add": 1}
    assert result.stats["kept_by_size_guard"] == 1
    assert ir.model_weight_bytes(optimized) < 100
    assert_same_outputs(model, optimized)


def test_small_expansion_folds():
    model = parse("""
    g (float[4,4] x) => (float[4,4] y) <int64[2] s = {4, 4}> {
      c = ConstantOfShape<value = float[1] {1.}>(s)
      y = Add(x, c)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1}
    assert_same_outputs(model, optimized)


def test_moderate_broadcast_of_constants_folds():
    # RAFT's correlation lookup adds a [256,1,1,2] grid to a [1,7,7,2] window: 100 KB from 2.4 KB, 41x its
    # inputs but small for any model.
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Sub", ["x", "c"], ["y"])],
                       [value("x", TensorProto.FLOAT, [256, 7, 7, 2])], [value("y", TensorProto.FLOAT, [256, 7, 7, 2])],
                       [tensor("a", rng.standard_normal((256, 1, 1, 2)).astype(np.float32)),
                        tensor("b", rng.standard_normal((1, 7, 7, 2)).astype(np.float32))])
    optimized, result = fold(model)
    assert op_counts(optimized) == {"Sub": 1}
    assert result.stats["kept_by_size_guard"] == 0
    assert_same_outputs(model, optimized)


def test_growth_budget_holds_across_iterations():
    # Three fills of 512 KiB: each run of fold alone would fit two in the 1 MiB budget, the next run a third.
    model = parse("""
    g (float[128,1024] x) => (float[128,1024] y) <int64[2] s = {128, 1024}> {
      a = ConstantOfShape<value = float[1] {1.}>(s)
      b = ConstantOfShape<value = float[1] {2.}>(s)
      c = ConstantOfShape<value = float[1] {3.}>(s)
      ab = Add(a, x)
      abc = Mul(ab, b)
      y = Sub(abc, c)
    }""")
    optimized = onnxopt.optimize(model, "fold,dce", verify=False)
    assert op_counts(optimized)["ConstantOfShape"] == 1
    assert ir.model_weight_bytes(optimized) - ir.model_weight_bytes(model) <= 1 << 20
    assert_same_outputs(model, optimized)


def test_expansion_guard_options():
    model = parse("""
    g (float[64,64] x) => (float[64,64] y) <int64[2] s = {64, 64}> {
      c = ConstantOfShape<value = float[1] {1.}>(s)
      y = Add(x, c)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1}  # 16 KiB: under small_bytes
    optimized, result = fold(model, small_bytes=1024)
    assert op_counts(optimized) == {"ConstantOfShape": 1, "Add": 1}
    optimized, _ = fold(model, small_bytes=1024, max_expansion=10_000)
    assert op_counts(optimized) == {"Add": 1}


def embedding_model(tied: bool, rows: int = 300, columns: int = 1000, as_constant_node: bool = False):
    """ids -> Gather(E) -> MatMul(Transpose(E)): the output projection reuses the embedding when tied."""
    embedding = np.random.default_rng(0).standard_normal((rows, columns)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E" if tied else "E_in", "ids"], ["h"], axis=0),
             helper.make_node("Transpose", ["E"], ["Et"]),
             helper.make_node("MatMul", ["h", "Et"], ["logits"])]
    inits = [tensor("E_in", embedding + 1)] if not tied else []
    if as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["E"], value=tensor("E", embedding)))
    else:
        inits.append(tensor("E", embedding))
    return make_model(nodes, [value("ids", TensorProto.INT64, [2])], [value("logits", TensorProto.FLOAT, [2, rows])],
                      inits)


@pytest.mark.parametrize("as_constant_node", [False, True], ids=["initializer", "constant-node"])
def test_transpose_of_a_tied_weight_stays_a_node(as_constant_node):
    # The weight is 1.2 MB, over the default budget of 1 MiB: folding would store it twice.
    model = embedding_model(tied=True, as_constant_node=as_constant_node)
    optimized, result = fold(model)
    assert op_counts(optimized) == {"Gather": 1, "Transpose": 1, "MatMul": 1}
    assert result.stats["kept_by_size_guard"] == 1
    assert ir.model_weight_bytes(optimized) == 300 * 1000 * 4
    assert_same_outputs(model, optimized, {"ids": np.array([3, 299])}, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("as_constant_node", [False, True], ids=["initializer", "constant-node"])
def test_transpose_of_an_unshared_weight_folds(as_constant_node):
    model = embedding_model(tied=False, as_constant_node=as_constant_node)
    optimized, result = fold(model)
    assert op_counts(optimized) == {"Gather": 1, "MatMul": 1}
    assert result.stats["kept_by_size_guard"] == 0
    assert ir.model_weight_bytes(optimized) == 2 * 300 * 1000 * 4
    assert initializers(optimized)["Et"].shape == (1000, 300)
    assert_same_outputs(model, optimized, {"ids": np.array([3, 299])}, rtol=1e-3, atol=1e-3)


def test_max_growth_budget_is_respected():
    model = embedding_model(tied=True, rows=20, columns=30)
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Gather": 1, "MatMul": 1}  # 2.4 KB of growth: within the budget
    optimized, result = fold(model, max_growth=2399)
    assert op_counts(optimized) == {"Gather": 1, "Transpose": 1, "MatMul": 1}
    optimized, _ = fold(model, max_growth=2400)
    assert op_counts(optimized) == {"Gather": 1, "MatMul": 1}


def test_max_growth_zero_still_folds_what_does_not_grow_the_model():
    model = parse("""
    g (float[2] x, int64[2] ids) => (float[2] y, float[2,3] z) <float[3,2] w = {1., 2., 3., 4., 5., 6.}> {
      c = Constant<value = float[2] {1., 2.}>()
      d = Add(c, c)
      y = Add(x, d)
      wt = Transpose(w)
      z = Gather(wt, ids)
    }""")
    optimized, _ = fold(model, max_growth=0)
    assert op_counts(optimized) == {"Add": 1, "Gather": 1}
    assert_same_outputs(model, optimized, {"x": np.ones(2, np.float32), "ids": np.array([1, 0])})


def test_options_through_a_pipeline_spec():
    model = embedding_model(tied=True, rows=20, columns=30)
    feeds = {"ids": np.array([0, 19])}
    unlimited = onnxopt.optimize(model, passes="fold", inputs=feeds)
    limited = onnxopt.optimize(model, passes="fold{max_growth=0}", inputs=feeds)
    assert op_counts(unlimited) == {"Gather": 1, "MatMul": 1}
    assert op_counts(limited) == {"Gather": 1, "Transpose": 1, "MatMul": 1}
    onnx.checker.check_model(limited, full_check=True)
    assert_same_outputs(model, limited, feeds)


# ---------------------------------------------------------------------------------------------------
# Shapes


SHAPE_HEADER = "g (float[N,3,8,8] x) => "


def test_gather_of_a_static_dimension_folds_and_a_dynamic_one_stays():
    model = parse(SHAPE_HEADER + """(int64 c, int64 n) {
      s = Shape(x)
      one = Constant<value = int64 {1}>()
      zero = Constant<value = int64 {0}>()
      c = Gather(s, one)
      n = Gather(s, zero)
    }""")
    optimized, result = fold(model)
    assert op_counts(optimized) == {"Shape": 1, "Gather": 1}
    assert result.stats["shapes_folded"] == 1
    values = initializers(optimized)
    assert values["c"].shape == () and values["c"] == 3
    assert next(n for n in optimized.graph.node if n.op_type == "Gather").output == ["n"]
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": np.zeros((batch, 3, 8, 8), np.float32)})


def test_exporter_flatten_chain_stays_correct_for_every_batch_size():
    model = parse(SHAPE_HEADER + """(float[N,192] y) {
      s = Shape(x)
      zero = Constant<value = int64 {0}>()
      n = Gather(s, zero)
      axes = Constant<value = int64[1] {0}>()
      n1 = Unsqueeze(n, axes)
      rest = Constant<value = int64[1] {-1}>()
      shape = Concat<axis = 0>(n1, rest)
      y = Reshape(x, shape)
    }""")
    optimized, _ = fold(model)
    assert "Reshape" in op_counts(optimized)
    for batch in (1, 5):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)
        assert run(optimized, feeds)[0].shape == (batch, 192)


@pytest.mark.parametrize("attrs,expected", [
    ("start = 1", [3, 8, 8]), ("start = 1, end = 3", [3, 8]), ("start = -2", [8, 8]),
    ("start = 1, end = -1", [3, 8]), ("start = -10, end = 10", None), ("start = 2, end = 1", []),
])
def test_shape_with_start_and_end(attrs, expected):
    model = parse(SHAPE_HEADER + "(int64[K] y) { y = Shape<%s>(x) }" % attrs, opset=15)
    optimized, _ = fold(model)
    if expected is None:
        assert op_counts(optimized) == {"Shape": 1}
    else:
        assert op_counts(optimized) == {}
        np.testing.assert_array_equal(initializers(optimized)["y"], np.array(expected, np.int64))
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": np.zeros((batch, 3, 8, 8), np.float32)})


def test_size_of_a_static_tensor_folds_and_of_a_dynamic_one_stays():
    model = parse("""
    g (float[2,3,4] a, float[N,3] b) => (int64 sa, int64 sb) {
      r = Relu(a)
      sa = Size(r)
      sb = Size(b)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Relu": 1, "Size": 1}
    values = initializers(optimized)
    assert values["sa"].shape == () and values["sa"] == 24
    assert_same_outputs(model, optimized)


I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


@pytest.mark.parametrize("starts,ends,steps", [
    (1, I64_MAX, 1), (2, 4, 1), (-2, I64_MAX, 1), (1, -1, 1), (0, I64_MAX, 2), (-1, I64_MIN, -1), (3, 0, -1),
    (-1, -3, -1), (-10, 10, 1), (I64_MIN, I64_MAX, 1),
])
def test_slice_of_a_shape_folds_like_onnxruntime_computes_it(starts, ends, steps):
    model = parse(SHAPE_HEADER + """(int64[K] y) <int64[1] starts = {%d}, int64[1] ends = {%d},
                                                    int64[1] axes = {0}, int64[1] steps = {%d}> {
      s = Shape(x)
      y = Slice(s, starts, ends, axes, steps)
    }""" % (starts, ends, steps))
    optimized, _ = fold(model)
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": np.zeros((batch, 3, 8, 8), np.float32)})


@pytest.mark.parametrize("starts,ends,steps", [
    (-9, -9, -1), (0, I64_MAX, -1), (3, I64_MAX, -1), (I64_MIN, -9, -1), (-9, I64_MIN, -2), (9, -9, -1),
])
def test_slice_of_a_shape_with_negative_steps_out_of_range(starts, ends, steps):
    # onnxruntime, the ONNX specification and numpy each clamp some of these differently.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 7])
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "st", "en", "ax", "sp"], ["y"])],
        [x], [value("y", TensorProto.INT64, ["K"])],
        [tensor("st", np.array([starts])), tensor("en", np.array([ends])), tensor("ax", np.array([0])),
         tensor("sp", np.array([steps]))])
    optimized, _ = fold(model)
    assert_same_outputs(model, optimized, {"x": np.zeros((2, 3, 5, 7), np.float32)})


@settings(max_examples=40, deadline=None)
@given(starts=st.sampled_from([I64_MIN, -9, -5, -4, -1, 0, 1, 3, 4, 9, I64_MAX]),
       ends=st.sampled_from([I64_MIN, -9, -5, -4, -1, 0, 1, 3, 4, 9, I64_MAX]),
       steps=st.sampled_from([-3, -2, -1, 1, 2, 3]), axis=st.sampled_from([0, -1]))
def test_slice_of_a_static_shape_matches_onnxruntime(starts, ends, steps, axis):
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "st", "en", "ax", "sp"], ["y"])],
        [value("x", TensorProto.FLOAT, [2, 3, 5, 7])], [value("y", TensorProto.INT64, ["K"])],
        [tensor("st", np.array([starts])), tensor("en", np.array([ends])), tensor("ax", np.array([axis])),
         tensor("sp", np.array([steps]))])
    optimized, _ = fold(model)
    assert_same_outputs(model, optimized, {"x": np.zeros((2, 3, 5, 7), np.float32)})


def test_slice_keeping_a_dynamic_dimension_stays():
    model = parse(SHAPE_HEADER + """(int64[K] y) <int64[1] starts = {0}, int64[1] ends = {2}> {
      s = Shape(x)
      y = Slice(s, starts, ends)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Shape": 1, "Slice": 1}


@pytest.mark.parametrize("runtime", ["axes", "steps"])
def test_slice_of_a_shape_with_runtime_axes_or_steps_stays(runtime):
    """Axes or steps fed at run time are unknown, not their defaults (axis 0, step 1)."""
    parameters = {"starts": [0], "ends": [9], "axes": [-1], "steps": [2]}
    inputs = [value("x", TensorProto.FLOAT, [2, 3, 5])]
    initializers = []
    for name, data in parameters.items():
        if name == runtime:
            inputs.append(value(name, TensorProto.INT64, [1]))
        else:
            initializers.append(tensor(name, np.array(data, np.int64)))
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", *parameters], ["y"])],
        inputs, [value("y", TensorProto.INT64, ["K"])], initializers)
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Slice": 1}  # the Shape of a static x folds, the Slice stays
    feeds = {"x": np.zeros((2, 3, 5), np.float32), runtime: np.array(parameters[runtime], np.int64)}
    assert_same_outputs(model, optimized, feeds)


def test_integer_arithmetic_on_shape_elements():
    model = parse(SHAPE_HEADER + """(float[N,3,4,16] y, int64 hw, int64[1] half)
        <int64 zero = {0}, int64 one = {1}, int64 two = {2}, int64 three = {3}, int64[1] axes = {0}> {
      s = Shape(x)
      n = Gather(s, zero)
      c = Gather(s, one)
      h = Gather(s, two)
      w = Gather(s, three)
      hw = Mul(h, w)
      hw_half = Div(hw, two)
      h_half = Div(h, two)
      w_twice = Add(w, w)
      n1 = Unsqueeze(n, axes)
      c1 = Unsqueeze(c, axes)
      h1 = Unsqueeze(h_half, axes)
      w1 = Unsqueeze(w_twice, axes)
      parts = Concat<axis = 0>(n1, c1, h1, w1)
      y = Reshape(x, parts)
      half = Unsqueeze(hw_half, axes)
    }""")
    optimized, _ = fold(model)
    values = initializers(optimized)
    assert values["hw"] == 64 and values["hw"].shape == ()
    np.testing.assert_array_equal(values["half"], [32])
    assert "Mul" not in op_counts(optimized) and "Div" not in op_counts(optimized)
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": np.ones((batch, 3, 8, 8), np.float32)})


EXPAND_GUARD = """(float[N, 3, 4] x) => (float[N, 3, 4] y, bool[3] guard)
    <int64 zero = {0}, int64[1] axes = {0}, int64[2] fixed = {3, 4}, int64[3] minus = {-1, -1, -1},
     int64[3] ones = {1, 1, 1}> {
      s = Shape(x)
      n = Gather(s, zero)
      n1 = Unsqueeze(n, axes)
      target = Concat<axis = 0>(n1, fixed)
      guard = Equal(target, minus)
      safe = Where(guard, ones, target)
      y = Expand(x, safe)
    }"""


def test_expand_guard_of_a_shape_folds():
    # TorchScript writes Expand(x, Where(Equal(shape, -1), 1, shape)): a dimension is never -1, dynamic or not.
    model = parse("g " + EXPAND_GUARD)
    optimized, _ = fold(model)
    np.testing.assert_array_equal(initializers(optimized)["guard"], [False, False, False])
    assert "Equal" not in op_counts(optimized)
    for batch in (1, 4):
        assert_same_outputs(model, optimized, {"x": np.ones((batch, 3, 4), np.float32)})
    fused = onnxopt.optimize(model, passes="fold,fuse,dce")
    assert "Where" not in op_counts(fused)
    assert_same_outputs(model, fused, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


@pytest.mark.parametrize("constant,folded", [("{-1, -1, 4}", True), ("{2, -1, -1}", False)],
                         ids=["mixed", "undecided"])
def test_equal_of_a_shape_folds_only_where_every_element_is_decided(constant, folded):
    # [N, 3, 4] == [-1, -1, 4] is [false, false, true] for every N; [N, 3, 4] == [2, -1, -1] depends on N.
    model = parse("g " + EXPAND_GUARD.replace("int64[3] minus = {-1, -1, -1}", f"int64[3] minus = {constant}"))
    optimized, _ = fold(model)
    assert ("Equal" in op_counts(optimized)) != folded
    if folded:
        np.testing.assert_array_equal(initializers(optimized)["guard"], [False, False, True])
    for batch in (1, 2):
        assert_same_outputs(model, optimized, {"x": np.ones((batch, 3, 4), np.float32)})


def test_max_of_equal_batch_dimensions_becomes_a_copied_dimension():
    # tf2onnx's Einsum: Reshape(product, [Max(N of a, N of b), 12]) with both N the same symbol; the
    # target's first element is the product's own dimension 0, a copy.
    model = parse("""
    g (float[N, 3, 4] a, float[N, 4, 2] b) => (float[N, 6] y, int64[2] lowest)
        <int64 zero = {0}, int64[1] axes = {0}, int64[1] six = {6}, int64[2] bound = {0, -1}> {
      p = MatMul(a, b)
      sa = Shape(a)
      sb = Shape(b)
      na = Gather(sa, zero)
      nb = Gather(sb, zero)
      n = Max(na, nb)
      n1 = Unsqueeze(n, axes)
      target = Concat<axis = 0>(n1, six)
      y = Reshape(p, target)
      lowest = Min(target, bound)
    }""")
    optimized, _ = fold(model)
    np.testing.assert_array_equal(initializers(optimized)["lowest"], [0, -1])
    reshape = next(n for n in optimized.graph.node if n.op_type == "Reshape")
    np.testing.assert_array_equal(initializers(optimized)[reshape.input[1]], [0, 6])
    optimized = onnxopt.optimize(model, passes="fold,dce")
    assert op_counts(optimized) == {"MatMul": 1, "Reshape": 1}
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        feeds = {"a": rng.standard_normal((batch, 3, 4)).astype(np.float32),
                 "b": rng.standard_normal((batch, 4, 2)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)


VIEWED_KEYS = """(float[B, S, 8] k) => (float[B, 2, 4, S] kt, int64 length, int64[2] pair)
    <int64[4] heads = {0, 0, 2, 4}, int64 two = {2}, int64[2] which = {-2, 0}> {
      kh = Reshape(k, heads)
      kt = Transpose<perm = [0, 2, 3, 1]>(kh)
      kv = Transpose<perm = [0, 2, 1, 3]>(kh)
      s = Shape(kv)
      length = Gather(s, two)
      pair = Gather(s, which)
    }"""


def test_dimensions_are_read_before_transposes_and_copying_reshapes():
    # T5 sizes its position bias from Shape(Transpose(Reshape(k))): read from k, the Transpose dies and
    # the heads Reshape is read only where attention reads it.
    model = parse("g " + VIEWED_KEYS)
    optimized, result = fold(model)
    assert result.stats["shapes_read_before_views"] == 2
    shape = next(n for n in optimized.graph.node if n.op_type == "Shape")
    assert list(shape.input) == ["k"]
    optimized = onnxopt.optimize(model, passes="fold,dce")
    assert op_counts(optimized) == {"Reshape": 1, "Transpose": 1, "Shape": 1, "Gather": 2}
    for batch, length in ((1, 3), (2, 5)):
        feeds = {"k": np.random.default_rng(length).standard_normal((batch, length, 8)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)


def test_dimensions_a_reshape_does_not_copy_are_read_after_it():
    # With -1 for the sequence, the Reshape's dimension 1 is computed, not copied: read through the
    # Transpose only. Inference still knows the -1 to be S (8 elements a row either side), and B and S are
    # dimensions the input names: the Gathers then read them from the input.
    model = parse("g " + VIEWED_KEYS.replace("{0, 0, 2, 4}", "{0, -1, 2, 4}"))
    optimized, result = fold(model)
    assert result.stats["shapes_read_before_views"] == 1 and result.stats["shapes_read_from_inputs"] == 2
    shape = next(n for n in optimized.graph.node if n.op_type == "Shape")
    assert list(shape.input) == ["k"]
    for batch, length in ((1, 3), (2, 5)):
        feeds = {"k": np.random.default_rng(length).standard_normal((batch, length, 8)).astype(np.float32)}
        assert_same_outputs(model, optimized, feeds)


LAYERS_SIZED_BY_SHAPES = """(int64[batch, seq] ids, float[batch, seq, 8] x, float[8] m)
    => (float[batch, seq, 8] a, float[batch, seq, 8] b, float[batch, seq2, 8] c, float[batch, seq, 8] c2)
    <int64[1] eight = {8}, int64 one = {1}, int64[1] ones = {1}, int64[1] axis0 = {0}> {
      y = Relu(x)
      z = Sigmoid(x)
      sy = Shape<start = 0, end = 2>(y)
      sz = Shape<start = 0, end = 2>(z)
      ty = Concat<axis = 0>(sy, eight)
      tz = Concat<axis = 0>(sz, eight)
      my = Expand(m, ty)
      mz = Expand(m, tz)
      a = Add(y, my)
      b = Add(z, mz)
      yy = Concat<axis = 1>(y, y)
      syy = Shape(yy)
      long = Gather(syy, one)
      long1 = Unsqueeze(long, axis0)
      sb = Shape<start = 0, end = 1>(z)
      tc = Concat<axis = 0>(sb, long1, eight)
      c = Expand(m, tc)
      sz2 = Shape(z)
      short = Gather(sz2, ones)
      tc2 = Concat<axis = 0>(sb, short, eight)
      c2 = Expand(m, tc2)
    }"""


def _layer_feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 10 + seq)
    return {"ids": rng.integers(0, 9, (batch, seq)), "x": rng.standard_normal((batch, seq, 8)).astype(np.float32),
            "m": rng.standard_normal(8).astype(np.float32)}


def test_named_dimensions_are_read_from_the_input_that_declares_them():
    # Each "layer" sizes its Expand from its own activations: read from x (ids, declared first, is read by
    # no node), the per-layer shape arithmetic merges into one. A dimension no input declares (yy's 2 * seq)
    # is read where it is.
    model = parse("g " + LAYERS_SIZED_BY_SHAPES)
    optimized, result = fold(model)
    assert result.stats["shapes_read_from_inputs"] == 4  # sy, sz, sb and the Gather of z's sequence
    readers = {n.output[0]: list(n.input) for n in optimized.graph.node if n.op_type == "Shape"}
    assert readers["sy"] == ["x"] and readers["sz"] == ["x"] and any(r == ["yy"] for r in readers.values())
    merged = onnxopt.optimize(model, passes="fold,cse,dce", verify=False)
    assert op_counts(merged)["Shape"] == 4 and op_counts(merged)["Expand"] == 3  # x[:2], x[:1], x whole, yy
    for batch, seq in ((1, 1), (2, 5), (3, 2)):
        assert_same_outputs(model, merged, _layer_feeds(batch, seq))


def test_named_dimensions_are_not_read_from_an_input_no_node_reads():
    # "unused" declares [batch, seq] first, but the model never looks at it: a caller may feed anything.
    text = LAYERS_SIZED_BY_SHAPES.replace("(int64[batch, seq] ids,",
                                          "(float[batch, seq] unused, int64[batch, seq] ids,")
    model = parse("g " + text)
    optimized, _ = fold(model)
    assert all(list(n.input) != ["unused"] for n in optimized.graph.node if n.op_type == "Shape")
    feeds = _layer_feeds(2, 5) | {"unused": np.zeros((1, 1), np.float32)}
    assert_same_outputs(model, optimized, feeds)


def test_named_dimensions_before_shape_has_start_and_end():
    # Opset 13: a Shape cannot select [batch, seq] of ids, so only a Gather of one dimension moves.
    text = LAYERS_SIZED_BY_SHAPES
    for old, new in (("sy = Shape<start = 0, end = 2>(y)", "fy = Shape(y)\n sy = Slice(fy, zero, two)"),
                     ("sz = Shape<start = 0, end = 2>(z)", "fz = Shape(z)\n sz = Slice(fz, zero, two)"),
                     ("sb = Shape<start = 0, end = 1>(z)", "sb = Slice(fz, zero, ones)"),
                     ("int64[1] axis0 = {0}>", "int64[1] axis0 = {0}, int64[1] zero = {0}, int64[1] two = {2}>")):
        text = text.replace(old, new)
    model = parse("g " + text, opset=13)
    optimized, result = fold(model)
    gathers = [n for n in optimized.graph.node if n.op_type == "Gather" and n.output[0] == "short"]
    shape_of = {n.output[0]: list(n.input) for n in optimized.graph.node if n.op_type == "Shape"}
    assert shape_of[gathers[0].input[0]] == ["x"] and result.stats["shapes_read_from_inputs"] == 1
    for batch, seq in ((1, 1), (2, 5)):
        assert_same_outputs(model, optimized, _layer_feeds(batch, seq))


def test_dimensions_of_a_graph_output_are_read_where_they_are():
    # An output's declared symbols are the exporter's word, not inference's: z stays the Shapes' input.
    model = parse("g " + LAYERS_SIZED_BY_SHAPES.replace("=> (float[batch, seq, 8] a,", "=> (float[batch, seq, 8] z,")
                  .replace("b = Add(z, Expand(m, tz))", "b = Add(y, Expand(m, tz))").replace(
                      "float[batch, seq, 8] b,", "float[batch, seq, 8] b, float[batch, seq, 8] a,"))
    optimized, _ = fold(model)
    shape_of = {n.output[0]: list(n.input) for n in optimized.graph.node if n.op_type == "Shape"}
    assert shape_of["sz"] == ["z"] and shape_of["sy"] == ["x"]
    for batch, seq in ((1, 1), (2, 5)):
        assert_same_outputs(model, optimized, _layer_feeds(batch, seq))


def test_cast_of_a_shape_element_that_overflows_the_target_type_is_not_folded():
    # Cast(300) to int8 wraps around in onnxruntime; folding must neither crash nor store 300.
    model = parse("""
    g (float[N,300] x) => (int8 y, int32 z) <int64 one = {1}> {
      s = Shape(x)
      c = Cast<to = 3>(s)
      y = Gather(c, one)
      c32 = Cast<to = 6>(s)
      z = Gather(c32, one)
    }""")
    optimized, _ = fold(model)
    assert initializers(optimized)["z"] == 300
    assert_same_outputs(model, optimized, {"x": np.zeros((2, 300), np.float32)})


def test_shape_folding_without_inferred_types(monkeypatch):
    # If shape inference fails, dtypes come from what the shape computation starts from.
    monkeypatch.setattr(ir, "infer_shapes", lambda graph, template=None: None)
    model = parse(SHAPE_HEADER + """(float[N,192] y)
        <int64 zero = {0}, int64 one = {1}, int64 two = {2}, int64 eight = {8}, int64[1] axes = {0}> {
      s = Shape(x)
      c = Gather(s, one)
      h = Gather(s, two)
      ch = Mul(c, h)
      hw = Mul(ch, eight)
      n = Gather(s, zero)
      n1 = Unsqueeze(n, axes)
      hw1 = Unsqueeze(hw, axes)
      shape = Concat<axis = 0>(n1, hw1)
      y = Reshape(x, shape)
    }""")
    optimized, _ = fold(model)
    assert "Mul" not in op_counts(optimized)
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": np.ones((batch, 3, 8, 8), np.float32)})


def test_fully_static_shape_chain_folds_entirely():
    model = parse("""
    g (float[2,3,8,8] x) => (float[2,192] y) <int64 zero = {0}, int64[1] axes = {0}, int64[1] rest = {-1}> {
      s = Shape(x)
      n = Gather(s, zero)
      n1 = Unsqueeze(n, axes)
      shape = Concat<axis = 0>(n1, rest)
      y = Reshape(x, shape)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Reshape": 1}
    reshape = optimized.graph.node[0]
    np.testing.assert_array_equal(initializers(optimized)[reshape.input[1]], [2, -1])
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Reshape targets computed from the input's shape, with allowzero=1 as the dynamo exporter writes them


def reshape_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Reshape")


def allowzero(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "allowzero"), 0)


def reshape_target(model: onnx.ModelProto) -> list[int]:
    return initializers(model)[reshape_node(model).input[1]].tolist()


def random_input(*shape: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("flag", [0, 1])
def test_head_split_gets_its_dynamic_dims_copied_and_its_minus_one_computed(flag):
    # Reshape(x, Concat(Shape(x)[:2], [-1, 8])): [B, S] are x's own, copied as 0, and -1 is 32 / 8.
    model = parse("""
    g (float[B,S,32] x) => (float[B,S,4,8] y) <int64[2] tail = {-1, 8}> {
      s = Shape<start = 0, end = 2>(x)
      shape = Concat<axis = 0>(s, tail)
      y = Reshape<allowzero = %d>(x, shape)
    }""" % flag)
    optimized, result = fold(model)
    assert result.stats["shapes_folded"] == 1  # the Shape and Concat, now unread, are left to dce
    assert reshape_target(optimized) == [0, 0, 4, 8] and allowzero(reshape_node(optimized)) == 0
    for batch, sequence in ((1, 5), (3, 2), (2, 1)):
        assert_same_outputs(model, optimized, random_input(batch, sequence, 32))
    if flag:  # onnxruntime infers a -1 beside a zero-sized dimension only with allowzero=1
        for batch, sequence in ((0, 5), (2, 0), (0, 0)):
            assert_same_outputs(model, optimized, random_input(batch, sequence, 32))


def test_minus_one_beside_copies_and_dynamic_dims_stays_with_allowzero_0():
    # [N, -1] of x [N, S]: -1 is S, not static, and -1 beside a copy is what the original computes.
    model = parse("""
    g (float[N,S] x) => (float[N,S] y) <int64[1] rest = {-1}> {
      n = Shape<start = 0, end = 1>(x)
      shape = Concat<axis = 0>(n, rest)
      y = Reshape(x, shape)
    }""")
    optimized, _ = fold(model)
    assert reshape_target(optimized) == [0, -1]
    for batch, sequence in ((2, 3), (1, 1)):
        assert_same_outputs(model, optimized, random_input(batch, sequence))


def test_head_merge_with_allowzero_keeps_zero_sized_dims():
    # With no -1, genuinely empty batches and sequences reshape the same: a copy of 0 is 0.
    model = parse("""
    g (float[B,S,4,8] x) => (float[B,S,32] y) <int64[1] width = {32}> {
      s = Shape<start = 0, end = 2>(x)
      shape = Concat<axis = 0>(s, width)
      y = Reshape<allowzero = 1>(x, shape)
    }""")
    optimized, _ = fold(model)
    assert reshape_target(optimized) == [0, 0, 32] and allowzero(reshape_node(optimized)) == 0
    for batch, sequence in ((2, 3), (0, 3), (2, 0), (0, 0), (1, 1)):
        assert_same_outputs(model, optimized, random_input(batch, sequence, 4, 8))
        assert run(optimized, random_input(batch, sequence, 4, 8))[0].shape == (batch, sequence, 32)


@pytest.mark.parametrize("flag", [0, 1])
def test_one_dynamic_element_that_is_no_copy_becomes_minus_one(flag):
    # S is dimension 1 of x but element 0 of the target: not a copy, but the only unknown, so -1.
    model = parse("""
    g (float[2,S,4] x) => (float[S,8] y) <int64[1] width = {8}> {
      s = Shape<start = 1, end = 2>(x)
      shape = Concat<axis = 0>(s, width)
      y = Reshape<allowzero = %d>(x, shape)
    }""" % flag)
    optimized, _ = fold(model)
    assert reshape_target(optimized) == [-1, 8] and allowzero(reshape_node(optimized)) == flag
    # With allowzero=0 an empty S would be read as a copy of x's 2 and the original fails; not so with 1.
    for sequence in ((3, 1, 0) if flag else (3, 1)):
        assert_same_outputs(model, optimized, random_input(2, sequence, 4))


@pytest.mark.parametrize("text,feeds", [
    # A literal 0 is a size-zero dimension with allowzero=1; cleared, it would copy x's 2.
    ("""g (float[B,2,0] x) => (float[B,0,5] y) <int64[2] tail = {0, 5}> {
      s = Shape<start = 0, end = 1>(x)
      shape = Concat<axis = 0>(s, tail)
      y = Reshape<allowzero = 1>(x, shape)
    }""", [random_input(3, 2, 0), random_input(0, 2, 0)]),
    # S is unknown and B a copy: -1 beside a copy fails for an empty batch, which the original reshapes.
    ("""g (float[B,2,2,S,16] x) => (float[B,4,S,16] y) <int64[1] heads = {4}, int64[1] width = {16}> {
      b = Shape<start = 0, end = 1>(x)
      s = Shape<start = 3, end = 4>(x)
      shape = Concat<axis = 0>(b, heads, s, width)
      y = Reshape<allowzero = 1>(x, shape)
    }""", [random_input(2, 2, 2, 3, 16), random_input(0, 2, 2, 3, 16)]),
    # Two elements are neither copies nor known (x's first dimension is their product).
    ("""g (float[N,32] x, float[B,S] like) => (float[B,S,32] y) <int64[1] width = {32}> {
      s = Shape(like)
      shape = Concat<axis = 0>(s, width)
      y = Reshape<allowzero = 1>(x, shape)
    }""", [{**random_input(6, 32), "like": np.zeros((2, 3), np.float32)}]),
    # -1 beside a copy, its size dynamic: onnxruntime infers it for an empty sequence with allowzero=1
    # ([-1, 0] gives [N, 0]), and cleared, the copied 0 leaves -1 undetermined.
    ("""g (float[N,S] x) => (float[N,S] y) <int64[1] rest = {-1}> {
      s = Shape<start = 1, end = 2>(x)
      shape = Concat<axis = 0>(rest, s)
      y = Reshape<allowzero = 1>(x, shape)
    }""", [random_input(2, 3), random_input(2, 0)]),
], ids=["literal-zero", "copy-beside-an-unknown", "two-unknowns", "minus-one-beside-a-copy"])
def test_allowzero_reshape_that_cannot_be_made_constant_is_left_alone(text, feeds):
    model = parse(text)
    for feed in feeds:
        assert_unchanged(model, feed)


# ---------------------------------------------------------------------------------------------------
# If with a constant condition


BRANCHES = """<then_branch = then_graph () => (float[2] a) { a = Relu(x) },
                else_branch = else_graph () => (float[2] b) { b = Neg(x) }>"""


@pytest.mark.parametrize("condition,expected", [(1, "Relu"), (0, "Neg")])
def test_if_with_constant_condition_becomes_the_taken_branch(condition, expected):
    model = parse("""
    g (float[2] x) => (float[2] y) {
      c = Constant<value = bool {%d}>()
      y = If(c) %s
    }""" % (condition, BRANCHES))
    optimized, result = fold(model)
    assert op_counts(optimized) == {expected: 1}
    assert result.stats["ifs_inlined"] == 1
    assert list(optimized.graph.node[0].output) == ["y"]
    assert_same_outputs(model, optimized)


def test_if_with_dynamic_condition_is_left_alone():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) %s
    }""" % BRANCHES)
    for condition in (True, False):
        assert_unchanged(model, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_if_with_an_overridable_condition_is_left_alone():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) <bool c = {1}> {
      y = If(c) %s
    }""" % BRANCHES)
    for condition in (True, False):
        assert_unchanged(model, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_if_with_a_one_element_condition_tensor_is_inlined():
    model = parse("""
    g (float[2] x) => (float[2] y) <bool[1] c = {0}> {
      y = If(c) %s
    }""" % BRANCHES)
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Neg": 1}
    assert_same_outputs(model, optimized)


def test_inlined_if_output_read_by_later_nodes():
    model = parse("""
    g (float[2] x) => (float[2] z) <bool c = {1}> {
      y = If(c) %s
      z = Abs(y)
    }""" % BRANCHES)
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Relu": 1, "Abs": 1}
    assert_same_outputs(model, optimized)


def test_branch_returning_an_outer_value():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {1}>()
      r = Relu(x)
      y = If(c) <then_branch = t () => (float[2] a) { a = Identity(r) },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
      z = Abs(y)
    }""")
    optimized, _ = fold(model)
    assert "If" not in op_counts(optimized)
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_nested_constant_ifs_are_inlined():
    model = parse("""
    g (float[2] x) => (float[2] y) {
      c = Constant<value = bool {1}>()
      y = If(c) <then_branch = t () => (float[2] a) {
                   d = Constant<value = bool {0}>()
                   a = If(d) <then_branch = t2 () => (float[2] p) { p = Relu(x) },
                              else_branch = e2 () => (float[2] q) { q = Neg(x) }>
                 },
                 else_branch = e () => (float[2] b) { b = Abs(x) }>
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Neg": 1}
    assert_same_outputs(model, optimized)


def test_constant_if_nested_in_a_dynamic_if_is_inlined_in_its_branch():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) <then_branch = t () => (float[2] a) {
                   d = Constant<value = bool {0}>()
                   a = If(d) <then_branch = t2 () => (float[2] p) { p = Relu(x) },
                              else_branch = e2 () => (float[2] q) { q = Neg(x) }>
                 },
                 else_branch = e () => (float[2] b) { b = Abs(x) }>
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"If": 1, "Neg": 1, "Abs": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_inlined_branches_with_clashing_inner_names_are_renamed():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {1}>()
      y = If(c) <then_branch = t1 () => (float[2] a1) { tmp = Relu(x)  a1 = Neg(tmp) },
                 else_branch = e1 () => (float[2] b1) { b1 = Neg(x) }>
      z = If(c) <then_branch = t2 () => (float[2] a2) { tmp = Abs(x)  a2 = Neg(tmp) },
                 else_branch = e2 () => (float[2] b2) { b2 = Neg(x) }>
    }""")
    optimized, result = fold(model)
    assert result.stats["ifs_inlined"] == 2
    assert op_counts(optimized) == {"Relu": 1, "Abs": 1, "Neg": 2}
    assert_same_outputs(model, optimized)


def test_inlined_branches_with_clashing_initializer_names_keep_their_values():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {1}>()
      y = If(c) <then_branch = t1 () => (float[2] a1) <float[2] k = {1., 2.}> { a1 = Add(x, k) },
                 else_branch = e1 () => (float[2] b1) { b1 = Neg(x) }>
      z = If(c) <then_branch = t2 () => (float[2] a2) <float[2] k = {3., 4.}> { a2 = Mul(x, k) },
                 else_branch = e2 () => (float[2] b2) { b2 = Neg(x) }>
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1, "Mul": 1}
    assert_same_outputs(model, optimized)


def test_branch_returning_one_value_twice():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {1}>()
      y, z = If(c) <then_branch = t () => (float[2] a, float[2] a) { a = Relu(x) },
                    else_branch = e () => (float[2] b, float[2] b2) { b = Neg(x)  b2 = Abs(x) }>
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Relu": 1, "Identity": 1}
    assert io_names(optimized) == io_names(model)
    # onnxruntime (1.32) returns garbage for one output of such an If: compare with the formula.
    x = np.array([1.5, -2], np.float32)
    y, z = run(optimized, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(z, np.maximum(x, 0))


def test_branch_output_that_is_a_graph_output():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {0}>()
      y = If(c) <then_branch = t () => (float[2] a) { a = Relu(x) },
                 else_branch = e () => (float[2] b) { n = Neg(x)  b = Mul(n, x) }>
      z = Sigmoid(y)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Neg": 1, "Mul": 1, "Sigmoid": 1}
    mul = next(n for n in optimized.graph.node if n.op_type == "Mul")
    assert list(mul.output) == ["y"]
    assert_same_outputs(model, optimized)


def test_branch_with_a_constant_output():
    model = parse("""
    g (float[2] x) => (float[2] y, float[2] z) {
      c = Constant<value = bool {1}>()
      y = If(c) <then_branch = t () => (float[2] k) <float[2] k = {1., 2.}> { },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
      z = Add(x, y)
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"Add": 1}
    np.testing.assert_array_equal(initializers(optimized)["y"], [1, 2])
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Subgraph bodies


def test_folding_inside_a_branch_that_reads_an_outer_constant():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) <float[2] w = {1., 2.}> {
      y = If(c) <then_branch = t () => (float[2] a) { w2 = Mul(w, w)  a = Add(x, w2) },
                 else_branch = e () => (float[2] b) { w3 = Neg(w)  b = Mul(w3, x) }>
    }""")
    optimized, result = fold(model)
    assert result.stats["folded"] == 2
    assert op_counts(optimized) == {"If": 1, "Add": 1, "Mul": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_producer_of_a_branch_output_stays_in_the_branch():
    model = parse("""
    g (float[2] x, bool c) => (float[2] y) <float[2] w = {1., 2.}> {
      y = If(c) <then_branch = t () => (float[2] a) { a = Mul(w, w) },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
    }""")
    optimized, _ = fold(model)
    assert op_counts(optimized) == {"If": 1, "Mul": 1, "Neg": 1}
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_shape_folded_branch_output_stays_produced_in_the_branch():
    # onnxruntime refuses a subgraph output that is an outer-scope value or initializer.
    model = parse("""
    g (float[N,3] x, bool c) => (int64 y) <int64 one = {1}> {
      y = If(c) <then_branch = t () => (int64 a) { s = Shape(x)  a = Gather(s, one) },
                 else_branch = e () => (int64 b) { b = Constant<value = int64 {0}>() }>
    }""")
    optimized, _ = fold(model)
    for condition in (True, False):
        assert_same_outputs(model, optimized, {"x": np.zeros((2, 3), np.float32), "c": np.array(condition)})


def test_loop_body_stays_valid():
    model = parse("""
    g (float[N,3] x) => (float[N,3] y) <int64 n = {3}, float[3] w = {1., 2., 3.}, int64 one = {1}> {
      go = Constant<value = bool {1}>()
      y = Loop(n, go, x) <body = body (int64 i, bool cond, float[N,3] acc) => (bool cond_out, float[N,3] out) {
        cond_out = Identity(cond)
        w2 = Mul(w, w)
        s = Shape(acc)
        d = Gather(s, one)
        df = Cast<to = 1>(d)
        step = Add(w2, df)
        out = Add(acc, step)
      }>
    }""")
    optimized, result = fold(model)
    assert result.modified
    assert "Loop" in op_counts(optimized)
    for batch in (1, 4):
        assert_same_outputs(model, optimized, {"x": np.ones((batch, 3), np.float32)})


def test_second_run_changes_nothing():
    model = parse("""
    g (float[N,3,8,8] x) => (float[N,192] y)
        <int64 zero = {0}, int64 one = {1}, int64 size = {64}, int64[1] axes = {0}> {
      s = Shape(x)
      n = Gather(s, zero)
      c = Gather(s, one)
      k = Mul(c, size)
      n1 = Unsqueeze(n, axes)
      k1 = Unsqueeze(k, axes)
      shape = Concat<axis = 0>(n1, k1)
      y = Reshape(x, shape)
    }""")
    optimized, _ = fold(model)
    again, result = fold(optimized)
    assert not result.modified, result.stats
    assert op_counts(again) == op_counts(optimized)


def test_a_node_the_guard_would_keep_is_not_evaluated(monkeypatch):
    """Inferred shapes show the 4 MiB ConstantOfShape is kept: it is never computed, nor its reader."""
    asked: list[str] = []
    real_evaluate = fold_module.evaluate

    def spy(graph, nodes):
        asked.extend(n.op for n in nodes)
        return real_evaluate(graph, nodes)

    monkeypatch.setattr(fold_module, "evaluate", spy)
    model = parse("""
    g (float[1024,1024] x) => (float[1024,1024] y, float[1,1] total)
      <int64[2] s = {1024, 1024}, int64[2] t = {1, 1024}> {
      c = ConstantOfShape<value = float[1] {1.}>(s)
      y = Add(x, c)
      total = ReduceSum<keepdims = 1>(c)
      small = ConstantOfShape<value = float[1] {1.}>(t)
      z = Add(x, small)
    }""")
    optimized, result = fold(model)
    assert "ConstantOfShape" in asked and asked.count("ConstantOfShape") == 1  # only the small one
    assert "ReduceSum" not in asked
    assert op_counts(optimized) == {"ConstantOfShape": 1, "Add": 2, "ReduceSum": 1}
    assert result.stats["kept_by_size_guard"] == 1
    assert_same_outputs(model, optimized)
