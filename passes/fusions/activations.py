"""Activation functions recovered from element-wise chains.

* ``gelu_erf`` (opset 20): ``x * 0.5 * (1 + erf(x / sqrt(2)))``, the factors multiplied in any order
  and association, ``/ sqrt(2)`` also as ``* (1 / sqrt(2))`` -> ``Gelu(x)``.
* ``gelu_tanh`` (opset 20): ``x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``, ``x^3`` as
  ``Pow(x, 3)`` or ``x * x * x`` -> ``Gelu(x, approximate="tanh")``.
* ``hard_sigmoid`` (opset 6): ``clamp(alpha * x + beta, 0, 1)``, the clamp as ``Clip`` or ``Min``/``Max``
  (``Relu`` for the lower bound), the affine part as ``x * a + b``, ``x / d + b``, ``(x + c) / d`` or
  ``(x + c) * a``; also ``clamp(alpha * x + beta, 0, k) / k`` (``* (1 / k)``), e.g. ``relu6(x + 3) / 6``
  -> ``HardSigmoid(x, alpha, beta)`` with the constants divided by ``k``.
* ``hard_swish`` (opset 14): ``x * HardSigmoid(x)`` with alpha 1/6 and beta 0.5, and ``x * relu6(x + 3) / 6``
  in any order -> ``HardSwish(x)``.
* ``mish`` (opset 18): ``x * tanh(softplus(x))``, softplus as ``Softplus`` or ``log(exp(x) + 1)`` -> ``Mish(x)``.
* ``swish`` (opset 24 only, see the rule): ``x * sigmoid(x)`` (SiLU) and ``x * sigmoid(alpha * x)`` ->
  ``Swish(x, alpha)``. Not for onnxruntime: 1.32 runs Swish as its function body (Cast, Mul, Sigmoid, Mul),
  which its QuickGelu fusion no longer recognises, so the two-operator form is faster there.

Every constant is compared within ``ULPS`` units in the last place of its type; anything else is left alone. The
fused operators compute the same function in the input's type (float32 and float16 only), so the
results agree to rounding. Constants with more axes than ``x`` (which would broadcast the decomposed
result to a larger shape) stop the fusion.
"""

from __future__ import annotations

import math

import numpy as np

from onnxopt.pass_infra import Target
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import ALL_TARGETS, NOT_TENSORRT, ULPS, close, constants_keep_rank, fusable_float, rank, scalar

SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_erf_pattern(op, x):
    """``x * 0.5 * (1 + erf(x / sqrt(2)))`` in any order and association of the product."""
    scaled = op.either(op.Div(x, op.const(SQRT_2, ulps=ULPS)), op.Mul(x, op.const(1 / SQRT_2, ulps=ULPS)))
    return op.product(x, op.const(0.5, ulps=ULPS), op.Add(op.Erf(scaled), 1))


def gelu_tanh_pattern(op, x):
    """``x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`` in any order of the products."""
    cube = op.either(op.Pow(x, 3), op.product(x, x, x))
    cubic = op.Add(x, op.product(op.const(GELU_CUBIC, ulps=ULPS), cube))
    inner = op.product(op.const(SQRT_2_OVER_PI, ulps=ULPS), cubic)
    return op.product(x, op.const(0.5, ulps=ULPS), op.Add(op.Tanh(inner), 1))


def clamp_pattern(op, value, low, high):
    """``value`` clamped to ``[low, high]``: Clip (bounds as inputs or, before opset 11, attributes), Min/Max, Relu."""
    return op.either(
        op.Clip(value, op.optional(low), op.optional(high)),
        op.Min(op.Max(value, low), high),
        op.Max(op.Min(value, high), low),
        op.Min(op.Relu(value), high),
    )


def affine_pattern(op, x, a, b, c, d):
    """``alpha * x + beta`` as ``x * a + b``, ``x / d + b``, ``(x + c) / d``, ``(x + c) * a``, ``x + c``, ``x * a``."""
    return op.either(op.Add(op.Mul(x, a), b), op.Add(op.Div(x, d), b), op.Div(op.Add(x, c), d),
                     op.Mul(op.Add(x, c), a), op.Add(x, c), op.Mul(x, a))


def hard_sigmoid_pattern(op, x, a, b, c, d, low, high, k):
    """``clamp(alpha * x + beta, 0, 1)`` or ``clamp(alpha * x + beta, 0, k) / k`` (or ``* (1 / k)``)."""
    clamped = clamp_pattern(op, affine_pattern(op, x, a, b, c, d), low, high)
    return op.either(clamped, op.Div(clamped, k, _tag="outer_scale"), op.Mul(clamped, k, _tag="outer_scale"))


def relu6_plus_3_pattern(op, x, low, high):
    return clamp_pattern(op, op.Add(x, 3), low, high)


def hard_swish_pattern(op, x, low, high, k):
    """``x * HardSigmoid(x)``, or ``x * relu6(x + 3)`` divided by 6 (or times 1/6) in any order."""
    relu6 = relu6_plus_3_pattern(op, x, low, high)
    return op.either(op.Mul(x, op.HardSigmoid(x)), op.product(x, relu6, k), op.Div(op.Mul(x, relu6), k, _tag="divide"))


def mish_pattern(op, x):
    """``x * tanh(softplus(x))``, softplus written as ``Softplus(x)`` or ``log(exp(x) + 1)``."""
    return op.Mul(x, op.Tanh(op.either(op.Softplus(x), op.Log(op.Add(op.Exp(x), 1)))))


def swish_pattern(op, x, alpha):
    """``x * sigmoid(x)`` or ``x * sigmoid(alpha * x)``."""
    return op.Mul(x, op.Sigmoid(op.either(x, op.Mul(x, alpha))))


def check_activation(m: Match) -> MatchResult:
    reason = fusable_float(m, "x") or constants_keep_rank(m, rank(m, "x"))
    return m.fail(reason) if reason else m.ok()


def clip_bounds(m: Match) -> tuple[float | None, float | None]:
    """The clamp's lower and upper bounds (``None`` where absent or not constant); Relu's lower bound is 0."""
    if m.has_node("Clip"):
        clip = m.node("Clip")
        if "min" in clip.attrs or "max" in clip.attrs:  # before opset 11
            return float(clip.attrs.get("min", -np.inf)), float(clip.attrs.get("max", np.inf))
        low = scalar(m, "low") if m["low"] is not None else -np.inf
        high = scalar(m, "high") if m["high"] is not None else np.inf
        return low, high
    low = 0.0 if m.has_node("Relu") else scalar(m, "low")
    return low, scalar(m, "high")


def affine_constants(m: Match) -> tuple[float, float] | None:
    """``(alpha, beta)`` of the matched affine part ``alpha * x + beta``, or ``None``."""
    present = "".join(name for name in "abcd" if m[name] is not None)
    values = {name: scalar(m, name) for name in present}
    if any(v is None for v in values.values()) or values.get("d") == 0:
        return None
    a, b, c, d = (values.get(name) for name in "abcd")
    forms = {"ab": lambda: (a, b), "bd": lambda: (1 / d, b), "cd": lambda: (1 / d, c / d), "ac": lambda: (a, c * a),
             "c": lambda: (1.0, c), "a": lambda: (a, 0.0)}
    return forms[present]() if present in forms else None


def hard_sigmoid_constants(m: Match) -> tuple[float, float] | None:
    """``(alpha, beta)`` with ``clamp(alpha * x + beta, 0, 1)`` equal to the matched chain, or ``None``."""
    affine = affine_constants(m)
    low, high = clip_bounds(m)
    if affine is None or low != 0 or high is None:
        return None
    scale = 1.0
    if m.has_node("outer_scale"):
        k = scalar(m, "k")
        if k is None or k == 0:
            return None
        scale = 1 / k if m.node("outer_scale").op == "Div" else k
    # clamp(v, 0, high) * scale = clamp(v * scale, 0, 1) exactly when high * scale = 1 (scale > 0).
    if not (scale > 0 and close(high * scale, 1.0, m.dtype("x"))):
        return None
    alpha, beta = affine
    return alpha * scale, beta * scale


class GeluFromErf(RewriteRule):
    """Replaces x * 0.5 * (1 + erf(x / sqrt(2))), in any order, with Gelu(x)."""

    name = "gelu_erf"
    min_opset = 20
    targets = NOT_TENSORRT

    def pattern(self, op, x):
        return gelu_erf_pattern(op, x)

    def check(self, m: Match) -> MatchResult:
        return check_activation(m)

    def rewrite(self, op, m: Match):
        return op.Gelu(m["x"])


class GeluFromTanh(RewriteRule):
    """Replaces x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) with Gelu(x, approximate="tanh")."""

    name = "gelu_tanh"
    min_opset = 20
    targets = NOT_TENSORRT

    def pattern(self, op, x):
        return gelu_tanh_pattern(op, x)

    def check(self, m: Match) -> MatchResult:
        return check_activation(m)

    def rewrite(self, op, m: Match):
        return op.Gelu(m["x"], approximate="tanh")


class HardSigmoidFromClamp(RewriteRule):
    """Replaces clamp(alpha * x + beta, 0, 1) (also relu6(x + 3) / 6 and the like) with HardSigmoid."""

    name = "hard_sigmoid"
    min_opset = 6
    targets = ALL_TARGETS

    def pattern(self, op, x, a, b, c, d, low, high, k):
        return hard_sigmoid_pattern(op, x, a, b, c, d, low, high, k)

    def check(self, m: Match) -> MatchResult:
        result = check_activation(m)
        if not result:
            return result
        if hard_sigmoid_constants(m) is None:
            return m.fail("the constants are not one number each, or the clamp is not to [0, 1] after scaling")
        return m.ok()

    def rewrite(self, op, m: Match):
        alpha, beta = hard_sigmoid_constants(m)
        return op.HardSigmoid(m["x"], alpha=float(np.float32(alpha)), beta=float(np.float32(beta)))


class HardSwishFromParts(RewriteRule):
    """Replaces x * HardSigmoid(x; 1/6, 1/2) and x * relu6(x + 3) / 6 with HardSwish(x)."""

    name = "hard_swish"
    min_opset = 14
    targets = NOT_TENSORRT

    def pattern(self, op, x, low, high, k):
        return hard_swish_pattern(op, x, low, high, k)

    def check(self, m: Match) -> MatchResult:
        result = check_activation(m)
        if not result:
            return result
        if m.has_node("HardSigmoid"):
            alpha, beta = m.attr("HardSigmoid", "alpha", 0.2), m.attr("HardSigmoid", "beta", 0.5)
            if not (close(alpha, 1 / 6) and close(beta, 0.5)):
                return m.fail("HardSigmoid's alpha and beta are not 1/6 and 1/2")
            return m.ok()
        low, high = clip_bounds(m)
        k = scalar(m, "k")
        divisor = None if k in (None, 0) else (k if m.has_node("divide") else 1 / k)
        if low != 0 or not close(high, 6.0, m.dtype("x")) or not close(divisor, 6.0, m.dtype("x")):
            return m.fail("not relu6(x + 3) / 6")
        return m.ok()

    def rewrite(self, op, m: Match):
        return op.HardSwish(m["x"])


class MishFromParts(RewriteRule):
    """Replaces x * tanh(softplus(x)) with Mish(x)."""

    name = "mish"
    min_opset = 18
    targets = NOT_TENSORRT

    def pattern(self, op, x):
        return mish_pattern(op, x)

    def check(self, m: Match) -> MatchResult:
        return check_activation(m)

    def rewrite(self, op, m: Match):
        return op.Mish(m["x"])


class SwishFromParts(RewriteRule):
    """Replaces x * sigmoid(x) and x * sigmoid(alpha * x) with Swish(x, alpha)."""

    name = "swish"
    min_opset = 24
    # Swish is a function operator; onnxruntime 1.32 expands it only in models of opset 24 and finds no
    # kernel in newer ones, so the output would not run (nor verify) there.
    max_opset = 24
    targets = frozenset({Target.GENERIC, Target.OPENVINO})

    def pattern(self, op, x, alpha):
        return swish_pattern(op, x, alpha)

    def check(self, m: Match) -> MatchResult:
        result = check_activation(m)
        if result and m["alpha"] is not None and scalar(m, "alpha") is None:
            return m.fail("alpha is not one constant number")
        return result

    def rewrite(self, op, m: Match):
        alpha = 1.0 if m["alpha"] is None else scalar(m, "alpha")
        return op.Swish(m["x"], alpha=float(np.float32(alpha)))


RULES = (GeluFromErf(), GeluFromTanh(), HardSigmoidFromClamp(), HardSwishFromParts(), MishFromParts(),
         SwishFromParts())
