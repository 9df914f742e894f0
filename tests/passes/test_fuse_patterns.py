"""Tests of the pattern-API extensions the fusion library is written with: ``op.either``, ``op.product``,
rules with several roots, ``Match.has_node`` and ``RewriteRule.targets``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import apply_rules, assert_same_outputs, op_counts, parse

from onnxopt.pass_infra import PassContext, Target
from onnxopt.pattern import Explanation, RewriteRule


class HalfProductToDiv(RewriteRule):
    """Replaces x * 0.5 * y, in any association and order, with (x * y) / 2."""

    def pattern(self, op, x, y):
        return op.product(x, 0.5, y)

    def rewrite(self, op, m):
        return op.Div(op.Mul(m["x"], m["y"]), op.const(np.array(2.0, np.float32), "two"))


class IdempotentPairToOne(RewriteRule):
    """Replaces Relu(Relu(x)) with Relu(x) and Abs(Abs(x)) with Abs(x): a rule with two roots."""

    def pattern(self, op, x):
        return op.either(op.Relu(op.Relu(x, _tag="inner")), op.Abs(op.Abs(x, _tag="inner")))

    def rewrite(self, op, m):
        if m.has_node("Relu"):
            return op.Relu(m["x"])
        return op.Abs(m["x"])


class ScaleOfDivOrMul(RewriteRule):
    """Replaces x / c or x * c (either alternative inside the pattern) followed by Neg with x * (-1/c) or x * -c."""

    def pattern(self, op, x, c):
        return op.Neg(op.either(op.Div(x, c), op.Mul(x, c)))

    def check(self, m):
        if m.value("c") is None:
            return m.fail("c is not constant")
        return m.ok()

    def rewrite(self, op, m):
        c = m.value("c").astype(np.float64)
        factor = -1.0 / c if m.has_node("Div") else -c
        return op.Mul(m["x"], op.const(factor.astype(np.float32), "factor"))


class OnlyForOrt(HalfProductToDiv):
    name = "only_for_ort"
    targets = frozenset({Target.ORT})


PRODUCT_ORDERS = {
    "(x*h)*y": "t = Mul(x, h)\n z = Mul(t, y)",
    "x*(h*y)": "t = Mul(h, y)\n z = Mul(x, t)",
    "(x*y)*h": "t = Mul(x, y)\n z = Mul(t, h)",
    "h*(y*x)": "t = Mul(y, x)\n z = Mul(h, t)",
    "(h*x)*y": "t = Mul(h, x)\n z = Mul(t, y)",
    "y*(x*h)": "t = Mul(x, h)\n z = Mul(y, t)",
}


def product_model(body: str) -> onnx.ModelProto:
    return parse(f"""
        g (float[2, 3] x, float[2, 3] y) => (float[2, 3] z) {{
            h = Constant <value = float {{0.5}}> ()
            {body}
        }}""")


@pytest.mark.parametrize("order", sorted(PRODUCT_ORDERS))
def test_product_matches_every_association_and_order(order):
    model = product_model(PRODUCT_ORDERS[order])
    optimized, counts = apply_rules(model, HalfProductToDiv())
    assert counts["half_product_to_div"] == 1
    assert op_counts(optimized) == {"Constant": 1, "Mul": 1, "Div": 1}
    assert_same_outputs(model, optimized)


def test_product_does_not_match_other_factors():
    model = product_model("t = Mul(x, y)\n z = Mul(t, y)")
    optimized, counts = apply_rules(model, HalfProductToDiv())
    assert counts["half_product_to_div"] == 0
    assert_same_outputs(model, optimized)


def test_product_builds_one_tree_per_shape():
    from onnxopt.pattern import PatternBuilder

    two = PatternBuilder().product(1.0, 2.0)
    assert not hasattr(two, "alternatives")  # one tree: the Mul itself
    three = PatternBuilder().product(1.0, 2.0, 3.0)
    four = PatternBuilder().product(1.0, 2.0, 3.0, 4.0)
    assert len(three.alternatives) == 3
    assert len(four.alternatives) == 15
    with pytest.raises(TypeError):
        PatternBuilder().product(1.0)


@pytest.mark.parametrize("op_type", ["Relu", "Abs"])
def test_a_rule_with_several_roots_fires_at_each(op_type):
    model = parse(f"""
        g (float[4] x) => (float[4] z) {{
            n = {op_type}(x)
            z = {op_type}(n)
        }}""")
    optimized, counts = apply_rules(model, IdempotentPairToOne())
    assert counts["idempotent_pair_to_one"] == 1
    assert op_counts(optimized) == {op_type: 1}
    assert_same_outputs(model, optimized)


def test_a_rule_with_several_roots_needs_one_alternative_whole():
    model = parse("""
        g (float[4] x) => (float[4] z) {
            n = Abs(x)
            z = Relu(n)
        }""")
    optimized, counts = apply_rules(model, IdempotentPairToOne())
    assert counts["idempotent_pair_to_one"] == 0
    assert op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("inner", ["Div", "Mul"])
def test_either_inside_a_pattern_binds_the_alternative_that_matched(inner):
    model = parse(f"""
        g (float[4] x) => (float[4] z) {{
            c = Constant <value = float[4] {{2.0, 4.0, -1.0, 0.5}}> ()
            t = {inner}(x, c)
            z = Neg(t)
        }}""")
    optimized, counts = apply_rules(model, ScaleOfDivOrMul())
    assert counts["scale_of_div_or_mul"] == 1
    assert op_counts(optimized)["Mul"] == 1 and "Neg" not in op_counts(optimized)
    assert_same_outputs(model, optimized)


def test_either_does_not_match_a_third_operator():
    model = parse("""
        g (float[4] x) => (float[4] z) {
            c = Constant <value = float[4] {2.0, 4.0, -1.0, 0.5}> ()
            t = Sub(x, c)
            z = Neg(t)
        }""")
    optimized, counts = apply_rules(model, ScaleOfDivOrMul())
    assert counts["scale_of_div_or_mul"] == 0
    assert op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("target,fires", [(Target.ORT, True), (Target.GENERIC, False), (Target.OPENVINO, False)])
def test_targets_limit_where_a_rule_runs(target, fires):
    model = product_model("t = Mul(x, h)\n z = Mul(t, y)")
    explanation = Explanation()
    optimized, counts = apply_rules(model, OnlyForOrt(), ctx=PassContext(original=model, target=target),
                              explanation=explanation)
    assert counts["only_for_ort"] == int(fires)
    if not fires:
        assert any(a.outcome == "not applicable" and "target" in a.reason for a in explanation.attempts)
    assert_same_outputs(model, optimized)


class HalfWithinUlps(RewriteRule):
    """Replaces x * 0.5 (within 2 units in the last place of the constant's type) with x / 2."""

    def pattern(self, op, x):
        return op.Mul(x, op.const(0.5, ulps=2))

    def rewrite(self, op, m):
        return op.Div(m["x"], op.const(np.array(2.0, m.dtype("x")), "two"))


@pytest.mark.parametrize("dtype,half,fires", [(np.float32, 0.50000006, True), (np.float32, 0.5001, False),
                                              (np.float16, 0.5005, True), (np.float16, 0.502, False)])
def test_const_ulps_follow_the_constants_type(dtype, half, fires):
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [onnx.helper.make_node("Mul", ["x", "h"], ["z"])]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", elem, [4])],
                               [onnx.helper.make_tensor_value_info("z", elem, [4])],
                               [onnx.numpy_helper.from_array(np.array(half, dtype), "h")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    optimized, counts = apply_rules(model, HalfWithinUlps())
    assert counts["half_within_ulps"] == int(fires)
    x = np.linspace(-2, 2, 4).astype(dtype)
    if fires:  # the constant is 0.5 up to its type's rounding: the outputs agree to that precision
        assert_same_outputs(model, optimized, {"x": x}, rtol=2e-3 if dtype == np.float16 else 1e-6, atol=0)
