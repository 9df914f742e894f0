"""Tests of ``fuse``'s folds of per-channel constants into ConvTranspose, BatchNormalization, Gemm and MatMul.

Conv's own folds (``conv_batchnorm``, ``conv_mul``, ``conv_add``) and ``matmul_add_to_gemm`` are tested in
``test_fuse.py``; they live in the same module, ``passes/fusions/affine.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, make_model, op_counts, tensor, value
from onnx import TensorProto, helper
from test_fuse import assert_unchanged, fuse, symbolic

from onnxopt.passes.fusions.affine import scale_output_channels


def attrs_of(model: onnx.ModelProto, op_type: str) -> dict:
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------------------
# ConvTranspose + BatchNormalization / per-channel Mul / Add


def conv_transpose_model(after="BatchNormalization", spatial=(4, 4), channels_in=4, channels_out=6, group=1,
                         bias=True, const_shape=None, dtype=np.float32, conv_attrs=None, params_as_inputs=(),
                         weight_used_elsewhere=False, conv_used_elsewhere=False, out_rank=None, seed=0):
    """x -> ConvTranspose(w, b) -> BatchNormalization, Mul or Add by a constant -> y.

    The weight is ``[C_in, C_out / group, 3, ...]``; with 4 input and 6 output channels a fold that took
    the weight's first axis for the output channels fails on shapes, and with groups on values.
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = rng.standard_normal((channels_in, channels_out // group, *(3,) * len(spatial))).astype(dtype)
    inits = [tensor("w", weight)]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(tensor("b", rng.standard_normal(channels_out).astype(dtype)))
        conv_inputs.append("b")
    inputs = [value("x", elem, [2, channels_in, *spatial])]
    nodes = [helper.make_node("ConvTranspose", conv_inputs, ["c"], name="deconv", group=group, **(conv_attrs or {}))]
    if after == "BatchNormalization":
        params = {"scale": rng.uniform(0.5, 2.0, channels_out), "offset": rng.standard_normal(channels_out),
                  "mean": rng.standard_normal(channels_out), "var": rng.uniform(0.1, 2.0, channels_out)}
        for name, values in params.items():
            if name in params_as_inputs:
                inputs.append(value(name, elem, [channels_out]))
            else:
                inits.append(tensor(name, values.astype(dtype)))
        nodes.append(helper.make_node("BatchNormalization", ["c", *params], ["y"], name="bn", epsilon=1e-3))
    else:
        shape = const_shape if const_shape is not None else (channels_out, 1, 1)
        inits.append(tensor("s", rng.uniform(0.5, 2.0, shape).astype(dtype)))
        nodes.append(helper.make_node(after, ["c", "s"], ["y"], name="affine"))
    outputs = [symbolic("y", elem, out_rank or 2 + len(spatial))]
    if conv_used_elsewhere:
        outputs.append(symbolic("c", elem, 2 + len(spatial)))
    if weight_used_elsewhere:
        nodes.append(helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
        outputs.append(value("w_sum", elem, []))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("spatial", [(5,), (4, 4)], ids=["1d", "2d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("channels_in,channels_out,group", [(4, 6, 1), (4, 6, 2), (4, 4, 4), (6, 4, 2)],
                         ids=["dense", "grouped", "depthwise", "grouped-narrowing"])
def test_conv_transpose_batchnorm_folds_into_the_weights(spatial, bias, channels_in, channels_out, group):
    model = conv_transpose_model(spatial=spatial, channels_in=channels_in, channels_out=channels_out, group=group,
                                 bias=bias)
    optimized, result = fuse(model)
    assert result.stats["conv_transpose_batchnorm"] == 1
    assert op_counts(optimized) == {"ConvTranspose": 1}
    node = optimized.graph.node[0]
    assert list(node.output) == ["y"] and len(node.input) == 3
    assert attrs_of(optimized, "ConvTranspose")["group"] == group
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-5)


def test_conv_transpose_batchnorm_with_strides_and_output_padding():
    # Stride 2 with a 1x1 kernel leaves every other output position to the bias alone: the folded bias
    # must be the normalized one there too.
    model = conv_transpose_model(conv_attrs={"strides": [2, 2], "output_padding": [1, 1], "pads": [0, 1, 1, 0]},
                                 group=2)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"ConvTranspose": 1}
    assert attrs_of(optimized, "ConvTranspose")["output_padding"] == [1, 1]
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-5)


def test_conv_transpose_batchnorm_float16():
    model = conv_transpose_model(dtype=np.float16, group=2)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"ConvTranspose": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(model, optimized, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["runtime-parameter", "conv-output-used", "runtime-weight"])
def test_conv_transpose_batchnorm_that_cannot_fold_stays(case):
    model = conv_transpose_model(params_as_inputs=("var",) if case == "runtime-parameter" else (),
                                 conv_used_elsewhere=case == "conv-output-used")
    if case == "runtime-weight":
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
        model.graph.input.append(value("w", TensorProto.FLOAT, [4, 6, 3, 3]))
    if case == "runtime-parameter":
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32),
                 "var": np.full(6, 0.5, np.float32)}
        optimized, result = fuse(model)
        assert not result.modified
        assert_same_outputs(model, optimized, feeds)
    else:
        assert_unchanged(model)


def test_scale_output_channels_of_a_grouped_transposed_weight():
    # Output channel o = g * (C_out / group) + j lives in w[c, j] for the input channels c of group g.
    weight = np.random.default_rng(2).standard_normal((6, 2, 3))  # C_in 6, 3 groups, C_out 6
    factor = np.arange(1.0, 7.0)
    scaled = scale_output_channels(weight, factor, group=3, transposed=True)
    for c in range(6):
        for j in range(2):
            output_channel = (c // 2) * 2 + j
            np.testing.assert_array_equal(scaled[c, j], weight[c, j] * factor[output_channel])


@pytest.mark.parametrize("op_type", ["Mul", "Add"])
@pytest.mark.parametrize("const_shape", [(6, 1, 1), (1, 6, 1, 1), (), (1,)], ids=["C11", "1C11", "scalar", "1"])
@pytest.mark.parametrize("group", [1, 2], ids=["dense", "grouped"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_transpose_per_channel_affine_folds(op_type, const_shape, group, bias):
    model = conv_transpose_model(op_type, const_shape=const_shape, group=group, bias=bias)
    optimized, result = fuse(model)
    rule = "conv_transpose_mul" if op_type == "Mul" else "conv_transpose_add"
    assert result.stats[rule] == 1
    assert op_counts(optimized) == {"ConvTranspose": 1}
    weight = optimized.graph.node[0].input[1]
    assert (weight == "w") == (op_type == "Add")  # an Add leaves the weight as it is
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-5)


def test_conv_transpose_batchnorm_mul_add_chain_becomes_one_conv_transpose():
    model = conv_transpose_model(group=2)
    model.graph.output[0].name = "z"
    model.graph.node.extend([helper.make_node("Mul", ["s", "y"], ["m"]), helper.make_node("Add", ["m", "t"], ["z"])])
    model.graph.initializer.extend([tensor("s", np.linspace(0.5, 2, 6, dtype=np.float32).reshape(6, 1, 1)),
                                    tensor("t", np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1))])
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"ConvTranspose": 1}
    assert [result.stats[k] for k in ("conv_transpose_batchnorm", "conv_transpose_mul", "conv_transpose_add")] == [1, 1, 1]
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op_type", ["Mul", "Add"])
@pytest.mark.parametrize("case", ["last-axis", "rows", "higher-rank", "conv-output-used"])
def test_conv_transpose_affine_that_is_not_per_channel_stays(op_type, case):
    # The ConvTranspose output is [2, 6, 6, 6]: [6] scales columns, [6, 1] rows, [1, 1, 6, 1, 1] adds an axis.
    shapes = {"last-axis": (6,), "rows": (6, 1), "higher-rank": (1, 1, 6, 1, 1), "conv-output-used": (6, 1, 1)}
    model = conv_transpose_model(op_type, const_shape=shapes[case], conv_used_elsewhere=case == "conv-output-used",
                                 out_rank=len(shapes[case]) if case == "higher-rank" else None)
    assert_unchanged(model)


def test_conv_transpose_mul_leaves_a_shared_weight_but_add_folds():
    assert_unchanged(conv_transpose_model("Mul", weight_used_elsewhere=True))
    model = conv_transpose_model("Add", weight_used_elsewhere=True)
    optimized, result = fuse(model)
    assert result.stats["conv_transpose_add"] == 1
    assert_same_outputs(model, optimized, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# BatchNormalization + per-channel Mul / Add (Caffe's BatchNorm + Scale)


def batchnorm_model(steps=(("Mul", (4, 1, 1)), ("Add", (4, 1, 1))), rank=4, channels=4, training_mode=0,
                    scale_as_input=False, dtype=np.float32, opset=17, known_rank=True, output_shape=None, seed=0):
    """x -> BatchNormalization -> one Mul or Add by a constant per step -> y."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    params = {"scale": rng.uniform(0.5, 2.0, channels), "offset": rng.standard_normal(channels),
              "mean": rng.standard_normal(channels), "var": rng.uniform(0.1, 2.0, channels)}
    shape = [2, channels, *(3,) * (rank - 2)]
    inputs = [value("x", elem, shape)]
    nodes = []
    if not known_rank:  # a Reshape to a run-time shape of unknown length hides the rank
        inputs = [value("flat", elem, [int(np.prod(shape))]), value("dims", TensorProto.INT64, ["k"])]
        nodes.append(helper.make_node("Reshape", ["flat", "dims"], ["x"]))
    inits = []
    for name, values in params.items():
        if name == "scale" and scale_as_input:
            inputs.append(value(name, elem, [channels]))
        else:
            inits.append(tensor(name, values.astype(dtype)))
    attrs, statistics = ({"training_mode": 1}, ["running_mean", "running_var"]) if training_mode else ({}, [])
    nodes.append(helper.make_node("BatchNormalization", ["x", *params], ["n0", *statistics], name="bn", epsilon=1e-3,
                                  **attrs))
    for index, (op_type, const_shape) in enumerate(steps):
        constant = rng.uniform(-2.0, 2.0, const_shape).astype(dtype)
        inits.append(tensor(f"s{index}", constant))
        nodes.append(helper.make_node(op_type, [f"n{index}", f"s{index}"], [f"n{index + 1}"], name=f"affine{index}"))
    nodes.append(helper.make_node("Identity", [f"n{len(steps)}"], ["y"]))
    return make_model(nodes, inputs, [value("y", elem, output_shape or shape)], inits, opset=opset)


@pytest.mark.parametrize("steps", [
    (("Mul", (4, 1, 1)), ("Add", (4, 1, 1))),
    (("Mul", (1, 4, 1, 1)),),
    (("Add", ()),),
    (("Mul", (1,)), ("Mul", (4, 1, 1)), ("Add", (1, 4, 1, 1))),
], ids=["caffe-scale", "mul-1C11", "add-scalar", "three"])
def test_batchnorm_absorbs_per_channel_mul_and_add(steps):
    model = batchnorm_model(steps)
    optimized, result = fuse(model)
    for op_type in ("Mul", "Add"):
        applied = sum(step[0] == op_type for step in steps)
        assert result.stats.get(f"batchnorm_{op_type.lower()}", 0) == applied
    assert op_counts(optimized) == {"BatchNormalization": 1, "Identity": 1}
    assert attrs_of(optimized, "BatchNormalization")["epsilon"] == pytest.approx(1e-3)
    assert_same_outputs(model, optimized, rtol=1e-5, atol=1e-5)


def test_batchnorm_absorbs_a_scale_on_a_3d_input_and_in_float16():
    model = batchnorm_model(rank=3, steps=(("Mul", (4, 1)), ("Add", (4, 1))), dtype=np.float16)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"BatchNormalization": 1, "Identity": 1}
    assert_same_outputs(model, optimized, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["spatial-constant", "rank-raising", "training", "runtime-scale", "unknown-rank",
                                  "not-finite"])
def test_batchnorm_affine_that_cannot_fold_stays(case):
    steps = {"spatial-constant": (("Mul", (4, 3, 3)),), "rank-raising": (("Add", (1, 1, 4, 1, 1)),)}.get(
        case, (("Mul", (4, 1, 1)),))
    model = batchnorm_model(steps, training_mode=case == "training", scale_as_input=case == "runtime-scale",
                            known_rank=case != "unknown-rank", opset=15,
                            output_shape=[1, 2, 4, 3, 3] if case == "rank-raising" else None)
    if case == "not-finite":
        model.graph.initializer[-1].CopyFrom(tensor("s0", np.full((4, 1, 1), np.inf, np.float32)))
    if case == "training":
        optimized, result = fuse(model)
        assert not result.stats.get("batchnorm_mul")
        return
    optimized, result = fuse(model)
    assert not result.stats.get("batchnorm_mul") and not result.stats.get("batchnorm_add")
    feeds = None
    if case == "runtime-scale":
        rng = np.random.default_rng(1)
        feeds = {"x": rng.standard_normal((2, 4, 3, 3)).astype(np.float32),
                 "scale": rng.uniform(0.5, 2.0, 4).astype(np.float32)}
    elif case == "unknown-rank":
        feeds = {"flat": np.random.default_rng(1).standard_normal(72).astype(np.float32),
                 "dims": np.array([2, 4, 3, 3], np.int64)}
    assert_same_outputs(model, optimized, feeds)


# ---------------------------------------------------------------------------------------------------
# Gemm + per-column Mul / Add


def gemm_model(op_type="Mul", s_shape=(5,), c_shape=(5,), trans_b=0, alpha=1.5, beta=0.5, rows=3, s_first=False,
               runtime=(), gemm_used_elsewhere=False, b_used_elsewhere=False, s_values=None, opset=13):
    """a [rows, 4] -> Gemm(a, B, C; alpha, beta, transB) -> Mul or Add by s -> y; ``runtime`` names inputs fed at run time."""
    rng = np.random.default_rng(3)
    k, n = 4, 5
    arrays = {"B": rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)}
    if c_shape is not None:
        arrays["C"] = rng.standard_normal(c_shape).astype(np.float32)
    arrays["s"] = s_values if s_values is not None else rng.uniform(0.5, 2.0, s_shape).astype(np.float32)
    inputs, inits = [value("a", TensorProto.FLOAT, [rows, k])], []
    for name, array in arrays.items():
        if name in runtime:
            inputs.append(value(name, TensorProto.FLOAT, list(array.shape)))
        else:
            inits.append(tensor(name, array))
    gemm_inputs = ["a", "B"] + (["C"] if c_shape is not None else [])
    nodes = [helper.make_node("Gemm", gemm_inputs, ["g"], name="gemm", alpha=alpha, beta=beta, transB=trans_b),
             helper.make_node(op_type, ["s", "g"] if s_first else ["g", "s"], ["y"], name="affine")]
    outputs = [symbolic("y", TensorProto.FLOAT, max(2, len(arrays["s"].shape)))]
    if gemm_used_elsewhere:
        outputs.append(symbolic("g", TensorProto.FLOAT, 2))
    if b_used_elsewhere:
        nodes.append(helper.make_node("ReduceSum", ["B"], ["b_sum"], keepdims=0))
        outputs.append(value("b_sum", TensorProto.FLOAT, []))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def runtime_feeds(model: onnx.ModelProto, seed: int = 4) -> dict[str, np.ndarray]:
    """Random feeds with every symbolic dimension 3 (the rows of a, or what a runtime C needs)."""
    rng = np.random.default_rng(seed)
    return {vi.name: rng.standard_normal([d.dim_value or 3 for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
            for vi in model.graph.input}


@pytest.mark.parametrize("s_shape", [(5,), (1, 5), (), (1,), (1, 1)], ids=["N", "1xN", "scalar", "1", "1x1"])
@pytest.mark.parametrize("trans_b", [0, 1], ids=["B", "B^T"])
@pytest.mark.parametrize("s_first", [False, True], ids=["gemm*s", "s*gemm"])
def test_gemm_times_per_column_constant_folds_into_b_and_c(s_shape, trans_b, s_first):
    model = gemm_model("Mul", s_shape=s_shape, trans_b=trans_b, s_first=s_first)
    optimized, result = fuse(model)
    assert result.stats["gemm_mul"] == 1
    assert op_counts(optimized) == {"Gemm": 1}
    attrs = attrs_of(optimized, "Gemm")
    assert (attrs["alpha"], attrs["beta"], attrs["transB"]) == (1.5, 0.5, trans_b)
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5), (3, 1), ()], ids=["noC", "N", "1xN", "MxN", "Mx1", "scalar"])
@pytest.mark.parametrize("op_type", ["Mul", "Add"])
def test_gemm_affine_folds_whatever_c_is(c_shape, op_type):
    model = gemm_model(op_type, c_shape=c_shape, trans_b=1)
    optimized, result = fuse(model)
    assert result.stats["gemm_mul" if op_type == "Mul" else "gemm_add"] == 1
    assert op_counts(optimized) == {"Gemm": 1}
    if op_type == "Add":
        assert attrs_of(optimized, "Gemm")["beta"] == 1.0  # beta * C + s is the new C
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("s_shape", [(5,), (1, 5), (), (3, 5), (3, 1)], ids=["N", "1xN", "scalar", "MxN", "Mx1"])
@pytest.mark.parametrize("s_first", [False, True], ids=["gemm+s", "s+gemm"])
def test_gemm_plus_constant_that_broadcasts_one_way_folds_into_c(s_shape, s_first):
    model = gemm_model("Add", s_shape=s_shape, s_first=s_first)
    optimized, result = fuse(model)
    assert result.stats["gemm_add"] == 1
    assert op_counts(optimized) == {"Gemm": 1}
    assert_same_outputs(model, optimized)


def test_gemm_add_with_a_runtime_b_folds_and_symbolic_rows_take_a_row_constant():
    model = gemm_model("Add", rows="M", runtime=("B",))
    optimized, result = fuse(model)
    assert result.stats["gemm_add"] == 1
    assert_same_outputs(model, optimized, runtime_feeds(model))


def test_gemm_affine_golden():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 2] a) => (float[2, 2] y)
          <float[2, 2] B = {1., 2., 3., 4.}, float[2] C = {1., 1.}, float[2] s = {10., 100.}, float[2] t = {5., 6.}> {
            g = Gemm <transB = 1, beta = 2.0> (a, B, C)
            m = Mul(g, s)
            y = Add(t, m)
        }""")
    optimized, result = fuse(model)
    assert (result.stats["gemm_mul"], result.stats["gemm_add"]) == (1, 1)
    (gemm,) = optimized.graph.node
    values = {t.name: onnx.numpy_helper.to_array(t) for t in optimized.graph.initializer}
    # transB: row n of B is column n of op(B). New C: beta * (C * s) + t, beta then 1.
    np.testing.assert_array_equal(values[gemm.input[1]], [[10.0, 20.0], [300.0, 400.0]])
    np.testing.assert_array_equal(values[gemm.input[2]], [25.0, 206.0])
    assert attrs_of(optimized, "Gemm") == {"transB": 1, "beta": 1.0}
    assert_same_outputs(model, optimized, {"a": np.array([[1, -2], [0.5, 3]], np.float32)})


@pytest.mark.parametrize("case", ["per-row", "full", "higher-rank", "runtime-c", "runtime-b", "shared-b", "runtime-s",
                                  "infinite", "gemm-output-used"])
def test_gemm_mul_that_cannot_fold_stays(case):
    kwargs = {"per-row": {"s_shape": (3, 1)}, "full": {"s_shape": (3, 5)}, "higher-rank": {"s_shape": (1, 1, 5)},
              "runtime-c": {"runtime": ("C",)}, "runtime-b": {"runtime": ("B",)}, "shared-b": {"b_used_elsewhere": True},
              "runtime-s": {"runtime": ("s",)}, "gemm-output-used": {"gemm_used_elsewhere": True},
              "infinite": {"s_values": np.array([1, 2, np.inf, 1, 1], np.float32)}}[case]
    model = gemm_model("Mul", **kwargs)
    optimized, result = fuse(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == {"Gemm": 1, "Mul": 1, **({"ReduceSum": 1} if case == "shared-b" else {})}
    assert_same_outputs(model, optimized, runtime_feeds(model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["rows-unknown", "both-ways", "higher-rank", "runtime-c", "runtime-s"])
def test_gemm_add_that_cannot_fold_stays(case):
    # With M unknown, Add([M, N], [3, 1]) may grow the result (M = 1), which Gemm's C may not.
    kwargs = {"rows-unknown": {"s_shape": (3, 1), "rows": "M"}, "both-ways": {"s_shape": (3, 5), "rows": "M"},
              "higher-rank": {"s_shape": (1, 1, 5)}, "runtime-c": {"runtime": ("C",)},
              "runtime-s": {"runtime": ("s",)}}[case]
    model = gemm_model("Add", **kwargs)
    optimized, result = fuse(model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == {"Gemm": 1, "Add": 1}
    assert_same_outputs(model, optimized, runtime_feeds(model))
    if case in ("rows-unknown", "both-ways"):
        one_row = {"a": np.ones((1, 4), np.float32)}
        assert_same_outputs(model, optimized, one_row)


def test_gemm_affine_before_opset_7_stays():
    nodes = [helper.make_node("Gemm", ["a", "B", "C"], ["g"], broadcast=1),
             helper.make_node("Mul", ["g", "s"], ["y"], broadcast=1, axis=0)]
    model = make_model(nodes, [value("a", TensorProto.FLOAT, [3, 3])], [value("y", TensorProto.FLOAT, [3, 3])],
                       [tensor("B", np.ones((3, 3), np.float32)), tensor("C", np.ones(3, np.float32)),
                        tensor("s", np.arange(3, dtype=np.float32))], opset=6, ir_version=4)
    optimized, result = fuse(model)
    assert not result.modified  # Mul-6 with axis=0 scales rows, not columns
    assert op_counts(optimized) == {"Gemm": 1, "Mul": 1}


# ---------------------------------------------------------------------------------------------------
# MatMul by a constant matrix + per-column Mul


def matmul_mul_model(a_shape=(3, 4), s_shape=(5,), dtype=np.float32, runtime_w=False, w_used_elsewhere=False,
                     add_bias=False, out_rank=None):
    rng = np.random.default_rng(6)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [value("a", elem, list(a_shape))]
    inits = [tensor("s", rng.uniform(0.5, 2.0, s_shape).astype(dtype))]
    weight = rng.standard_normal((4, 5)).astype(dtype)
    if runtime_w:
        inputs.append(value("w", elem, [4, 5]))
    else:
        inits.append(tensor("w", weight))
    nodes = [helper.make_node("MatMul", ["a", "w"], ["mm"], name="mm"),
             helper.make_node("Mul", ["mm", "s"], ["scaled"], name="scale")]
    result = "scaled"
    if add_bias:
        inits.append(tensor("bias", rng.standard_normal(5).astype(dtype)))
        nodes.append(helper.make_node("Add", ["scaled", "bias"], ["y"]))
        result = "y"
    else:
        nodes[-1].output[0] = result = "y"
    rank = out_rank if out_rank is not None else max(len(a_shape), len(s_shape), 1)
    outputs = [symbolic(result, elem, rank)]
    if w_used_elsewhere:
        nodes.append(helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
        outputs.append(value("w_sum", elem, []))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("a_shape,s_shape", [
    ((3, 4), (5,)), ((3, 4), (1, 5)), ((3, 4), ()), ((3, 4), (1, 1)), ((2, 3, 4), (5,)), ((2, 3, 4), (1, 1, 5)),
    ((2, 3, 4), (1, 5)), ((4,), (5,)), ((4,), ()), (("B", "S", 4), (5,)),
], ids=["2d-N", "2d-1xN", "2d-scalar", "2d-1x1", "3d-N", "3d-11N", "3d-1N", "1d-N", "1d-scalar", "symbolic-N"])
def test_matmul_times_per_column_constant_folds_into_the_weight(a_shape, s_shape):
    model = matmul_mul_model(a_shape, s_shape)
    optimized, result = fuse(model)
    assert result.stats["matmul_mul"] == 1
    assert op_counts(optimized) == {"MatMul": 1}
    assert optimized.graph.node[0].input[0] == "a" and optimized.graph.node[0].output[0] == "y"
    assert_same_outputs(model, optimized, runtime_feeds(model))


def test_matmul_mul_add_on_a_matrix_becomes_one_gemm():
    model = matmul_mul_model(add_bias=True)
    optimized, result = fuse(model)
    assert (result.stats["matmul_mul"], result.stats["matmul_add_to_gemm"]) == (1, 1)
    assert op_counts(optimized) == {"Gemm": 1}
    assert_same_outputs(model, optimized)


def test_matmul_mul_add_on_3d_input_keeps_matmul_and_add():
    model = matmul_mul_model(a_shape=(2, 3, 4), add_bias=True)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"MatMul": 1, "Add": 1}
    assert_same_outputs(model, optimized)


def test_matmul_mul_float16():
    model = matmul_mul_model(a_shape=(2, 3, 4), dtype=np.float16)
    optimized, result = fuse(model)
    assert result.stats["matmul_mul"] == 1
    assert_same_outputs(model, optimized, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["per-row", "higher-rank", "runtime-w", "shared-w", "int32"])
def test_matmul_mul_that_cannot_fold_stays(case):
    kwargs = {"per-row": {"s_shape": (3, 1)}, "higher-rank": {"a_shape": (2, 3, 4), "s_shape": (1, 1, 1, 5)},
              "runtime-w": {"runtime_w": True}, "shared-w": {"w_used_elsewhere": True}, "int32": {"dtype": np.int32}}[case]
    model = matmul_mul_model(**kwargs)
    optimized, result = fuse(model)
    assert not result.modified, result.stats
    assert_same_outputs(model, optimized, runtime_feeds(model) if case != "int32" else None)


def test_matmul_mul_with_unknown_input_rank_folds_only_a_vector():
    # a's rank is known only at run time: [1, N] would raise a 1-D result to 2-D, [N] never raises it.
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[L] x, int64[R] shape) => (float y) <float[4, 5] w = {%s}, float%s s = {1., 2., 3., 4., 5.}> {
            a = Reshape(x, shape)
            mm = MatMul(a, w)
            y = Mul(mm, s)
        }"""
    weights = ", ".join(str(float(i)) for i in range(20))
    for s_shape, fires in (("[1, 5]", False), ("[5]", True)):
        model = onnx.parser.parse_model(text % (weights, s_shape))
        optimized, result = fuse(model)
        assert result.modified == fires
        for shape in ([3, 4], [4]):
            feeds = {"x": np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32), "shape": np.array(shape)}
            assert_same_outputs(model, optimized, feeds)


def matmul_bias_mul_model(a_shape=(1, 3, 3, 4), s_shape=(5,), bias_shape=(5,), runtime_bias=False,
                          add_read_elsewhere=False):
    """ConvNeXt's block end: a channels-last Linear, then the layer scale."""
    rng = np.random.default_rng(7)
    inputs = [value("a", TensorProto.FLOAT, list(a_shape))]
    inits = [tensor("w", rng.standard_normal((4, 5)).astype(np.float32)),
             tensor("s", rng.uniform(0.5, 2.0, s_shape).astype(np.float32))]
    if runtime_bias:
        inputs.append(value("b", TensorProto.FLOAT, list(bias_shape)))
    else:
        inits.append(tensor("b", rng.standard_normal(bias_shape).astype(np.float32)))
    nodes = [helper.make_node("MatMul", ["a", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["b", "mm"], ["biased"], name="bias"),
             helper.make_node("Mul", ["biased", "s"], ["y"], name="scale")]
    rank = max(len(a_shape), len(bias_shape), len(s_shape))
    outputs = [symbolic("y", TensorProto.FLOAT, rank)]
    if add_read_elsewhere:
        nodes.append(helper.make_node("Relu", ["biased"], ["r"]))
        outputs.append(symbolic("r", TensorProto.FLOAT, rank))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("a_shape,s_shape,bias_shape", [
    ((1, 3, 3, 4), (5,), (5,)), ((2, 3, 4), (1, 5), (5,)), ((2, 3, 4), (), (1, 5)), (("B", "S", 4), (5,), (5,)),
], ids=["convnext", "3d-1xN", "scalar-scale", "symbolic"])  # 2-D inputs become Gemm + gemm_mul instead
def test_matmul_plus_bias_times_per_column_constant_folds(a_shape, s_shape, bias_shape):
    model = matmul_bias_mul_model(a_shape, s_shape, bias_shape)
    optimized, result = fuse(model)
    assert result.stats["matmul_bias_mul"] == 1
    assert "Mul" not in op_counts(optimized)
    assert_same_outputs(model, optimized, runtime_feeds(model))


@pytest.mark.parametrize("case", ["per-row-scale", "runtime-bias", "sum-read-elsewhere", "bias-raises-rank"])
def test_matmul_plus_bias_times_constant_that_cannot_fold_stays(case):
    kwargs = {"per-row-scale": {"a_shape": (3, 4), "s_shape": (3, 1)}, "runtime-bias": {"runtime_bias": True},
              "sum-read-elsewhere": {"add_read_elsewhere": True},
              "bias-raises-rank": {"a_shape": (3, 4), "bias_shape": (1, 1, 5)}}[case]
    model = matmul_bias_mul_model(**kwargs)
    optimized, result = fuse(model)
    assert result.stats["matmul_bias_mul"] == 0
    assert op_counts(optimized)["Mul"] == 1
    assert_same_outputs(model, optimized, runtime_feeds(model))


def test_constant_matrix_on_the_left_of_matmul_stays():
    # W @ a scaled per column scales a's columns, not W's.
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 5] a) => (float[3, 5] y) <float[3, 4] w = {1.,2.,3.,4.,5.,6.,7.,8.,9.,10.,11.,12.}, float[5] s = {1.,2.,3.,4.,5.}> {
            mm = MatMul(w, a)
            y = Mul(mm, s)
        }""")
    assert_unchanged(model)
