"""Regression tests for the bugs the differential fuzzer (``test_differential.py``) found.

One test per bug, each on the smallest graph that shows it, built with ``onnx.helper``. A bug that is
not fixed yet carries ``xfail(strict=True)``: the suite stays green, and the test turns into a failure
(XPASS) the day the bug is fixed, so that whoever fixed it removes the mark. ``test_differential.py``
recognizes these bugs (``KNOWN_BUGS``) so that it keeps looking for new ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, run, tensor, value
from onnx import TensorProto, helper

import onnxopt

OPSET = 18


def known_bug(reason: str):
    """xfail, strict, and only for what the bug does (a wrong result or an onnxopt error): a test that
    breaks for another reason (the original model does not run, say) fails for real."""
    return pytest.mark.xfail(strict=True, raises=(AssertionError, onnxopt.OnnxoptError), reason=reason)


def expect(condition: bool, message: str) -> None:
    """A precondition of a regression test: its failure is no sign of the bug, so it is no AssertionError."""
    if not condition:
        pytest.fail(f"precondition: {message}", pytrace=False)


def model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    return make_model(nodes, inputs, outputs, initializers, opset=OPSET, ir_version=8)


def assert_equivalent(original: onnx.ModelProto, passes: str, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``passes`` run without error, the result passes the full check and computes the same outputs."""
    optimized = onnxopt.optimize(original, passes=passes, verify=False)
    onnx.checker.check_model(optimized, full_check=True)
    expected = run(original, feeds)
    try:
        computed = run(optimized, feeds)
    except Exception as error:  # a result onnxruntime refuses is the bug, not a failure of the test
        raise AssertionError(f"onnxruntime refuses the optimized model: {error}") from error
    for want, got in zip(expected, computed):
        assert want.dtype == got.dtype and want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return optimized


def test_split_num_outputs_uneven_chunks_keep_their_shapes():
    """Split-18 with ``num_outputs`` cuts ceil(8/3) = 3 elements per chunk: [3, 3, 2].

    onnxruntime's symbolic shape inference gives every chunk 8 // 3 = 2 elements. When ``infer_shapes``
    took its word, ``fold`` folded ``Shape(a)`` to [2] (with ``dce`` after it the wrong constant was the
    whole model: a silent miscompile), and alone it wrote value_info that onnx.checker rejects.
    """
    original = model(
        [helper.make_node("Split", ["x"], ["a", "b", "c"], num_outputs=3), helper.make_node("Shape", ["a"], ["s"])],
        [value("x", TensorProto.FLOAT, [8])],
        [value("s", TensorProto.INT64, [1])],
    )
    feeds = {"x": np.arange(8, dtype=np.float32)}
    assert_equivalent(original, "fold", feeds)
    assert_equivalent(original, "fold,dce", feeds)


@pytest.mark.parametrize(
    ("start", "end", "step", "length"),
    [
        (1, -5, -1, 2),  # an end below -dim with a negative step: "before the first element"
        (1, np.iinfo(np.int64).min, -1, 2),  # the same, as exporters write it
        (3, 1, 1, 0),  # an end before the start: nothing
    ],
)
def test_slice_length_from_shape_inference_is_clamped(start, end, step, length):
    """``Slice(x[4], starts=[start], ends=[end], steps=[step])`` has ``length`` elements.

    onnxruntime's symbolic shape inference computes the length without clamping the end as the
    specification says (-2, 1 and -2 elements for these cases); when ``infer_shapes`` took its word,
    ``fold`` wrote it into the value_info of ``y``, and the result failed onnx.checker's full check
    ("Inferred shape and existing shape differ").
    """
    original = model(
        [
            helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
            helper.make_node("Shape", ["y"], ["n"]),
        ],
        [value("x", TensorProto.FLOAT, [4])],
        [value("n", TensorProto.INT64, [1])],
        [
            tensor("starts", np.array([start], np.int64)),
            tensor("ends", np.array([end], np.int64)),
            tensor("axes", np.array([0], np.int64)),
            tensor("steps", np.array([step], np.int64)),
        ],
    )
    feeds = {"x": np.arange(4, dtype=np.float32)}
    expect(run(original, feeds)[0].tolist() == [length], f"the original computes [{length}]")
    assert_equivalent(original, "fold", feeds)


def test_unsqueeze_of_a_scalar_by_two_axes_keeps_rank_two():
    """``Unsqueeze(b, axes=[0, 1])`` of a scalar constant ``b`` is ``int64[1, 1]``.

    ``fold_shapes`` carries small integer tensors as partial values and turns a scalar into a 1-D
    value on any Unsqueeze, whatever the number of axes: ``y`` becomes ``int64[1]``, so ``Shape(y)``
    folds to ``[1]`` (a silent miscompile); with ``y`` itself an output declared rank 2, the result
    fails onnx.checker.
    """
    original = model(
        [helper.make_node("Unsqueeze", ["b", "axes"], ["y"]), helper.make_node("Shape", ["y"], ["s"])],
        [value("x", TensorProto.FLOAT, [2])],
        [value("s", TensorProto.INT64, [None])],
        [tensor("b", np.array(0, np.int64)), tensor("axes", np.array([0, 1], np.int64))],
    )
    assert_equivalent(original, "fold", {"x": np.zeros(2, np.float32)})


def if_model(
    then_nodes, else_nodes, then_out, else_out, out_shape, else_initializers=(), initializers=()
) -> onnx.ModelProto:
    """``y = If(c)`` over ``x: float[2]``, with the given branch bodies; ``y`` is float."""
    then_branch = helper.make_graph(then_nodes, "then", [], [value(then_out, TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        else_nodes, "else", [], [value(else_out, TensorProto.FLOAT, None)], list(else_initializers)
    )
    return model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [value("x", TensorProto.FLOAT, [2]), value("c", TensorProto.BOOL, [])],
        [value("y", TensorProto.FLOAT, out_shape)],
        initializers,
    )


@pytest.mark.parametrize(
    ("defined_by", "passes"),
    [
        ("initializer", "fold"),
        ("initializer", "cse"),
        ("initializer", "fuse"),
        ("initializer", "dce"),
        ("constant_node", "fold"),
        ("foldable_node", "fold"),
    ],
)
def test_branch_constant_named_like_a_value_of_the_other_branch(defined_by, passes):
    """The else branch has a constant ``t``; the then branch computes a value also named ``t``.

    Sibling branches are separate scopes, so the model is valid. Exporting the graph moves the else
    branch's constant into the main graph's initializers: ``t`` is then an outer value the then branch
    redefines, and onnx.checker rejects the result ("single static assignment"). A branch initializer
    breaks every pass; a Constant node, or a node computing from constants only (``Abs(k)`` of the
    main graph's ``k``), breaks ``fold``, which turns it into an initializer.
    """
    constant = np.array(0, np.int64)
    if defined_by == "initializer":
        else_nodes, initializers = [], [tensor("t", constant)]
    elif defined_by == "constant_node":
        else_nodes, initializers = [helper.make_node("Constant", [], ["t"], value=tensor("t", constant))], []
    else:
        else_nodes, initializers = [helper.make_node("Abs", ["k"], ["t"])], []
    original = if_model(
        then_nodes=[helper.make_node("ReduceSum", ["x"], ["t"], keepdims=0)],
        else_nodes=else_nodes + [helper.make_node("Gather", ["x", "t"], ["s"])],
        then_out="t",
        else_out="s",
        out_shape=[],
        else_initializers=initializers,
        initializers=[tensor("k", constant)],
    )
    for condition in (True, False):
        assert_equivalent(original, passes, {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_dce_dead_values_with_one_name_in_both_branches():
    """Both branches compute an unused ``a = Relu(x)``; graphsurgeon gives the two one tensor object.

    Removing the first dead Relu also detaches the shared tensor from the second, and removing the
    second then fails inside ``ir.remove_nodes`` (``list.remove``): dce raises an internal error on a
    valid model.
    """
    original = if_model(
        then_nodes=[helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Abs", ["x"], ["b"])],
        else_nodes=[helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
        then_out="b",
        else_out="b",
        out_shape=[2],
    )
    for condition in (True, False):
        assert_equivalent(original, "dce", {"x": np.array([1, -2], np.float32), "c": np.array(condition)})


def test_slice_of_a_shape_with_a_runtime_step_is_not_folded():
    """``Slice(Shape(x), starts=[0], ends=[9], axes=[0], steps=step)`` with ``step`` a graph input.

    ``x`` is ``float[2, 3]``, so with ``step = [2]`` the result is ``[2]``. ``fold_shapes`` reads the
    starts and ends but takes a steps input that is not constant for the default 1, and folds the
    Slice to the constant ``[2, 3]``: a silent miscompile.
    """
    original = model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "starts", "ends", "axes", "step"], ["y"]),
        ],
        [value("x", TensorProto.FLOAT, [2, 3]), value("step", TensorProto.INT64, [1])],
        [value("y", TensorProto.INT64, [None])],
        [
            tensor("starts", np.array([0], np.int64)),
            tensor("ends", np.array([9], np.int64)),
            tensor("axes", np.array([0], np.int64)),
        ],
    )
    assert_equivalent(original, "fold", {"x": np.zeros((2, 3), np.float32), "step": np.array([2], np.int64)})


@pytest.mark.parametrize(
    ("op", "height", "width", "kernel", "stride"),
    [
        ("Conv", 1, 3, [2, 1], 2),  # ceil(1 / 2) = 1 row; onnxruntime's inference says 0
        ("MaxPool", 4, 5, [3, 2], 3),  # ceil(4 / 3) = 2 rows; onnxruntime's inference says 1
    ],
)
def test_same_padding_strided_with_a_dynamic_width_keeps_its_height(op, height, width, kernel, stride):
    """``op(x[1, 1, height, W], kernel, auto_pad=SAME_UPPER, strides=[stride, stride])`` has ceil(height /
    stride) rows, the width ``W`` (fed ``width``) being dynamic.

    With the width symbolic, onnxruntime's symbolic shape inference gets the static height wrong too.
    When ``infer_shapes`` took its word, ``fold`` wrote that into the value_info of ``y`` (the result
    failed onnx.checker) and folded ``Shape(y)[2]``: with ``dce`` after it, the whole model became a
    wrong constant, a silent miscompile.
    """
    attrs = {"auto_pad": "SAME_UPPER", "strides": [stride, stride]}
    if op == "Conv":
        inputs, initializers = ["x", "w"], [tensor("w", np.ones((1, 1, *kernel), np.float32))]
    else:
        inputs, initializers, attrs["kernel_shape"] = ["x"], [], kernel
    original = model(
        [
            helper.make_node(op, inputs, ["y"], **attrs),
            helper.make_node("Shape", ["y"], ["shape"]),
            helper.make_node("Gather", ["shape", "two"], ["rows"]),
        ],
        [value("x", TensorProto.FLOAT, [1, 1, height, "W"])],
        [value("rows", TensorProto.INT64, [1])],
        [*initializers, tensor("two", np.array([2], np.int64))],
    )
    feeds = {"x": np.ones((1, 1, height, width), np.float32)}
    expect(run(original, feeds)[0].tolist() == [-(-height // stride)], "the original computes ceil(height / stride)")
    assert_equivalent(original, "fold,dce", feeds)
    assert_equivalent(original, "fold", feeds)


@pytest.mark.parametrize(
    ("op", "attrs", "rows"),
    [
        # ceil((2 - 1) / 2 + 1) = 2 windows, but the second would start at row 2, past the input: dropped.
        ("MaxPool", {"kernel_shape": [1, 1], "strides": [2, 1]}, 1),
        # The same with padding: the second window would start in the end padding.
        ("AveragePool", {"kernel_shape": [2, 1], "strides": [2, 1], "pads": [0, 0, 1, 0]}, 1),
        # With auto_pad the specification's formulas apply: VALID gives ceil((2 - 1 + 1) / 2) = 1 row.
        ("AveragePool", {"kernel_shape": [1, 1], "strides": [2, 1], "auto_pad": "VALID"}, 1),
    ],
)
def test_pool_with_ceil_mode_has_the_rows_the_runtime_computes(op, attrs, rows):
    """``op(x[1, 1, 2, 1], ceil_mode=1, **attrs)`` has one row (onnxruntime; onnx's reference evaluator agrees
    where it supports the attributes).

    Shape inference (onnxruntime's symbolic one and onnx's alike) says 2 rows; ``fold`` trusted it and
    folded ``Shape(y)`` to ``[1, 1, 2, 1]``: a silent miscompile.
    """
    original = model(
        [helper.make_node(op, ["x"], ["y"], ceil_mode=1, **attrs), helper.make_node("Shape", ["y"], ["shape"])],
        [value("x", TensorProto.FLOAT, [1, 1, 2, 1])],
        [value("shape", TensorProto.INT64, [4])],
    )
    feeds = {"x": np.ones((1, 1, 2, 1), np.float32)}
    expect(run(original, feeds)[0].tolist() == [1, 1, rows, 1], f"the original computes [1, 1, {rows}, 1]")
    assert_equivalent(original, "fold", feeds)


def test_conv_transpose_same_upper_with_output_padding_is_input_times_stride():
    """``ConvTranspose(x[1, 1, 5, 3], w[1, 1, 2, 2], strides=[2, 2], auto_pad=SAME_UPPER, output_padding=[1, 1])``.

    With SAME padding the output is the input times the stride, ``[10, 6]`` (the specification,
    onnxruntime and onnx's reference evaluator agree; output_padding only shifts the padding). Shape
    inference (onnx's and onnxruntime's symbolic one) adds the output padding, ``[11, 7]``; ``fold``
    trusted it and folded ``Shape(y)`` to that: a silent miscompile.
    """
    original = model(
        [
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER", output_padding=[1, 1]
            ),
            helper.make_node("Shape", ["y"], ["shape"]),
        ],
        [value("x", TensorProto.FLOAT, [1, 1, 5, 3])],
        [value("shape", TensorProto.INT64, [4])],
        [tensor("w", np.ones((1, 1, 2, 2), np.float32))],
    )
    feeds = {"x": np.ones((1, 1, 5, 3), np.float32)}
    expect(run(original, feeds)[0].tolist() == [1, 1, 10, 6], "the original computes [1, 1, 10, 6]")
    assert_equivalent(original, "fold", feeds)


@pytest.mark.parametrize(
    ("op", "attrs", "x_shape", "parameters", "runtime", "shape"),
    [
        # Squeeze whose axes it cannot see: every dimension of size 1 goes.
        ("Squeeze", {}, [1, 6, 1], {"axes": [2]}, "axes", [1, 6]),
        # Slice whose axes it cannot see: axis 0 is sliced.
        ("Slice", {}, [2, 1, 3], {"starts": [1], "ends": [3], "axes": [2]}, "axes", [2, 1, 2]),
        # Slice whose steps it cannot see: step 1, so a reversed slice is empty.
        ("Slice", {}, [2, 1, 3], {"starts": [-1], "ends": [-4], "axes": [2], "steps": [-1]}, "steps", [2, 1, 3]),
        # Split whose sizes it cannot see: equal chunks.
        ("Split", {"axis": -1}, [2, 1, 3], {"split": [2, 1]}, "split", [2, 1, 2]),
    ],
)
def test_shape_of_an_operator_with_runtime_parameters_is_not_guessed(op, attrs, x_shape, parameters, runtime, shape):
    """``y = op(x, parameters)`` where the parameter ``runtime`` is a graph input (fed its value).

    onnxruntime's symbolic shape inference does not leave the shape of ``y`` unknown when a parameter
    input is not constant: it guesses (all size-1 axes, axis 0, step 1, equal chunks). When
    ``infer_shapes`` took its word, ``fold`` folded ``Shape(y)`` to the guess, a silent miscompile; in
    bigger graphs the wrong value_info made the result fail onnx.checker, or onnxruntime refuse to run it
    ("Shape mismatch attempting to re-use buffer").
    """
    inputs, initializers, feeds = [value("x", TensorProto.FLOAT, x_shape)], [], {}
    for name, data in parameters.items():
        data = np.array(data, np.int64)
        if name == runtime:
            inputs.append(value(name, TensorProto.INT64, list(data.shape)))
            feeds[name] = data
        else:
            initializers.append(tensor(name, data))
    outputs = ["y", "rest"] if op == "Split" else ["y"]
    original = model(
        [helper.make_node(op, ["x", *parameters], outputs, **attrs), helper.make_node("Shape", ["y"], ["shape"])],
        inputs,
        [value("shape", TensorProto.INT64, [None])],
        initializers,
    )
    feeds["x"] = np.arange(6, dtype=np.float32).reshape(x_shape)
    expect(run(original, feeds)[0].tolist() == shape, f"the original computes {shape}")
    assert_equivalent(original, "fold", feeds)


def test_squeeze_without_axes_of_a_dynamic_dimension_is_not_guessed():
    """``y = Squeeze(x[N])`` with no axes removes every dimension of size 1: with ``N = 1``, ``y`` is a scalar.

    The model declares its output ``Relu(y)`` a scalar. onnxruntime's symbolic shape inference assumes a
    dynamic dimension is not 1 and gives ``y`` the shape ``[N]``; when ``infer_shapes`` took its word,
    ``fold`` wrote that into the value_info, and the result failed onnx.checker (rank 1 against the
    declared rank 0). The rank of ``y`` is unknown until ``N`` is.
    """
    original = model(
        [helper.make_node("Squeeze", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        [value("x", TensorProto.FLOAT, ["N"])],
        [value("z", TensorProto.FLOAT, [])],
    )
    assert_equivalent(original, "fold", {"x": np.array([-1.5], np.float32)})


@pytest.mark.parametrize("end", [np.iinfo(np.int64).max, np.iinfo(np.int32).max])
def test_slice_with_a_negative_step_to_int_max_has_the_length_onnxruntime_computes(end):
    """``Slice(x[3], starts=[-1], ends=[end], steps=[-1])``: onnxruntime reads an end of INT32_MAX or
    INT64_MAX with a negative step as "through the first element" (3 elements), where the specification
    clamps it to the last element (none), and so do both shape inference engines.

    Found by the property test of ``tests/core/test_shapes.py``: ``fold`` folded ``Shape(y)`` to ``[0]``.
    """
    original = model(
        [
            helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
            helper.make_node("Shape", ["y"], ["n"]),
        ],
        [value("x", TensorProto.FLOAT, [3])],
        [value("n", TensorProto.INT64, [1])],
        [
            tensor("starts", np.array([-1], np.int64)),
            tensor("ends", np.array([end], np.int64)),
            tensor("axes", np.array([0], np.int64)),
            tensor("steps", np.array([-1], np.int64)),
        ],
    )
    feeds = {"x": np.arange(3, dtype=np.float32)}
    expect(run(original, feeds)[0].tolist() == [3], "onnxruntime computes [3]")
    assert_equivalent(original, "fold", feeds)
    assert_equivalent(original, "fold,dce", feeds)


def test_transposes_sunk_below_an_add_keep_node_names_unique():
    """``Add(Transpose(t, perm=[0, 1]), t)`` with ``t = Transpose(x)``: ``fuse`` rewrites the Add and its
    Transposes, and the result holds two nodes named ``add`` (onnx.checker lets it pass, onnxruntime
    refuses to load it)."""
    original = model(
        [
            helper.make_node("Transpose", ["x"], ["t"], name="transpose"),
            helper.make_node("Transpose", ["t"], ["u"], perm=[0, 1]),
            helper.make_node("Add", ["u", "t"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        [value("x", TensorProto.FLOAT, ["N", 1])],
        [value("y", TensorProto.FLOAT, [None, None])],
    )
    assert_equivalent(original, "fuse", {"x": np.array([[0.5], [-1.0], [2.0]], np.float32)})
