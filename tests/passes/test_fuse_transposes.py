"""Tests of ``fuse``'s Transpose rules: into Gemm/MatMul, and through element-wise operators to cancel."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, op_counts, random_feeds
from test_fuse_norm import fuse


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def computing_ops(model) -> dict[str, int]:
    return {op: n for op, n in op_counts(model).items() if op != "Constant"}


def transposes(model) -> int:
    return op_counts(model).get("Transpose", 0)


def attrs_of(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------------------
# Gemm and MatMul


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_transposes_fold_into_gemm_flags(which):
    ta = "at = Transpose <perm = [1, 0]> (a)" if which in ("a", "both") else "at = Identity(a)"
    tb = "bt = Transpose <perm = [1, 0]> (b)" if which in ("b", "both") else "bt = Identity(b)"
    a_shape = "float[5, 4]" if which in ("a", "both") else "float[4, 5]"
    b_shape = "float[3, 5]" if which in ("b", "both") else "float[5, 3]"
    model = parse(f"""
        g ({a_shape} a, {b_shape} b) => (float[4, 3] y) {{
            {ta}
            {tb}
            y = Gemm <transA = 0, alpha = 2.0> (at, bt)
        }}""")
    optimized, result = fuse(model)
    assert result.stats["transpose_gemm"] == 1
    assert computing_ops(optimized) == {"Gemm": 1}
    attrs = attrs_of(optimized, "Gemm")
    assert attrs.get("transA", 0) == int(which in ("a", "both")) and attrs.get("transB", 0) == int(which in ("b", "both"))
    assert attrs["alpha"] == 2.0
    assert_same_outputs(model, optimized)


def test_gemm_with_transA_already_set_flips_back():
    model = parse("""
        g (float[4, 5] a, float[5, 3] b) => (float[4, 3] y) {
            at = Transpose <perm = [1, 0]> (a)
            y = Gemm <transA = 1> (at, b)
        }""")
    optimized, _result = fuse(model)
    assert computing_ops(optimized) == {"Gemm": 1} and attrs_of(optimized, "Gemm")["transA"] == 0
    assert_same_outputs(model, optimized)


def test_matmul_of_transposed_constant_takes_the_transposed_constant():
    w = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    values = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"""
        g (float[2, 4, 5] a) => (float[2, 4, 3] y) {{
            w = Constant <value = float[3, 5] {{{values}}}> ()
            wt = Transpose <perm = [1, 0]> (w)
            y = MatMul(a, wt)
        }}""")
    optimized, result = fuse(model)
    assert result.stats["transpose_matmul"] == 1 and computing_ops(optimized) == {"MatMul": 1}
    assert_same_outputs(model, optimized)


def test_2d_matmul_of_transposed_inputs_becomes_gemm():
    model = parse("""
        g (float[5, 4] a, float[3, 5] b) => (float[4, 3] y) {
            at = Transpose <perm = [1, 0]> (a)
            bt = Transpose <perm = [1, 0]> (b)
            y = MatMul(at, bt)
        }""")
    optimized, _result = fuse(model)
    assert computing_ops(optimized) == {"Gemm": 1}
    assert attrs_of(optimized, "Gemm") == {"transA": 1, "transB": 1}
    assert_same_outputs(model, optimized)


def test_batched_matmul_of_a_transposed_input_stays():
    model = parse("""
        g (float[2, 5, 4] a, float[2, 5, 3] b) => (float[2, 4, 3] y) {
            at = Transpose <perm = [0, 2, 1]> (a)
            y = MatMul(at, b)
        }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_matmul"] == 0 and op_counts(optimized) == op_counts(model)


def test_matmul_gemm_needs_opset_11():
    model = parse("""
        g (float[5, 4] a, float[5, 3] b) => (float[4, 3] y) {
            at = Transpose <perm = [1, 0]> (a)
            y = MatMul(at, b)
        }""", opset=10)
    _optimized, result = fuse(model)
    assert result.stats["transpose_matmul"] == 0


def test_integer_matmul_is_not_made_a_gemm():
    model = parse("""
        g (int32[5, 4] a, int32[5, 3] b) => (int32[4, 3] y) {
            at = Transpose <perm = [1, 0]> (a)
            y = MatMul(at, b)
        }""")
    _optimized, result = fuse(model)
    assert result.stats["transpose_matmul"] == 0


# ---------------------------------------------------------------------------------------------------
# Through element-wise operators


def test_opposite_transposes_around_unary_and_constant_binary_cancel():
    # NCHW -> NHWC, + bias per channel (last axis), Relu, back to NCHW: the converters' layout dance.
    model = parse("""
        g (float[1, 3, 4, 5] x) => (float[1, 3, 4, 5] y) {
            t = Transpose <perm = [0, 2, 3, 1]> (x)
            bias = Constant <value = float[3] {0.5, -1.0, 2.0}> ()
            a = Add(t, bias)
            r = Relu(a)
            y = Transpose <perm = [0, 3, 1, 2]> (r)
        }""")
    optimized, result = fuse(model)
    assert transposes(optimized) == 0, (op_counts(optimized), result.stats)
    assert computing_ops(optimized) == {"Add": 1, "Relu": 1}
    assert_same_outputs(model, optimized)


def test_binary_of_two_transposed_inputs_then_transposed_back():
    model = parse("""
        g (float[2, 3, 4] x, float[2, 3, 4] z) => (float[2, 3, 4] y) {
            a = Transpose <perm = [2, 0, 1]> (x)
            b = Transpose <perm = [2, 0, 1]> (z)
            s = Mul(a, b)
            e = Sigmoid(s)
            y = Transpose <perm = [1, 2, 0]> (e)
        }""")
    optimized, result = fuse(model)
    assert transposes(optimized) == 0, (op_counts(optimized), result.stats)
    assert_same_outputs(model, optimized)


def test_clip_bounds_stay_scalars():
    model = parse("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            t = Transpose <perm = [1, 0, 2]> (x)
            lo = Constant <value = float {-0.5}> ()
            hi = Constant <value = float {0.5}> ()
            c = Clip(t, lo, hi)
            y = Transpose <perm = [1, 0, 2]> (c)
        }""")
    optimized, _result = fuse(model)
    assert computing_ops(optimized) == {"Clip": 1}
    assert_same_outputs(model, optimized)


def test_transpose_after_binary_with_a_plain_input_moves_where_its_inverse_cancels():
    # ConvNeXt's stage ends: the Transpose moves onto z, and the one on x cancels with it: 2 -> 1.
    model = parse("""
        g (float[2, 3, 4] x, float[3, 2, 4] z) => (float[2, 3, 4] y) {
            t = Transpose <perm = [1, 0, 2]> (x)
            s = Add(t, z)
            y = Transpose <perm = [1, 0, 2]> (s)
        }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_elementwise"] == 1 and transposes(optimized) == 1
    assert_same_outputs(model, optimized)


def test_transpose_after_binary_with_a_plain_input_stays_unless_one_cancels():
    # The inner Transpose only composes with the outer one (no identity): moving would keep 2.
    model = parse("""
        g (float[2, 3, 4] x, float[4, 2, 3] z) => (float[2, 4, 3] y) {
            t = Transpose <perm = [2, 0, 1]> (x)
            s = Add(t, z)
            y = Transpose <perm = [1, 0, 2]> (s)
        }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_elementwise"] == 0 and transposes(optimized) == 2
    assert_same_outputs(model, optimized)


def test_transpose_does_not_move_onto_a_plain_input_of_lower_rank():
    model = parse("""
        g (float[2, 3, 4] x, float[4] z) => (float[2, 3, 4] y) {
            t = Transpose <perm = [1, 0, 2]> (x)
            s = Add(t, z)
            y = Transpose <perm = [1, 0, 2]> (s)
        }""")
    optimized, _result = fuse(model)
    assert_same_outputs(model, optimized)


def test_transpose_whose_inner_transpose_is_read_elsewhere_stays():
    model = parse("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[3, 2, 4] t) {
            t = Transpose <perm = [1, 0, 2]> (x)
            r = Relu(t)
            y = Transpose <perm = [1, 0, 2]> (r)
        }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_elementwise"] == 0 and transposes(optimized) == 2
    assert_same_outputs(model, optimized)


def test_two_transposes_of_the_same_permutation_sink_into_one():
    model = parse("""
        g (float[2, 3, 4] x, float[2, 3, 4] z) => (float[4, 2, 3] y) {
            a = Transpose <perm = [2, 0, 1]> (x)
            b = Transpose <perm = [2, 0, 1]> (z)
            y = Sub(a, b)
        }""")
    optimized, result = fuse(model)
    assert result.stats["elementwise_transposes"] == 1
    assert computing_ops(optimized) == {"Sub": 1, "Transpose": 1}
    assert_same_outputs(model, optimized)


def test_different_permutations_do_not_sink():
    model = parse("""
        g (float[2, 3, 4] x, float[3, 2, 4] z) => (float[4, 3, 2] y) {
            a = Transpose <perm = [2, 1, 0]> (x)
            b = Transpose <perm = [2, 0, 1]> (z)
            y = Add(a, b)
        }""")
    optimized, result = fuse(model)
    assert result.stats["elementwise_transposes"] == 0 and transposes(optimized) == 2
    assert_same_outputs(model, optimized)


def test_broadcast_constant_of_lower_rank_is_transposed_padded():
    # The constant [4, 1] broadcasts against the last two axes of the transposed [5, 4, 3]... here [3, 4, 5].
    model = parse("""
        g (float[5, 4, 3] x) => (float[5, 4, 3] y) {
            t = Transpose <perm = [2, 1, 0]> (x)
            c = Constant <value = float[4, 1] {1.0, 2.0, 3.0, 4.0}> ()
            m = Mul(t, c)
            y = Transpose <perm = [2, 1, 0]> (m)
        }""")
    optimized, _result = fuse(model)
    assert transposes(optimized) == 0
    assert_same_outputs(model, optimized, random_feeds(model))


def test_gemm_operand_transpose_read_elsewhere_stays():
    model = parse("""
        g (float[5, 4] a, float[5, 3] b) => (float[4, 3] y, float[4, 5] at) {
            at = Transpose <perm = [1, 0]> (a)
            y = Gemm(at, b)
        }""")
    optimized, result = fuse(model)
    assert result.stats["transpose_gemm"] == 0 and op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized)
