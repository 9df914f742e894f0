"""Tests of the horizontal fusion: projections of one input packed into one MatMul (+ Add) and a Split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import pytest
from helpers import apply_rules, assert_same_outputs, make_model, op_counts, tensor, value
from onnx import TensorProto, helper

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext, Target
from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fuse import Fuse
from onnxopt.passes.fusions import horizontal
from onnxopt.pattern import Explanation

RULE = "parallel_matmuls_to_split"


@dataclass(frozen=True)
class FuseWithHorizontal(Fuse):
    """``fuse`` with the horizontal rules, whether or not ``fuse`` lists them yet."""

    name: ClassVar[str] = "fuse-with-horizontal"
    rules: ClassVar[tuple] = Fuse.rules + tuple(rule for rule in horizontal.RULES if rule not in Fuse.rules)


def optimize(model: onnx.ModelProto, target: Target = Target.GENERIC):
    """fuse (with the horizontal rules) then dce; checks the pass contracts and onnx.checker."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    ctx = PassContext(original=model, target=target)
    result = FuseWithHorizontal()(graph, ctx)
    DeadCodeElimination()(graph, ctx)
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


class Projections:
    """A graph whose input ``x`` feeds several projections, each a graph output."""

    def __init__(self, x_shape, seed: int = 0, dtype=np.float32):
        self.x_shape = list(x_shape)
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[tuple[str, list]] = []  # name, shape
        self.extra_inputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, shape) -> str:
        self.inits.append(tensor(name, self.rng.standard_normal(shape).astype(self.dtype)))
        return name

    def project(self, name: str, columns: int, bias_shape=(), op: str = "MatMul", weight: str | None = None,
                **attrs) -> str:
        """``x @ W`` (+ a bias of ``bias_shape``, ``None`` for none) as graph output ``name``."""
        rows = self.x_shape[-1]
        transposed = attrs.get("transB", 0)
        weight = weight or self.const(f"{name}_w", (columns, rows) if transposed else (rows, columns))
        bias = None if bias_shape is None else self.const(f"{name}_b", bias_shape or (columns,))
        if op == "Gemm":
            self.nodes.append(helper.make_node("Gemm", ["x", weight] + ([bias] if bias else []), [name], **attrs))
        elif bias is None:
            self.nodes.append(helper.make_node("MatMul", ["x", weight], [name]))
        else:
            self.nodes.append(helper.make_node("MatMul", ["x", weight], [f"{name}_mm"]))
            self.nodes.append(helper.make_node("Add", [f"{name}_mm", bias], [name]))
        self.outputs.append((name, self.x_shape[:-1] + [columns]))
        return name

    def model(self, opset: int = 17) -> onnx.ModelProto:
        outputs = [value(name, TensorProto.FLOAT, shape) for name, shape in self.outputs]
        return make_model(self.nodes, [value("x", TensorProto.FLOAT, self.x_shape)] + self.extra_inputs, outputs,
                          self.inits, opset=opset)


def computing_ops(model) -> dict[str, int]:
    return {op: n for op, n in op_counts(model).items() if op != "Constant"}


def split_node(model) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Split")


# ---------------------------------------------------------------------------------------------------
# Where it fires


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_query_key_value_become_one_matmul_add_and_split(opset):
    graph = Projections([2, 5, 8])
    for name in ("q", "k", "v"):
        graph.project(name, 8)
    model = graph.model(opset)
    optimized, result = optimize(model)
    assert computing_ops(optimized) == {"MatMul": 1, "Add": 1, "Split": 1}
    assert result.stats[RULE] == 1  # one rewrite per packing
    split = split_node(optimized)
    assert list(split.output) == ["q", "k", "v"]  # each result keeps its name
    sizes = next((a.ints for a in split.attribute if a.name == "split"), None) if opset < 13 else None
    assert sizes is None or list(sizes) == [8, 8, 8]
    assert (len(split.input) == 2) == (opset >= 13)
    assert_same_outputs(model, optimized)


def test_projection_without_bias_gets_zeros_and_widths_may_differ():
    # Whisper's k_proj has no bias; widths 8, 4, 6 give Split sizes 8, 4, 6.
    graph = Projections(["B", "S", 8])
    graph.project("q", 8)
    graph.project("k", 4, bias_shape=None)
    graph.project("v", 6, bias_shape=(1, 1, 6))
    model = graph.model()
    optimized, _ = optimize(model)
    assert computing_ops(optimized) == {"MatMul": 1, "Add": 1, "Split": 1}
    bias = next(i for i in optimized.graph.initializer if i.name.endswith("_bias"))
    values = onnx.numpy_helper.to_array(bias)
    assert values.shape == (18,) and not values[8:12].any()
    assert_same_outputs(model, optimized, {"x": np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)})


def test_projections_without_any_bias_pack_into_matmul_and_split():
    graph = Projections([4, 8])
    graph.project("a", 3, bias_shape=None)
    graph.project("b", 5, bias_shape=None)
    model = graph.model()
    optimized, result = optimize(model)
    assert computing_ops(optimized) == {"MatMul": 1, "Split": 1}
    assert result.stats[RULE] == 1
    assert_same_outputs(model, optimized)


def test_gemm_projections_pack_into_one_gemm():
    graph = Projections([4, 8])
    graph.project("a", 3, op="Gemm")
    graph.project("b", 5, op="Gemm", transB=1)
    graph.project("c", 2, bias_shape=None, op="Gemm")
    model = graph.model()
    optimized, _ = optimize(model)
    assert computing_ops(optimized) == {"Gemm": 1, "Split": 1}
    assert_same_outputs(model, optimized)


def test_four_projections_and_a_non_projection_reader():
    graph = Projections([3, 8])
    for name in ("a", "b", "c", "d"):
        graph.project(name, 4)
    graph.nodes.append(helper.make_node("Relu", ["x"], ["r"]))
    graph.outputs.append(("r", [3, 8]))
    model = graph.model()
    optimized, result = optimize(model)
    assert computing_ops(optimized) == {"Gemm": 1, "Split": 1, "Relu": 1}  # 2-D x: MatMul + Add -> Gemm
    assert result.stats[RULE] == 1
    assert_same_outputs(model, optimized)


def test_one_rewrite_replaces_every_member_and_leaves_no_copy():
    graph = Projections([2, 5, 8])
    for name in ("q", "k", "v"):
        graph.project(name, 8)
    model = graph.model()
    explanation = Explanation()
    optimized, counts = apply_rules(model, *horizontal.RULES, explanation=explanation)  # no dce afterwards
    assert counts == {RULE: 1}
    assert computing_ops(optimized) == {"MatMul": 1, "Add": 1, "Split": 1}
    (rewritten,) = [a for a in explanation.attempts if a.outcome == "rewritten"]
    assert rewritten.node == "q" and rewritten.reason.endswith("also replaced 'k', 'v'")
    assert_same_outputs(model, optimized)


def test_bias_that_varies_per_row_stays_an_add_after_the_split():
    graph = Projections([4, 8])
    graph.project("a", 3)
    graph.project("b", 3, bias_shape=(4, 3))  # not one value per column: its Add is no part of the projection
    model = graph.model()
    optimized, _ = optimize(model)
    assert computing_ops(optimized) == {"Gemm": 1, "Split": 1, "Add": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Where it must not fire


def assert_unchanged(model, target: Target = Target.GENERIC):
    optimized, result = optimize(model, target)
    assert result.stats.get(RULE, 0) == 0
    assert "Split" not in computing_ops(optimized)
    assert_same_outputs(model, optimized)


def test_single_projection_is_left_alone():
    graph = Projections([2, 5, 8])
    graph.project("q", 8)
    graph.nodes.append(helper.make_node("MatMul", ["x", "x_t"], ["s"]))
    graph.extra_inputs.append(value("x_t", TensorProto.FLOAT, [8, 4]))  # a runtime weight is no projection
    graph.outputs.append(("s", [2, 5, 4]))
    assert_unchanged(graph.model())


def test_projections_of_different_inputs_are_left_alone():
    graph = Projections([2, 8])
    graph.project("a", 4)
    graph.nodes.append(helper.make_node("Relu", ["x"], ["x2"]))
    graph.nodes.append(helper.make_node("MatMul", ["x2", graph.const("w2", (8, 4))], ["b"]))
    graph.outputs.append(("b", [2, 4]))
    assert_unchanged(graph.model())


def test_weight_read_by_another_node_is_not_packed():
    graph = Projections([2, 8])
    graph.project("a", 4)
    graph.project("b", 4)
    graph.nodes.append(helper.make_node("Relu", ["a_w"], ["w_relu"]))  # packing would store a_w twice
    graph.outputs.append(("w_relu", [8, 4]))
    optimized, result = optimize(graph.model())
    assert result.stats[RULE] == 0
    assert_same_outputs(graph.model(), optimized)


def test_not_for_onnxruntime():
    # onnxruntime's own fusions and ort_fuse's packed Attention want the three projections apart.
    graph = Projections([2, 5, 8])
    for name in ("q", "k", "v"):
        graph.project(name, 8)
    assert_unchanged(graph.model(), Target.ORT)


def test_intermediate_product_that_is_a_graph_output_keeps_its_add_apart():
    graph = Projections([2, 5, 8])
    graph.project("q", 8)
    graph.project("k", 8)
    graph.outputs.append(("k_mm", [2, 5, 8]))  # the product before its bias is an output too
    model = graph.model()
    optimized, _ = optimize(model)
    assert computing_ops(optimized) == {"MatMul": 1, "Add": 2, "Split": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# The pure helper


def test_per_column_accepts_rows_of_one_value_per_column_only():
    assert horizontal.per_column(np.ones((1, 1, 4)), 4, 3).shape == (4,)
    assert horizontal.per_column(np.array(2.0), 4, 2).tolist() == [2.0] * 4
    assert horizontal.per_column(np.ones((1, 1, 4)), 4, 2) is None  # would raise the product's rank
    assert horizontal.per_column(np.ones((2, 4)), 4, 2) is None
    assert horizontal.per_column(np.ones(4), 4, None) is not None
