"""``ort_fuse``: onnxruntime's contrib operators (``com.microsoft``) for what its CPU kernels fuse.

Only for ``--target ort``; on other targets the pass changes nothing. Rules (stats keys in brackets):

* ``residual_sum``: ``LayerNormalization(a + b)`` (float32) -> ``LayerNormalization(Sum(a, b))``. onnxruntime
  fuses an Add read only by a LayerNormalization into ``SkipLayerNormalization`` whenever it knows both
  operands' shapes, which shape folding makes it know; its CPU kernel (1.32, float32) is a scalar loop that
  ran 4-7x slower than Add + LayerNormalization ([1, 16..512, 768], 1 and 2 threads) and made BERT-base 6%
  slower end to end. A two-input Sum is the same addition under the same broadcasting, and onnxruntime's
  fusion looks for Add only. The census reports such drops as declined, not as regressions.
* ``gelu``: Gelu written out with ``erf`` (``x * 0.5 * (1 + erf(x / sqrt(2)))``, exporters' form before
  opset 20) -> ``com.microsoft.Gelu``. A bias added before it stays an Add: onnxruntime 1.32's CPU
  BiasGelu ran 20-60% slower than Add + Gelu ([1, 128..197, 3072], 1 and 2 threads), and with static
  shapes onnxruntime itself moves the Add into the MatMul's Gemm, where the bias costs nothing (ViT-B
  static: 1.02x -> 1.00x the original). With dynamic shapes onnxruntime fuses the two into BiasGelu
  itself, as it does for the original.
* ``fast_gelu_bias`` and ``fast_gelu``: the tanh approximation (``Gelu(approximate="tanh")`` or written
  out) of ``x + b`` or ``x`` -> ``FastGelu(x[, b])``.
* ``contrib_rotary_embedding`` and ``contrib_rotary_embedding_partial``: on models of opset 11 to 22, which
  lack the standard RotaryEmbedding (``fuse``'s ``rotary_embedding`` takes opset 23 and later), Llama's
  ``x * cos + rotate_half(x) * sin`` (the same match and conditions) -> ``com.microsoft.RotaryEmbedding``,
  and ``concat(RotaryEmbedding(x[..., :r]), x[..., r:])`` -> one with ``rotary_embedding_dim=r`` (and
  ``num_heads``, which the kernel then requires). The contrib operator reads ``(rows, d/2)`` tables at
  ``position_ids``; the run-time ``cos``/``sin`` of shape ``(B', S, d)`` become such a table by taking their
  first half and flattening ``B' * S`` rows, and the position of token ``s`` of batch ``b`` is its row:
  an offset of 0 when ``B'`` is 1 (row ``s`` for every batch), else ``b * S + s`` computed at run time
  (``Range`` over ``Shape``). Measured exact (2e-7) against the decomposed form on onnxruntime 1.32 CPU,
  float32 and float16, batches 1 to 3.
* ``contrib_rotary_before_head_split``: a contrib RotaryEmbedding of ``Transpose(Reshape(x, [B, S, H, D]),
  [0, 2, 1, 3])``, the heads of a 3-D projection ``x``, rotates ``x`` itself (the operator's 3-D form, with
  ``num_heads=H``) before the split: the same rotation of each head at the same positions. Llama's query
  is then a head split of a 3-D value, which ``MultiHeadAttention`` takes where the model's opset has no
  standard ``Attention``.
* ``packed_attention``: ``MultiHeadAttention`` (from the ``attention`` pass) whose query, key and value
  are projections ``x @ Wq + bq``, ``x @ Wk + bk``, ``x @ Wv + bv`` of one ``x`` with constant weights ->
  ``com.microsoft.Attention(x, [Wq | Wk | Wv], [bq | bk | bv])``, one GEMM for the three (a missing bias
  is zeros).

Exactness: each contrib operator is defined as the composition it replaces and onnxruntime's kernels
compute it in float32 (only float32 is rewritten), so results agree to rounding; ``FastGelu``'s constants
are those of the tanh approximation. ``Sum`` of two inputs is ``Add`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxopt.pass_infra import Target
from onnxopt.passes.attention import HEADS_FIRST, ORT_DOMAIN, ContribRewritePass, head_split, typed
from onnxopt.passes.fusions.activations import check_activation, gelu_erf_pattern, gelu_tanh_pattern
from onnxopt.passes.fusions.rotary import (HalfCache, check_caches, check_partial_rotation, check_rotary,
                                           first_half, head_layout, rotary_pattern, slice_range)
from onnxopt.pattern import Match, MatchResult, RewriteRule

FLOAT32 = np.dtype(np.float32)
ORT_ONLY = frozenset({Target.ORT})


def _float32(m: Match, name: str) -> str | None:
    dtype = m.dtype(name)
    return None if dtype == FLOAT32 else f"'{m[name].name}' is {dtype}, not float32"


class _OrtRule(RewriteRule):
    """A rule emitting ``com.microsoft`` operators, for onnxruntime only."""

    domain = ORT_DOMAIN
    targets = ORT_ONLY


# ---------------------------------------------------------------------------------------------------
# Residual sums: SkipLayerNormalization declined


class ResidualSumBeforeNorm(_OrtRule):
    """Writes LayerNormalization(a + b) as LayerNormalization(Sum(a, b)), which onnxruntime does not fuse."""

    name = "residual_sum"

    def pattern(self, op, a, b, gamma, beta):
        return op.LayerNormalization(op.Add(a, b), gamma, op.optional(beta))

    def check(self, m: Match) -> MatchResult:
        reason = _float32(m, "a")
        if reason:
            return m.fail(reason)
        return m.ok()

    def rewrite(self, op, m: Match):
        norm = m.node("LayerNormalization")
        output = op.LayerNormalization(op.Sum(m["a"], m["b"]), m["gamma"], m["beta"], _name=norm.name,
                                       **m.attrs("LayerNormalization"))
        return typed(output, norm.outputs[0].dtype, norm.outputs[0].shape)


# ---------------------------------------------------------------------------------------------------
# Gelu


def _tanh_approximation(value) -> bool:
    return value in ("tanh", b"tanh")


def check_bias(m: Match) -> MatchResult:
    """The bias ``b`` must be a constant vector along ``h``'s last axis (so that ``h + b`` keeps ``h``'s shape)."""
    reason = _float32(m, "h")
    if reason:
        return m.fail(reason)
    bias, shape = m.value("b"), m.shape("h")
    if bias is None or bias.ndim != 1 or bias.dtype != FLOAT32:
        return m.fail("the bias is not a constant float32 vector")
    if not shape or shape[-1] != bias.shape[0]:
        return m.fail(f"the bias of {bias.shape[0]} values does not run along the last axis of {shape}")
    return m.ok()


def check_float32_activation(m: Match) -> MatchResult:
    reason = _float32(m, "x")
    return m.fail(reason) if reason else check_activation(m)


class ErfGeluToGelu(_OrtRule):
    """Replaces x * 0.5 * (1 + erf(x / sqrt(2))) with com.microsoft.Gelu(x) (models before opset 20)."""

    name = "gelu"

    def pattern(self, op, x):
        return gelu_erf_pattern(op, x)

    def check(self, m: Match) -> MatchResult:
        return check_float32_activation(m)

    def rewrite(self, op, m: Match):
        return typed(op.Gelu(m["x"], _domain=ORT_DOMAIN), m["x"].dtype, m["x"].shape)


class TanhGeluToFastGeluWithBias(_OrtRule):
    """Replaces the tanh approximation of Gelu(h + b) with FastGelu(h, b)."""

    name = "fast_gelu_bias"

    def pattern(self, op, h, b):
        biased = op.Add(h, b)
        return op.either(op.Gelu(biased, approximate=_tanh_approximation), gelu_tanh_pattern(op, biased))

    def check(self, m: Match) -> MatchResult:
        return check_bias(m)

    def rewrite(self, op, m: Match):
        return typed(op.FastGelu(m["h"], m["b"], _domain=ORT_DOMAIN), m["h"].dtype, m["h"].shape)


class TanhGeluToFastGelu(_OrtRule):
    """Replaces the tanh approximation of Gelu(x) with FastGelu(x)."""

    name = "fast_gelu"

    def pattern(self, op, x):
        return op.either(op.Gelu(x, approximate=_tanh_approximation), gelu_tanh_pattern(op, x))

    def check(self, m: Match) -> MatchResult:
        return check_float32_activation(m)

    def rewrite(self, op, m: Match):
        return typed(op.FastGelu(m["x"], _domain=ORT_DOMAIN), m["x"].dtype, m["x"].shape)


# ---------------------------------------------------------------------------------------------------
# Rotary embeddings below opset 23

STANDARD_ROTARY_OPSET = 23
# Range (opset 11) computes per-batch positions.
CONTRIB_ROTARY_MIN_OPSET = 11


class _ContribRotaryRule(_OrtRule):
    """A rule for models whose opset lacks the standard RotaryEmbedding (``rotary_embedding`` covers the others)."""

    def applies_to(self, opsets: dict[str, int]) -> str | None:
        version = opsets.get("", 0)
        if version >= STANDARD_ROTARY_OPSET:
            return f"the model's opset {version} has the standard RotaryEmbedding"
        if version < CONTRIB_ROTARY_MIN_OPSET:
            return f"the rule needs opset {CONTRIB_ROTARY_MIN_OPSET} or later, the model has {version}"
        return super().applies_to(opsets)


def _flat_cache(op, cache: HalfCache, half: int):
    """The ``(rows, d/2)`` table the contrib operator indexes: the cache's batch and sequence flattened."""
    if cache.constant is not None:
        return op.const(np.ascontiguousarray(cache.constant.reshape(-1, half)), "rotary_cache")
    return op.Reshape(first_half(op, cache.source, half), op.const(np.array([-1, half], np.int64), "rows_by_half"))


def _positions(op, cache: HalfCache):
    """Each token's row in ``_flat_cache``: an offset of 0 for a cache of batch 1, else ``b * S + s``."""
    if cache.batch == 1:
        return op.const(np.zeros(1, np.int64), "position_offset")
    if cache.constant is not None:
        batch, sequence = cache.constant.shape[:2]
        return op.const(np.arange(batch * sequence, dtype=np.int64).reshape(batch, sequence), "position_ids")
    batch_and_sequence = op.Slice(op.Shape(cache.source), op.const(np.array([0], np.int64), "starts"),
                                  op.const(np.array([2], np.int64), "ends"))
    rows = op.ReduceProd(batch_and_sequence, keepdims=0)
    first, step = op.const(np.array(0, np.int64), "zero"), op.const(np.array(1, np.int64), "one")
    return op.Reshape(op.Range(first, rows, step), batch_and_sequence)


class RotateHalfToContribRotaryEmbedding(_ContribRotaryRule):
    """Replaces x * cos + rotate_half(x) * sin with com.microsoft.RotaryEmbedding (opset below 23)."""

    name = "contrib_rotary_embedding"

    def pattern(self, op, x, cos, sin):
        return rotary_pattern(op, x, cos, sin)

    def check(self, m: Match) -> MatchResult:
        result = check_rotary(m)
        if not result:
            return result
        x_shape, head_size = head_layout(m)
        cos, sin = check_caches(m, x_shape, head_size)
        if cos.batch != sin.batch:
            return m.fail(f"cos has batch {cos.batch} and sin {sin.batch}")
        return m.ok()

    def rewrite(self, op, m: Match):
        x_shape, head_size = head_layout(m)
        cos, sin = check_caches(m, x_shape, head_size)
        half = head_size // 2
        output = op.RotaryEmbedding(m["x"], _positions(op, cos), _flat_cache(op, cos, half), _flat_cache(op, sin, half),
                                    interleaved=0, _domain=ORT_DOMAIN, _name=m.node("Add").name)
        return typed(output, m["x"].dtype, m.shape("x"))


class ContribRotaryEmbeddingPartial(_ContribRotaryRule):
    """Replaces concat(RotaryEmbedding(x[..., :r]), x[..., r:]) with one contrib RotaryEmbedding rotating r features."""

    name = "contrib_rotary_embedding_partial"

    def pattern(self, op, x, position_ids, cos, sin):
        rotated = op.Slice(x, _allow_other_inputs=True, _tag="rotated_part")
        passed = op.Slice(x, _allow_other_inputs=True, _tag="passed_part")
        rotation = op.RotaryEmbedding(rotated, position_ids, cos, sin, _domain=ORT_DOMAIN)
        return op.Concat(rotation, passed, _tag="join")

    def check(self, m: Match) -> MatchResult:
        result = check_partial_rotation(m)
        if result and not isinstance(m.shape("x")[1], int):
            return m.fail("the number of heads is unknown (the operator needs it to rotate part of x)")
        return result

    def rewrite(self, op, m: Match):
        x_shape, head_size = head_layout(m)
        _, rotary_dim = slice_range(m.node("rotated_part"), 4, head_size)
        attrs = m.attrs("RotaryEmbedding")
        attrs.update(rotary_embedding_dim=rotary_dim, num_heads=x_shape[1])
        output = op.RotaryEmbedding(m["x"], m["position_ids"], m["cos"], m["sin"], _domain=ORT_DOMAIN,
                                    _name=m.node("join").name, **attrs)
        return typed(output, m["x"].dtype, m.shape("x"))


class ContribRotaryBeforeHeadSplit(_OrtRule):
    """Rotates a projection before its split into heads: RotaryEmbedding(heads(x)) -> heads(RotaryEmbedding(x))."""

    name = "contrib_rotary_before_head_split"

    def pattern(self, op, x, target, position_ids, cos, sin):
        heads = op.Transpose(op.Reshape(x, target, _tag="split"), perm=HEADS_FIRST, _tag="heads")
        return op.RotaryEmbedding(heads, position_ids, cos, sin, _domain=ORT_DOMAIN)

    def check(self, m: Match) -> MatchResult:
        split = head_split(m, "split", "x")
        if isinstance(split, str):
            return m.fail(split)
        attrs = m.attrs("RotaryEmbedding")
        if attrs.get("interleaved", 0) or attrs.get("is_packed_batching", 0):
            return m.fail("the rotation is interleaved or packed")
        if attrs.get("num_heads", split.heads) != split.heads:
            return m.fail(f"the rotation is of {attrs['num_heads']} heads, the split makes {split.heads}")
        return m.ok()

    def rewrite(self, op, m: Match):
        split = head_split(m, "split", "x")
        attrs = m.attrs("RotaryEmbedding")
        attrs["num_heads"] = split.heads
        rotated = typed(op.RotaryEmbedding(m["x"], m["position_ids"], m["cos"], m["sin"], _domain=ORT_DOMAIN,
                                           **attrs), m["x"].dtype, m.shape("x"))
        reshape = m.node("split")
        heads = op.Transpose(op.Reshape(rotated, m["target"], _name=reshape.name, **m.attrs("split")),
                             perm=HEADS_FIRST, _name=m.node("heads").name)
        output = m.node("RotaryEmbedding").outputs[0]
        return typed(heads, output.dtype, output.shape)


# ---------------------------------------------------------------------------------------------------
# Attention with its input projections


def projection_pattern(op, x, weight, bias, tag: str):
    """``x @ weight + bias`` or ``x @ weight`` (the MatMul tagged ``tag``)."""
    product = op.MatMul(x, weight, _tag=tag)
    return op.either(op.Add(product, bias, _tag=f"{tag}_bias"), product)


def _projection(m: Match, weight: str, bias: str, hidden: int) -> tuple[np.ndarray, np.ndarray] | str:
    """The weight and bias (zeros when absent) of one projection, or why they cannot be packed."""
    w = m.value(weight)
    if w is None or w.ndim != 2 or w.dtype != FLOAT32 or w.shape[0] != hidden:
        return f"'{m[weight].name}' is not a constant float32 matrix of {hidden} rows"
    if m[bias] is None:
        return np.asarray(w), np.zeros(w.shape[1], np.float32)
    b = m.value(bias)
    if b is None or b.dtype != FLOAT32 or b.shape != (w.shape[1],):
        return f"'{m[bias].name}' is not a constant float32 vector of {w.shape[1]} values"
    return np.asarray(w), np.asarray(b)


def packed_projections(m: Match) -> tuple[np.ndarray, np.ndarray, list[int]] | str:
    """``[Wq | Wk | Wv]``, ``[bq | bk | bv]`` and the three widths, or why the projections do not pack."""
    shape = m.shape("x")
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return "the projected input is not known to be [B, S, hidden]"
    parts = [_projection(m, f"w{p}", f"b{p}", shape[2]) for p in "qkv"]
    for part in parts:
        if isinstance(part, str):
            return part
    weights, biases = zip(*parts)
    widths = [w.shape[1] for w in weights]
    return np.concatenate(weights, axis=1), np.concatenate(biases), widths


class MultiHeadAttentionToAttention(_OrtRule):
    """Replaces MultiHeadAttention of three projections of one x with Attention(x, packed weights and biases)."""

    name = "packed_attention"

    def pattern(self, op, x, wq, bq, wk, bk, wv, bv, attention_bias):
        return op.MultiHeadAttention(projection_pattern(op, x, wq, bq, "q"), projection_pattern(op, x, wk, bk, "k"),
                                     projection_pattern(op, x, wv, bv, "v"), None, None,
                                     op.optional(attention_bias), _domain=ORT_DOMAIN)

    def check(self, m: Match) -> MatchResult:
        packed = packed_projections(m)
        if isinstance(packed, str):
            return m.fail(packed)
        _, _, widths = packed
        heads = int(m.attr("MultiHeadAttention", "num_heads", 0))
        if widths[0] != widths[1] or heads <= 0 or any(width % heads for width in widths):
            return m.fail(f"projection widths {widths} are not query and key of one size, split into {heads} heads")
        return m.ok()

    def rewrite(self, op, m: Match):
        weights, biases, widths = packed_projections(m)
        attrs = {key: value for key, value in m.attrs("MultiHeadAttention").items()
                 if key in ("num_heads", "scale", "mask_filter_value", "unidirectional")}
        if widths[2] != widths[0]:
            attrs["qkv_hidden_sizes"] = widths
        output = op.Attention(m["x"], op.const(weights, "qkv_weight"), op.const(biases, "qkv_bias"), None, None,
                              m["attention_bias"], _domain=ORT_DOMAIN, _name=m.node("MultiHeadAttention").name, **attrs)
        return typed(output, m["x"].dtype, [*list(m.shape("x"))[:2], widths[2]])


RULES = (ResidualSumBeforeNorm(), ErfGeluToGelu(), TanhGeluToFastGeluWithBias(),
         TanhGeluToFastGelu(), RotateHalfToContribRotaryEmbedding(), ContribRotaryEmbeddingPartial(),
         ContribRotaryBeforeHeadSplit(), MultiHeadAttentionToAttention())


@dataclass(frozen=True)
class OrtFuse(ContribRewritePass):
    """Fuses into onnxruntime's contrib operators where they are faster: Gelu, FastGelu, RotaryEmbedding, Attention."""

    name: ClassVar[str] = "ort_fuse"
    rules: ClassVar[tuple] = RULES
