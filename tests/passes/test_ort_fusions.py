"""Tests of the ``ort_fuse`` pass: onnxruntime contrib operators, checked in real onnxruntime sessions.

Each rule has graphs where it must fire (compared numerically with onnxruntime, graph optimizations off)
and graphs where it must not; nothing fires for a target other than onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import op_counts, random_feeds, run, tensor, value
from onnx import helper

from onnxopt import ir
from onnxopt.census import fusion_census, runtime_graph
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext, Target
from onnxopt.passes.attention import Attention
from onnxopt.passes.ort_fusions import OrtFuse
from onnxopt.pattern import explain

HIDDEN = 8
RNG = np.random.default_rng(0)


class Graph:
    """A test graph under construction: nodes, constants, inputs; fresh value names."""

    def __init__(self, opset: int = 17, dtype=np.float32):
        self.opset, self.dtype = opset, dtype
        self.elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nodes, self.inits, self.inputs = [], [], []
        self.count = 0

    def input(self, name: str, shape) -> str:
        self.inputs.append(value(name, self.elem, list(shape)))
        return name

    def const(self, array, dtype=None) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(tensor(name, np.asarray(array, dtype or self.dtype)))
        return name

    def random(self, *shape) -> str:
        return self.const(RNG.standard_normal(shape))

    def node(self, op: str, *inputs: str, outputs: int = 1, **attrs):
        self.count += 1
        names = [f"{op.lower()}{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def model(self, *outputs: tuple[str, list]) -> onnx.ModelProto:
        declared = []
        for name, shape in outputs:
            self.nodes.append(helper.make_node("Identity", [name], [f"out_{name}"]))
            declared.append(value(f"out_{name}", self.elem, shape))
        graph = helper.make_graph(self.nodes, "g", self.inputs, declared, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10 if self.opset >= 21 else 8
        onnx.checker.check_model(model, full_check=True)
        return model

    def gelu_erf(self, x: str) -> str:
        erf = self.node("Erf", self.node("Div", x, self.const(math.sqrt(2))))
        return self.node("Mul", self.node("Mul", x, self.node("Add", erf, self.const(1.0))), self.const(0.5))

    def gelu_tanh(self, x: str, half: float = 0.5) -> str:
        cube = self.node("Pow", x, self.const(3.0))
        inner = self.node("Mul", self.const(math.sqrt(2 / math.pi)),
                          self.node("Add", x, self.node("Mul", self.const(0.044715), cube)))
        return self.node("Mul", self.node("Mul", self.const(half), x), self.node("Add", self.node("Tanh", inner),
                                                                                self.const(1.0)))


def ort_fuse(model: onnx.ModelProto, target: Target = Target.ORT, passes: tuple = ()):
    """Runs the passes (``ort_fuse`` by default) once each; checks the contracts and onnx.checker on the result."""
    passes = passes or (OrtFuse(),)
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    stats: dict[str, int] = {}
    for pass_ in passes:
        stats.update(pass_(graph, PassContext(original=model, target=target)).stats)
        assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized)
    return optimized, {k: v for k, v in stats.items() if v}


def assert_same(model: onnx.ModelProto, optimized: onnx.ModelProto, rtol: float = 1e-4) -> None:
    feeds = random_feeds(model, seed=1)
    for want, got in zip(run(model, feeds), run(optimized, feeds)):
        assert want.shape == got.shape and want.dtype == got.dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


def layer_norm_of_sum(a_shape, b_shape, shared: bool = False, axis: int = -1, opset: int = 17, dtype=np.float32):
    g = Graph(opset, dtype)
    total = g.node("Add", g.input("a", a_shape), g.input("b", b_shape))
    hidden = a_shape[-1]
    gamma_shape = [hidden] if axis == -1 else list(a_shape[axis:])
    y = g.node("LayerNormalization", total, g.random(*gamma_shape), g.random(*gamma_shape), axis=axis, epsilon=1e-5)
    shape = list(np.broadcast_shapes(tuple(a_shape), tuple(b_shape)))
    outputs = [(y, shape)]
    if shared:  # a pre-norm residual stream: the sum is also added to the normalized branch
        outputs.append((g.node("Add", total, g.node("Relu", y)), shape))
    return g.model(*outputs)


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ([2, 5, HIDDEN], [2, 5, HIDDEN]),
    ([2, 5, HIDDEN], [1, 5, HIDDEN]),
    ([2, 5, HIDDEN], [5, HIDDEN]),
    ([5, HIDDEN], [5, HIDDEN]),
    ([1, 5, HIDDEN], [2, 5, HIDDEN]),
], ids=["same", "broadcast_batch", "skip_2d", "input_2d", "swapped"])
def test_residual_sum_keeps_onnxruntime_from_skip_layer_norm(a_shape, b_shape):
    model = layer_norm_of_sum(a_shape, b_shape)
    optimized, stats = ort_fuse(model)
    assert stats == {"residual_sum": 1}
    counts = op_counts(optimized)
    assert counts.get("Sum") == 1 and counts.get("LayerNormalization") == 1 and "Add" not in counts
    assert_same(model, optimized)
    engine = (runtime_graph(model).counts, runtime_graph(optimized).counts)
    assert engine[1].get(("com.microsoft", "SkipLayerNormalization"), 0) == 0
    assert engine[1].get(("", "LayerNormalization")) == 1
    if len(a_shape) == len(b_shape) == 3 and a_shape == b_shape:  # what onnxruntime's own fusion takes
        assert engine[0].get(("com.microsoft", "SkipLayerNormalization")) == 1


def test_residual_sum_census_declines_not_regresses():
    model = layer_norm_of_sum([2, 5, HIDDEN], [2, 5, HIDDEN])
    census = fusion_census(model, ort_fuse(model)[0])
    row = {row.op_type: row for row in census.rows}["SkipLayerNormalization"]
    assert (row.original, row.ours, row.declined is not None, row.regression) == (1, 0, True, False)
    assert census.regressions == []


def test_residual_sum_leaves_a_residual_stream():
    # Pre-norm: the sum is read by the next residual Add too, so onnxruntime does not fuse it either.
    model = layer_norm_of_sum([2, 5, HIDDEN], [2, 5, HIDDEN], shared=True)
    optimized, stats = ort_fuse(model)
    assert stats == {}
    assert op_counts(optimized) == op_counts(model)
    misses = explain(model, OrtFuse, PassContext(target=Target.ORT)).misses("residual_sum")
    assert any("other readers" in attempt.reason for attempt in misses), [str(a) for a in misses]


def test_residual_sum_leaves_float16():
    model = layer_norm_of_sum([2, 5, HIDDEN], [2, 5, HIDDEN], dtype=np.float16)
    optimized, stats = ort_fuse(model)
    assert stats == {}
    misses = explain(model, OrtFuse, PassContext(target=Target.ORT)).misses("residual_sum")
    assert any("not float32" in attempt.reason for attempt in misses), [str(a) for a in misses]


def gelu_model(form: str, bias_shape=(HIDDEN,), opset: int = 17, half: float = 0.5) -> onnx.ModelProto:
    g = Graph(opset)
    x = g.input("x", [2, 5, HIDDEN])
    if bias_shape is not None:
        x = g.node("Add", x, g.random(*bias_shape))
    y = {"erf": lambda: g.gelu_erf(x), "tanh": lambda: g.gelu_tanh(x, half),
         "op": lambda: g.node("Gelu", x), "op_tanh": lambda: g.node("Gelu", x, approximate="tanh")}[form]()
    return g.model((y, [2, 5, HIDDEN]))


@pytest.mark.parametrize(("form", "bias", "opset", "fused", "rule"), [
    ("erf", False, 17, "Gelu", "gelu"),
    ("tanh", True, 17, "FastGelu", "fast_gelu_bias"),
    ("op_tanh", True, 20, "FastGelu", "fast_gelu_bias"),
    ("tanh", False, 17, "FastGelu", "fast_gelu"),
    ("op_tanh", False, 20, "FastGelu", "fast_gelu"),
], ids=["erf", "bias_tanh", "bias_tanh_op", "tanh", "tanh_op"])
def test_gelu_forms(form, bias, opset, fused, rule):
    model = gelu_model(form, (HIDDEN,) if bias else None, opset)
    optimized, stats = ort_fuse(model)
    assert stats == {rule: 1}
    counts = op_counts(optimized)
    assert counts.get(fused) == 1 and "Add" not in counts and "Mul" not in counts, counts
    assert [n.domain for n in optimized.graph.node if n.op_type == fused] == ["com.microsoft"]
    assert_same(model, optimized)


@pytest.mark.parametrize("bias_shape", [(HIDDEN,), (5, HIDDEN)], ids=["vector", "two_axes"])
def test_biased_erf_gelu_keeps_its_add(bias_shape):
    # No BiasGelu: onnxruntime's CPU kernel is slower than Add + Gelu, and with static shapes onnxruntime
    # moves the Add into the MatMul's Gemm itself.
    model = gelu_model("erf", bias_shape=bias_shape)
    optimized, stats = ort_fuse(model)
    assert stats == {"gelu": 1}
    counts = op_counts(optimized)
    assert counts.get("Add") == 1 and counts.get("Gelu") == 1 and "BiasGelu" not in counts
    assert_same(model, optimized)


def test_standard_gelu_of_a_sum_is_left_to_onnxruntime():
    model = gelu_model("op", opset=20)
    optimized, stats = ort_fuse(model)
    assert stats == {}
    assert op_counts(optimized) == op_counts(model)


def test_wrong_gelu_constant_is_not_fused():
    model = gelu_model("tanh", half=0.6)
    optimized, stats = ort_fuse(model)
    assert stats == {}
    assert_same(model, optimized)


def test_nothing_for_other_targets():
    for model in (layer_norm_of_sum([2, 5, HIDDEN], [2, 5, HIDDEN]), gelu_model("erf"), gelu_model("tanh")):
        for target in (Target.GENERIC, Target.OPENVINO, Target.TENSORRT):
            optimized, stats = ort_fuse(model, target)
            assert stats == {} and op_counts(optimized) == op_counts(model)


def self_attention(heads: int = 2, head_size: int = 4, key_bias: bool = True, same_input: bool = True,
                   value_size: int | None = None) -> onnx.ModelProto:
    """BERT's self-attention: q, k, v projections of x, heads split, SDPA, merge."""
    value_size = value_size or head_size
    hidden = heads * head_size
    g = Graph()
    x = g.input("x", [2, 5, hidden])
    other = x if same_input else g.input("memory", [2, 5, hidden])

    def project(source: str, width: int, bias: bool) -> str:
        product = g.node("MatMul", source, g.random(hidden, width))
        return g.node("Add", product, g.random(width)) if bias else product

    def split(value: str, size: int, perm: list[int]) -> str:
        return g.node("Transpose", g.node("Reshape", value, g.const([0, 0, heads, size], np.int64)), perm=perm)

    query = split(project(x, hidden, True), head_size, [0, 2, 1, 3])
    keys = split(project(other, hidden, key_bias), head_size, [0, 2, 3, 1])
    values = split(project(other, heads * value_size, True), value_size, [0, 2, 1, 3])
    scores = g.node("Mul", g.node("MatMul", query, keys), g.const(1 / math.sqrt(head_size)))
    probabilities = g.node("Softmax", g.node("Add", scores, g.input("mask", [2, 1, 5, 5])), axis=-1)
    merged = g.node("Transpose", g.node("MatMul", probabilities, values), perm=[0, 2, 1, 3])
    y = g.node("Reshape", merged, g.const([0, 0, -1], np.int64))
    return g.model((y, [2, 5, heads * value_size]))


@pytest.mark.parametrize("kwargs", [{}, {"key_bias": False}, {"value_size": 6}], ids=["bert", "whisper", "wide_values"])
def test_packed_attention(kwargs):
    model = self_attention(**kwargs)
    optimized, stats = ort_fuse(model, passes=(Attention(), OrtFuse()))
    assert stats == {"sdpa_to_multi_head_attention": 1, "packed_attention": 1}
    counts = op_counts(optimized)
    assert counts.get("Attention") == 1 and "MatMul" not in counts and "MultiHeadAttention" not in counts, counts
    assert_same(model, optimized)


def test_cross_attention_is_not_packed():
    model = self_attention(same_input=False)
    optimized, stats = ort_fuse(model, passes=(Attention(), OrtFuse()))
    assert stats == {"sdpa_to_multi_head_attention": 1}
    assert op_counts(optimized).get("MultiHeadAttention") == 1
    assert_same(model, optimized)


def test_golden_biased_gelu():
    """Before: TorchScript's erf Gelu of a biased MatMul; after: MatMul, Add, com.microsoft.Gelu."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        gelu (float[2, 8] x) => (float[2, 4] y) {
            w = Constant <value = float[8, 4] {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1,
                                               1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1}> ()
            b = Constant <value = float[4] {0.1, -0.2, 0.3, -0.4}> ()
            root2 = Constant <value = float {1.4142135}> ()
            one = Constant <value = float {1}> ()
            half = Constant <value = float {0.5}> ()
            h = MatMul(x, w)
            hb = Add(h, b)
            scaled = Div(hb, root2)
            e = Erf(scaled)
            e1 = Add(e, one)
            product = Mul(hb, e1)
            y = Mul(product, half)
        }
    """)
    optimized, stats = ort_fuse(model)
    assert stats == {"gelu": 1}
    assert [n.op_type for n in optimized.graph.node if n.op_type != "Constant"] == ["MatMul", "Add", "Gelu"]
    assert_same(model, optimized)
