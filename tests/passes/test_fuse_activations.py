"""Tests of ``fuse``'s activation rules: Gelu (erf and tanh forms), HardSigmoid, HardSwish and Mish.

Each form is written as graphs the exporters produce (TorchScript: ``Mul(Mul(x, 1 + erf), 0.5)``,
``x * x * x``; the dynamo exporter: ``Mul(x, Mul(0.5, 1 + erf))``, ``Pow(x, 3)``) and other orders.
Inputs are spread over [-6, 6] so that clamps and saturations are exercised.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_counts, value
from onnx import TensorProto, helper
from test_fuse_norm import Builder, fuse

from onnxopt.pass_infra import Target

SHAPE = (2, 3, 8)


def feeds(dtype=np.float32):
    return {"x": np.random.default_rng(0).uniform(-6, 6, SHAPE).astype(dtype)}


def expect(model, expected_ops, rule, fired=True, target=Target.GENERIC, rtol=1e-4, atol=1e-5):
    optimized, result = fuse(model, target)
    assert result.stats[rule] == int(fired), result.stats
    if expected_ops is not None:
        assert op_counts(optimized) == expected_ops, op_counts(optimized)
    assert_same_outputs(model, optimized, feeds(), rtol=rtol, atol=atol)
    return optimized


def unchanged(model, rule, target=Target.GENERIC):
    optimized, result = fuse(model, target)
    assert result.stats.get(rule, 0) == 0, result.stats
    assert op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized, feeds())


# ---------------------------------------------------------------------------------------------------
# Gelu, erf form


def gelu_erf_model(order="torchscript", opset=20, half=0.5, root2=math.sqrt(2), scale_as="div", half_shape=()):
    b = Builder(opset)
    scaled = b.node("Div", "x", b.const(root2)) if scale_as == "div" else b.node("Mul", "x", b.const(1 / root2))
    cdf2 = b.node("Add", b.node("Erf", scaled), b.const(1.0))
    h = b.const(np.full(half_shape, half))
    if order == "torchscript":    # (x * (1 + erf)) * 0.5
        y = b.node("Mul", b.node("Mul", "x", cdf2), h)
    elif order == "dynamo":       # x * (0.5 * (1 + erf))
        y = b.node("Mul", "x", b.node("Mul", h, cdf2))
    else:                         # (0.5 * x) * (1 + erf)
        y = b.node("Mul", b.node("Mul", h, "x"), cdf2)
    return b.model(y, SHAPE, output_shape=(1,) * (len(half_shape) - len(SHAPE)) + SHAPE)


@pytest.mark.parametrize("order", ["torchscript", "dynamo", "half-first"])
@pytest.mark.parametrize("scale_as", ["div", "mul"])
def test_gelu_erf_becomes_gelu(order, scale_as):
    optimized = expect(gelu_erf_model(order, scale_as=scale_as), {"Gelu": 1}, "gelu_erf")
    assert not optimized.graph.node[0].attribute  # approximate="none", the default


def test_gelu_erf_float32_rounded_constants():
    expect(gelu_erf_model(root2=float(np.float32(math.sqrt(2))), half=float(np.float32(0.5))), {"Gelu": 1}, "gelu_erf")


@pytest.mark.parametrize("case", [dict(half=0.6), dict(root2=1.41), dict(opset=19), dict(half_shape=(1, 1, 1, 1))],
                         ids=["not-a-half", "imprecise-sqrt2", "opset19", "constant-raises-rank"])
def test_gelu_erf_does_not_fire(case):
    unchanged(gelu_erf_model(**case), "gelu_erf")


def test_gelu_is_kept_decomposed_for_tensorrt():
    unchanged(gelu_erf_model(), "gelu_erf", Target.TENSORRT)


# ---------------------------------------------------------------------------------------------------
# Gelu, tanh form


def gelu_tanh_model(form="torchscript", opset=20, cubic=0.044715):
    b = Builder(opset)
    if form == "torchscript":  # x * (x * x), constants on the left, 0.5 last
        cube = b.node("Mul", "x", b.node("Mul", "x", "x"))
        inner = b.node("Mul", b.const(math.sqrt(2 / math.pi)), b.node("Add", "x", b.node("Mul", b.const(cubic), cube)))
        y = b.node("Mul", b.const(0.5), b.node("Mul", "x", b.node("Add", b.const(1.0), b.node("Tanh", inner))))
    else:                      # dynamo: Pow(x, 3), x * (0.5 * (1 + tanh))
        cube = b.node("Pow", "x", b.const(3.0))
        inner = b.node("Mul", b.const(math.sqrt(2 / math.pi)), b.node("Add", "x", b.node("Mul", b.const(cubic), cube)))
        y = b.node("Mul", "x", b.node("Mul", b.const(0.5), b.node("Add", b.node("Tanh", inner), b.const(1.0))))
    return b.model(y, SHAPE)


@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
def test_gelu_tanh_becomes_gelu_tanh(form):
    optimized = expect(gelu_tanh_model(form), {"Gelu": 1}, "gelu_tanh")
    assert helper.get_attribute_value(optimized.graph.node[0].attribute[0]) == b"tanh"


@pytest.mark.parametrize("case", [dict(cubic=0.05), dict(opset=18)], ids=["other-cubic", "opset18"])
def test_gelu_tanh_does_not_fire(case):
    unchanged(gelu_tanh_model(**case), "gelu_tanh")


# ---------------------------------------------------------------------------------------------------
# HardSigmoid


AFFINE_FORMS = ("clip", "min-max", "max-min")


def hard_sigmoid_model(form, opset=17, alpha=0.2, beta=0.5, low=0.0, high=1.0):
    b = Builder(opset)
    affine = b.node("Add", b.node("Mul", "x", b.const(alpha)), b.const(beta)) if form in AFFINE_FORMS else None
    if form == "clip":
        if opset < 11:
            y = b.node("Clip", affine, min=low, max=high)
        else:
            y = b.node("Clip", affine, b.const(low), b.const(high))
    elif form == "min-max":
        y = b.node("Min", b.node("Max", affine, b.const(low)), b.const(high))
    elif form == "max-min":
        y = b.node("Max", b.const(low), b.node("Min", b.const(high), affine))
    elif form == "relu6-div":  # relu6(x + 3) / 6, torch's hardsigmoid written out
        y = b.node("Div", b.node("Clip", b.node("Add", "x", b.const(3.0)), b.const(0.0), b.const(6.0)), b.const(6.0))
    elif form == "relu6-mul":  # min(relu(x + 3), 6) * (1 / 6)
        relu6 = b.node("Min", b.node("Relu", b.node("Add", "x", b.const(3.0))), b.const(6.0))
        y = b.node("Mul", relu6, b.const(1 / 6))
    else:                      # (x + 1) / 4 clamped to [0, 1]
        y = b.node("Clip", b.node("Div", b.node("Add", "x", b.const(1.0)), b.const(4.0)), b.const(low), b.const(high))
    return b.model(y, SHAPE)


@pytest.mark.parametrize("form,alpha,beta", [("clip", 0.2, 0.5), ("min-max", 0.2, 0.5), ("max-min", 0.2, 0.5),
                                             ("relu6-div", 1 / 6, 0.5), ("relu6-mul", 1 / 6, 0.5),
                                             ("shift-div", 0.25, 0.25)])
def test_hard_sigmoid_from_clamps(form, alpha, beta):
    optimized = expect(hard_sigmoid_model(form), {"HardSigmoid": 1}, "hard_sigmoid")
    attrs = {a.name: helper.get_attribute_value(a) for a in optimized.graph.node[0].attribute}
    assert np.isclose(attrs["alpha"], alpha, rtol=1e-6) and np.isclose(attrs["beta"], beta, rtol=1e-6)


def test_hard_sigmoid_with_clip_attributes_before_opset_11():
    optimized, result = fuse(hard_sigmoid_model("clip", opset=10))  # onnxruntime runs no opset-10 Clip here
    assert result.stats["hard_sigmoid"] == 1 and op_counts(optimized) == {"HardSigmoid": 1}


@pytest.mark.parametrize("case", [dict(high=2.0), dict(low=-1.0)], ids=["upper-bound-2", "lower-bound-minus-1"])
def test_hard_sigmoid_does_not_fire_on_other_bounds(case):
    unchanged(hard_sigmoid_model("clip", **case), "hard_sigmoid")


# ---------------------------------------------------------------------------------------------------
# HardSwish


def hard_swish_model(form, opset=17, alpha=1 / 6):
    b = Builder(opset)
    if form == "hard-sigmoid":
        y = b.node("Mul", "x", b.node("HardSigmoid", "x", alpha=alpha))
        return b.model(y, SHAPE)
    relu6 = b.node("Clip", b.node("Add", "x", b.const(3.0)), b.const(0.0), b.const(6.0))
    if form == "div":          # (x * relu6(x + 3)) / 6
        y = b.node("Div", b.node("Mul", "x", relu6), b.const(6.0))
    elif form == "mul-last":   # (x * relu6(x + 3)) * (1 / 6)
        y = b.node("Mul", b.node("Mul", "x", relu6), b.const(1 / 6))
    else:                      # x * (relu6(x + 3) * (1 / 6)): HardSigmoid first, then HardSwish
        y = b.node("Mul", "x", b.node("Mul", relu6, b.const(1 / 6)))
    return b.model(y, SHAPE)


@pytest.mark.parametrize("form", ["hard-sigmoid", "div", "mul-last", "mul-inner"])
def test_hard_swish_from_parts(form):
    expect(hard_swish_model(form), {"HardSwish": 1}, "hard_swish")


@pytest.mark.parametrize("case", [dict(form="hard-sigmoid", alpha=0.2), dict(form="div", opset=13)],
                         ids=["alpha-0.2", "opset13"])
def test_hard_swish_does_not_fire(case):
    model = hard_swish_model(**case)
    optimized, result = fuse(model)
    assert result.stats["hard_swish"] == 0 and "HardSwish" not in op_counts(optimized)
    assert_same_outputs(model, optimized, feeds())


# ---------------------------------------------------------------------------------------------------
# Mish


def mish_model(softplus="op", opset=18, other_input=False):
    b = Builder(opset)
    source = "z" if other_input else "x"
    if softplus == "op":
        soft = b.node("Softplus", source)
    else:
        soft = b.node("Log", b.node("Add", b.node("Exp", source), b.const(1.0)))
    y = b.node("Mul", "x", b.node("Tanh", soft))
    return b.model(y, SHAPE, extra_inputs=[value("z", TensorProto.FLOAT, list(SHAPE))] if other_input else ())


@pytest.mark.parametrize("softplus", ["op", "log-exp"])
def test_mish_from_parts(softplus):
    expect(mish_model(softplus), {"Mish": 1}, "mish")


def test_mish_of_another_value_does_not_fire():
    model = mish_model(other_input=True)
    optimized, result = fuse(model)
    assert result.stats["mish"] == 0
    rng = np.random.default_rng(0)
    assert_same_outputs(model, optimized, {"x": rng.standard_normal(SHAPE).astype(np.float32),
                                           "z": rng.standard_normal(SHAPE).astype(np.float32)})


def test_mish_before_opset_18_does_not_fire():
    unchanged(mish_model(opset=17), "mish")


# ---------------------------------------------------------------------------------------------------
# Swish


def swish_model(alpha=None, opset=24, alpha_first=False, sigmoid_first=False, dtype=np.float32):
    b = Builder(opset, dtype)
    inner = "x"
    if alpha is not None:
        constant = b.const(alpha)
        inner = b.node("Mul", constant, "x") if alpha_first else b.node("Mul", "x", constant)
    sigmoid = b.node("Sigmoid", inner)
    return b.model(b.node("Mul", sigmoid, "x") if sigmoid_first else b.node("Mul", "x", sigmoid), SHAPE)


@pytest.mark.parametrize("alpha,alpha_first,sigmoid_first", [(None, False, False), (None, False, True),
                                                             (1.702, False, False), (0.5, True, True)],
                         ids=["silu", "silu-swapped", "alpha", "alpha-swapped"])
@pytest.mark.parametrize("target", [Target.GENERIC, Target.OPENVINO])
def test_swish_from_parts(alpha, alpha_first, sigmoid_first, target):
    optimized = expect(swish_model(alpha, alpha_first=alpha_first, sigmoid_first=sigmoid_first), {"Swish": 1},
                       "swish", target=target)
    node = optimized.graph.node[0]
    assert helper.get_attribute_value(node.attribute[0]) == pytest.approx(alpha or 1.0)


def test_float16_swish():
    model = swish_model(1.5, dtype=np.float16)
    optimized, _ = fuse(model)
    assert op_counts(optimized) == {"Swish": 1}
    assert_same_outputs(model, optimized, feeds(np.float16), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["opset-23", "opset-25", "onnxruntime", "tensor-alpha"])
def test_swish_does_not_fire(case):
    if case == "tensor-alpha":
        b = Builder(24)
        sigmoid = b.node("Sigmoid", b.node("Mul", "x", b.const(np.linspace(0.5, 2.0, SHAPE[-1]))))
        unchanged(b.model(b.node("Mul", "x", sigmoid), SHAPE), "swish")
        return
    # At opset 25 onnxruntime would find no kernel for Swish.
    unchanged(swish_model(opset={"opset-23": 23, "opset-25": 25}.get(case, 24)), "swish",
              target=Target.ORT if case == "onnxruntime" else Target.GENERIC)


def test_float16_gelu():
    b = Builder(20, np.float16)
    cdf2 = b.node("Add", b.node("Erf", b.node("Div", "x", b.const(math.sqrt(2)))), b.const(1.0))
    model = b.model(b.node("Mul", b.node("Mul", "x", cdf2), b.const(0.5)), SHAPE)
    optimized, _result = fuse(model)
    assert op_counts(optimized) == {"Gelu": 1}
    assert_same_outputs(model, optimized, feeds(np.float16), rtol=1e-2, atol=1e-2)


def test_onnx_checker_accepts_every_fused_activation():
    for model in (gelu_erf_model(), gelu_tanh_model(), hard_sigmoid_model("clip"), hard_swish_model("div"),
                  mish_model(), swish_model(2.0)):
        onnx.checker.check_model(fuse(model)[0], full_check=True)
