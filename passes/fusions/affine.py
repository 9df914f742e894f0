"""Constants that scale or shift the output channels of a linear operator, folded into its weight and bias.

Conv, ConvTranspose, Gemm and MatMul compute each output channel (axis 1 of a Conv's output, the last axis
- a column - of a Gemm's or MatMul's) from its own slice of the weight, plus its bias. Multiplying the
channel by ``s`` is therefore the same as multiplying that slice of the weight and the bias by ``s``, and
adding ``t`` is the same as adding ``t`` to the bias. Rules (stats keys in brackets):

* ``conv_batchnorm``, ``conv_transpose_batchnorm``: BatchNormalization after a Conv or ConvTranspose. In
  inference mode it computes ``y = (x - mean) * f + offset`` with ``f = scale / sqrt(var + epsilon)`` per
  channel: a product by ``f`` and a sum with ``offset - mean * f``, both folded.
* ``conv_mul``, ``conv_add``, ``conv_transpose_mul``, ``conv_transpose_add``: a Conv or ConvTranspose times
  or plus a finite constant with one value per output channel (1 on every other axis, not raising the rank).
* ``batchnorm_mul``, ``batchnorm_add``: an inference-mode BatchNormalization times or plus a finite constant
  with one value per channel becomes one BatchNormalization with ``scale * s`` and ``B * s`` (or ``B + s``):
  the per-channel Scale layer that Caffe and Caffe2 converters write after each BatchNormalization.
* ``gemm_mul``: ``Gemm(A, B, C) * s`` -> ``Gemm(A, B * s, C * s)`` for a finite constant ``s`` with one value
  per column of the ``[M, N]`` result (shape ``[N]``, ``[1, N]`` or one value), scaling the columns of
  ``op(B)`` (the rows of ``B`` under ``transB``); ``alpha`` and ``beta`` stay, since ``alpha * A B s + beta
  * C s`` is the scaled result. A per-row or full ``[M, N]`` constant scales the rows of ``A``: not folded.
* ``gemm_add``: ``Gemm(A, B, C) + s`` -> ``Gemm(A, B, beta * C + s)`` with ``beta = 1``, for a constant that
  broadcasts to ``[M, N]`` one way (Gemm's rule for ``C``) and leaves ``C`` broadcasting so.
* ``matmul_mul``: ``MatMul(a, W) * s`` -> ``MatMul(a, W * s)`` for a constant 2-D ``W`` and ``s`` one value
  per column of the ``[..., N]`` result; ``s`` must not raise the rank, so it has at most one axis unless
  ``a``'s rank is known. ``MatMul + Add`` becomes a Gemm through ``matmul_add_to_gemm``.
* ``matmul_bias_mul``: ``(MatMul(a, W) + b) * s`` -> ``MatMul(a, W * s) + b * s`` under the same conditions, for
  a finite constant bias ``b`` that does not raise the rank (ConvNeXt's layer scale): ``(aW + b) s = a(Ws) + bs``
  per column.
* ``matmul_add_to_gemm``: ``MatMul(A, B) + C`` -> ``Gemm(A, B, C)`` when ``A`` is known to be 2-D, ``B`` is a
  constant 2-D matrix and ``C`` a constant that broadcasts to the ``[M, N]`` result one way; float32/float64.

Weight layouts. A Conv's weight is ``[C_out, C_in / group, k...]``: output channel ``o`` is ``W[o]``. A
ConvTranspose's is ``[C_in, C_out / group, k...]``: output channel ``o = g * C_out / group + j`` is
``W[c, j]`` for the input channels ``c`` of group ``g``. Gemm's ``B`` is ``[K, N]`` (``[N, K]`` with
``transB``); MatMul's ``W`` is ``[K, N]``.

Folded values are computed in float64 and cast back to the weight's type, so float16 and float32 models
get the closest value of their type to the exact product (which the two-operator form did not compute
either). A weight that other nodes also read is not rescaled: folding would store a second, scaled copy.
Only floating-point operators fold (an integer product would wrap or round differently). Mul/Add before
opset 7 broadcast by their legacy ``axis`` rule, so the matrix rules need opset 7.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from onnxopt.pattern import Match, MatchResult, RewriteRule

# Types Gemm and MatMul take that numpy holds; integer products are left alone.
MATRIX_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


# ---------------------------------------------------------------------------------------------------
# The arithmetic, in float64


def batchnorm_affine(scale: np.ndarray, offset: np.ndarray, mean: np.ndarray, var: np.ndarray,
                     epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``(f, t)`` with inference-mode BatchNormalization equal to ``x * f + t`` per channel."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    return factor, offset.astype(np.float64) - mean.astype(np.float64) * factor


def scale_output_channels(weight: np.ndarray, factor: np.ndarray, group: int = 1,
                          transposed: bool = False) -> np.ndarray:
    """A Conv (or, ``transposed``, a ConvTranspose) weight with each output channel's slice times ``factor``."""
    weight = weight.astype(np.float64)
    spatial = (1,) * (weight.ndim - 2)
    if not transposed:
        return weight * factor.reshape(-1, 1, *spatial)
    inputs, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(group, inputs // group, per_group, *weight.shape[2:])
    return (grouped * factor.reshape(group, 1, per_group, *spatial)).reshape(weight.shape)


def fold_channel_affine(weight: np.ndarray, bias: np.ndarray | None, factor: np.ndarray | None,
                        shift: np.ndarray | None, group: int = 1,
                        transposed: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Weight and bias of a Conv/ConvTranspose whose output is then multiplied by ``factor`` and shifted.

    ``factor`` and ``shift`` hold one value per output channel (``None``: 1 and 0). The weight is ``None``
    when ``factor`` is, as it stays as it is; both are cast to the weight's type.
    """
    channels = weight.shape[1] * group if transposed else weight.shape[0]
    new_bias = bias.astype(np.float64) if bias is not None else np.zeros(channels)
    new_weight = None
    if factor is not None:
        new_weight = scale_output_channels(weight, factor, group, transposed).astype(weight.dtype)
        new_bias = new_bias * factor
    if shift is not None:
        new_bias = new_bias + shift
    return new_weight, new_bias.astype(weight.dtype)


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, offset: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, epsilon: float, group: int = 1,
                   transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Conv (or ConvTranspose) weight and bias that include an inference-mode BatchNormalization after it."""
    factor, shift = batchnorm_affine(scale, offset, mean, var, epsilon)
    return fold_channel_affine(weight, bias, factor, shift, group, transposed)


def per_channel(constant: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``constant`` as one value per channel, if it broadcasts against a ``[N, C, ...]`` output that way.

    The constant must not raise the rank (that would change the output's shape) and must be 1 on every
    axis but the channel axis, where it is 1 or ``C``.
    """
    if constant.ndim > rank:
        return None
    aligned = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(aligned) if axis != 1) or aligned[1] not in (1, channels):
        return None
    return np.broadcast_to(constant.reshape(-1).astype(np.float64), (channels,))


def per_column(constant: np.ndarray, rank: int | None, columns: int) -> np.ndarray | None:
    """``constant`` as one value per column, if it broadcasts against a ``[..., N]`` result of ``rank`` axes that way.

    With the rank unknown, only a constant of at most one axis surely does not raise it.
    """
    if constant.ndim > (rank if rank is not None else 1):
        return None
    if any(size != 1 for size in constant.shape[:-1]) or (constant.ndim and constant.shape[-1] not in (1, columns)):
        return None
    return np.broadcast_to(constant.reshape(-1).astype(np.float64), (columns,))


def broadcasts_to_matrix(shape: tuple, rows: int | None, columns: int | None) -> bool:
    """Whether ``shape`` broadcasts to ``[rows, columns]`` one way (``None``: unknown, so only 1 fits)."""
    if len(shape) > 2:
        return False
    target = (rows, columns)[2 - len(shape):]
    return all(size == 1 or (isinstance(want, int) and size == want) for size, want in zip(shape, target))


def joint_shape(*shapes: tuple) -> tuple | None:
    """The shape ``shapes`` broadcast to together, or ``None`` where they do not."""
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        return None


def finite_constant(m: Match, name: str, dtype: np.dtype | None) -> str | None:
    """Why the constant bound to ``name`` cannot be folded into an operator of type ``dtype``, or ``None``."""
    constant = m.value(name)
    if constant is None:
        return f"'{name}' is not constant"
    if dtype is None or constant.dtype != dtype:
        return f"the constant is {constant.dtype}, the operator {dtype if dtype is not None else 'of unknown type'}"
    if not np.all(np.isfinite(constant)):
        return "the constant is not finite"
    return None


def weight_to_rescale(m: Match, name: str) -> str | None:
    """Why the weight bound to ``name`` cannot be rescaled in place, or ``None``."""
    if not m.is_constant(name):
        return "the weight is not constant"
    # Another reader keeps the old weight alive: folding would store a second, scaled copy.
    if len(m[name].outputs) > 1:
        return "the weight is shared with other nodes"
    return None


# ---------------------------------------------------------------------------------------------------
# Conv and ConvTranspose


class _ConvChannelRule(RewriteRule):
    """Shared by the rules that fold per-output-channel constants into a Conv (or ConvTranspose)."""

    conv_op: ClassVar[str] = "Conv"

    def conv_pattern(self, op, x, w, b):
        return getattr(op, self.conv_op)(x, w, op.optional(b))

    @property
    def transposed(self) -> bool:
        return self.conv_op == "ConvTranspose"

    def group(self, m: Match) -> int:
        return int(m.attr(self.conv_op, "group", 1))

    def channels(self, m: Match) -> int:
        weight = m.value("w")
        return weight.shape[1] * self.group(m) if self.transposed else weight.shape[0]

    def conv_reason(self, m: Match) -> str | None:
        """Why the matched Conv's weight and bias cannot take a folded constant, or ``None``."""
        weight = m.value("w")
        if weight is None:
            return f"{self.conv_op} weight is not constant"
        if weight.dtype.kind != "f":
            return f"{self.conv_op} weight is {weight.dtype}, not floating point"
        if weight.ndim < 3:
            return f"{self.conv_op} weight has {weight.ndim} axes"
        group = self.group(m)
        if self.transposed and (group < 1 or weight.shape[0] % group):
            return f"{weight.shape[0]} input channels do not split into {group} groups"
        bias = m.value("b")
        if m["b"] is not None and (bias is None or bias.shape != (self.channels(m),) or bias.dtype != weight.dtype):
            return f"{self.conv_op} bias is not a constant of one value per output channel"
        return None

    def folded_conv(self, op, m: Match, factor: np.ndarray | None, shift: np.ndarray | None):
        """The Conv with ``factor`` and ``shift`` (one value per output channel, or ``None``) folded in."""
        conv = m.node(self.conv_op)
        weight, bias = fold_channel_affine(m.value("w"), m.value("b"), factor, shift, self.group(m), self.transposed)
        weight_input = m["w"] if weight is None else op.const(weight, f"{m['w'].name}_{self.name}")
        bias_input = op.const(bias, f"{conv.name or 'conv'}_{self.name}_bias")
        return getattr(op, self.conv_op)(m["x"], weight_input, bias_input, _name=conv.name, **m.attrs(self.conv_op))


def batchnorm_inference_reason(m: Match) -> str | None:
    """Why the matched BatchNormalization may use batch statistics, or ``None`` when it is in inference mode."""
    if m.attr("BatchNormalization", "training_mode", 0) or m.attr("BatchNormalization", "spatial", 1) != 1:
        return "BatchNormalization is in training mode or not spatial"
    # Before opset 7, is_test=0 (the default) asks for batch statistics, i.e. training mode.
    if (m.opset() or 0) < 7 and not m.attr("BatchNormalization", "is_test", 0):
        return "BatchNormalization before opset 7 without is_test uses batch statistics"
    return None


class ConvBatchNormToConv(_ConvChannelRule):
    """Replaces BatchNormalization(Conv(x, w, b)) in inference mode with Conv(x, w', b')."""

    name = "conv_batchnorm"

    def pattern(self, op, x, w, b, scale, offset, mean, var):
        return op.BatchNormalization(self.conv_pattern(op, x, w, b), scale, offset, mean, var)

    def check(self, m: Match) -> MatchResult:
        reason = batchnorm_inference_reason(m) or self.conv_reason(m)
        if reason:
            return m.fail(reason)
        params = [m.value(n) for n in ("scale", "offset", "mean", "var")]
        if any(p is None for p in params):
            return m.fail("BatchNormalization parameters are not constant")
        if any(p.shape != (self.channels(m),) for p in params):
            return m.fail("BatchNormalization parameters are not one value per output channel")
        return m.ok()

    def rewrite(self, op, m: Match):
        params = [m.value(n) for n in ("scale", "offset", "mean", "var")]
        epsilon = float(m.attr("BatchNormalization", "epsilon", 1e-5))
        return self.folded_conv(op, m, *batchnorm_affine(*params, epsilon))


class ConvTransposeBatchNormToConvTranspose(ConvBatchNormToConv):
    """Replaces BatchNormalization(ConvTranspose(x, w, b)) in inference mode with ConvTranspose(x, w', b')."""

    name = "conv_transpose_batchnorm"
    conv_op = "ConvTranspose"


class _ConvAffineToConv(_ConvChannelRule):
    """Shared check of a Conv followed by a per-channel constant Mul or Add."""

    def check(self, m: Match) -> MatchResult:
        reason = self.conv_reason(m)  # None: the weight is a floating-point constant
        reason = reason or finite_constant(m, "s", m.value("w").dtype)
        if reason:
            return m.fail(reason)
        if per_channel(m.value("s"), m.value("w").ndim, self.channels(m)) is None:
            return m.fail(f"the constant of shape {list(m.value('s').shape)} is not one value per output channel")
        return m.ok()

    def channel_values(self, m: Match) -> np.ndarray:
        return per_channel(m.value("s"), m.value("w").ndim, self.channels(m))


class ConvMulToConv(_ConvAffineToConv):
    """Replaces Conv(x, w, b) * s, with ``s`` a constant per output channel, by Conv(x, w * s, b * s)."""

    name = "conv_mul"

    def pattern(self, op, x, w, b, s):
        return op.Mul(self.conv_pattern(op, x, w, b), s)

    def check(self, m: Match) -> MatchResult:
        reason = weight_to_rescale(m, "w")
        return m.fail(reason) if reason else super().check(m)

    def rewrite(self, op, m: Match):
        return self.folded_conv(op, m, self.channel_values(m), None)


class ConvAddToConv(_ConvAffineToConv):
    """Replaces Conv(x, w, b) + s, with ``s`` a constant per output channel, by Conv(x, w, b + s)."""

    name = "conv_add"

    def pattern(self, op, x, w, b, s):
        return op.Add(self.conv_pattern(op, x, w, b), s)

    def rewrite(self, op, m: Match):
        return self.folded_conv(op, m, None, self.channel_values(m))


class ConvTransposeMulToConvTranspose(ConvMulToConv):
    """Replaces ConvTranspose(x, w, b) * s, with ``s`` a constant per output channel, by ConvTranspose(x, w', b * s)."""

    name = "conv_transpose_mul"
    conv_op = "ConvTranspose"


class ConvTransposeAddToConvTranspose(ConvAddToConv):
    """Replaces ConvTranspose(x, w, b) + s, with ``s`` a constant per output channel, by ConvTranspose(x, w, b + s)."""

    name = "conv_transpose_add"
    conv_op = "ConvTranspose"


# ---------------------------------------------------------------------------------------------------
# BatchNormalization


class _BatchNormAffineToBatchNorm(RewriteRule):
    """Shared check of an inference-mode BatchNormalization followed by a per-channel constant Mul or Add."""

    # Mul and Add broadcast the numpy way from opset 7 on; before, by their legacy axis rule.
    min_opset = 7

    def check(self, m: Match) -> MatchResult:
        reason = batchnorm_inference_reason(m)
        if reason:
            return m.fail(reason)
        shape = m.shape("x")
        if shape is None or len(shape) < 2:
            return m.fail("the normalized input's rank is not known")
        scale, offset = m.value("scale"), m.value("offset")
        if scale is None or offset is None or scale.ndim != 1 or offset.shape != scale.shape:
            return m.fail("BatchNormalization's scale and bias are not constants of one value per channel")
        reason = finite_constant(m, "s", m.dtype("x"))
        if reason:
            return m.fail(reason)
        if self.channel_values(m) is None:
            return m.fail(f"the constant of shape {list(m.value('s').shape)} is not one value per channel")
        return m.ok()

    def channel_values(self, m: Match) -> np.ndarray | None:
        return per_channel(m.value("s"), len(m.shape("x")), m.value("scale").shape[0])

    def normalization(self, op, m: Match, scale: np.ndarray, offset: np.ndarray):
        node = m.node("BatchNormalization")
        prefix = node.name or "batchnorm"
        return op.BatchNormalization(
            m["x"], op.const(scale.astype(m.value("scale").dtype), f"{prefix}_{self.name}_scale"),
            op.const(offset.astype(m.value("offset").dtype), f"{prefix}_{self.name}_bias"), m["mean"], m["var"],
            _name=node.name, **m.attrs("BatchNormalization"))


class BatchNormMulToBatchNorm(_BatchNormAffineToBatchNorm):
    """Replaces BatchNormalization(x, scale, B, mean, var) * s (one constant per channel) by one of scale * s, B * s."""

    name = "batchnorm_mul"

    def pattern(self, op, x, scale, offset, mean, var, s):
        return op.Mul(op.BatchNormalization(x, scale, offset, mean, var), s)

    def rewrite(self, op, m: Match):
        factor = self.channel_values(m)
        return self.normalization(op, m, m.value("scale").astype(np.float64) * factor,
                                  m.value("offset").astype(np.float64) * factor)


class BatchNormAddToBatchNorm(_BatchNormAffineToBatchNorm):
    """Replaces BatchNormalization(x, scale, B, mean, var) + s, with ``s`` a constant per channel, by one with B + s."""

    name = "batchnorm_add"

    def pattern(self, op, x, scale, offset, mean, var, s):
        return op.Add(op.BatchNormalization(x, scale, offset, mean, var), s)

    def rewrite(self, op, m: Match):
        shifted = m.value("offset").astype(np.float64) + self.channel_values(m)
        return self.normalization(op, m, m.value("scale"), shifted)


# ---------------------------------------------------------------------------------------------------
# Gemm and MatMul


def gemm_dims(m: Match) -> tuple[int | None, int | None]:
    """``(M, N)`` of the matched Gemm's result, each ``None`` where shapes do not tell."""
    a_shape, b_shape = m.shape("a"), m.shape("b")
    rows = columns = None
    if a_shape is not None and len(a_shape) == 2:
        rows = a_shape[int(m.attr("Gemm", "transA", 0))]
    if b_shape is not None and len(b_shape) == 2:
        columns = b_shape[1 - int(m.attr("Gemm", "transB", 0))]
    known = [size if isinstance(size, int) else None for size in (rows, columns)]
    return known[0], known[1]


def gemm_type(m: Match) -> np.dtype | None:
    """The matched Gemm's floating-point type, from whichever operand knows it."""
    for name in ("b", "a"):
        dtype = m.dtype(name)
        if dtype is not None:
            return dtype if dtype in MATRIX_FLOATS else None
    return None


class GemmMulToGemm(RewriteRule):
    """Replaces Gemm(a, B, C) * s, with ``s`` a constant per column, by Gemm(a, B * s, C * s)."""

    name = "gemm_mul"
    min_opset = 7

    def pattern(self, op, a, b, c, s):
        return op.Mul(op.Gemm(a, b, op.optional(c)), s)

    def check(self, m: Match) -> MatchResult:
        reason = weight_to_rescale(m, "b") or finite_constant(m, "s", gemm_type(m))
        if reason:
            return m.fail(reason)
        if m.value("b").ndim != 2:
            return m.fail("B is not a matrix")
        if m["c"] is not None and m.value("c") is None:
            return m.fail("C is not constant")
        _, columns = gemm_dims(m)
        if per_column(m.value("s"), 2, columns) is None:
            return m.fail(f"the constant of shape {list(m.value('s').shape)} is not one value per column")
        return m.ok()

    def rewrite(self, op, m: Match):
        gemm = m.node("Gemm")
        _, columns = gemm_dims(m)
        factor = per_column(m.value("s"), 2, columns)
        weight = m.value("b")
        axis = 0 if int(m.attr("Gemm", "transB", 0)) else 1  # the axis of B that holds the columns
        scaled = weight.astype(np.float64) * (factor.reshape(-1, 1) if axis == 0 else factor.reshape(1, -1))
        bias = m.value("c")
        new_bias = None
        if bias is not None:
            scaled_bias = bias.astype(np.float64) * m.value("s").astype(np.float64)
            new_bias = op.const(scaled_bias.astype(bias.dtype), f"{gemm.name or 'gemm'}_{self.name}_bias")
        return op.Gemm(m["a"], op.const(scaled.astype(weight.dtype), f"{m['b'].name}_{self.name}"), new_bias,
                       _name=gemm.name, **m.attrs("Gemm"))


class GemmAddToGemm(RewriteRule):
    """Replaces Gemm(a, b, C) + s, with ``s`` a constant that broadcasts to the result, by Gemm(a, b, beta * C + s)."""

    name = "gemm_add"
    min_opset = 7

    def pattern(self, op, a, b, c, s):
        return op.Add(op.Gemm(a, b, op.optional(c)), s)

    def check(self, m: Match) -> MatchResult:
        reason = finite_constant(m, "s", gemm_type(m))
        if reason:
            return m.fail(reason)
        bias = m.value("c")
        if m["c"] is not None and (bias is None or bias.dtype != m.value("s").dtype):
            return m.fail("C is not a constant of the Gemm's type")
        rows, columns = gemm_dims(m)
        shape = m.value("s").shape
        if not broadcasts_to_matrix(shape, rows, columns):
            return m.fail(f"the constant of shape {list(shape)} may not broadcast to [M, N] one way")
        joint = shape if bias is None else joint_shape(bias.shape, shape)
        if joint is None or not broadcasts_to_matrix(joint, rows, columns):
            return m.fail("C plus the constant may not broadcast to [M, N] one way")
        return m.ok()

    def rewrite(self, op, m: Match):
        gemm = m.node("Gemm")
        addend = m.value("s")
        bias = m.value("c")
        total = addend.astype(np.float64)
        if bias is not None:
            total = float(m.attr("Gemm", "beta", 1.0)) * bias.astype(np.float64) + total
        attrs = m.attrs("Gemm")
        attrs["beta"] = 1.0
        return op.Gemm(m["a"], m["b"], op.const(total.astype(addend.dtype), f"{gemm.name or 'gemm'}_{self.name}_bias"),
                       _name=gemm.name, **attrs)


class MatMulMulToMatMul(RewriteRule):
    """Replaces MatMul(a, W) * s, with ``W`` a constant matrix and ``s`` a constant per column, by MatMul(a, W * s)."""

    name = "matmul_mul"
    min_opset = 7

    def pattern(self, op, a, w, s):
        return op.Mul(op.MatMul(a, w), s)

    def check(self, m: Match) -> MatchResult:
        reason = weight_to_rescale(m, "w")
        if reason:
            return m.fail(reason)
        weight = m.value("w")
        if weight.ndim != 2:
            return m.fail("the weight is not a matrix")
        if weight.dtype not in MATRIX_FLOATS:
            return m.fail(f"the weight is {weight.dtype}, not floating point")
        reason = finite_constant(m, "s", weight.dtype)
        if reason:
            return m.fail(reason)
        if self.column_factors(m) is None:
            return m.fail(f"the constant of shape {list(m.value('s').shape)} is not one value per column "
                          "(or may raise the result's rank)")
        return m.ok()

    def column_factors(self, m: Match) -> np.ndarray | None:
        a_shape = m.shape("a")
        rank = None if a_shape is None else max(len(a_shape), 1)
        return per_column(m.value("s"), rank, m.value("w").shape[1])

    def rewrite(self, op, m: Match):
        weight = m.value("w")
        scaled = weight.astype(np.float64) * self.column_factors(m).reshape(1, -1)
        return op.MatMul(m["a"], op.const(scaled.astype(weight.dtype), f"{m['w'].name}_{self.name}"),
                         _name=m.node("MatMul").name)


class MatMulBiasMulToMatMulBias(MatMulMulToMatMul):
    """Replaces (MatMul(a, W) + b) * s, with ``W`` a constant matrix, ``b`` a constant and ``s`` a constant per
    column, by MatMul(a, W * s) + b * s: ConvNeXt's layer scale after its second pointwise Linear."""

    name = "matmul_bias_mul"

    def pattern(self, op, a, w, b, s):
        return op.Mul(op.Add(op.MatMul(a, w), b), s)

    def check(self, m: Match) -> MatchResult:
        found = super().check(m)
        if not found:
            return found
        bias = m.value("b")
        if bias is None or bias.dtype != m.value("w").dtype or not np.all(np.isfinite(bias)):
            return m.fail("the bias is not a finite constant of the weight's type")
        a_shape = m.shape("a")
        rank = None if a_shape is None else max(len(a_shape), 1)
        if bias.ndim > (rank if rank is not None else 1):
            return m.fail("the bias may raise the result's rank")
        if joint_shape(bias.shape, m.value("s").shape) is None:
            return m.fail("the bias and the constant do not broadcast together")
        return m.ok()

    def rewrite(self, op, m: Match):
        bias = m.value("b")
        scaled_bias = bias.astype(np.float64) * m.value("s").astype(np.float64)
        product = super().rewrite(op, m)
        return op.Add(product, op.const(scaled_bias.astype(bias.dtype), f"{m['b'].name}_{self.name}"),
                      _name=m.node("Add").name)


class MatMulAddToGemm(RewriteRule):
    """Replaces Add(MatMul(a, B), C) with Gemm(a, B, C) for a 2-D ``a`` and constant 2-D ``B``."""

    name = "matmul_add_to_gemm"
    # Before opset 7, Add broadcasts the legacy way (broadcast=1 with an axis, e.g. a bias per row)
    # and Gemm's C only broadcasts with broadcast=1: numpy broadcasting rules do not apply.
    min_opset = 7

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b), c)

    def check(self, m: Match) -> MatchResult:
        # A's rank first: it is cheap and rules out most sites (transformers multiply 3-D activations)
        # before B, a weight, is copied out of its TensorProto.
        a_shape = m.shape("a")
        if a_shape is None or len(a_shape) != 2:
            return m.fail("A is not known to be 2-D")
        b_value, c_value = m.value("b"), m.value("c")
        if b_value is None or b_value.ndim != 2:
            return m.fail("B is not a constant matrix")
        if c_value is None:
            return m.fail("the addend is not constant")
        if b_value.dtype.name not in ("float32", "float64"):
            return m.fail(f"Gemm here only for float32/float64, not {b_value.dtype}")
        a_dtype = m.dtype("a")
        if c_value.dtype != b_value.dtype or (a_dtype is not None and a_dtype != b_value.dtype):
            return m.fail("operand dtypes differ")
        rows = a_shape[0] if isinstance(a_shape[0], int) else None
        if not broadcasts_to_matrix(c_value.shape, rows, b_value.shape[1]):
            return m.fail(f"the addend of shape {list(c_value.shape)} does not broadcast to [M, N] one way")
        return m.ok()

    def rewrite(self, op, m: Match):
        return op.Gemm(m["a"], m["b"], m["c"], _name=m.node("MatMul").name or m.node("Add").name)


RULES = (ConvBatchNormToConv(), ConvTransposeBatchNormToConvTranspose(), ConvMulToConv(), ConvAddToConv(),
         ConvTransposeMulToConvTranspose(), ConvTransposeAddToConvTranspose(), BatchNormMulToBatchNorm(),
         BatchNormAddToBatchNorm(), GemmMulToGemm(), GemmAddToGemm(), MatMulMulToMatMul(), MatMulBiasMulToMatMulBias(),
         MatMulAddToGemm())
