"""Checks the fusion rules share: constants read within float32's precision, ranks, normalized axes,
broadcast shapes."""

from __future__ import annotations

import numpy as np

from onnxopt import ir
from onnxopt.pass_infra import Target
from onnxopt.pattern import Match

# Exporters round the same constant differently (sqrt(2) as 1.4142135 or 1.41421356237, 1/6 computed in
# float32 or float64): at most a unit or two in the last place of the constant's type apart (2**-23 for
# float32, 2**-10 for float16). A constant farther off is another function, and the fusion is refused.
ULPS = 2

# Floating-point types the fused operators (LayerNormalization, Gelu, HardSwish, ...) take, whose
# decomposed forms compute no more precisely than the fused kernels do.
FUSABLE_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32)})

ALL_TARGETS = frozenset(Target)
# TensorRT's ONNX parser is not available to check here; it recognises the decomposed forms of these
# itself, so operators newer than LayerNormalization and HardSigmoid stay decomposed for it.
NOT_TENSORRT = frozenset(Target) - {Target.TENSORRT}

# Operators that broadcast their operands numpy-style: a constant operand with more axes than the other
# raises the result's rank, which a fused operator would not.
BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


def broadcast_dims(*shapes: list) -> list | None:
    """The shape ``shapes`` broadcast to, where every axis is decided (numbers, or one symbol); else ``None``."""
    rank = max(len(shape) for shape in shapes)
    result = []
    for axis in range(rank):
        dims = {shape[axis - rank + len(shape)] for shape in shapes if axis - rank + len(shape) >= 0} - {1}
        if len(dims) > 1 or None in dims:
            return None
        result.append(dims.pop() if dims else 1)
    return result


def close(value: float | None, expected: float, dtype: np.dtype | None = None) -> bool:
    """Whether ``value`` is ``expected`` within ``ULPS`` units in the last place of ``dtype`` (float32 by default)."""
    rtol = ULPS * float(np.finfo(dtype if dtype is not None and np.dtype(dtype).kind == "f" else np.float32).eps)
    return value is not None and bool(np.isclose(value, expected, rtol=rtol, atol=0.0))


def scalar(m: Match, name: str) -> float | None:
    """The one value of a constant with one element bound to ``name``, or ``None``."""
    value = m.value(name)
    if value is None or value.size != 1 or value.dtype.kind not in "iuf":
        return None
    return float(value.reshape(-1)[0])


def rank(m: Match, name: str) -> int | None:
    shape = m.shape(name)
    return None if shape is None else len(shape)


def fusable_float(m: Match, name: str) -> str | None:
    """Why the value's type rules a fusion out, or ``None`` (float32 and float16 fuse)."""
    dtype = m.dtype(name)
    if dtype not in FUSABLE_FLOATS:
        return f"'{name}' is {dtype if dtype is not None else 'of unknown type'}, not float32 or float16"
    return None


def constants_keep_rank(m: Match, data_rank: int | None) -> str | None:
    """Why a constant operand of a matched broadcasting node could change the result's shape, or ``None``.

    A fused operator's output has its input's shape; the decomposed form's has more axes when one of its
    constants (a ``0.5``, an ``epsilon``) has more axes than the input. With the input's rank unknown,
    only constants without axes are safe.
    """
    for node in m.nodes:
        if node.op not in BROADCASTING_OPS:
            continue
        for tensor in node.inputs:
            if not ir.is_constant(tensor):
                continue
            value = ir.constant_value(tensor)
            if value is None:
                return f"constant '{tensor.name}' cannot be read"
            limit = 0 if data_rank is None else data_rank
            if value.ndim > limit:
                return f"constant '{tensor.name}' of shape {list(value.shape)} may broadcast the result to more axes"
    return None


def trailing_axis(axes: list[int], data_rank: int | None) -> int | None:
    """The first axis, negative, when ``axes`` are exactly the last ones (``[-2, -1]`` -> ``-2``), else ``None``."""
    if not axes:
        return None
    if data_rank is None:
        if any(axis >= 0 for axis in axes):
            return None
        negative = sorted(axes)
    else:
        if any(not -data_rank <= axis < data_rank for axis in axes):
            return None
        negative = sorted(axis - data_rank if axis >= 0 else axis for axis in axes)
    count = len(negative)
    if negative != list(range(-count, 0)):
        return None
    return -count


def known_dims(shape: list | None) -> list[int] | None:
    """The shape when every dimension is a known integer, else ``None``."""
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]
