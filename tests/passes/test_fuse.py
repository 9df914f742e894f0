"""Tests of ``fuse``: Conv+BatchNormalization, MatMul+Add -> Gemm and Transpose pairs."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import apply_checked, assert_same_outputs, make_model, op_counts, random_feeds, run, tensor, value
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt import ir
from onnxopt.pass_infra import PassContext
from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fuse import Fuse
from onnxopt.passes.fusions.affine import fold_batchnorm


def fuse(model: onnx.ModelProto):
    """Runs fuse once; checks the pass contracts and onnx.checker on the result."""
    return apply_checked(Fuse(), model)


def symbolic(name: str, elem: int, rank: int) -> onnx.ValueInfoProto:
    """A graph output of known rank; onnx.checker requires a shape, inference fills in the rest."""
    return value(name, elem, [f"{name}_{axis}" for axis in range(rank)])


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]


def assert_unchanged(model: onnx.ModelProto) -> None:
    optimized, result = fuse(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized)


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------------
# Conv + BatchNormalization


def conv_bn_model(spatial=(5, 5), channels_in=4, channels_out=6, group=1, conv_bias=True, dtype=np.float32,
                  bn_attrs=None, params_as_inputs=(), extra_outputs=(), bn_outputs=("y",), opset=17, seed=0):
    """x -> Conv(w, b) -> BatchNormalization -> y, with random weights and a positive variance."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kernel = (3,) * len(spatial)
    weight = rng.standard_normal((channels_out, channels_in // group, *kernel)).astype(dtype)
    params = {
        "scale": rng.uniform(0.5, 2.0, channels_out), "offset": rng.standard_normal(channels_out),
        "mean": rng.standard_normal(channels_out), "var": rng.uniform(0.1, 2.0, channels_out),
    }
    inits = [tensor("w", weight)]
    conv_inputs = ["x", "w"]
    if conv_bias:
        inits.append(tensor("b", rng.standard_normal(channels_out).astype(dtype)))
        conv_inputs.append("b")
    inputs = [value("x", elem, [1, channels_in, *spatial])]
    for name, values in params.items():
        if name in params_as_inputs:
            inputs.append(value(name, elem, [channels_out]))
        else:
            inits.append(tensor(name, values.astype(dtype)))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=group, pads=[1] * 2 * len(spatial)),
        helper.make_node("BatchNormalization", ["c", "scale", "offset", "mean", "var"], list(bn_outputs),
                         name="bn", **(bn_attrs or {})),
    ]
    outputs = [symbolic("y", elem, 2 + len(spatial))] + [symbolic(name, elem, 1) for name in extra_outputs]
    return make_model(nodes, inputs, outputs, inits, opset=opset)


@pytest.mark.parametrize("spatial", [(7,), (5, 5), (3, 4, 5)], ids=["conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
def test_conv_batchnorm_is_folded_into_the_conv(spatial, conv_bias, group):
    model = conv_bn_model(spatial, channels_in=4, channels_out=4 if group == 4 else 6, group=group,
                          conv_bias=conv_bias, bn_attrs={"epsilon": 1e-3})
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    assert result.stats["conv_batchnorm"] == 1
    conv = optimized.graph.node[0]
    assert list(conv.output) == ["y"] and len(conv.input) == 3
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == group
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-4)


def test_conv_batchnorm_float16():
    model = conv_bn_model((5, 5), dtype=np.float16)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(model, optimized, rtol=1e-2, atol=2e-2)


def test_fold_batchnorm_matches_the_formula():
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((3, 2, 1, 1)), rng.standard_normal(3)
    scale, offset = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    mean, var = rng.standard_normal(3), rng.uniform(0.1, 1, 3)
    new_weight, new_bias = fold_batchnorm(weight, bias, scale, offset, mean, var, 1e-5)
    x = rng.standard_normal(2)
    conv = weight[:, :, 0, 0] @ x + bias
    expected = (conv - mean) / np.sqrt(var + 1e-5) * scale + offset
    np.testing.assert_allclose(new_weight[:, :, 0, 0] @ x + new_bias, expected, rtol=1e-12)


def test_conv_batchnorm_in_training_mode_is_not_fused():
    # Training mode normalizes with the batch's statistics, not the constants.
    model = conv_bn_model(bn_attrs={"training_mode": 1}, bn_outputs=("y", "running_mean", "running_var"))
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1}


def test_conv_batchnorm_with_used_running_statistics_is_not_fused():
    model = conv_bn_model(bn_attrs={"training_mode": 1}, bn_outputs=("y", "running_mean", "running_var"),
                          extra_outputs=("running_mean",))
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1}


@pytest.mark.parametrize("is_test,fused", [(0, False), (1, True)])
def test_conv_batchnorm_before_opset_7_fuses_only_in_test_mode(is_test, fused):
    # onnxruntime runs no opset-6 BatchNormalization; fold_batchnorm's own test covers the numbers.
    model = conv_bn_model(opset=6, bn_attrs={"is_test": is_test})
    optimized, result = fuse(model)
    assert result.modified is fused
    assert op_counts(optimized) == ({"Conv": 1} if fused else {"Conv": 1, "BatchNormalization": 1})


def test_conv_batchnorm_with_used_extra_outputs_in_old_opset_is_not_fused():
    model = conv_bn_model(opset=9, bn_outputs=("y", "mean_out", "var_out", "saved_mean", "saved_var"),
                          extra_outputs=("var_out",))
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1}


@pytest.mark.parametrize("param", ["scale", "offset", "mean", "var"])
def test_conv_batchnorm_with_non_constant_parameters_is_not_fused(param):
    model = conv_bn_model(params_as_inputs=(param,))
    feeds = random_feeds(model)
    if param == "var":
        feeds["var"] = np.abs(feeds["var"]) + 0.1
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1}
    assert_same_outputs(model, optimized, feeds)


def test_conv_batchnorm_with_overridable_parameter_is_not_fused():
    # An initializer that is also a graph input is only a default: the caller may pass another scale.
    model = conv_bn_model()
    model.graph.input.append(value("scale", TensorProto.FLOAT, [6]))
    optimized, result = fuse(model)
    assert not result.modified
    assert [vi.name for vi in optimized.graph.input] == ["x", "scale"]
    feeds = random_feeds(model)
    assert_same_outputs(model, optimized, feeds)


def test_conv_batchnorm_float16_conv_with_float_statistics():
    model = conv_bn_model(dtype=np.float16, opset=15)
    for init in model.graph.initializer:
        if init.name in ("scale", "offset", "mean", "var"):
            init.CopyFrom(tensor(init.name, onnx.numpy_helper.to_array(init).astype(np.float32)))
    onnx.checker.check_model(model, full_check=True)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(model, optimized, rtol=1e-2, atol=2e-2)


def test_conv_batchnorm_with_weights_from_constant_nodes():
    model = conv_bn_model()
    for name in ("w", "var"):
        init = next(t for t in model.graph.initializer if t.name == name)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=init))
        model.graph.initializer.remove(init)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Conv": 1, "Constant": 2}
    assert_same_outputs(model, optimized)


def test_conv_batchnorm_with_non_constant_weight_is_not_fused():
    model = conv_bn_model()
    model.graph.input.append(value("w", TensorProto.FLOAT, [6, 4, 3, 3]))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
    assert_unchanged(model)


def test_conv_output_used_twice_is_not_fused():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(symbolic("r", TensorProto.FLOAT, 4))
    assert_unchanged(model)


def test_conv_output_that_is_a_graph_output_is_not_fused():
    model = conv_bn_model()
    model.graph.output.append(symbolic("c", TensorProto.FLOAT, 4))
    assert_unchanged(model)


def test_reader_of_the_fused_output_comes_after_the_new_conv():
    # A reader of the BatchNormalization output must still come after the new Conv.
    model = conv_bn_model()
    model.graph.output[0].name = "z"
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    optimized, _ = fuse(model)
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Relu"]
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# MatMul + Add -> Gemm


def matmul_add_model(a_shape=(3, 4), n=5, bias_shape=(5,), dtype=np.float32, bias_first=False,
                     b_constant=True, bias_constant=True, a_through_relu=False):
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    k = a_shape[-1] if isinstance(a_shape[-1], int) else 4
    inits, inputs = [], [value("a", elem, list(a_shape))]
    b = (rng.standard_normal((k, n)) * 3).astype(dtype)
    c = (rng.standard_normal(bias_shape) * 3).astype(dtype)
    if b_constant:
        inits.append(tensor("b", b))
    else:
        inputs.append(value("b", elem, [k, n]))
    if bias_constant:
        inits.append(tensor("bias", c))
    else:
        inputs.append(value("bias", elem, list(bias_shape)))
    nodes = []
    source = "a"
    if a_through_relu:
        nodes.append(helper.make_node("Relu", ["a"], ["a_relu"]))
        source = "a_relu"
    nodes.append(helper.make_node("MatMul", [source, "b"], ["mm"], name="mm"))
    nodes.append(helper.make_node("Add", ["bias", "mm"] if bias_first else ["mm", "bias"], ["y"], name="add"))
    rank = max(len(a_shape), len(bias_shape))
    return make_model(nodes, inputs, [symbolic("y", elem, rank)], inits)


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (3, 5), (), (1,), (3, 1), (1, 1)],
                         ids=["N", "1xN", "MxN", "scalar", "1", "Mx1", "1x1"])
@pytest.mark.parametrize("bias_first", [False, True], ids=["mm+bias", "bias+mm"])
def test_matmul_add_becomes_gemm(bias_shape, bias_first):
    model = matmul_add_model(bias_shape=bias_shape, bias_first=bias_first)
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Gemm": 1}
    assert result.stats["matmul_add_to_gemm"] == 1
    assert list(optimized.graph.node[0].output) == ["y"]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5)])
def test_matmul_add_with_symbolic_rows_becomes_gemm(bias_shape):
    model = matmul_add_model(a_shape=("M", 4), bias_shape=bias_shape)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Gemm": 1}
    assert_same_outputs(model, optimized)


def test_matmul_add_on_an_intermediate_value_uses_inferred_shapes():
    model = matmul_add_model(a_through_relu=True, dtype=np.float64)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Gemm": 1}
    assert_same_outputs(model, optimized)


def test_matmul_add_with_3d_input_is_not_fused():
    assert_unchanged(matmul_add_model(a_shape=(2, 3, 4)))


def test_matmul_add_with_unknown_input_rank_is_not_fused():
    model = parse("""
    g (float[3,4] x, int64[R] s) => (float[M, N] y)
      <float[4,5] b = {1.,2.,3.,4.,5.,1.,2.,3.,4.,5.,1.,2.,3.,4.,5.,1.,2.,3.,4.,5.}, float[5] bias = {1.,2.,3.,4.,5.}> {
      a = Reshape(x, s)
      mm = MatMul(a, b)
      y = Add(mm, bias)
    }""")
    optimized, result = fuse(model)
    assert not result.modified
    assert_same_outputs(model, optimized, {"x": np.ones((3, 4), np.float32), "s": np.array([3, 4])})


def test_matmul_add_with_non_constant_weight_is_not_fused():
    assert_unchanged(matmul_add_model(b_constant=False))


def test_matmul_add_with_non_constant_addend_is_not_fused():
    assert_unchanged(matmul_add_model(bias_constant=False))


@pytest.mark.parametrize("bias_shape", [(3, 1), (2, 5), (4, 1, 5)], ids=["Mx1", "wrong-rows", "3d"])
def test_matmul_add_with_bias_that_broadcasts_both_ways_is_not_fused(bias_shape):
    # With M unknown, Add([M, N], [3, 1]) may grow the result; Gemm's C only broadcasts one way.
    model = matmul_add_model(a_shape=("M", 4), bias_shape=bias_shape)
    optimized, result = fuse(model)
    assert not result.modified
    rows = bias_shape[-2] if len(bias_shape) > 1 and bias_shape[-2] != 1 else 1
    assert_same_outputs(model, optimized, {"a": np.ones((rows, 4), np.float32)})
    assert_same_outputs(model, optimized, {"a": np.ones((1, 4), np.float32)})


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16])
def test_matmul_add_with_other_dtypes_is_not_fused(dtype):
    assert_unchanged(matmul_add_model(dtype=dtype))


def test_matmul_output_used_elsewhere_is_not_fused():
    model = matmul_add_model()
    model.graph.output.append(symbolic("mm", TensorProto.FLOAT, 2))
    assert_unchanged(model)


def test_matmul_add_with_legacy_broadcast_before_opset_7_is_not_fused():
    # Add-6 with axis=0 adds the bias per row; Gemm would add it per column (M == N here).
    nodes = [helper.make_node("MatMul", ["a", "b"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"], broadcast=1, axis=0)]
    model = make_model(nodes, [value("a", TensorProto.FLOAT, [3, 4])], [value("y", TensorProto.FLOAT, [3, 3])],
                       [tensor("b", np.ones((4, 3), np.float32)), tensor("bias", np.arange(3, dtype=np.float32))],
                       opset=6, ir_version=4)
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized) == {"MatMul": 1, "Add": 1}


def test_add_of_two_matmuls_is_not_fused():
    model = matmul_add_model()
    model.graph.node[-1].input[:] = ["mm", "mm2"]
    model.graph.node.insert(1, helper.make_node("MatMul", ["a", "b"], ["mm2"]))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "bias"))
    optimized, result = fuse(model)
    # The addend is not constant either way.
    assert not result.modified
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Transpose pairs


def transpose_model(shape, perms, graph_io=False, first_used_elsewhere=False):
    """x -> Transpose(perm_1) -> ... -> Transpose(perm_k) -> y, optionally wrapped in Relu before and after."""
    nodes, current = [], "x"
    if not graph_io:
        nodes.append(helper.make_node("Relu", ["x"], ["x_relu"]))
        current = "x_relu"
    for index, perm in enumerate(perms):
        attrs = {} if perm is None else {"perm": list(perm)}
        nodes.append(helper.make_node("Transpose", [current], [f"t{index}"], name=f"transpose{index}", **attrs))
        current = f"t{index}"
    if graph_io:
        nodes[-1].output[0] = "y"
    else:
        nodes.append(helper.make_node("Neg", [current], ["y"]))
    outputs = [symbolic("y", TensorProto.FLOAT, len(shape))]
    if first_used_elsewhere:
        outputs.append(symbolic("t0", TensorProto.FLOAT, len(shape)))
    return make_model(nodes, [value("x", TensorProto.FLOAT, list(shape))], outputs)


def test_cancelling_transposes_are_removed():
    model = transpose_model((2, 3, 4), [(0, 2, 1), (0, 2, 1)])
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    assert result.modified
    assert_same_outputs(model, optimized)


def test_cancelling_transposes_before_a_graph_output_keep_its_name():
    model = transpose_model((2, 3, 4), [(1, 2, 0), (2, 0, 1)])
    model.graph.node.pop()
    model.graph.node[-1].output[0] = "y"
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1}
    assert list(optimized.graph.node[0].output) == ["y"]
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_cancelling_transposes_from_graph_input_to_graph_output_leave_an_identity():
    model = transpose_model((2, 3, 4), [(0, 2, 1), (0, 2, 1)], graph_io=True)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Identity": 1}
    assert io_names(optimized) == io_names(model)
    assert_same_outputs(model, optimized)


def test_identity_transpose_is_removed():
    model = transpose_model((2, 3, 4), [(0, 1, 2)])
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    assert_same_outputs(model, optimized)


def _perm_pairs(rank, count, seed):
    rng = np.random.default_rng(seed)
    perms = list(itertools.permutations(range(rank)))
    return [(perms[i], perms[j]) for i, j in rng.integers(0, len(perms), (count, 2))]


def _inverse_pairs(rank, count, seed):
    rng = np.random.default_rng(seed)
    perms = [tuple(int(a) for a in rng.permutation(rank)) for _ in range(count)]
    return [(perm, tuple(int(a) for a in np.argsort(perm))) for perm in perms]


@pytest.mark.parametrize("first,second", _perm_pairs(3, 8, 0) + _perm_pairs(4, 12, 1) + _inverse_pairs(3, 3, 2)
                         + _inverse_pairs(4, 4, 3))
def test_transpose_pairs_compose(first, second):
    shape = (2, 3, 4, 5)[: len(first)]
    model = transpose_model(shape, [first, second])
    optimized, _ = fuse(model)
    composed = [first[axis] for axis in second]
    expected = {"Relu": 1, "Neg": 1} if composed == sorted(composed) else {"Relu": 1, "Neg": 1, "Transpose": 1}
    assert op_counts(optimized) == expected
    assert_same_outputs(model, optimized)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 4).flatmap(lambda rank: st.lists(st.permutations(range(rank)), min_size=2, max_size=4)))
def test_transpose_chains_compose_exactly(perms):
    model = transpose_model((2, 3, 4, 5)[: len(perms[0])], perms)
    optimized, _ = fuse(model)
    assert op_counts(optimized).get("Transpose", 0) <= 1
    assert_same_outputs(model, optimized)
    assert not fuse(optimized)[1].modified


def test_three_transposes_become_one():
    model = transpose_model((2, 3, 4, 5), [(0, 2, 3, 1), (3, 1, 0, 2), (1, 0, 3, 2)])
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1, "Transpose": 1}
    assert_same_outputs(model, optimized)


def test_transposes_without_perm_reverse_the_axes():
    model = transpose_model((2, 3, 4), [None, None])
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1}
    assert_same_outputs(model, optimized)

    model = transpose_model((2, 3, 4, 5), [None, (0, 2, 1, 3)])
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1, "Transpose": 1}
    assert_same_outputs(model, optimized)


def test_transposes_without_perm_and_unknown_rank_are_kept():
    model = parse("""
    g (float[2,3,4] x, int64[R] s) => (float[a, b, c] y) {
      r = Reshape(x, s)
      t = Transpose(r)
      y = Transpose(t)
    }""")
    optimized, result = fuse(model)
    assert not result.modified
    assert_same_outputs(model, optimized, {"x": random_feeds(model)["x"], "s": np.array([4, 3, 2])})


def test_first_transpose_used_elsewhere_stays():
    model = transpose_model((2, 3, 4), [(1, 2, 0), (1, 0, 2)], first_used_elsewhere=True)
    optimized, _ = fuse(model)
    counts = op_counts(optimized)
    assert counts["Transpose"] == 2
    transposes = [n for n in optimized.graph.node if n.op_type == "Transpose"]
    assert all(n.input[0] == "x_relu" for n in transposes)
    assert_same_outputs(model, optimized)


def test_first_transpose_cancelled_but_used_elsewhere_stays():
    model = transpose_model((2, 3, 4), [(0, 2, 1), (0, 2, 1)], first_used_elsewhere=True)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Relu": 1, "Neg": 1, "Transpose": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Subgraphs


def _bn_params(rng, prefix, channels=4):
    values = (rng.uniform(0.5, 2, channels), rng.standard_normal(channels), rng.standard_normal(channels),
              rng.uniform(0.1, 2, channels))
    return [tensor(f"{prefix}{n}", v.astype(np.float32)) for n, v in zip("somv", values)]


def _branch(rng, name, out):
    """Conv+BN (own parameters, shared outer weight), a cancelling Transpose pair and MatMul+Add."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], [f"{name}_c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{name}_c"] + [f"{name}_{n}" for n in "somv"], [f"{name}_bn"]),
        helper.make_node("Transpose", [f"{name}_bn"], [f"{name}_t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", [f"{name}_t1"], [f"{name}_t2"], perm=[0, 3, 1, 2]),
        helper.make_node("Add", [f"{name}_t2", "bn"], [f"{name}_sum"]),
        helper.make_node("Reshape", [f"{name}_sum", "flat"], [f"{name}_flat"]),
        helper.make_node("MatMul", [f"{name}_flat", "b"], [f"{name}_mm"]),
        helper.make_node("Add", [f"{name}_mm", "bias"], [out]),
    ]
    return helper.make_graph(nodes, name, [], [symbolic(out, TensorProto.FLOAT, 2)], _bn_params(rng, f"{name}_"))


def if_model():
    rng = np.random.default_rng(0)
    inits = [tensor("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)), *_bn_params(rng, ""),
             tensor("b", rng.standard_normal((4, 5)).astype(np.float32)),
             tensor("bias", rng.standard_normal(5).astype(np.float32)), tensor("flat", np.array([-1, 4], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["bn"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=_branch(rng, "then", "a"),
                              else_branch=_branch(rng, "else", "b_out"))]
    return make_model(nodes, [value("x", TensorProto.FLOAT, [1, 4, 5, 5]), value("cond", TensorProto.BOOL, [])],
                      [symbolic("y", TensorProto.FLOAT, 2)], inits)


def test_fusions_apply_inside_if_branches():
    model = if_model()
    optimized, result = fuse(model)
    expected = {"pad_conv": 0, "conv_batchnorm": 3, "transpose_transpose": 2, "matmul_add_to_gemm": 2}
    assert {key: result.stats[key] for key in expected} == expected
    assert not any(count for key, count in result.stats.items() if key not in expected)
    counts = op_counts(optimized)
    assert counts == {"Conv": 3, "If": 1, "Add": 2, "Reshape": 2, "Gemm": 2}
    for flag in (True, False):
        feeds = {"x": random_feeds(model)["x"], "cond": np.array(flag)}
        assert_same_outputs(model, optimized, feeds)


def test_constants_made_in_branches_do_not_shadow_outer_names():
    # Each branch folds its own BatchNormalization into the shared weight "w": the folded weights
    # differ, so a branch constant reusing the main graph's name would bind to the wrong value once
    # the model is loaded again.
    optimized, _ = fuse(if_model())
    reloaded, result = fuse(optimized)
    assert not result.modified
    names = [t.name for t in optimized.graph.initializer]
    for node in optimized.graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                names += [t.name for t in attr.g.initializer]
    assert len(names) == len(set(names))
    for flag in (True, False):
        feeds = {"x": random_feeds(optimized)["x"], "cond": np.array(flag)}
        assert_same_outputs(if_model(), reloaded, feeds)


def test_producer_in_the_outer_graph_is_not_fused_into_a_branch():
    model = parse("""
    g (float[2,3,4] x, bool c) => (float[a, b, d] y) {
      t = Transpose<perm = [0, 2, 1]>(x)
      y = If(c) <
        then_branch = g1 () => (float[2,3,4] p) { p = Transpose<perm = [0, 2, 1]>(t) },
        else_branch = g2 () => (float[2,4,3] q) { q = Neg(t) }
      >
    }""")
    optimized, result = fuse(model)
    assert not result.modified
    assert op_counts(optimized)["Transpose"] == 2
    for flag in (True, False):
        assert_same_outputs(model, optimized, {"x": random_feeds(model)["x"], "c": np.array(flag)})


def test_fusions_inside_a_loop_body_keep_the_loop_exact():
    model = parse("""
    g (float[2,4] x, int64 n, bool c) => (float[2,4] y)
      <float[4,4] b = {1.,0.,0.,0.,0.,1.,0.,0.,0.,0.,1.,0.,0.,0.,0.,1.}, float[4] bias = {0.5, -0.5, 0.25, 1.0}> {
      y = Loop(n, c, x) <
        body = loop_body (int64 i, bool cond_in, float[2,4] acc) => (bool cond_out, float[2,4] acc_out) {
          cond_out = Identity(cond_in)
          t1 = Transpose<perm = [1, 0]>(acc)
          t2 = Transpose<perm = [1, 0]>(t1)
          r = Tanh(t2)
          mm = MatMul(r, b)
          acc_out = Add(bias, mm)
        }
      >
    }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_transpose"] == 1 and result.stats["matmul_add_to_gemm"] == 1
    assert op_counts(optimized) == {"Loop": 1, "Identity": 1, "Tanh": 1, "Gemm": 1}
    feeds = {"x": random_feeds(model)["x"], "n": np.array(3, np.int64), "c": np.array(True)}
    assert_same_outputs(model, optimized, feeds)


def test_fuse_is_idempotent():
    model = conv_bn_model()
    once, first = fuse(model)
    twice, second = fuse(once)
    assert first.modified and not second.modified
    assert op_counts(twice) == op_counts(once)


def _where_model(condition, x_shape=(2, 3), y_shape=(2, 3), condition_shape=(3,)):
    rng = np.random.default_rng(6)
    inits = [tensor("c", np.broadcast_to(np.array(condition, bool), condition_shape).copy())]
    inputs = [value("x", TensorProto.FLOAT, list(x_shape)), value("y", TensorProto.FLOAT, list(y_shape))]
    nodes = [helper.make_node("Where", ["c", "x", "y"], ["w"]), helper.make_node("Relu", ["w"], ["out"])]
    model = make_model(nodes, inputs, [symbolic("out", TensorProto.FLOAT, 2)], inits)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32), "y": rng.standard_normal(y_shape).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("condition,kept", [(True, "x"), (False, "y")])
def test_where_with_a_constant_condition_picks_its_operand(condition, kept):
    model, feeds = _where_model(condition)
    optimized, result = fuse(model)
    assert result.stats["constant_where"] == 1
    assert op_counts(optimized) == {"Relu": 1} and list(optimized.graph.node[0].input) == [kept]
    assert_same_outputs(model, optimized, feeds)


@pytest.mark.parametrize("case", ["mixed", "broadcast-by-other", "broadcast-by-condition"])
def test_where_that_must_stay(case):
    kwargs = {"mixed": {"condition": [True, False, True]},
              "broadcast-by-other": {"condition": True, "x_shape": (1, 3)},
              "broadcast-by-condition": {"condition": True, "x_shape": (2, 1), "y_shape": (2, 1)}}[case]
    model, feeds = _where_model(**kwargs)
    optimized, result = fuse(model)
    assert result.stats.get("constant_where", 0) == 0
    assert_same_outputs(model, optimized, feeds)


def _pad_conv_model(pads, mode="constant", fill=None, opset=17, conv_attrs=None):
    rng = np.random.default_rng(3)
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             tensor("pads", np.array(pads, np.int64))]
    pad_inputs = ["x", "pads"]
    if fill is not None:
        inits.append(tensor("value", np.array(fill, np.float32)))
        pad_inputs.append("value")
    nodes = [helper.make_node("Pad", pad_inputs, ["p"], mode=mode),
             helper.make_node("Conv", ["p", "W"], ["y"], **(conv_attrs or {"pads": [1, 0, 1, 0]}))]
    return make_model(nodes, [value("x", TensorProto.FLOAT, [1, 3, 8, 8])], [symbolic("y", TensorProto.FLOAT, 4)],
                      inits, opset=opset)


@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 2, 2, 0, 0, 2, 2]])
def test_zero_pad_folds_into_conv(pads):
    model = _pad_conv_model(pads)
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    # A Pad of zeros everywhere is removed as a no-op before the Conv is looked at.
    assert result.stats["pad_conv"] + result.stats["noop_pad"] == 1
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("auto_pad", ["VALID", "SAME_UPPER"])
def test_zero_pad_folds_into_a_valid_conv_only(auto_pad):
    # tf2onnx and timm's TF-style "same" padding: an asymmetric Pad, then a stride-2 Conv with auto_pad=VALID.
    model = _pad_conv_model([0, 0, 0, 0, 0, 0, 1, 1], conv_attrs={"auto_pad": auto_pad, "strides": [2, 2]})
    optimized, result = fuse(model)
    assert result.stats["pad_conv"] == (auto_pad == "VALID")
    if auto_pad == "VALID":
        conv = optimized.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        assert op_counts(optimized) == {"Conv": 1} and "auto_pad" not in attrs and attrs["pads"] == [0, 0, 1, 1]
    assert_same_outputs(model, optimized)


def _pad_pool_model(pool, pads, fill=None, pool_attrs=None, indices_used=False, opset=17):
    inits = [tensor("pads", np.array(pads, np.int64))]
    pad_inputs = ["x", "pads"]
    if fill is not None:
        inits.append(tensor("value", np.array(fill, np.float32)))
        pad_inputs.append("value")
    attrs = {"kernel_shape": [3, 3], **(pool_attrs or {})}
    outputs = ["y", "indices"] if indices_used else ["y"]
    nodes = [helper.make_node("Pad", pad_inputs, ["p"]), helper.make_node(pool, ["p"], outputs, **attrs)]
    graph_outputs = [symbolic("y", TensorProto.FLOAT, 4)]
    if indices_used:
        graph_outputs.append(symbolic("indices", TensorProto.INT64, 4))
    return make_model(nodes, [value("x", TensorProto.FLOAT, [2, 3, 9, 8])], graph_outputs, inits, opset=opset)


@pytest.mark.parametrize("pool,fill", [("AveragePool", None), ("AveragePool", 0.0), ("MaxPool", -np.inf)])
@pytest.mark.parametrize("pads,pool_attrs", [
    ([0, 0, 1, 2, 0, 0, 2, 0], {}),
    ([0, 0, 0, 0, 0, 0, 1, 1], {"strides": [2, 2], "auto_pad": "VALID"}),
    ([0, 0, 1, 0, 0, 0, 0, 1], {"strides": [2, 1], "pads": [1, 0, 0, 1], "count_include_pad": 1}),
    ([0, 0, 1, 1, 0, 0, 1, 1], {"dilations": [2, 1], "opset": 19}),
], ids=["asymmetric", "valid-strided", "with-own-pads", "dilated"])
def test_pad_folds_into_pooling(pool, fill, pads, pool_attrs):
    pool_attrs = dict(pool_attrs)
    opset = pool_attrs.pop("opset", 17)
    if pool == "MaxPool":
        pool_attrs.pop("count_include_pad", None)
    model = _pad_pool_model(pool, pads, fill, pool_attrs, opset=opset)
    optimized, result = fuse(model)
    assert result.stats["pad_average_pool" if pool == "AveragePool" else "pad_max_pool"] == 1
    assert op_counts(optimized) == {pool: 1}
    rng = np.random.default_rng(4)
    # Negative inputs: a MaxPool that took a padded 0 for a maximum would show.
    assert_same_outputs(model, optimized, {"x": rng.uniform(-3.0, -1.0, (2, 3, 9, 8)).astype(np.float32)})


@pytest.mark.parametrize("case", ["maxpool-zeros", "average-own-pads-uncounted", "ceil-mode", "pad-reaches-kernel",
                                  "indices-used", "same-upper", "channel-axis"])
def test_pad_that_cannot_fold_into_pooling_stays(case):
    pool, fill, pads, attrs = "AveragePool", None, [0, 0, 1, 1, 0, 0, 1, 1], {}
    if case == "maxpool-zeros":
        pool = "MaxPool"
    elif case == "average-own-pads-uncounted":
        attrs = {"pads": [1, 0, 0, 0]}
    elif case == "ceil-mode":
        attrs = {"ceil_mode": 1, "strides": [2, 2]}
    elif case == "pad-reaches-kernel":
        pads = [0, 0, 3, 0, 0, 0, 0, 0]
    elif case == "indices-used":
        pool, fill = "MaxPool", -np.inf
    elif case == "same-upper":
        attrs = {"auto_pad": "SAME_UPPER"}
    elif case == "channel-axis":
        pads = [0, 1, 1, 1, 0, 0, 1, 1]
    model = _pad_pool_model(pool, pads, fill, attrs, indices_used=case == "indices-used")
    optimized, result = fuse(model)
    assert not result.stats.get("pad_average_pool") and not result.stats.get("pad_max_pool")
    assert op_counts(optimized) == {"Pad": 1, pool: 1}
    rng = np.random.default_rng(4)
    assert_same_outputs(model, optimized, {"x": rng.uniform(-3.0, 3.0, (2, 3, 9, 8)).astype(np.float32)})


@pytest.mark.parametrize("pads, mode, fill", [
    ([0, 0, 1, 1, 0, 0, 1, 1], "reflect", None),
    ([0, 0, 1, 1, 0, 0, 1, 1], "constant", 1.0),
    ([1, 0, 1, 1, 0, 0, 1, 1], "constant", None),
])
def test_pad_that_is_not_spatial_zero_padding_stays(pads, mode, fill):
    model = _pad_conv_model(pads, mode, fill)
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Pad": 1, "Conv": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Conv followed by a per-channel Mul or Add


def structure(model: onnx.ModelProto) -> list[tuple[str, list[str], list[str]]]:
    return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


def conv_affine_model(op_type="Mul", const_shape=(4, 1, 1), conv_bias=True, swap=False, const_input=False,
                      conv_used_elsewhere=False, dtype=np.float32, width=6, out_rank=4):
    rng = np.random.default_rng(5)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(dtype))]
    conv_inputs = ["x", "W"]
    if conv_bias:
        inits.append(tensor("B", rng.standard_normal(4).astype(dtype)))
        conv_inputs.append("B")
    inputs = [value("x", elem, [1, 3, 6, width])]
    if const_input:
        inputs.append(value("s", elem, list(const_shape)))
    else:
        inits.append(tensor("s", rng.uniform(0.5, 2.0, const_shape).astype(dtype)))
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op_type, ["s", "c"] if swap else ["c", "s"], ["y"], name="affine")]
    outputs = [symbolic("y", elem, out_rank)]
    if conv_used_elsewhere:
        outputs.append(symbolic("c", elem, 4))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("op_type", ["Mul", "Add"])
@pytest.mark.parametrize("const_shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1)],
                         ids=["C11", "1C11", "scalar", "1", "111"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "nobias"])
def test_conv_per_channel_affine_folds_into_the_conv(op_type, const_shape, conv_bias):
    model = conv_affine_model(op_type, const_shape, conv_bias)
    optimized, result = fuse(model)
    rule = "conv_mul" if op_type == "Mul" else "conv_add"
    assert result.stats[rule] == 1
    weight = "W_conv_mul" if op_type == "Mul" else "W"
    assert structure(optimized) == [("Conv", ["x", weight, f"conv_{rule}_bias"], ["y"])]
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-4)


def test_conv_affine_with_commuted_operands_folds():
    model = conv_affine_model("Mul", swap=True)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-4)


def test_conv_batchnorm_mul_add_chain_becomes_one_conv():
    model = conv_bn_model()
    model.graph.output[0].name = "z"
    model.graph.node.extend([helper.make_node("Mul", ["y", "s"], ["m"]), helper.make_node("Add", ["a", "m"], ["z"])])
    model.graph.initializer.extend([tensor("s", np.full((6, 1, 1), 0.5, np.float32)),
                                    tensor("a", np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1))])
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"Conv": 1}
    assert (result.stats["conv_batchnorm"], result.stats["conv_mul"], result.stats["conv_add"]) == (1, 1, 1)
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op_type", ["Mul", "Add"])
@pytest.mark.parametrize("case", ["last-axis", "spatial", "batch", "higher-rank", "not-constant", "conv-shared"])
def test_conv_affine_that_is_not_per_channel_stays(op_type, case):
    # The Conv output is [1, 4, 6, 4] (or [4, 4, 6, 4] for "batch"): a constant of shape [4] scales
    # columns, [4, 6, 1] rows and channels, [4, 1, 1, 1] the batch, [1, 1, 4, 1, 1] raises the rank.
    kwargs = {"last-axis": {"const_shape": (4,)}, "spatial": {"const_shape": (4, 6, 1)},
              "batch": {"const_shape": (4, 1, 1, 1)}, "higher-rank": {"const_shape": (1, 1, 4, 1, 1), "out_rank": 5},
              "not-constant": {"const_input": True}, "conv-shared": {"conv_used_elsewhere": True}}[case]
    model = conv_affine_model(op_type, width=4, **kwargs)
    if case == "batch":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.checker.check_model(model, full_check=True)
    optimized, result = fuse(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == {"Conv": 1, op_type: 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# No-ops at inference


def test_inference_dropout_is_removed():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      d, mask = Dropout(x)
      y = Relu(d)
    }""")
    optimized, result = fuse(model)
    assert result.stats["noop_dropout"] == 1
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


def test_dropout_with_constant_false_training_mode_is_removed():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <float ratio = {0.5}, bool train = {0}> {
      d = Dropout(x, ratio, train)
      y = Relu(d)
    }""")
    optimized, _ = fuse(model)
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("text", [
    """g (float[2,3] x, bool train) => (float[2,3] y) <float ratio = {0.5}> {
      d = Dropout(x, ratio, train)
      y = Relu(d)
    }""",
    """g (float[2,3] x) => (float[2,3] y, bool[2,3] mask) {
      d, mask = Dropout(x)
      y = Relu(d)
    }""",
], ids=["training-input", "mask-used"])
def test_dropout_that_may_train_or_whose_mask_is_used_stays(text):
    model = parse(text)
    optimized, result = fuse(model)
    assert result.stats["noop_dropout"] == 0
    assert op_counts(optimized) == {"Dropout": 1, "Relu": 1}


def test_dropout_before_graph_output_keeps_the_output_name():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      r = Relu(x)
      y = Dropout(r)
    }""")
    optimized, _ = fuse(model)
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("shape,dims", [("[1,3]", "2,3"), ("[2,3]", "2,3"), ("[1]", "2,3"), ("[1,3]", "N,3")])
def test_expand_to_the_same_shape_is_removed(shape, dims):
    model = parse("""
    g (float[%s] x) => (float[%s] y) <int64[%d] s = %s> {
      e = Expand(x, s)
      y = Relu(e)
    }""" % (dims, dims, shape.count(",") + 1, shape.replace("[", "{").replace("]", "}")))
    optimized, result = fuse(model)
    assert result.stats["noop_expand"] == 1
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert_same_outputs(model, optimized, feeds)


@pytest.mark.parametrize("shape,dims,out", [("[4,2,3]", "2,3", "a,b,c"), ("[2,3]", "2,1", "a,b"), ("[2,3]", "N,3", "a,b")],
                         ids=["rank", "grows", "symbolic"])
def test_expand_that_may_grow_stays(shape, dims, out):
    model = parse("""
    g (float[%s] x) => (float[%s] y) <int64[%d] s = %s> {
      e = Expand(x, s)
      y = Relu(e)
    }""" % (dims, out, shape.count(",") + 1, shape.replace("[", "{").replace("]", "}")))
    optimized, result = fuse(model)
    assert result.stats["noop_expand"] == 0
    assert op_counts(optimized) == {"Expand": 1, "Relu": 1}


@pytest.mark.parametrize("starts,ends,axes", [
    ("{0}", "{9223372036854775807}", "{1}"), ("{0, 0}", "{2, 3}", "{0, 1}"), ("{-3}", "{3}", "{-1}"),
    ("{0}", "{100}", "{0}"),
])
def test_slice_taking_everything_is_removed(starts, ends, axes):
    count = starts.count(",") + 1
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <int64[%d] st = %s, int64[%d] en = %s, int64[%d] ax = %s> {
      s = Slice(x, st, en, ax)
      y = Relu(s)
    }""" % (count, starts, count, ends, count, axes))
    optimized, result = fuse(model)
    assert result.stats["noop_slice"] == 1
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("starts,ends,steps", [("{1}", "{3}", "{1}"), ("{0}", "{2}", "{1}"),
                                               ("{0}", "{3}", "{2}"), ("{2}", "{0}", "{-1}")],
                         ids=["start", "end", "step", "reverse"])
def test_slice_that_cuts_stays(starts, ends, steps):
    model = parse("""
    g (float[2,3] x) => (float[a, b] y) <int64[1] st = %s, int64[1] en = %s, int64[1] ax = {1}, int64[1] sp = %s> {
      s = Slice(x, st, en, ax, sp)
      y = Relu(s)
    }""" % (starts, ends, steps))
    optimized, result = fuse(model)
    assert result.stats["noop_slice"] == 0
    assert op_counts(optimized) == {"Slice": 1, "Relu": 1}
    assert_same_outputs(model, optimized)


def test_slice_to_a_static_end_of_an_unknown_dimension_stays():
    model = parse("""
    g (float[N,3] x) => (float[a, b] y) <int64[1] st = {0}, int64[1] en = {2}, int64[1] ax = {0}> {
      s = Slice(x, st, en, ax)
      y = Relu(s)
    }""")
    optimized, result = fuse(model)
    assert result.stats["noop_slice"] == 0


@pytest.mark.parametrize("inner,outer,merged", [
    (("{0}", "{9223372036854775807}", "{1}", "{2}"), ("{0}", "{9223372036854775807}", "{2}", "{2}"), True),  # LeViT
    (("{1}", "{-1}", "{-1}", "{1}"), ("{4}", "{0}", "{0}", "{-1}"), True),   # a negative axis and a reversal
    (("{0}", "{4}", "{1}", "{1}"), ("{1}", "{3}", "{1}", "{1}"), False),     # one axis twice
], ids=["levit", "negative-axis", "same-axis"])
def test_slice_of_a_slice_along_other_axes_becomes_one(inner, outer, merged):
    model = parse("""
    g (float[N,6,6] x) => (float[a, b, c] y) <int64[1] s1 = %s, int64[1] e1 = %s, int64[1] a1 = %s, int64[1] p1 = %s,
                                            int64[1] s2 = %s, int64[1] e2 = %s, int64[1] a2 = %s, int64[1] p2 = %s> {
      i = Slice(x, s1, e1, a1, p1)
      o = Slice(i, s2, e2, a2, p2)
      y = Relu(o)
    }""" % (inner + outer))
    optimized, result = fuse(model)
    assert result.stats["slice_slice"] == int(merged)
    assert op_counts(optimized)["Slice"] == (1 if merged else 2)
    assert_same_outputs(model, optimized, {"x": np.random.default_rng(0).standard_normal((2, 6, 6)).astype(np.float32)})


def test_slice_read_by_slices_along_other_axes_merges_into_each():
    # Swin's patch merging (dynamo): rows 0::2 and 1::2 taken once each, then columns 0::2 and 1::2 of each.
    model = parse("""
    g (float[1,4,4,3] x) => (float[1,2,2,12] y)
      <int64[1] zero = {0}, int64[1] one = {1}, int64[1] end = {9223372036854775807},
       int64[1] ax1 = {1}, int64[1] ax2 = {2}, int64[1] two = {2}> {
      r0 = Slice(x, zero, end, ax1, two)
      r1 = Slice(x, one, end, ax1, two)
      a = Slice(r0, zero, end, ax2, two)
      b = Slice(r1, zero, end, ax2, two)
      c = Slice(r0, one, end, ax2, two)
      d = Slice(r1, one, end, ax2, two)
      y = Concat <axis = -1> (a, b, c, d)
    }""")
    optimized, result = fuse(model)
    assert result.stats["slice_slice"] == 4
    graph = ir.import_model(optimized)
    DeadCodeElimination()(graph, PassContext(original=optimized))
    assert op_counts(ir.export_model(graph, optimized)) == {"Slice": 4, "Concat": 1}
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("outputs,other_reader", [
    ("float[c, d] z", "z = Slice(i, s, e, a0)"),  # another Slice of the inner one cuts its axis again
    ("float[c, d] i", ""),                          # the inner Slice's result is a graph output
], ids=["read-by-a-slice-of-the-same-axis", "graph-output"])
def test_slice_of_a_slice_read_elsewhere_stays(outputs, other_reader):
    model = parse("""
    g (float[4,6] x) => (float[a, b] y, %s) <int64[1] s = {1}, int64[1] e = {3}, int64[1] a0 = {0}, int64[1] a1 = {1}> {
      i = Slice(x, s, e, a0)
      y = Slice(i, s, e, a1)
      %s
    }""" % (outputs, other_reader))
    optimized, result = fuse(model)
    assert result.stats["slice_slice"] == 0
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_of_zeros_is_removed(mode):
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <int64[4] p = {0, 0, 0, 0}> {
      q = Pad<mode = "%s">(x, p)
      y = Relu(q)
    }""" % mode)
    optimized, result = fuse(model)
    assert result.stats["noop_pad"] == 1
    assert structure(optimized) == [("Relu", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("pads", ["{0, 1, 0, 0}", "{0, 0, 0, -1}"])
def test_pad_that_changes_the_shape_stays(pads):
    model = parse("""
    g (float[2,3] x) => (float[a, b] y) <int64[4] p = %s> {
      q = Pad(x, p)
      y = Relu(q)
    }""" % pads)
    optimized, result = fuse(model)
    assert result.stats["noop_pad"] == 0
    assert op_counts(optimized) == {"Pad": 1, "Relu": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Lossless Cast pairs


@pytest.mark.parametrize("source,wider", [("float", 11), ("float16", 1), ("int8", 10), ("int32", 7), ("uint8", 6),
                                          ("int16", 1), ("bool", 6), ("int32", 11)])
def test_lossless_cast_round_trip_is_removed(source, wider):
    back = helper.np_dtype_to_tensor_dtype(helper.tensor_dtype_to_np_dtype(
        getattr(TensorProto, source.upper() if source != "float" else "FLOAT")))
    model = parse("""
    g (%s[2,3] x) => (%s[2,3] y) {
      w = Cast<to = %d>(x)
      c = Cast<to = %d>(w)
      y = Identity(c)
    }""" % (source, source, wider, back))
    optimized, result = fuse(model)
    assert result.stats["noop_cast_pair"] == 1
    assert structure(optimized) == [("Identity", ["x"], ["y"])]
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("source,middle", [("float", 10), ("int32", 1), ("int64", 11), ("float", 6), ("int16", 10),
                                           ("uint32", 6)],
                         ids=["float-half", "int32-float", "int64-double", "float-int32", "int16-half", "uint32-int32"])
def test_lossy_cast_round_trip_stays(source, middle):
    back = getattr(TensorProto, source.upper())
    model = parse("""
    g (%s[2,3] x) => (%s[2,3] y) {
      w = Cast<to = %d>(x)
      c = Cast<to = %d>(w)
      y = Identity(c)
    }""" % (source, source, middle, back))
    optimized, result = fuse(model)
    assert result.stats["noop_cast_pair"] == 0
    assert op_counts(optimized) == {"Cast": 2, "Identity": 1}
    feeds = random_feeds(model)
    feeds["x"] = (feeds["x"] * 1e5 + 0.3).astype(feeds["x"].dtype) if feeds["x"].dtype.kind == "f" else \
        (feeds["x"] + np.iinfo(feeds["x"].dtype).max // 2 + 1).astype(feeds["x"].dtype)
    assert_same_outputs(model, optimized, feeds)


def test_cast_pair_to_another_type_stays():
    model = parse("""
    g (float[2,3] x) => (int32[2,3] y) {
      w = Cast<to = 11>(x)
      y = Cast<to = 6>(w)
    }""")
    optimized, result = fuse(model)
    assert result.stats["noop_cast_pair"] == 0


def test_conv_mul_with_a_shared_weight_stays():
    # Folding the scale into a weight another Conv also reads would store a second copy of it.
    model = conv_affine_model("Mul")
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["c2"], pads=[1, 1, 1, 1]))
    model.graph.output.append(symbolic("c2", TensorProto.FLOAT, 4))
    optimized, result = fuse(model)
    assert result.stats["conv_mul"] == 0
    assert op_counts(optimized) == {"Conv": 2, "Mul": 1}


CAST_TYPES = ["FLOAT16", "FLOAT", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64",
              "BOOL"]


def _extremes(dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return np.array([True, False, True, False], dtype)
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    values = [info.min, info.max, 0, 1]
    if dtype.kind == "f":
        values += [info.tiny, -info.eps, np.nan, np.inf, 1 / 3]
    else:
        values += [info.max - 1, info.min + 1, info.max // 3]
    return np.array(values, dtype)


@pytest.mark.parametrize("source", CAST_TYPES)
def test_removed_cast_round_trips_are_bit_exact_in_onnxruntime(source):
    # One model per source type holding a round trip through every other type: each one fuse removes
    # must give back exactly the input, extreme values included; the others must stay.
    elem = getattr(TensorProto, source)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    nodes, outputs = [], []
    for wider in CAST_TYPES:
        if wider == source:
            continue
        nodes += [helper.make_node("Cast", ["x"], [f"to_{wider}"], to=getattr(TensorProto, wider)),
                  helper.make_node("Cast", [f"to_{wider}"], [f"back_{wider}"], to=elem)]
        outputs.append(value(f"back_{wider}", elem, [len(_extremes(dtype))]))
    model = make_model(nodes, [value("x", elem, [len(_extremes(dtype))])], outputs)
    optimized, result = fuse(model)
    feeds = {"x": _extremes(dtype)}
    kept = {n.output[0] for n in optimized.graph.node if n.op_type == "Cast"}
    assert len(kept) == 2 * (len(outputs) - result.stats["noop_cast_pair"])
    for output, got in zip(outputs, run(optimized, feeds)):
        if f"to_{output.name[5:]}" not in kept:
            np.testing.assert_array_equal(got, feeds["x"], err_msg=output.name)
            assert got.dtype == dtype
    assert result.stats["noop_cast_pair"] >= (1 if source not in ("INT64", "UINT64", "DOUBLE") else 0)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["Mul", "Add"]), st.integers(0, 5).flatmap(
    lambda rank: st.lists(st.booleans(), min_size=rank, max_size=rank)), st.booleans())
def test_conv_affine_by_any_broadcastable_constant_is_exact(op_type, keep_axes, swap):
    # The constant's axes line up with the Conv output [1, 4, 6, 4] from the right; each axis is either
    # 1 or the output's size (axes beyond rank 4 are 1 or 2, raising the rank).
    out_shape = [1, 4, 6, 4]
    const_shape = []
    for position, keep in enumerate(keep_axes):
        axis = 4 - len(keep_axes) + position
        const_shape.append((out_shape[axis] if axis >= 0 else 2) if keep else 1)
    result_shape = list(np.broadcast_shapes(tuple(out_shape), tuple(const_shape)))
    model = conv_affine_model(op_type, tuple(const_shape), swap=swap, width=4, out_rank=len(result_shape))
    optimized, result = fuse(model)
    per_channel = len(const_shape) <= 4 and all(
        size == 1 for position, size in enumerate(const_shape) if 4 - len(const_shape) + position != 1)
    assert result.stats["conv_mul" if op_type == "Mul" else "conv_add"] == int(per_channel)
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-4)
