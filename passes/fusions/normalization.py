"""LayerNormalization (opset 17) and RMSNormalization (opset 23) recovered from their decomposed forms.

Over the last ``k`` axes of ``x`` (``axis = -k``), with ``mean`` a ReduceMean over those axes keeping them:

* ``layer_norm``: ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` -> ``LayerNormalization(x, 1,
  axis, epsilon=eps)``. The square is ``Pow(d, 2)`` or ``d * d``; the division is ``Div``, or a
  multiplication by ``Reciprocal(sqrt)`` or ``1 / sqrt`` (TorchScript's, the dynamo exporter's and
  tf2onnx's spellings). The scale is a constant of ones with the normalized shape.
* ``rms_norm``: ``x / sqrt(mean(x^2) + eps)`` (same spellings) -> ``RMSNormalization(x, 1, axis, eps)``.
* ``norm_scale``: ``LayerNormalization(x, s, b) * g`` -> ``LayerNormalization(x, s * g, b * g)``, and
  ``RMSNormalization(x, s) * g`` -> ``RMSNormalization(x, s * g)``, for a constant ``g`` that varies
  only along the normalized axes (the affine ``gamma`` of the decomposed forms).
* ``layer_norm_bias``: ``LayerNormalization(x, s, b) + c`` -> ``LayerNormalization(x, s, b + c)``, for a
  constant ``c`` that varies only along the normalized axes (``beta``).
* ``layer_norm_affine``: ``x * r + (beta - mean(x) * r)`` with ``r = gamma / sqrt(var + eps)`` (or
  without ``gamma``/``beta``), TensorFlow's ``batch_normalization`` written out by tf2onnx for Keras'
  LayerNormalization -> ``LayerNormalization(x, gamma, beta)``; also Keras 3's ``x * r + (-mean(x) * r +
  beta)``, and means written as ``GlobalAveragePool`` (which averages axes 2 to the last, as tf2onnx
  writes a last-axis mean of a rank-3 tensor).

All are exact up to rounding: the fused kernels compute in float32 (``stash_type`` 1), so only float32
and float16 inputs fuse (a float64 decomposition is more precise than the kernel). The reductions must
keep their axes and cover exactly the last axes; constants folded into ``scale``/``bias`` are computed in
float64 and broadcast to the normalized shape, whose sizes must be known (the other axes of ``x`` may be
dynamic: a constant folded in is 1 along them, so it never broadcasts the result along them).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import (
    ALL_TARGETS,
    NOT_TENSORRT,
    constants_keep_rank,
    fusable_float,
    known_dims,
    rank,
    scalar,
    trailing_axis,
)


def reciprocal_pattern(op, value):
    """``1 / value`` as exporters write it: ``Reciprocal(value)`` or ``Div(1, value)``."""
    return op.either(op.Reciprocal(value), op.Div(1, value))


def divided_pattern(op, numerator, denominator):
    """``numerator / denominator`` as ``Div`` or as a multiplication by the reciprocal."""
    return op.either(op.Div(numerator, denominator), op.Mul(numerator, reciprocal_pattern(op, denominator)))


def square_pattern(op, value):
    return op.either(op.Pow(value, 2), op.Mul(value, value))


def layer_norm_pattern(op, x, epsilon):
    """``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + epsilon)``; ReduceMeans tagged ``mean``, ``variance``."""
    centered = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _tag="mean"))
    variance = op.ReduceMean(square_pattern(op, centered), _allow_other_inputs=True, _tag="variance")
    return divided_pattern(op, centered, op.Sqrt(op.Add(variance, epsilon)))


def rms_norm_pattern(op, x, epsilon):
    """``x / sqrt(mean(x^2) + epsilon)``; the ReduceMean is tagged ``mean_square``."""
    mean_square = op.ReduceMean(square_pattern(op, x), _allow_other_inputs=True, _tag="mean_square")
    return divided_pattern(op, x, op.Sqrt(op.Add(mean_square, epsilon)))


def mean_over_last_axes_pattern(op, value, tag: str):
    """A mean over the last axes keeping them: ReduceMean, or GlobalAveragePool (axes 2 to the last), which
    tf2onnx writes for a last-axis ReduceMean of a rank-3 tensor."""
    return op.either(op.ReduceMean(value, _allow_other_inputs=True, _tag=tag), op.GlobalAveragePool(value, _tag=tag))


def layer_norm_affine_pattern(op, x, epsilon, gamma, beta):
    """``x * r + (beta - mean * r)``, ``r = [gamma *] 1 / sqrt(mean((x - mean)^2) + epsilon)``, as tf2onnx writes it.

    Without ``beta``: ``x * r - mean * r``. Keras 3's graphs, converted by tf2onnx 1.17, add a negated mean
    instead: ``x * r + (-mean * r + beta)`` and ``x * r + -mean * r`` (the Neg tagged ``negated_mean``).
    The means are tagged ``mean`` and ``variance``.
    """
    mean = mean_over_last_axes_pattern(op, x, "mean")
    centered = op.Sub(x, mean)
    variance = mean_over_last_axes_pattern(op, square_pattern(op, centered), "variance")
    inverse = reciprocal_pattern(op, op.Sqrt(op.Add(variance, epsilon)))
    factor = op.either(op.Mul(inverse, gamma, _tag="gamma"), inverse)
    shifted_mean = op.Mul(mean, factor, _tag="shifted_mean")
    negated_shift = op.Mul(op.Neg(mean, _tag="negated_mean"), factor, _tag="shifted_mean")
    scaled = op.Mul(x, factor, _tag="scaled")
    return op.either(op.Add(scaled, op.Sub(beta, shifted_mean)), op.Sub(scaled, shifted_mean),
                     op.Add(scaled, op.Add(negated_shift, beta)), op.Add(scaled, negated_shift))


def reduced_axes(node: gs.Node) -> list[int] | None:
    """The axes a ReduceMean reduces, from its attribute (before opset 18) or constant input, or ``None``.

    A GlobalAveragePool reduces axes 2 to the last of an input of known rank.
    """
    if node.op == "GlobalAveragePool":
        data = node.inputs[0].shape
        return None if data is None or len(data) < 3 else list(range(2, len(data)))
    if node.attrs.get("keepdims", 1) != 1:
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = ir.constant_value(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return None


def normalized_axis(m: Match, labels: tuple[str, ...]) -> int | MatchResult:
    """The first normalized axis (negative) shared by the tagged ReduceMeans, or why there is none."""
    data_rank = rank(m, "x")
    axes = [reduced_axes(m.node(label)) for label in labels]
    if any(a is None for a in axes):
        return m.fail("a ReduceMean drops its axes or its axes are not constant")
    first = [trailing_axis(a, data_rank) for a in axes]
    if first[0] is None or any(f != first[0] for f in first):
        return m.fail(f"the reductions over axes {axes} are not the same last axes of x")
    return first[0]


def normalized_shape(m: Match, axis: int) -> list[int] | None:
    """The sizes of x's normalized axes (``axis``, negative, to the last), or ``None`` if one is not known.

    Only these sizes matter: the scale and bias the rules write have the normalized shape, and the
    leading (batch, sequence) axes, often dynamic, are the same in the fused and the decomposed forms.
    """
    shape = m.shape("x")
    if shape is None or -axis > len(shape):
        return None
    return known_dims(shape[axis:])


def check_decomposed(m: Match, labels: tuple[str, ...]) -> MatchResult:
    """The checks every decomposed normalization shares: type, axes, epsilon, shapes of constants."""
    reason = fusable_float(m, "x") or constants_keep_rank(m, rank(m, "x"))
    if reason:
        return m.fail(reason)
    axis = normalized_axis(m, labels)
    if isinstance(axis, MatchResult):
        return axis
    epsilon = scalar(m, "epsilon")
    if epsilon is None or not np.isfinite(epsilon) or epsilon < 0:
        return m.fail("epsilon is not one constant non-negative number")
    if normalized_shape(m, axis) is None:
        return m.fail("the normalized dimensions of x are not known")
    return m.ok()


def ones(m: Match, axis: int) -> np.ndarray:
    return np.ones(normalized_shape(m, axis), m.dtype("x"))


class LayerNormalizationFromParts(RewriteRule):
    """Replaces (x - mean(x)) / sqrt(var(x) + eps) over the last axes with LayerNormalization(x, 1)."""

    name = "layer_norm"
    min_opset = 17
    targets = ALL_TARGETS

    def pattern(self, op, x, epsilon):
        return layer_norm_pattern(op, x, epsilon)

    def check(self, m: Match) -> MatchResult:
        return check_decomposed(m, ("mean", "variance"))

    def rewrite(self, op, m: Match):
        axis = normalized_axis(m, ("mean", "variance"))
        return op.LayerNormalization(m["x"], op.const(ones(m, axis), "layer_norm_scale"), axis=axis,
                                     epsilon=scalar(m, "epsilon"))


class RMSNormalizationFromParts(RewriteRule):
    """Replaces x / sqrt(mean(x^2) + eps) over the last axes with RMSNormalization(x, 1)."""

    name = "rms_norm"
    min_opset = 23
    targets = NOT_TENSORRT

    def pattern(self, op, x, epsilon):
        return rms_norm_pattern(op, x, epsilon)

    def check(self, m: Match) -> MatchResult:
        return check_decomposed(m, ("mean_square",))

    def rewrite(self, op, m: Match):
        axis = normalized_axis(m, ("mean_square",))
        return op.RMSNormalization(m["x"], op.const(ones(m, axis), "rms_norm_scale"), axis=axis,
                                   epsilon=scalar(m, "epsilon"))


class LayerNormalizationFromAffineParts(RewriteRule):
    """Replaces x * r + (beta - mean(x) * r), r = gamma / sqrt(var(x) + eps), with LayerNormalization."""

    name = "layer_norm_affine"
    min_opset = 17
    targets = ALL_TARGETS

    def pattern(self, op, x, epsilon, gamma, beta):
        return layer_norm_affine_pattern(op, x, epsilon, gamma, beta)

    def check(self, m: Match) -> MatchResult:
        result = check_decomposed(m, ("mean", "variance"))
        if not result:
            return result
        # ``r`` appears twice in the pattern: both products must read the same value (with or without gamma).
        mean = m.node("negated_mean" if m.has_node("negated_mean") else "mean").outputs[0]
        if factor_of(m.node("scaled"), m["x"]) is not factor_of(m.node("shifted_mean"), mean):
            return m.fail("x and the mean are not multiplied by the same factor")
        axis = normalized_axis(m, ("mean", "variance"))
        for name in ("gamma", "beta"):
            if m[name] is not None and folded_along(m, name, axis) is None:
                return m.fail(f"{name} is not a constant that varies only along the normalized axes")
        return m.ok()

    def rewrite(self, op, m: Match):
        axis = normalized_axis(m, ("mean", "variance"))
        scale = ones(m, axis) if m["gamma"] is None else folded_along(m, "gamma", axis)
        inputs = [m["x"], op.const(scale.astype(m.dtype("x")), "layer_norm_scale")]
        if m["beta"] is not None:
            inputs.append(op.const(folded_along(m, "beta", axis).astype(m.dtype("x")), "layer_norm_bias"))
        return op.LayerNormalization(*inputs, axis=axis, epsilon=scalar(m, "epsilon"))


def factor_of(product: gs.Node, operand: gs.Tensor) -> gs.Tensor | None:
    """The other operand of a binary ``product`` that reads ``operand``."""
    others = [t for t in product.inputs if t is not operand]
    return others[0] if len(others) == 1 else None


def folded_along(m: Match, name: str, axis: int) -> np.ndarray | None:
    """Constant ``m[name]`` (float64) broadcast to the normalized shape, if it varies only along those axes.

    It must be finite, of x's type, have no more axes than x and be 1 on every axis before ``axis``.
    """
    value, shape, data_rank = m.value(name), normalized_shape(m, axis), rank(m, "x")
    if value is None or shape is None or data_rank is None or value.dtype != m.dtype("x"):
        return None
    if value.ndim > data_rank or not np.all(np.isfinite(value)):
        return None
    leading = value.shape[: max(0, value.ndim + axis)]
    if any(size != 1 for size in leading):
        return None
    trailing = value.reshape(value.shape[len(leading):])
    try:
        return np.broadcast_to(trailing.astype(np.float64), shape)
    except ValueError:
        return None


def norm_axis(node: gs.Node, data_rank: int | None) -> int | None:
    """The negative first normalized axis of a LayerNormalization or RMSNormalization node."""
    axis = int(node.attrs.get("axis", -1))
    if axis >= 0:
        if data_rank is None or axis >= data_rank:
            return None
        axis -= data_rank
    return axis


def norm_node(m: Match) -> gs.Node:
    """The matched LayerNormalization or RMSNormalization node."""
    return m.node("LayerNormalization") if m.has_node("LayerNormalization") else m.node("RMSNormalization")


def fits(value: np.ndarray, shape: list[int]) -> bool:
    """Whether ``value`` broadcasts to ``shape`` without adding axes to it."""
    try:
        return value.ndim <= len(shape) and np.broadcast_shapes(value.shape, tuple(shape)) == tuple(shape)
    except ValueError:
        return False


class _FoldIntoNorm(RewriteRule):
    """Shared check of a constant folded into a normalization's scale or bias.

    ``folded`` names the constant after the normalization; ``constants`` the normalization's inputs that
    must be constants (they are recomputed), which must also fit the normalized shape.
    """

    folded: str = ""
    constants: tuple[str, ...] = ()

    def check(self, m: Match) -> MatchResult:
        axis = norm_axis(norm_node(m), rank(m, "x"))
        if axis is None:
            return m.fail("the normalization's axis is unknown")
        folded = folded_along(m, self.folded, axis)
        if folded is None:
            return m.fail("the constant does not vary only along the normalized axes (or their sizes are unknown)")
        for name in self.constants:
            if m[name] is None:
                continue
            value = m.value(name)
            if value is None or not fits(value, list(folded.shape)):
                return m.fail(f"the normalization's {name} is not a constant of the normalized shape")
        return m.ok()

    def folded_value(self, m: Match) -> np.ndarray:
        return folded_along(m, self.folded, norm_axis(norm_node(m), rank(m, "x")))


class NormScale(_FoldIntoNorm):
    """Folds a constant Mul after LayerNormalization or RMSNormalization into its scale (and bias)."""

    name = "norm_scale"
    min_opset = 17
    targets = ALL_TARGETS
    folded = "factor"
    constants = ("scale", "bias")

    def pattern(self, op, x, scale, bias, factor):
        return op.Mul(op.either(op.LayerNormalization(x, scale, op.optional(bias)), op.RMSNormalization(x, scale)),
                      factor)

    def rewrite(self, op, m: Match):
        factor, dtype, node = self.folded_value(m), m.dtype("x"), norm_node(m)
        scale = (np.broadcast_to(m.value("scale").astype(np.float64), factor.shape) * factor).astype(dtype)
        inputs = [m["x"], op.const(scale, f"{node.op}_scale")]
        if m["bias"] is not None:
            bias = np.broadcast_to(m.value("bias").astype(np.float64), factor.shape) * factor
            inputs.append(op.const(bias.astype(dtype), f"{node.op}_bias"))
        return getattr(op, node.op)(*inputs, **m.attrs(node.op))


class LayerNormBias(_FoldIntoNorm):
    """Folds a constant Add after LayerNormalization into its bias."""

    name = "layer_norm_bias"
    min_opset = 17
    targets = ALL_TARGETS
    folded = "shift"
    constants = ("bias",)

    def pattern(self, op, x, scale, bias, shift):
        return op.Add(op.LayerNormalization(x, scale, op.optional(bias)), shift)

    def rewrite(self, op, m: Match):
        shift = self.folded_value(m)
        bias = shift if m["bias"] is None else np.broadcast_to(m.value("bias").astype(np.float64), shift.shape) + shift
        return op.LayerNormalization(m["x"], m["scale"], op.const(bias.astype(m.dtype("x")), "layer_norm_bias"),
                                     **m.attrs("LayerNormalization"))


RULES = (LayerNormalizationFromParts(), LayerNormalizationFromAffineParts(), RMSNormalizationFromParts(),
         NormScale(), LayerNormBias())
