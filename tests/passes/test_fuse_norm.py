"""Tests of ``fuse``'s normalization rules: LayerNormalization and RMSNormalization from their parts.

The graphs spell the normalizations the way exporters do: TorchScript (ReduceMean axes as an attribute,
``Pow(d, 2)``, ``Div``, ``1 / sqrt`` for rsqrt), the dynamo exporter (axes as an input from opset 18,
``Reciprocal``) and tf2onnx (``d * d``, ``x * r + (beta - mean * r)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import apply_checked, assert_same_outputs, make_model, op_counts, run, tensor, value
from onnx import TensorProto, helper

import onnxopt
from onnxopt.pass_infra import Target
from onnxopt.passes.fuse import Fuse

ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


def fuse(model: onnx.ModelProto, target: Target = Target.GENERIC):
    """Runs fuse once; checks the pass contracts and onnx.checker on the result."""
    return apply_checked(Fuse(), model, target)


class Builder:
    """Nodes and constants of a test graph, with fresh value names."""

    def __init__(self, opset: int, dtype=np.float32):
        self.opset, self.dtype = opset, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def const(self, array, dtype=None) -> str:
        name = self.fresh("c")
        self.inits.append(tensor(name, np.asarray(array, dtype or self.dtype)))
        return name

    def node(self, op: str, *inputs: str, **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def reduce_mean(self, x: str, axes) -> str:
        if self.opset >= 18:
            return self.node("ReduceMean", x, self.const(list(axes), np.int64))
        return self.node("ReduceMean", x, axes=list(axes))

    def square(self, d: str, form: str) -> str:
        return self.node("Pow", d, self.const(2.0)) if form == "pow" else self.node("Mul", d, d)

    def divide(self, numerator: str, denominator: str, form: str) -> str:
        if form == "div":
            return self.node("Div", numerator, denominator)
        if form == "reciprocal":
            return self.node("Mul", numerator, self.node("Reciprocal", denominator))
        return self.node("Mul", numerator, self.node("Div", self.const(1.0), denominator))  # TorchScript's rsqrt

    def model(self, output: str, shape, extra_outputs=(), extra_inputs=(), output_shape=None) -> onnx.ModelProto:
        """The model from input ``x`` of ``shape`` to output ``y`` (the value ``output``, renamed)."""
        producer = next(n for n in self.nodes if output in n.output)
        producer.output[list(producer.output).index(output)] = "y"
        elem = ELEM[self.dtype]
        outputs = [value("y", elem, list(output_shape or shape))]
        outputs += [value(n, elem, [f"{n}_{i}" for i in range(len(shape))]) for n in extra_outputs]
        inputs = [value("x", elem, list(shape))] + list(extra_inputs)
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset, check=False)


def layer_norm_model(opset=17, shape=(2, 3, 8), axes=(-1,), variance_axes=None, square="pow", divide="div",
                     gamma=True, beta=True, epsilon=1e-5, dtype=np.float32, gamma_shape=None, keep_output=None):
    """x -> decomposed LayerNormalization (-> * gamma -> + beta) -> y."""
    rng = np.random.default_rng(0)
    b = Builder(opset, dtype)
    mean = b.reduce_mean("x", axes)
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.square(centered, square), variance_axes or axes)
    std = b.node("Sqrt", b.node("Add", variance, b.const(epsilon)))
    y = b.divide(centered, std, divide)
    normalized = [shape[a] for a in sorted(a % len(shape) for a in axes)]
    if gamma:
        y = b.node("Mul", y, b.const(rng.uniform(0.5, 2, gamma_shape or normalized)))
    if beta:
        y = b.node("Add", y, b.const(rng.standard_normal(normalized)))
    outputs = [keep_output(locals())] if keep_output else []
    return b.model(y, shape, extra_outputs=outputs)


def check(model, expected_ops, stats=None, target=Target.GENERIC, rtol=1e-4, atol=1e-5):
    optimized, result = fuse(model, target)
    assert op_counts(optimized) == expected_ops, (op_counts(optimized), result.stats)
    for rule, count in (stats or {}).items():
        assert result.stats[rule] == count, result.stats
    assert_same_outputs(model, optimized, rtol=rtol, atol=atol)
    return optimized


# ---------------------------------------------------------------------------------------------------
# LayerNormalization


@pytest.mark.parametrize("opset", [17, 18], ids=["axes-attribute", "axes-input"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal", "one-over"])
def test_layer_norm_with_gamma_and_beta_becomes_one_node(opset, square, divide):
    model = layer_norm_model(opset=opset, square=square, divide=divide)
    optimized = check(model, {"LayerNormalization": 1}, {"layer_norm": 1, "norm_scale": 1, "layer_norm_bias": 1})
    node = optimized.graph.node[0]
    assert list(node.output) == ["y"]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "axis")) == -1


@pytest.mark.parametrize("gamma,beta", [(False, False), (True, False), (False, True)])
def test_layer_norm_without_gamma_or_beta(gamma, beta):
    check(layer_norm_model(gamma=gamma, beta=beta), {"LayerNormalization": 1})


@pytest.mark.parametrize("axes", [(-2, -1), (1, 2), (2, 1)], ids=["negative", "positive", "unsorted"])
def test_layer_norm_over_the_last_two_axes(axes):
    optimized = check(layer_norm_model(axes=axes), {"LayerNormalization": 1})
    node = optimized.graph.node[0]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "axis")) == -2


def test_layer_norm_float16():
    model = layer_norm_model(dtype=np.float16)
    check(model, {"LayerNormalization": 1}, rtol=1e-2, atol=1e-2)


def test_layer_norm_gamma_of_rank_three_with_leading_ones():
    check(layer_norm_model(gamma_shape=(1, 1, 8)), {"LayerNormalization": 1})


@pytest.mark.parametrize("case", [
    dict(axes=(1,), gamma=False, beta=False),  # a middle axis: not LayerNormalization's
    dict(axes=(0, 2), gamma=False, beta=False),  # not contiguous last axes
    dict(axes=(-1,), variance_axes=(-2, -1)),  # mean and variance over different axes
    dict(dtype=np.float64),                   # the kernel would compute in float32
    dict(opset=16),                           # no LayerNormalization in this opset
], ids=["middle-axis", "non-contiguous", "different-axes", "float64", "opset16"])
def test_layer_norm_does_not_fire(case):
    model = layer_norm_model(**case)
    optimized, result = fuse(model)
    assert "LayerNormalization" not in op_counts(optimized)
    assert not result.stats.get("layer_norm")
    assert_same_outputs(model, optimized, atol=1e-5)


def test_layer_norm_keeps_an_intermediate_read_elsewhere():
    model = layer_norm_model(keep_output=lambda names: names["centered"])
    optimized, result = fuse(model)
    assert result.stats["layer_norm"] == 0
    assert_same_outputs(model, optimized)


def test_layer_norm_with_epsilon_from_an_input_does_not_fire():
    b = Builder(17)
    mean = b.reduce_mean("x", (-1,))
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.square(centered, "pow"), (-1,))
    y = b.node("Div", centered, b.node("Sqrt", b.node("Add", variance, "eps")))
    model = b.model(y, (2, 3, 8), extra_inputs=[value("eps", TensorProto.FLOAT, [])])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32),
             "eps": np.array(1e-5, np.float32)}
    optimized, result = fuse(model)
    assert result.stats["layer_norm"] == 0
    assert_same_outputs(model, optimized, feeds)


def test_layer_norm_of_a_mean_of_another_value_does_not_fire():
    b = Builder(17)
    mean = b.reduce_mean("z", (-1,))
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.square(centered, "pow"), (-1,))
    y = b.node("Div", centered, b.node("Sqrt", b.node("Add", variance, b.const(1e-5))))
    model = b.model(y, (2, 3, 8), extra_inputs=[value("z", TensorProto.FLOAT, [2, 3, 8])])
    optimized, result = fuse(model)
    assert result.stats["layer_norm"] == 0
    assert_same_outputs(model, optimized)


def test_layer_norm_epsilon_with_more_axes_than_x_does_not_fire():
    # A [1, 1, 1, 1] epsilon makes the decomposed result 4-D; LayerNormalization's would stay 3-D.
    b = Builder(17)
    mean = b.reduce_mean("x", (-1,))
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.square(centered, "pow"), (-1,))
    y = b.node("Div", centered, b.node("Sqrt", b.node("Add", variance, b.const(np.full((1, 1, 1, 1), 1e-5)))))
    model = b.model(y, (2, 3, 8), output_shape=(1, 2, 3, 8))
    optimized, result = fuse(model)
    assert result.stats["layer_norm"] == 0
    assert_same_outputs(model, optimized)


def test_gamma_along_a_batch_axis_is_not_folded():
    # gamma of shape [3, 1] varies along axis 1, which LayerNormalization's scale cannot express.
    model = layer_norm_model(gamma_shape=(3, 1), beta=False)
    check(model, {"LayerNormalization": 1, "Mul": 1}, {"layer_norm": 1, "norm_scale": 0})


def test_layer_norm_for_every_target():
    for target in Target:
        check(layer_norm_model(), {"LayerNormalization": 1}, target=target)


# ---------------------------------------------------------------------------------------------------
# tf2onnx's batch-normalization form


def affine_layer_norm_model(gamma=True, beta=True, opset=17, shape=(2, 5, 16), negated=False, pooled=False):
    """Keras LayerNormalization as tf2onnx writes it: x * r + (beta - mean * r), r = gamma * rsqrt(var + eps).

    ``negated``: Keras 3's x * r + (-mean * r + beta); ``pooled``: the means as GlobalAveragePool, which
    tf2onnx 1.17 writes for a last-axis mean of a rank-3 tensor.
    """
    rng = np.random.default_rng(1)
    b = Builder(opset)

    def mean_of(value):
        return b.node("GlobalAveragePool", value) if pooled else b.reduce_mean(value, (-1,))

    mean = mean_of("x")
    centered = b.node("Sub", "x", mean)
    variance = mean_of(b.node("Mul", centered, centered))
    inverse = b.node("Reciprocal", b.node("Sqrt", b.node("Add", variance, b.const(1e-3))))
    factor = b.node("Mul", inverse, b.const(rng.uniform(0.5, 2, shape[-1]))) if gamma else inverse
    scaled = b.node("Mul", "x", factor)
    shift = b.const(rng.standard_normal(shape[-1])) if beta else None
    if negated:
        negated_shift = b.node("Mul", b.node("Neg", mean), factor)
        y = b.node("Add", scaled, b.node("Add", negated_shift, shift) if beta else negated_shift)
    elif beta:
        y = b.node("Add", scaled, b.node("Sub", shift, b.node("Mul", mean, factor)))
    else:
        y = b.node("Sub", scaled, b.node("Mul", mean, factor))
    return b.model(y, shape)


@pytest.mark.parametrize("gamma,beta", [(True, True), (False, True), (True, False), (False, False)])
def test_tf2onnx_layer_norm_becomes_one_node(gamma, beta):
    check(affine_layer_norm_model(gamma, beta), {"LayerNormalization": 1}, {"layer_norm_affine": 1})


@pytest.mark.parametrize("beta", [True, False])
@pytest.mark.parametrize("pooled", [False, True], ids=["reduce_mean", "global_average_pool"])
def test_keras3_layer_norm_with_a_negated_mean_becomes_one_node(beta, pooled):
    model = affine_layer_norm_model(beta=beta, negated=True, pooled=pooled)
    check(model, {"LayerNormalization": 1}, {"layer_norm_affine": 1})


def test_global_average_pool_over_two_axes_normalizes_both():
    # On [N, C, H, W] GlobalAveragePool averages H and W: the normalization runs over the last two axes.
    optimized = check(affine_layer_norm_model(gamma=False, beta=False, shape=(2, 3, 4, 5), pooled=True),
                      {"LayerNormalization": 1}, {"layer_norm_affine": 1})
    axis = next(a for a in optimized.graph.node[0].attribute if a.name == "axis")
    assert helper.get_attribute_value(axis) == -2


def test_tf2onnx_layer_norm_with_mismatched_factors_does_not_fire():
    # x is multiplied by gamma * r, the mean by r alone: not a normalization.
    b = Builder(17)
    mean = b.reduce_mean("x", (-1,))
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.node("Mul", centered, centered), (-1,))
    inverse = b.node("Reciprocal", b.node("Sqrt", b.node("Add", variance, b.const(1e-3))))
    factor = b.node("Mul", inverse, b.const(np.linspace(0.5, 2, 16)))
    y = b.node("Add", b.node("Mul", "x", factor), b.node("Sub", b.const(np.zeros(16)), b.node("Mul", mean, inverse)))
    model = b.model(y, (2, 5, 16))
    optimized, result = fuse(model)
    assert result.stats["layer_norm_affine"] == 0
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# RMSNormalization


def rms_norm_model(opset=23, divide="reciprocal", weight=True, square="pow", axes=(-1,), shape=(2, 3, 8)):
    """x -> x / sqrt(mean(x^2) + eps) (-> * weight) -> y, as the exporters write LLaMA's and T5's RMSNorm."""
    b = Builder(opset)
    mean_square = b.reduce_mean(b.square("x", square), axes)
    y = b.divide("x", b.node("Sqrt", b.node("Add", mean_square, b.const(1e-6))), divide)
    if weight:
        y = b.node("Mul", b.const(np.random.default_rng(2).uniform(0.5, 2, shape[-1])), y)
    return b.model(y, shape)


@pytest.mark.parametrize("divide", ["div", "reciprocal", "one-over"])
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_rms_norm_with_weight_becomes_one_node(divide, square):
    check(rms_norm_model(divide=divide, square=square), {"RMSNormalization": 1}, {"rms_norm": 1, "norm_scale": 1})


def test_rms_norm_without_weight():
    check(rms_norm_model(weight=False), {"RMSNormalization": 1})


@pytest.mark.parametrize("case", [dict(opset=22), dict(axes=(1,))], ids=["opset22", "middle-axis"])
def test_rms_norm_does_not_fire(case):
    model = rms_norm_model(**case)
    optimized, _result = fuse(model)
    assert "RMSNormalization" not in op_counts(optimized)
    assert_same_outputs(model, optimized)


def test_rms_norm_is_not_emitted_for_tensorrt():
    model = rms_norm_model()
    optimized, _result = fuse(model, Target.TENSORRT)
    assert "RMSNormalization" not in op_counts(optimized)
    assert_same_outputs(model, optimized)


def test_layer_norm_at_opset_23_is_not_taken_for_rms_norm_of_the_centered_value():
    check(layer_norm_model(opset=23), {"LayerNormalization": 1}, {"rms_norm": 0})


def test_beta_from_a_graph_input_is_not_folded():
    b = Builder(17)
    mean = b.reduce_mean("x", (-1,))
    centered = b.node("Sub", "x", mean)
    variance = b.reduce_mean(b.square(centered, "pow"), (-1,))
    y = b.node("Add", b.node("Div", centered, b.node("Sqrt", b.node("Add", variance, b.const(1e-5)))), "beta")
    model = b.model(y, (2, 3, 8), extra_inputs=[value("beta", TensorProto.FLOAT, [8])])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "beta": rng.standard_normal(8).astype(np.float32)}
    optimized, result = fuse(model)
    assert result.stats["layer_norm"] == 1 and result.stats["layer_norm_bias"] == 0
    assert op_counts(optimized) == {"LayerNormalization": 1, "Add": 1}
    assert_same_outputs(model, optimized, feeds)


# ---------------------------------------------------------------------------------------------------
# Dynamic axes: only the normalized axes' sizes must be known


DYNAMIC = ("batch", "sequence", 8)


def dynamic_feeds(batch: int, sequence: int, width: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch * 10 + sequence).standard_normal((batch, sequence, width))
            .astype(np.float32)}


def assert_same_for_sizes(model, optimized, sizes=((2, 5), (1, 1), (3, 2), (0, 4))):
    """The same outputs for several batch and sequence sizes, an empty batch among them."""
    for batch, sequence in sizes:
        assert_same_outputs(model, optimized, dynamic_feeds(batch, sequence))


def test_rms_norm_with_dynamic_batch_and_sequence_becomes_one_node():
    model = rms_norm_model(shape=DYNAMIC)
    optimized = check(model, {"RMSNormalization": 1}, {"rms_norm": 1, "norm_scale": 1})
    assert_same_for_sizes(model, optimized)


@pytest.mark.parametrize("divide", ["div", "reciprocal", "one-over"])
def test_layer_norm_with_dynamic_batch_and_sequence_becomes_one_node(divide):
    model = layer_norm_model(shape=DYNAMIC, divide=divide)
    optimized = check(model, {"LayerNormalization": 1}, {"layer_norm": 1, "norm_scale": 1, "layer_norm_bias": 1})
    assert_same_for_sizes(model, optimized)


def test_layer_norm_gamma_with_leading_ones_and_dynamic_batch():
    model = layer_norm_model(shape=DYNAMIC, gamma_shape=(1, 1, 8))
    optimized = check(model, {"LayerNormalization": 1}, {"norm_scale": 1})
    assert_same_for_sizes(model, optimized)


def test_tf2onnx_layer_norm_with_dynamic_batch_becomes_one_node():
    model = affine_layer_norm_model(shape=("batch", "sequence", 16))
    optimized = check(model, {"LayerNormalization": 1}, {"layer_norm_affine": 1})
    for batch, sequence in ((2, 5), (1, 1), (0, 3)):
        assert_same_outputs(model, optimized, dynamic_feeds(batch, sequence, 16))


@pytest.mark.parametrize("build", [
    lambda: rms_norm_model(shape=("batch", "sequence", "hidden"), weight=False),
    lambda: layer_norm_model(shape=("batch", "sequence", "hidden"), gamma=False, beta=False),
    lambda: layer_norm_model(shape=("batch", "sequence", 8), axes=(-2, -1), gamma=False, beta=False),
], ids=["rms-dynamic-hidden", "layer-dynamic-hidden", "layer-over-a-dynamic-axis"])
def test_norm_over_a_dynamic_axis_does_not_fire(build):
    # The scale LayerNormalization and RMSNormalization need has the normalized shape, unknown here.
    model = build()
    optimized, result = fuse(model)
    assert not {"LayerNormalization", "RMSNormalization"} & set(op_counts(optimized))
    assert not result.stats.get("layer_norm") and not result.stats.get("rms_norm")
    assert_same_for_sizes(model, optimized, ((2, 5), (1, 3)))


def test_gamma_along_a_dynamic_batch_axis_is_not_folded():
    # gamma [4, 1, 8] broadcasts a batch of 1 to 4: the normalization's scale could not do that.
    model = layer_norm_model(shape=("batch", "sequence", 8), gamma_shape=(4, 1, 8), beta=False)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "out_batch"
    optimized, result = fuse(model)
    assert op_counts(optimized) == {"LayerNormalization": 1, "Mul": 1}
    assert result.stats["layer_norm"] == 1 and result.stats["norm_scale"] == 0
    assert run(optimized, dynamic_feeds(1, 3))[0].shape == (4, 3, 8)
    assert_same_for_sizes(model, optimized, ((1, 3), (4, 2)))


# ---------------------------------------------------------------------------------------------------
# Exported models, whose batch and sequence axes are dynamic


FIXTURES = Path(__file__).parents[1] / "fixtures" / "models"
LLAMA_NORMS = 5  # before attention and before the MLP in each of the 2 layers, and the final norm
LLAMA_FIXTURES = ["llama_tiny_torchscript17.onnx", "llama_tiny_dynamo18.onnx",
                  "llama_tiny_past_torchscript17.onnx", "llama_tiny_past_dynamo18.onnx"]


def fixture_feeds(model: onnx.ModelProto, sizes: dict[str, int], vocabulary: int = 64) -> dict[str, np.ndarray]:
    """Inputs for the named dynamic sizes: token ids below ``vocabulary``, masks of ones, positions in order."""
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or sizes[d.dim_param] for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name == "position_ids":
            feeds[vi.name] = np.broadcast_to(np.arange(dims[1]) + sizes.get("past_sequence", 0), dims).astype(dtype)
        elif "mask" in vi.name:
            feeds[vi.name] = np.ones(dims, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 2 if "type" in vi.name else vocabulary, dims).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def rule_hits(report) -> dict[str, int]:
    hits: dict[str, int] = {}
    for row in report.per_pass():
        for rule, count in row["stats"].items():
            hits[rule] = hits.get(rule, 0) + count
    return hits


def llama_sizes(batch: int, sequence: int, past: int = 3) -> dict[str, int]:
    return {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", LLAMA_FIXTURES)
def test_every_rms_norm_of_the_llama_exports_is_found(fixture):
    # The default pipeline: TorchScript casts the normalized value to its own type before the weight,
    # and only once another pass has dropped that Cast is the weight folded into the scale.
    model = onnx.load(str(FIXTURES / fixture))
    result = onnxopt.optimize_model(model, upgrade_opset=23, verify=False)
    optimized, hits = result.model, rule_hits(result.report)
    assert op_counts(optimized).get("RMSNormalization") == LLAMA_NORMS
    assert hits["rms_norm"] == LLAMA_NORMS and hits["norm_scale"] == LLAMA_NORMS
    assert "ReduceMean" not in op_counts(optimized)
    for batch, sequence in ((2, 5), (1, 3)):
        assert_same_outputs(model, optimized, fixture_feeds(model, llama_sizes(batch, sequence)))


def decomposed_layer_norm(node: onnx.NodeProto, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A LayerNormalization over the last axis as TorchScript wrote it before opset 17, and its constants.

    ``(x - mean) / sqrt(mean((x - mean)^2) + eps) * scale + bias``, with ReduceMean's axes an attribute
    before opset 18 and an input from it.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("axis", -1) == -1 and len(node.output) == 1
    x, scale, bias = node.input
    prefix = f"{node.output[0]}_decomposed"

    def name(suffix: str) -> str:
        return prefix + suffix

    constants = [tensor(name("_two"), np.array(2.0, np.float32)),
                 tensor(name("_eps"), np.array(attrs.get("epsilon", 1e-5), np.float32)),
                 tensor(name("_axes"), np.array([-1], np.int64))]

    def reduce_mean(value: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [value, name("_axes")], [out])
        return helper.make_node("ReduceMean", [value], [out], axes=[-1])

    nodes = [reduce_mean(x, name("_mean")),
             helper.make_node("Sub", [x, name("_mean")], [name("_centered")]),
             helper.make_node("Pow", [name("_centered"), name("_two")], [name("_square")]),
             reduce_mean(name("_square"), name("_variance")),
             helper.make_node("Add", [name("_variance"), name("_eps")], [name("_shifted")]),
             helper.make_node("Sqrt", [name("_shifted")], [name("_std")]),
             helper.make_node("Div", [name("_centered"), name("_std")], [name("_normalized")]),
             helper.make_node("Mul", [name("_normalized"), scale], [name("_scaled")]),
             helper.make_node("Add", [name("_scaled"), bias], [node.output[0]])]
    return nodes, constants


def decompose_layer_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each LayerNormalization written out as ``decomposed_layer_norm`` does."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    decomposed = onnx.ModelProto()
    decomposed.CopyFrom(model)
    del decomposed.graph.node[:]
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            decomposed.graph.node.append(node)
            continue
        nodes, constants = decomposed_layer_norm(node, opset)
        decomposed.graph.node.extend(nodes)
        decomposed.graph.initializer.extend(constants)
    return decomposed


EXPORTED = {"bert_torchscript17.onnx": 5, "bert_dynamo18.onnx": 5, "gpt2_past_torchscript17.onnx": 5,
            "gpt2_past_dynamo18.onnx": 5}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(EXPORTED))
def test_every_decomposed_layer_norm_of_the_exported_transformers_is_found(fixture):
    exported = onnx.load(str(FIXTURES / fixture))
    model = decompose_layer_norms(exported)
    assert "LayerNormalization" not in op_counts(model)
    optimized, result = fuse(model)
    assert op_counts(optimized).get("LayerNormalization") == EXPORTED[fixture]
    assert (result.stats["layer_norm"] == result.stats["norm_scale"] == result.stats["layer_norm_bias"]
            == EXPORTED[fixture])
    for batch, sequence in ((2, 7), (1, 3)):
        sizes = {"batch": batch, "sequence": sequence, "past_sequence": 3, "total_sequence": sequence + 3}
        assert_same_outputs(model, optimized, fixture_feeds(model, sizes))
