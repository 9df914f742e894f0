"""Random expression graphs through a set of algebraic rules: outputs, names and invariants are kept."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import assert_same_outputs, make_model, tensor, value
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext
from onnxopt.pattern import RewriteRule, RuleSet


class MulOneToInput(RewriteRule):
    def pattern(self, op, x):
        return op.Mul(x, 1)

    def check(self, m):
        return m.ok() if m.shape("x") == [2, 3] else m.fail("shape of x unknown or smaller")

    def rewrite(self, op, m):
        return m["x"]


class NegNegToInput(RewriteRule):
    def pattern(self, op, x):
        return op.Neg(op.Neg(x))

    def rewrite(self, op, m):
        return m["x"]


class SubNegToAdd(RewriteRule):
    def pattern(self, op, a, b):
        return op.Sub(a, op.Neg(b))

    def rewrite(self, op, m):
        return op.Add(m["a"], m["b"])


class AddSelfToMulTwo(RewriteRule):
    def pattern(self, op, x):
        return op.Add(x, x)

    def rewrite(self, op, m):
        return op.Mul(m["x"], op.const(np.array(2.0, np.float32), "two"))


RULES = [MulOneToInput(), NegNegToInput(), SubNegToAdd(), AddSelfToMulTwo()]

step = st.tuples(st.sampled_from(["Add", "Mul", "Sub", "Neg", "Relu"]), st.integers(0, 100), st.integers(0, 100))


@settings(max_examples=25, deadline=None)
@given(st.lists(step, min_size=1, max_size=12), st.lists(st.integers(0, 100), min_size=1, max_size=3))
def test_random_graphs_keep_their_outputs(steps, output_picks):
    values = ["x", "y", "one"]
    nodes = []
    for index, (op_type, first, second) in enumerate(steps):
        a, b = values[first % len(values)], values[second % len(values)]
        out = f"v{index}"
        inputs = [a] if op_type in ("Neg", "Relu") else [a, b]
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{index}"))
        values.append(out)
    produced = values[3:]
    outputs = sorted({produced[p % len(produced)] for p in output_picks})
    model = make_model(
        nodes, [value("x", TensorProto.FLOAT, [2, 3]), value("y", TensorProto.FLOAT, [2, 3])],
        [value(name, TensorProto.FLOAT, [2, 3]) for name in outputs],
        [tensor("one", np.ones((2, 3), np.float32))])
    graph = ir.import_model(model)
    ir.infer_shapes(graph)
    signature = IOSignature.of(graph)
    RuleSet(RULES).apply(graph, PassContext())
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    assert [o.name for o in optimized.graph.output] == outputs
    assert_same_outputs(model, optimized)
    # A fixed point: a second run finds nothing.
    again = ir.import_model(optimized)
    ir.infer_shapes(again)
    assert not any(RuleSet(RULES).apply(again, PassContext()).values())
