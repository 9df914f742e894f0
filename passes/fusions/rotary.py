"""RotaryEmbedding (opset 23) recovered from the rotate-half form of rotary position embeddings.

Llama, Mistral, Qwen and GPT-NeoX style decoders (Hugging Face transformers) rotate the queries and keys
``x`` of shape ``(batch, heads, sequence, head_size)`` as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])`` over the last axis (``d`` the head size), and
``cos``, ``sin`` of shape ``(batch or 1, 1, sequence, d)``, usually ``Unsqueeze(c, 1)`` of a
``(batch or 1, sequence, d)`` value computed at run time as ``cos(concat(f, f))`` (``f`` the positions
times the inverse frequencies), possibly scaled and cast.

* ``rotary_embedding``: ``x * cos + rotate_half(x) * sin`` (products and sum in either order, the
  negation as ``Neg`` or ``* -1``) -> ``RotaryEmbedding(x, cos_cache, sin_cache)`` with
  ``cos_cache = cos[:, 0, :, :d/2]`` and likewise for ``sin``: a ``Slice`` of the 3-D value, or a new
  constant when ``cos`` is one.
* ``rotary_embedding_partial``: ``concat(RotaryEmbedding(x[..., :r]), x[..., r:])`` over the last axis
  -> ``RotaryEmbedding(x, rotary_embedding_dim=r)``: partial rotation (GPT-NeoX, Phi) rotates the first
  ``r`` features and passes the others through, which is exactly what the attribute does.
* ``rotary_cache_batch``: ``RotaryEmbedding(x, cos, sin)`` without position ids whose caches have batch
  1 while ``x``'s batch is not known to be 1 -> the caches expanded to ``x``'s batch (see below).

Exact when, and only then, does the rule fire:

* ``x`` is 4-D ``(B, N, S, d)`` with ``d`` a known even number (the operator's 4-D layout; ``(B, S, N, d)``
  inputs, whose ``cos`` is unsqueezed on axis 2, are left alone), of type float32 or float16;
* the two Slices take ``[0, d/2)`` and ``[d/2, d)`` of the last axis with step 1, the Concat joins them
  on the last axis, the higher half negated and first;
* ``cos`` and ``sin`` are ``(B or 1, 1, S, d)`` with the same ``S`` as ``x`` (equal numbers or the same
  symbol), so that the decomposed form broadcasts to ``x``'s shape and nothing else;
* the two halves of ``cos`` (and of ``sin``) along the last axis are provably equal, so that the
  operator's ``cos_cache[..., i]`` multiplies both ``x[..., i]`` and ``x[..., i + d/2]`` as the
  decomposed form does: a constant is compared element by element; otherwise the value must be a
  ``Concat(f, f)`` of one value twice on the last axis, followed only by ``Cos``, ``Sin``, ``Cast``,
  ``Neg``, ``Identity`` or arithmetic with an operand that is constant along the last axis (or itself
  of equal halves).

onnxruntime's kernel requires caches of ``x``'s batch (it refuses ``(1, S, d/2)`` caches for a batch of 2,
although the specification's reference broadcasts them), so a cache of batch 1 for an ``x`` whose batch
is not known to be 1 is expanded to ``x``'s batch (``Shape`` + ``Concat`` + ``Expand``: a few kilobytes,
far cheaper than the elementwise work removed). The specification describes the caches as ``(batch, S,
d/2)`` while its reference broadcasts them, and the torch dynamo exporter (2.13) at opset 23 writes
``RotaryEmbedding`` with batch-1 caches, which onnxruntime 1.32 then refuses at batch 2:
``rotary_cache_batch`` expands those too (the same values, for every batch).

Targets: the generic target and onnxruntime. onnxruntime 1.32's CPU kernel ran q and k of a layer
(batch 1, 32 heads x 128, sequence 128, float32, 1 thread) in 0.5 ms against 2.4 ms decomposed; OpenVINO
2026.4 computes the same values but ran the fused operator about 5% slower than its own handling of the
decomposed form, so that target keeps the decomposed form; TensorRT's parser could not be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Target
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import FUSABLE_FLOATS

# Measured above: faster in onnxruntime, slower in OpenVINO, unknown in TensorRT.
ROTARY_TARGETS = frozenset({Target.GENERIC, Target.ORT})

# Operators through which a value of equal halves along the last axis keeps them.
_UNARY_KEEPING_HALVES = frozenset({"Cos", "Sin", "Cast", "Neg", "Identity"})
_BINARY_KEEPING_HALVES = frozenset({"Mul", "Div", "Add", "Sub"})
_HALVES_SEARCH_DEPTH = 8

Dim = int | str | None


def rotate_half_pattern(op, x):
    """``concat(-x[..., d/2:], x[..., :d/2])``; the Slices are tagged ``high_half`` and ``low_half``."""
    high = op.Slice(x, _allow_other_inputs=True, _tag="high_half")
    low = op.Slice(x, _allow_other_inputs=True, _tag="low_half")
    return op.Concat(op.either(op.Neg(high), op.Mul(high, -1)), low, _tag="rotate_half")


def rotary_pattern(op, x, cos, sin):
    """``x * cos + rotate_half(x) * sin``."""
    return op.Add(op.Mul(x, cos), op.Mul(rotate_half_pattern(op, x), sin))


# ---------------------------------------------------------------------------------------------------
# Shapes and slices


def same_dim(a: Dim, b: Dim) -> bool:
    """Whether two dimensions are provably equal: the same number or the same symbol."""
    return a is not None and a == b


def is_last_axis(axis: int, rank: int) -> bool:
    return axis in (-1, rank - 1)


def slice_range(node: gs.Node, rank: int, size: int) -> tuple[int, int] | None:
    """``[start, end)`` that a Slice takes of the last axis (of ``size`` elements), or ``None``.

    ``None`` unless the Slice cuts that one axis only, with constant bounds and step 1.
    """
    inputs = node.inputs + [gs.Variable.empty()] * (5 - len(node.inputs))
    starts, ends = ir.constant_value(inputs[1]), ir.constant_value(inputs[2])
    axes = ir.constant_value(inputs[3]) if inputs[3].name else np.arange(0 if starts is None else starts.size)
    steps = ir.constant_value(inputs[4]) if inputs[4].name else np.ones(1, np.int64)
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
        return None
    if not is_last_axis(int(axes.reshape(-1)[0]), rank) or int(steps.reshape(-1)[0]) != 1:
        return None

    def clamp(bound: int) -> int:
        return min(max(bound + size if bound < 0 else bound, 0), size)

    return clamp(int(starts.reshape(-1)[0])), clamp(int(ends.reshape(-1)[0]))


def concat_on_last_axis(node: gs.Node, rank: int) -> bool:
    return is_last_axis(int(node.attrs.get("axis", 0)), rank)


def head_layout(m: Match) -> tuple[list[Dim], int] | MatchResult:
    """``x``'s 4-D shape and its even, known head size, or why there is none."""
    shape = m.shape("x")
    if shape is None or len(shape) != 4:
        return m.fail("x is not 4-D (batch, heads, sequence, head size)")
    head_size = shape[3]
    if not isinstance(head_size, int) or head_size <= 0 or head_size % 2:
        return m.fail(f"the head size of x ({head_size}) is not a known even number")
    return list(shape), head_size


def check_rotate_half(m: Match, head_size: int) -> MatchResult:
    half = head_size // 2
    if slice_range(m.node("low_half"), 4, head_size) != (0, half):
        return m.fail(f"the second half of the Concat is not x[..., :{half}]")
    if slice_range(m.node("high_half"), 4, head_size) != (half, head_size):
        return m.fail(f"the negated half of the Concat is not x[..., {half}:]")
    if not concat_on_last_axis(m.node("rotate_half"), 4):
        return m.fail("rotate_half's Concat is not on the last axis")
    return m.ok()


# ---------------------------------------------------------------------------------------------------
# cos and sin: equal halves, and the (batch, sequence, head_size / 2) cache the operator takes


def constant_along_last_axis(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is a constant that broadcasts along the last axis (no axes, or last axis 1)."""
    value = ir.constant_value(tensor) if ir.is_constant(tensor) else None
    return value is not None and (value.ndim == 0 or value.shape[-1] == 1)


def has_equal_halves(tensor: gs.Tensor, size: int, depth: int = _HALVES_SEARCH_DEPTH) -> bool:
    """Whether ``tensor[..., :size/2]`` provably equals ``tensor[..., size/2:]`` (its last axis of ``size``)."""
    if ir.is_constant(tensor):
        value = ir.constant_value(tensor)
        half = size // 2
        return (value is not None and value.ndim > 0 and value.shape[-1] == size
                and np.array_equal(value[..., :half], value[..., half:]))
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    node = tensor.inputs[0]
    if node.domain not in ("", None, "ai.onnx"):
        return False
    if node.op == "Concat":
        rank = -1 if tensor.shape is None else len(tensor.shape)  # axis -1 is the last axis whatever the rank
        return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and concat_on_last_axis(node, rank)
    if node.op in _UNARY_KEEPING_HALVES:
        return has_equal_halves(node.inputs[0], size, depth - 1)
    if node.op in _BINARY_KEEPING_HALVES and len(node.inputs) == 2:
        halves = [has_equal_halves(t, size, depth - 1) for t in node.inputs]
        flat = [constant_along_last_axis(t) for t in node.inputs]
        return any(halves) and all(h or f for h, f in zip(halves, flat))
    return False


@dataclass(frozen=True)
class HalfCache:
    """Where the operator's cache for one of ``cos`` and ``sin`` comes from.

    Either ``source``, a ``(batch, S, d)`` value whose first half the rewrite slices off, or
    ``constant``, the ``(batch, S, d/2)`` cache itself; ``batch`` is its first dimension.
    """

    source: gs.Tensor | None
    constant: np.ndarray | None
    batch: Dim


def unsqueezed_on_heads(tensor: gs.Tensor) -> gs.Tensor | None:
    """The 3-D value ``c`` when ``tensor`` is ``Unsqueeze(c, [1])`` (the heads axis of a 4-D result)."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Unsqueeze":
        return None
    node = tensor.inputs[0]
    if "axes" in node.attrs:  # before opset 13
        axes = np.asarray(node.attrs["axes"])
    else:
        axes = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (1, -3):
        return None
    source = node.inputs[0]
    return source if source.shape is not None and len(source.shape) == 3 else None


def half_cache(m: Match, name: str, x_shape: list[Dim], head_size: int) -> HalfCache | str:
    """The cache for ``m[name]`` (``cos`` or ``sin``, 4-D, multiplied with ``x``), or why there is none."""
    tensor, half = m[name], head_size // 2
    shape = m.shape(name)
    if shape is None or len(shape) != 4:
        return f"{name} is not 4-D"
    if shape[1] != 1 or shape[3] != head_size:
        return f"{name} of shape {shape} is not (batch, 1, sequence, {head_size})"
    if not same_dim(shape[2], x_shape[2]):
        return f"the sequence length of {name} ({shape[2]}) is not provably that of x ({x_shape[2]})"
    if not (shape[0] == 1 or same_dim(shape[0], x_shape[0])):
        return f"the batch of {name} ({shape[0]}) is neither 1 nor provably that of x ({x_shape[0]})"
    if m.is_constant(name):
        value = m.value(name)
        if value is None or not has_equal_halves(tensor, head_size):
            return f"the two halves of constant {name} differ"
        return HalfCache(None, np.ascontiguousarray(value[:, 0, :, :half]), shape[0])
    source = unsqueezed_on_heads(tensor)
    if source is None:
        return f"{name} is not a 3-D value unsqueezed on axis 1"
    if not has_equal_halves(source, head_size):
        return f"the two halves of {name} along the last axis are not provably equal (not concat(c, c))"
    return HalfCache(source, None, shape[0])


def check_caches(m: Match, x_shape: list[Dim], head_size: int) -> tuple[HalfCache, HalfCache] | MatchResult:
    caches = [half_cache(m, name, x_shape, head_size) for name in ("cos", "sin")]
    for cache in caches:
        if isinstance(cache, str):
            return m.fail(cache)
    if m.dtype("cos") != m.dtype("x") or m.dtype("sin") != m.dtype("x"):
        return m.fail("cos, sin and x differ in type")
    return caches[0], caches[1]


def batch_source(x: gs.Tensor, rank: int) -> gs.Tensor:
    """A value with ``x``'s batch: ``x``, or what ``x`` was sliced from along its last axis only.

    Partial rotation rotates ``x[..., :r]``; reading the batch from the whole ``x`` leaves the slice to
    the rotation alone, so that ``rotary_embedding_partial`` can then take it in.
    """
    while len(x.inputs) == 1 and x.inputs[0].op == "Slice":
        source = x.inputs[0].inputs[0]
        size = None if source.shape is None or len(source.shape) != rank else source.shape[-1]
        if not isinstance(size, int) or slice_range(x.inputs[0], rank, size) is None:
            break
        x = source
    return x


def expanded_batch_shape(op, x: gs.Tensor):
    """``(B, 1, 1)`` with ``B`` the batch of ``x``: Expand broadcasts a ``(1, S, d/2)`` cache to ``(B, S, d/2)``."""
    return op.Concat(op.Shape(x, start=0, end=1), op.const(np.ones(2, np.int64), "ones"), axis=0)


def needs_batch_expansion(cache: HalfCache, x_shape: list[Dim]) -> bool:
    """Whether a cache of batch 1 must be expanded for an ``x`` whose batch may be larger (onnxruntime insists)."""
    return cache.batch == 1 and x_shape[0] != 1


def first_half(op, source, half: int):
    """``source[..., :half]``: the cache the operators take from a ``cos``/``sin`` of equal halves."""
    return op.Slice(source, op.const(np.array([0], np.int64), "starts"), op.const(np.array([half], np.int64), "ends"),
                    op.const(np.array([-1], np.int64), "axes"))


def check_rotary(m: Match) -> MatchResult:
    """Whether a match of ``rotary_pattern`` is a rotation of a 4-D float ``x`` with caches the operator can take."""
    if m.dtype("x") not in FUSABLE_FLOATS:
        return m.fail("x is not float32 or float16")
    layout = head_layout(m)
    if isinstance(layout, MatchResult):
        return layout
    x_shape, head_size = layout
    result = check_rotate_half(m, head_size)
    if not result:
        return result
    caches = check_caches(m, x_shape, head_size)
    return caches if isinstance(caches, MatchResult) else m.ok()


def check_partial_rotation(m: Match) -> MatchResult:
    """Whether ``concat(RotaryEmbedding(x[..., :r]), x[..., r:])`` (tags ``rotated_part``, ``passed_part``,
    ``join``) rotates the first ``r`` features of a 4-D ``x`` and passes the others through."""
    layout = head_layout(m)
    if isinstance(layout, MatchResult):
        return layout
    _, head_size = layout
    if int(m.attr("RotaryEmbedding", "rotary_embedding_dim", 0) or 0) != 0:
        return m.fail("the inner RotaryEmbedding already rotates part of its input")
    rotated = slice_range(m.node("rotated_part"), 4, head_size)
    if rotated is None or rotated[0] != 0 or not 0 < rotated[1] < head_size or rotated[1] % 2:
        return m.fail("the rotated part is not x[..., :r] for an even r below the head size")
    if slice_range(m.node("passed_part"), 4, head_size) != (rotated[1], head_size):
        return m.fail(f"the part passed through is not x[..., {rotated[1]}:]")
    if not concat_on_last_axis(m.node("join"), 4):
        return m.fail("the Concat is not on the last axis")
    return m.ok()


# ---------------------------------------------------------------------------------------------------
# Rules


class RotaryEmbeddingFromRotateHalf(RewriteRule):
    """Replaces x * cos + rotate_half(x) * sin (4-D x, cos of equal halves) with RotaryEmbedding."""

    name = "rotary_embedding"
    min_opset = 23
    targets = ROTARY_TARGETS

    def pattern(self, op, x, cos, sin):
        return rotary_pattern(op, x, cos, sin)

    def check(self, m: Match) -> MatchResult:
        return check_rotary(m)

    def rewrite(self, op, m: Match):
        x_shape, head_size = head_layout(m)
        cos, sin = check_caches(m, x_shape, head_size)
        batch_shape = None
        if needs_batch_expansion(cos, x_shape) or needs_batch_expansion(sin, x_shape):
            batch_shape = expanded_batch_shape(op, batch_source(m["x"], 4))
        caches = [self.cache_value(op, cache, head_size, batch_shape, x_shape) for cache in (cos, sin)]
        return op.RotaryEmbedding(m["x"], *caches, interleaved=0, _name=m.node("Add").name)

    @staticmethod
    def cache_value(op, cache: HalfCache, head_size: int, batch_shape, x_shape: list[Dim]):
        if cache.constant is not None:
            value = op.const(cache.constant, "rotary_cache")
        else:
            value = first_half(op, cache.source, head_size // 2)
        return op.Expand(value, batch_shape) if needs_batch_expansion(cache, x_shape) else value


class RotaryEmbeddingPartial(RewriteRule):
    """Replaces concat(RotaryEmbedding(x[..., :r]), x[..., r:]) with RotaryEmbedding(x, rotary_embedding_dim=r)."""

    name = "rotary_embedding_partial"
    min_opset = 23
    targets = ROTARY_TARGETS

    def pattern(self, op, x, cos, sin, position_ids):
        rotated = op.Slice(x, _allow_other_inputs=True, _tag="rotated_part")
        passed = op.Slice(x, _allow_other_inputs=True, _tag="passed_part")
        return op.Concat(op.RotaryEmbedding(rotated, cos, sin, op.optional(position_ids)), passed, _tag="join")

    def check(self, m: Match) -> MatchResult:
        return check_partial_rotation(m)

    def rewrite(self, op, m: Match):
        _, head_size = head_layout(m)
        _, rotary_dim = slice_range(m.node("rotated_part"), 4, head_size)
        attrs = m.attrs("RotaryEmbedding")
        attrs["rotary_embedding_dim"] = rotary_dim
        return op.RotaryEmbedding(m["x"], m["cos"], m["sin"], m["position_ids"], _name=m.node("join").name, **attrs)


class RotaryCacheToBatch(RewriteRule):
    """Expands RotaryEmbedding caches of batch 1 to the batch of x (onnxruntime's kernel requires it)."""

    name = "rotary_cache_batch"
    min_opset = 23
    targets = ROTARY_TARGETS

    def pattern(self, op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin)

    def check(self, m: Match) -> MatchResult:
        x_shape = m.shape("x")
        if x_shape is None or len(x_shape) not in (3, 4):
            return m.fail("the rank of x is unknown")
        for name in ("cos", "sin"):
            shape = m.shape(name)
            if shape is None or len(shape) != 3 or shape[0] != 1:
                return m.fail(f"{name} is not a 3-D cache of batch 1 (or its shape is unknown)")
        if x_shape[0] == 1:
            return m.fail("x has batch 1 too")
        return m.ok()

    def rewrite(self, op, m: Match):
        batch_shape = expanded_batch_shape(op, m["x"])
        return op.RotaryEmbedding(m["x"], op.Expand(m["cos"], batch_shape), op.Expand(m["sin"], batch_shape),
                                  _name=m.node("RotaryEmbedding").name, **m.attrs("RotaryEmbedding"))


RULES = (RotaryEmbeddingFromRotateHalf(), RotaryEmbeddingPartial(), RotaryCacheToBatch())
