"""``attention``: scaled dot-product attention recovered into one attention operator.

Exporters write multi-head attention out as a dozen operators. With ``q``, ``k``, ``v`` of shape
``[B, S, H*D]`` (``[B, T, H*D]`` for ``k`` and ``v``)::

    Q = Transpose(Reshape(q, [B, S, H, D]), [0, 2, 1, 3])             # heads first: [B, H, S, D]
    K' = Transpose(Reshape(k, [B, T, H, D]), [0, 2, 3, 1])            # [B, H, D, T]
    V = Transpose(Reshape(v, [B, T, H, Dv]), [0, 2, 1, 3])            # [B, H, T, Dv]
    P = Softmax(MatMul(Q, K') * scale + mask, axis=-1)                # [B, H, S, T]
    y = Reshape(Transpose(MatMul(P, V), [0, 2, 1, 3]), [B, S, H*Dv])  # heads merged back

The scale may be a ``Mul`` or a ``Div`` of the scores, a ``Mul`` of ``q`` before the split (Whisper), or
``Mul``s of ``Q`` and ``K'`` (the dynamo exporter's ``sqrt(scale)`` on each); the mask is any additive
float tensor; a ``Cast`` of the probabilities to their own type may follow the Softmax. ``K'`` and ``V``
may also be any ``[B, H, T, D]`` values with ``K' = Transpose(K, [0, 1, 3, 2])`` — a key/value cache
concatenated with the new keys (GPT-2 with past) — and then ``Q`` too may be any ``[B, H, S, D]`` value
(Llama's, rotated by RotaryEmbedding). 4-D keys and values may have fewer heads, ``Hkv``, repeated by
transformers' ``repeat_kv`` for grouped-query attention::

    K = Reshape(Expand(Unsqueeze(K_kv, axis 2), [B, Hkv, H/Hkv, T, D]), [B, H, T, D])

torch's ``scaled_dot_product_attention`` (transformers' default attention, ``attn_implementation="sdpa"``)
is exported with three more steps, all matched: a guard ``P = Where(IsNaN(P), 0, P)`` after the Softmax
(its mask is ``Where(keep, 0, -inf)``, and a query whose keys are all masked out gets NaN there); from the
dynamo exporter, ``K' = Reshape(Transpose(Reshape(K, [-1, T, D]), [0, 2, 1]), [B, H, D, T])``, whose
targets are read from ``Shape(K)`` (those Shape nodes may read values of the match: they die with it);
and a Reshape of the attended heads to the shape they have. Rules (stats keys in brackets):

* ``score_biases_summed``: ``Softmax((scores + a) + b)`` -> ``Softmax(scores + (a + b))``, so that a relative
  position bias and a padding mask added one after the other (MPNet, T5) make the one mask an operator
  takes; every layer adds the same two, so ``cse`` leaves one sum for all. Addition is exact up to
  rounding in either order, and the broadcast of three shapes does not depend on the order either
  (any target, any opset);
* ``interleaved_heads_split`` and ``interleaved_heads_split_in_three``: for onnxruntime, GPT-NeoX's fused
  projection viewed as ``[B, S, H, 3D]`` (each head's query, key and value side by side), transposed heads
  first and cut on the last axis into equal parts by Slices or a Split, becomes one projection per part
  with the weight's (and bias's) columns of that part, ``[B, S, H*D]``, split into heads: the same
  products, so that each part is a head split of a 3-D value as the attention rules want it;
* ``sdpa_to_attention``: for the generic, OpenVINO and TensorRT targets on models of opset 23 or later,
  the standard ``Attention``: with ``q_num_heads``/``kv_num_heads`` on the 3-D ``q``, ``k``, ``v`` when
  the keys and values are split from 3-D values, else on the 4-D ``Q``, ``K_kv``, ``V_kv`` (the repeat
  goes: the operator groups ``H/Hkv`` query heads on each key/value head itself; keys and values that are a cache's
  ``Concat(past, new, axis=2)`` become its ``past_key``/``past_value`` inputs and the Concats' results its
  ``present_key``/``present_value`` outputs, exact by the specification and measured so on onnxruntime 1.32 CPU
  and OpenVINO; ``sdpa_to_attention_for_ort`` does the same);
* ``sdpa_to_multi_head_attention``: for onnxruntime, ``com.microsoft.MultiHeadAttention`` on the 3-D
  ``q`` (and the 3-D ``k``, ``v``, or the 4-D ``K``, ``V`` of the query's heads as its BNSH key and
  value), any model opset; a cache's Concats become its ``past_key``/``past_value`` inputs and
  ``present_key``/``present_value`` outputs where the new keys and values are head splits of 3-D values,
  which it then takes (measured exact on onnxruntime 1.32 CPU);
* ``sdpa_to_attention_for_ort``: for onnxruntime on models of opset 23 or later, the standard ``Attention``
  where MultiHeadAttention does not fit: grouped heads (MultiHeadAttention would read them as repeat_kv
  repeated them, no faster than the unfused graph), or a query that is no split of a 3-D value (Llama's).
  onnxruntime's GroupQueryAttention is not used: on CPU it does not compute a batch of more than one with
  a key/value cache as the original does.

Exactness. Both operators compute ``softmax(scale * Q·Kᵀ + mask)·V`` per head; every scale factor is a
positive scalar constant, multiplied into the operator's ``scale`` (always written out: the default
would be ``1/sqrt(D)``), so only rounding differs. The splits must be provably the head split, on a
value whose last dimension ``H*D`` is known: a constant target ``[B|0, S|0, H, D]`` (one of the four
may be ``-1``), or a target computed at run time (the dynamo exporter reads ``B`` and ``S`` from the
graph inputs' shapes) whose output inferred shapes show to be ``[B, S, H, D]`` with the input's own
``B`` and ``S``. 4-D ``K``/``V`` must have the query's ``B`` (MatMul would broadcast another) and its
``H`` heads, or ``Hkv`` heads each repeated ``H/Hkv`` times in a row, which is the standard operator's
grouping: query head ``h`` reads key/value head ``h // (H/Hkv)`` (MultiHeadAttention has none). The
merge keeps its own target, so the result has exactly the original's shape; only when the target is
``[B|0, S|0, -1|H*Dv]`` is it dropped. Both operators want a mask whose last two dimensions
are ``S`` and ``T``: a mask not known to have them is first expanded to ``[B, 1, S, T]`` with the
dimensions read at run time (which is what the ``Add`` broadcast to). For the standard operator, the
mask's lowest value (exporters' "masked out") becomes half of it, the same by the specification, because
onnxruntime's kernel returns zeros for a row that holds only the lowest value (in float16, where the original's
``score - 65504`` rounds the scores away on such a row, onnx's reference evaluator keeps some of them against
half of it; onnxruntime and OpenVINO agree with the original). Only float32 (and, for
the standard operator, float16) attention is rewritten; the Softmax must run over the last axis.

Rows the Softmax makes NaN. With finite ``q``, ``k``, ``v`` the Softmax gives NaN exactly on the rows whose mask
is ``-inf`` for every key, or ``+inf`` or NaN for one (``exp(x - max)`` meets ``inf - inf`` or NaN): eager
attention's output is NaN there, and the guard makes it ``0·V = 0``. The operators differ on those rows
(measured: onnxruntime 1.32 CPU, OpenVINO 2026.4 CPU, whose ONNX frontend follows the operator with
``Select(IsNaN(y), 0, y)``, and onnx 1.23's reference evaluator)::

    mask row              original  guarded  MultiHeadAttention,     standard Attention:
                                             ort_fuse's Attention    onnxruntime, reference   OpenVINO
    all -inf              NaN       0        NaN                     0                        0
    one +inf, one NaN     NaN       0        NaN                     NaN                      0
    all NaN               NaN       0        NaN                     NaN                      0

So, with ``s = ReduceSum(Softmax(mask))`` over the keys (NaN on exactly those rows, near 1 on the others: the
mask's Softmax runs on the engine that runs the original's) and ``s - s`` (NaN there, 0 elsewhere):

* MultiHeadAttention needs nothing; under the guard, the guard moves after it as ``Where(IsNaN(y), 0, y)``;
* the standard operator without the guard: for onnxruntime (``sdpa_to_attention_for_ort``) the mask becomes
  ``mask + (s - s)``, and a row of NaN gives NaN; for the other targets, whose engine may be OpenVINO,
  ``s - s`` is added to the operator's result, per head and query (one ``Add`` per layer);
* the standard operator under the guard: the mask becomes ``Where(IsNaN(s), -inf, mask)``, whose rows of
  ``-inf`` every engine gives zeros.

What is made of the mask is made once, shared by the layers that read it, and only where the mask may hold
what it corrects: ``non_finite_kinds`` proves the values of a ``Where`` of constants, so transformers' masks
(``Where(keep, 0, lowest)``: never a NaN row; ``Where(keep, 0, -inf)`` under the guard: rows of ``-inf``
only) get nothing; ``(1 - m) * lowest`` proves nothing (``m = -1`` gives ``-inf``, ``m = 3`` ``+inf``).
Scores large enough for ``score + mask`` to overflow (``1e31`` in float32) are beyond this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import PassContext, PassResult, Target
from onnxopt.passes.fusions.common import broadcast_dims
from onnxopt.passes.fusions.rotary import slice_range
from onnxopt.pattern import Match, MatchResult, Replacement, RewritePass, RewriteRule

ORT_DOMAIN = "com.microsoft"

HEADS_FIRST = [0, 2, 1, 3]  # [B, S, H, D] <-> [B, H, S, D]
KEYS_TRANSPOSED = [0, 2, 3, 1]  # [B, T, H, D] -> [B, H, D, T]
LAST_TWO_SWAPPED = [0, 1, 3, 2]  # [B, H, T, D] -> [B, H, D, T]
MATRICES_TRANSPOSED = [0, 2, 1]  # [B*H, T, D] -> [B*H, D, T]


# ---------------------------------------------------------------------------------------------------
# Patterns, public so that other passes match the same forms


def scaled_pattern(op, value, factor, tag: str):
    """``value``, or ``value * factor`` (the ``Mul`` tagged ``tag``)."""
    return op.either(op.Mul(value, factor, _tag=tag), value)


def query_heads_pattern(op, q, q_shape, q_scale, q_heads_scale):
    """``Q`` of shape ``[B, H, S, D]`` split from ``q``; a scale may sit on ``q`` or on ``Q``."""
    split = op.Reshape(scaled_pattern(op, q, q_scale, "q_scale"), q_shape, _tag="q_split")
    return scaled_pattern(op, op.Transpose(split, perm=HEADS_FIRST, _tag="q_heads"), q_heads_scale, "q_heads_scale")


def repeated_heads_pattern(op, heads, tag: str):
    """``heads``, or ``repeat_kv(heads)``: each ``[T, D]`` head of ``[B, Hkv, T, D]`` repeated ``n`` times in a
    row, ``[B, Hkv * n, T, D]`` (an Unsqueeze at axis 2, an Expand to ``n`` there, a Reshape merging the two)."""
    unsqueezed = op.Unsqueeze(heads, _allow_other_inputs=True, _tag=f"{tag}_unsqueeze")
    expanded = op.Expand(unsqueezed, _allow_other_inputs=True, _tag=f"{tag}_expand")
    return op.either(op.Reshape(expanded, _allow_other_inputs=True, _tag=f"{tag}_repeat"), heads)


def transposed_through_matrices_pattern(op, heads):
    """``Reshape(Transpose(Reshape(K, [-1, T, D]), [0, 2, 1]), [B, H, D, T])``, the dynamo exporter's ``Kᵀ``."""
    flattened = op.Reshape(heads, _allow_other_inputs=True, _tag="k_flat")
    return op.Reshape(op.Transpose(flattened, perm=MATRICES_TRANSPOSED, _tag="k_flat_transposed"),
                      _allow_other_inputs=True, _tag="k_unflat")


def heads_key_transposed_pattern(op, key, k_scale):
    """``Kᵀ`` of shape ``[B, H, D, T]`` from the 4-D ``key`` (maybe repeated for grouped heads), transposed
    directly or through 3-D reshapes; maybe scaled."""
    heads = repeated_heads_pattern(op, key, "k")
    transposed = op.either(op.Transpose(heads, perm=LAST_TWO_SWAPPED, _tag="k_heads"),
                           transposed_through_matrices_pattern(op, heads))
    return scaled_pattern(op, transposed, k_scale, "k_scale")


def key_transposed_pattern(op, k, k_shape, key, k_scale):
    """``Kᵀ`` of shape ``[B, H, D, T]``: split from a 3-D ``k`` (and transposed directly or through 3-D
    reshapes), or from the 4-D ``key``; maybe scaled."""
    split = op.Transpose(op.Reshape(k, k_shape, _tag="k_split"), perm=HEADS_FIRST, _tag="k_heads")
    from_split = op.either(op.Transpose(op.Reshape(k, k_shape, _tag="k_split"), perm=KEYS_TRANSPOSED, _tag="k_heads"),
                           transposed_through_matrices_pattern(op, split))
    return op.either(scaled_pattern(op, from_split, k_scale, "k_scale"), heads_key_transposed_pattern(op, key, k_scale))


def value_heads_pattern(op, v, v_shape, value):
    """``V`` of shape ``[B, H, T, Dv]``: split from a 3-D ``v``, or any 4-D ``value`` (maybe repeated)."""
    return op.either(op.Transpose(op.Reshape(v, v_shape, _tag="v_split"), perm=HEADS_FIRST, _tag="v_heads"),
                     repeated_heads_pattern(op, value, "v"))


def nan_guarded_pattern(op, probabilities, nan_fill):
    """``Where(IsNaN(p), 0, p)``, torch's guard on a Softmax over keys all masked out, or ``p`` itself."""
    return op.either(op.Where(op.IsNaN(probabilities, _tag="nan_test"), nan_fill, probabilities, _tag="nan_guard"),
                     probabilities)


def attention_core_pattern(op, query, key_transposed, value, scale, divisor, mask, nan_fill):
    """``Softmax(Q·Kᵀ * scale + mask)·V`` (scale as ``Mul``, ``Div`` or none, mask optional, NaN guard optional)."""
    scores = op.MatMul(query, key_transposed, _tag="scores")
    scaled = op.either(op.Mul(scores, scale, _tag="scores_scale"), op.Div(scores, divisor, _tag="scores_divisor"),
                       scores)
    probabilities = op.Softmax(op.either(op.Add(scaled, mask, _tag="mask_add"), scaled))
    cast = op.either(op.Cast(probabilities), probabilities)
    return op.MatMul(nan_guarded_pattern(op, cast, nan_fill), value, _tag="attended")


def sdpa_pattern(op, q, k, v, query, key, value, q_shape, k_shape, v_shape, q_scale, q_heads_scale, k_scale, scale,
                 divisor, mask, nan_fill, out_shape, any_query: bool = True):
    """The whole of multi-head attention, from the head splits to the merge (see the module docstring).

    The query is split from ``q``, or else (with ``any_query``) any 4-D ``query`` (Llama's, rotated by
    RotaryEmbedding) with 4-D keys and values: tried second, so that where both fit the split's operands are
    taken.
    """
    attended = attention_core_pattern(op, query_heads_pattern(op, q, q_shape, q_scale, q_heads_scale),
                                      key_transposed_pattern(op, k, k_shape, key, k_scale),
                                      value_heads_pattern(op, v, v_shape, value), scale, divisor, mask, nan_fill)
    if any_query:
        heads = attention_core_pattern(op, scaled_pattern(op, query, q_heads_scale, "q_heads_scale"),
                                       heads_key_transposed_pattern(op, key, k_scale),
                                       repeated_heads_pattern(op, value, "v"), scale, divisor, mask, nan_fill)
        attended = op.either(attended, heads)
    # The dynamo exporter may reshape the heads to the shape they have (a view in torch).
    kept = op.either(op.Reshape(attended, _allow_other_inputs=True, _tag="heads_view"), attended)
    return op.Reshape(op.Transpose(kept, perm=HEADS_FIRST, _tag="merge_heads"), out_shape, _tag="merge")


# ---------------------------------------------------------------------------------------------------
# What a match means


@dataclass(frozen=True)
class HeadSplit:
    """A Reshape of ``[B, S, H*D]`` into ``[B, S, H, D]``."""

    heads: int
    head_size: int


@dataclass(frozen=True)
class Sdpa:
    """A matched attention: head counts and sizes, the combined scale, and the operands in 3-D or 4-D form."""

    heads: int
    kv_heads: int  # fewer than heads for grouped-query attention (4-D keys and values only)
    head_size: int
    value_head_size: int
    scale: float
    query: gs.Tensor | None  # [B, S, H*D]; None when Q is no head split of a 3-D value
    query_heads: gs.Tensor  # [B, H, S, D], unscaled
    key: gs.Tensor  # [B, T, H*D] when keys_3d, else [B, Hkv, T, D]
    value: gs.Tensor  # [B, T, H*Dv] when keys_3d, else [B, Hkv, T, Dv]
    keys_3d: bool
    mask: gs.Tensor | None
    nan_guarded: bool  # Where(IsNaN(p), 0, p) after the Softmax: rows masked out entirely give zeros


def head_split(m: Match, tag: str, source: str) -> HeadSplit | str:
    """How the Reshape tagged ``tag`` splits ``m[source]`` into heads, or why it is not a head split."""
    return reshape_head_split(m.node(tag), m.shape(source))


def reshape_head_split(node: gs.Node, shape: list | None) -> HeadSplit | str:
    """How the Reshape ``node`` splits its input, of inferred shape ``shape``, into heads, or why it is not a
    head split."""
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int) or shape[2] <= 0:
        return f"'{node.inputs[0].name}' is not known to be [B, S, hidden] with a known hidden size"
    target = ir.constant_value(node.inputs[1])
    if target is None:
        return head_split_at_run_time(node, shape)
    target = [int(t) for t in target.reshape(-1)]
    if len(target) != 4:
        return f"'{node.name}' does not reshape to 4 dimensions"
    if int(node.attrs.get("allowzero", 0)) and 0 in target:
        return f"'{node.name}' has allowzero with a zero in its target"
    kept = [target[axis] == 0 or (isinstance(shape[axis], int) and target[axis] == shape[axis]) for axis in (0, 1)]
    hidden, (heads, size) = shape[2], target[2:]
    if heads > 0 and size > 0:
        # With the heads fully given, a -1 in place of B or S can only be that dimension again.
        if not all(keep or value == -1 for keep, value in zip(kept, target[:2])) or target[:2] == [-1, -1]:
            return f"'{node.name}' may not keep the first two dimensions of its input"
    elif not all(kept):
        return f"'{node.name}' may not keep the first two dimensions of its input"
    elif heads == -1 and size > 0 and hidden % size == 0:
        heads = hidden // size
    elif size == -1 and heads > 0 and hidden % heads == 0:
        size = hidden // heads
    if heads <= 0 or size <= 0 or heads * size != hidden:
        return f"'{node.name}' does not split {hidden} into heads"
    return HeadSplit(heads, size)


def head_split_at_run_time(node: gs.Node, shape: list) -> HeadSplit | str:
    """How a Reshape whose target is computed at run time splits its ``[B, S, hidden]`` input, or why it is
    not known to be a head split.

    The dynamo exporter computes every view's target from the graph inputs' shapes
    (``Concat(Shape(input_ids)[0:1], Shape(attention_mask)[1:2], [-1, D])``), where TorchScript reads the
    reshaped value's own. Inferred shapes decide: the output must be ``[B, S, H, D]`` with ``B`` and ``S``
    provably the input's (the same number or symbol) and ``H`` or ``D`` known; the size then fixes the other.
    """
    output = node.outputs[0].shape
    if output is None or len(output) != 4 or not all(_named_same_dim(output[axis], shape[axis]) for axis in (0, 1)):
        return f"the target of '{node.name}' is not constant, nor is its output known to keep its input's B and S"
    hidden, (heads, size) = shape[2], output[2:]
    if not isinstance(heads, int) and isinstance(size, int) and size > 0 and hidden % size == 0:
        heads = hidden // size
    if not isinstance(size, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        size = hidden // heads
    if not (isinstance(heads, int) and isinstance(size, int)) or heads <= 0 or size <= 0 or heads * size != hidden:
        return f"'{node.name}' is not known to split {hidden} into heads"
    return HeadSplit(heads, size)


def _scale_factor(m: Match, name: str, operand_rank: int) -> float | str:
    """The value of a scalar scale bound to ``name`` (1 when absent), or why it is no scalar constant."""
    if m[name] is None:
        return 1.0
    value = m.value(name)
    if value is None or value.size != 1 or value.dtype.kind != "f" or value.ndim > operand_rank:
        return f"'{m[name].name}' is not a scalar float constant"
    return float(value.reshape(-1)[0])


def combined_scale(m: Match) -> float | str:
    """The product of every scale factor of the match, or why one of them cannot be folded."""
    total = 1.0
    for name, rank in (("q_scale", 3), ("q_heads_scale", 4), ("k_scale", 4), ("scale", 4)):
        factor = _scale_factor(m, name, rank)
        if isinstance(factor, str):
            return factor
        total *= factor
    if m["divisor"] is not None:
        divisor = _scale_factor(m, "divisor", 4)
        if isinstance(divisor, str):
            return divisor
        total = total / divisor if divisor else math.inf
    if not math.isfinite(total) or total <= 0:
        return f"the scale {total} is not a positive finite number"
    return total


def _heads_dims(tensor: gs.Tensor) -> tuple[int, int] | str:
    """The head count and head size of a 4-D ``[B, H, T, D]`` value, or why they are not known."""
    shape = tensor.shape
    if shape is None or len(shape) != 4:
        return f"'{tensor.name}' is not known to be 4-D"
    if not all(isinstance(dim, int) and dim > 0 for dim in (shape[1], shape[3])):
        return f"'{tensor.name}' of shape {list(shape)} does not have heads of a known count and size"
    return shape[1], shape[3]


def _value_heads(m: Match) -> gs.Tensor:
    """``V`` as ``[B, Hkv, T, Dv]``: the 4-D value, or the heads split from the 3-D one."""
    return m["value"] if m["value"] is not None else m.node("v_heads").outputs[0]


def _query_heads(m: Match) -> gs.Tensor:
    """``Q`` as ``[B, H, S, D]``, unscaled: the 4-D query, or the heads split from the 3-D one."""
    return m["query"] if m["query"] is not None else m.node("q_heads").outputs[0]


def _unsqueeze_axes(node: gs.Node) -> list[int] | None:
    """The axes an Unsqueeze inserts: its constant second input (opset 13 on), or its attribute."""
    if len(node.inputs) > 1:
        axes = ir.constant_value(node.inputs[1])
        return None if axes is None else [int(axis) for axis in axes.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(axis) for axis in axes]


def head_repeats(m: Match, tag: str) -> int | str:
    """How many times in a row ``repeat_kv`` (tagged ``tag``) repeats each key/value head (1 without one), or
    why it is not known to be such a repeat.

    All three operators keep the order of elements: the Unsqueeze must insert axis 2 (``[B, Hkv, 1, T, D]``),
    inferred shapes must show the Expand to broadcast that axis alone (``[B, Hkv, n, T, D]``) and the Reshape
    to merge it with the heads (``[B, Hkv * n, T, D]``), so that head ``h`` of the result is head ``h // n``:
    the attention operators' grouping of query heads on ``kv_num_heads``.
    """
    if not m.has_node(f"{tag}_repeat"):
        return 1
    node = m.node(f"{tag}_repeat")
    if _unsqueeze_axes(m.node(f"{tag}_unsqueeze")) not in ([2], [-3]):
        return f"the heads repeated by '{node.name}' are not unsqueezed at axis 2"
    unsqueezed, expanded, repeated = (m.node(f"{tag}_{step}").outputs[0].shape
                                      for step in ("unsqueeze", "expand", "repeat"))
    if any(shape is None for shape in (unsqueezed, expanded, repeated)) \
            or [len(unsqueezed), len(expanded), len(repeated)] != [5, 5, 4]:
        return f"the heads repeated by '{node.name}' have no known shapes"
    batch, kv_heads, times, total, size = expanded
    if not (isinstance(kv_heads, int) and isinstance(times, int) and times > 0):
        return f"'{node.name}' repeats heads a number of times not known"
    kept = all(_named_same_dim(unsqueezed[axis], expanded[axis]) for axis in (0, 1, 3, 4))
    merged_heads = [batch, kv_heads * times, total, size]
    if not kept or not all(_named_same_dim(got, want) for got, want in zip(repeated, merged_heads)):
        return f"'{node.name}' is not known to repeat each key/value head in a row"
    return times


def nan_guard_keeps_rows(m: Match) -> MatchResult:
    """Whether the optional NaN guard is ``Where(IsNaN(p), 0, p)`` with a zero that cannot broadcast ``p``
    to another shape."""
    if not m.has_node("nan_guard"):
        return m.ok()
    fill = m.value("nan_fill")
    if fill is None or fill.size != 1 or fill.ndim > 4 or fill.dtype.kind != "f" or float(fill.reshape(-1)[0]) != 0:
        return m.fail(f"'{m.node('nan_guard').name}' does not put a scalar 0 in place of NaN")
    return m.ok()


def transposed_through_matrices(m: Match) -> MatchResult:
    """Whether ``Reshape(Transpose(Reshape(K, [-1, T, D]), [0, 2, 1]), [B, H, D, T])`` is ``Kᵀ``.

    Inferred shapes decide: the first Reshape must keep ``K``'s last two dimensions (so it only merges
    the leading ones, keeping every ``[T, D]`` matrix whole and in order), and the last must give
    ``K``'s own leading dimensions followed by ``D`` and ``T`` (so it splits the merged one back).
    """
    if not m.has_node("k_flat"):
        return m.ok()
    heads = m.node("k_flat").inputs[0].shape
    flat = m.node("k_flat").outputs[0].shape
    unflat = m.node("k_unflat").outputs[0].shape
    if heads is None or flat is None or unflat is None or len(heads) != 4 or len(flat) != 3 or len(unflat) != 4:
        return m.fail("the keys' transpose through 3-D reshapes has no known shapes")
    if not (_named_same_dim(flat[1], heads[2]) and _named_same_dim(flat[2], heads[3])):
        return m.fail(f"'{m.node('k_flat').name}' does not keep the keys' last two dimensions")
    expected = [heads[0], heads[1], heads[3], heads[2]]
    if not all(_named_same_dim(got, want) for got, want in zip(unflat, expected)):
        return m.fail(f"'{m.node('k_unflat').name}' of shape {list(unflat)} does not restore the keys' dimensions")
    return m.ok()


def heads_view_keeps_shape(m: Match) -> MatchResult:
    """Whether the optional Reshape of the attended heads is known, from inferred shapes, to give the shape
    it is given: then it changes nothing."""
    if not m.has_node("heads_view"):
        return m.ok()
    node = m.node("heads_view")
    given, made = node.inputs[0].shape, node.outputs[0].shape
    if given is None or made is None or len(given) != len(made) \
            or not all(_named_same_dim(a, b) for a, b in zip(given, made)):
        return m.fail(f"'{node.name}' is not known to keep the shape of the attended heads")
    return m.ok()


def read_only_inside(m: Match) -> MatchResult:
    """Whether every value made inside the match is read only inside it, or else only by ``Shape`` nodes.

    The dynamo exporter reads the shape of ``K`` to transpose it through 3-D reshapes: those ``Shape``
    nodes die with the match, and with them the last reader of ``K``'s own head split.
    """
    matched = {id(node) for node in m.nodes}
    for node in m.nodes:
        if node is m.root:
            continue
        for tensor in node.outputs:
            if ir.is_graph_output(m.graph, tensor):
                return m.fail(f"'{tensor.name}' inside the pattern is a graph output")
            if any(id(reader) not in matched and reader.op != "Shape" for reader in tensor.outputs):
                return m.fail(f"'{tensor.name}' inside the pattern has other readers")
    return m.ok()


def _softmax_over_last_axis(m: Match) -> bool:
    axis = m.attr("Softmax", "axis", -1 if (m.opset() or 13) >= 13 else 1)
    return axis in (-1, 3)


def _cast_keeps_type(m: Match, dtype: np.dtype) -> bool:
    if not m.has_node("Cast"):
        return True
    to = m.attr("Cast", "to")
    return to is not None and onnx.helper.tensor_dtype_to_np_dtype(to) == dtype


def _checked_mask(m: Match, dtype: np.dtype) -> MatchResult:
    if m["mask"] is None:
        return m.ok()
    mask_shape = m.shape("mask")
    if m.dtype("mask") != dtype or mask_shape is None or len(mask_shape) > 4:
        return m.fail("the mask is not a float tensor of known rank up to 4 and the query's type")
    return m.ok()


def _query_split(m: Match) -> HeadSplit | str:
    """The query's heads: from its split, or from the shape of the 4-D query."""
    if m["query"] is None:
        return head_split(m, "q_split", "q")
    dims = _heads_dims(m["query"])
    return dims if isinstance(dims, str) else HeadSplit(*dims)


def _split_keys(m: Match, split: HeadSplit) -> int | str:
    """The values' head size where keys and values are split from 3-D values, or why they are not
    split into the query's heads."""
    key_split, value_split = head_split(m, "k_split", "k"), head_split(m, "v_split", "v")
    for found in (key_split, value_split):
        if isinstance(found, str):
            return found
    if key_split != split or value_split.heads != split.heads:
        return f"keys ({key_split}) or values ({value_split}) have other heads than the query ({split})"
    return value_split.head_size


def _heads_keys(m: Match, query: gs.Tensor, split: HeadSplit) -> tuple[int, int] | str:
    """The key/value head count and the values' head size where keys and values are 4-D (each maybe
    repeated for grouped heads), or why they do not fit the query's heads."""
    if m["key"] is None:
        return "the keys are split from a 3-D value, the values or the query are 4-D"
    key, value = m["key"], _value_heads(m)
    found = [_heads_dims(key), _heads_dims(value), head_repeats(m, "k"), head_repeats(m, "v")]
    for item in found:
        if isinstance(item, str):
            return item
    (kv_heads, key_size), (value_heads, value_size), key_repeats, value_repeats = found
    if key_size != split.head_size:
        return f"keys have head size {key_size}, the query {split.head_size}"
    if kv_heads != value_heads or key_repeats != value_repeats or kv_heads * key_repeats != split.heads:
        return (f"keys ({kv_heads} heads, each {key_repeats} times) and values ({value_heads} heads, each "
                f"{value_repeats} times) do not give the query's {split.heads} heads")
    batch = (query.shape or [None])[0]
    if not all(_same_dim(tensor.shape[0], batch) for tensor in (key, value)):
        return f"keys '{key.name}' and values '{value.name}' are not known to have the query's batch"
    return kv_heads, value_size


def describe_attention(m: Match, dtypes: tuple[np.dtype, ...]) -> Sdpa | MatchResult:
    """What a match of ``sdpa_pattern`` computes, or why it cannot be one attention operator."""
    query = _query_heads(m)
    dtype = None if query.dtype is None else np.dtype(query.dtype)
    if dtype not in dtypes:
        return m.fail(f"'{query.name}' is {dtype}, not one of {', '.join(str(d) for d in dtypes)}")
    if not _softmax_over_last_axis(m):
        return m.fail("the Softmax is not over the last axis")
    if not _cast_keeps_type(m, dtype):
        return m.fail("the Cast after the Softmax changes the type")
    for found in (read_only_inside(m), nan_guard_keeps_rows(m), transposed_through_matrices(m),
                  heads_view_keeps_shape(m), _checked_mask(m, dtype)):
        if not found:
            return found
    scale = combined_scale(m)
    if isinstance(scale, str):
        return m.fail(scale)
    split = _query_split(m)
    if isinstance(split, str):
        return m.fail(split)
    keys_3d = m["query"] is None and m["k"] is not None and m["v"] is not None
    keys = _split_keys(m, split) if keys_3d else _heads_keys(m, query, split)
    if isinstance(keys, str):
        return m.fail(keys)
    kv_heads, value_size = (split.heads, keys) if keys_3d else keys
    return Sdpa(split.heads, kv_heads, split.head_size, value_size, scale, m["q"], query,
                m["k"] if keys_3d else m["key"], m["v"] if keys_3d else _value_heads(m), keys_3d, m["mask"],
                m.has_node("nan_guard"))


# ---------------------------------------------------------------------------------------------------
# Building the replacement


_SUM_OF_PRODUCTS = re.compile(r"[\w\s+*]+")


def _canonical(dim):
    """A symbolic dimension with the terms of its sums and the factors of its products sorted: onnxruntime's
    symbolic inference writes ``past_sequence + sequence`` in one place, ``sequence + past_sequence`` in
    another. Anything but sums of products of symbols and numbers is kept as written."""
    if not isinstance(dim, str) or not _SUM_OF_PRODUCTS.fullmatch(dim):
        return dim
    terms = ("*".join(sorted(factor.strip() for factor in term.split("*"))) for term in dim.split("+"))
    return " + ".join(sorted(terms))


def _same_dim(a, b) -> bool:
    """Whether two inferred dimensions are provably equal (the same number, or the same symbolic sum)."""
    return a is not None and _canonical(a) == _canonical(b) and not (isinstance(a, int) and a < 0)


def _named_same_dim(a, b) -> bool:
    """Like ``_same_dim``, but never on a symbol onnx's inference made up (``unk__N``): each engine numbers
    its own, so two of them with one name need not be one size."""
    return _same_dim(a, b) and not (isinstance(a, str) and "unk__" in a)


def _dim(op, tensor: gs.Tensor, axis: int, opset: int) -> gs.Tensor:
    """Dimension ``axis`` of ``tensor`` at run time, as a 1-element int64 tensor."""
    if opset >= 15:
        return op.Shape(tensor, start=axis, end=axis + 1)
    return op.Gather(op.Shape(tensor), op.const(np.array([axis], np.int64), "axis"), axis=0)


def _leading_dims_input(node: gs.Node) -> gs.Tensor | None:
    """The input whose dimensions but the last ``node``'s output has: that of a projection ``x @ W`` with a
    constant matrix, or of ``x + b`` / ``x * s`` (either order) with a constant of at most one axis."""
    if node.op not in ("MatMul", "Add", "Mul") or len(node.inputs) != 2:
        return None
    orders = [node.inputs] if node.op == "MatMul" else [node.inputs, node.inputs[::-1]]
    for data, constant in orders:
        value = ir.constant_value(constant) if ir.is_constant(constant) else None
        if value is None or ir.is_constant(data):
            continue
        if value.ndim == 2 if node.op == "MatMul" else value.ndim <= 1:
            return data
    return None


def leading_dims_source(tensor: gs.Tensor) -> gs.Tensor:
    """The earliest value with ``tensor``'s leading dimensions, through projections, biases and scales.

    Reading the batch and sequence sizes from there (rather than from ``q`` itself) leaves the projection
    of ``q`` with no reader but the attention, so that ``ort_fuse`` can pack it with those of ``k`` and ``v``.
    """
    while len(tensor.inputs) == 1 and _leading_dims_input(tensor.inputs[0]) is not None:
        tensor = _leading_dims_input(tensor.inputs[0])
    return tensor


def _batch_and_sequence(sdpa: Sdpa) -> tuple[gs.Tensor, int, int]:
    """Where to read the query's ``B`` and ``S`` at run time: a value and the two axes."""
    if sdpa.query is not None:
        return leading_dims_source(sdpa.query), 0, 1
    return sdpa.query_heads, 0, 2


@dataclass(frozen=True)
class KvCache:
    """Keys and values each a ``Concat(past, new)`` along the keys' axis (GPT-2's and Llama's cache): the
    standard operator's ``past_key``/``past_value`` inputs, and its ``present_key``/``present_value`` outputs in
    place of the Concats' results."""

    past_key: gs.Tensor
    new_key: gs.Tensor
    past_value: gs.Tensor
    new_value: gs.Tensor
    present_key: gs.Tensor
    present_value: gs.Tensor


def _cache_concat(m: Match, tensor: gs.Tensor) -> list[gs.Tensor] | None:
    """``[past, new]`` where ``tensor`` (4-D ``[B, Hkv, T, D]``) is their Concat along axis 2 in this graph."""
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "Concat" or node.domain not in ("", None) or len(node.inputs) != 2 \
            or not ir.is_local(m.graph, node) or int(node.attrs.get("axis", 0)) not in (2, -2):
        return None
    return list(node.inputs)


def _computed_from(tensors: list[gs.Tensor], sources: list[gs.Tensor]) -> bool:
    """Whether any of ``tensors`` is computed from one of ``sources`` (walking back through their producers)."""
    wanted, seen, pending = {id(s) for s in sources}, set(), list(tensors)
    while pending:
        tensor = pending.pop()
        if id(tensor) in wanted:
            return True
        if id(tensor) not in seen:
            seen.add(id(tensor))
            pending.extend(t for node in tensor.inputs for t in node.inputs)
    return False


def kv_cache(m: Match, sdpa: Sdpa) -> KvCache | None:
    """The key/value cache the standard operator can take in, if the 4-D keys and values are one.

    By the opset-23 specification, ``present_key = Concat(past_key, K, axis=2)`` with ``past_key`` of shape
    ``[B, Hkv, P, D]``, the attention runs over those ``P + S`` keys, and the mask covers them (its last
    dimension is ``P + S``, as it was against the Concat). Concat on axis 2 of 4-D values already makes
    ``past`` and ``new`` of one layout. The operator's other operands must not be computed from the Concats'
    results, which become its own outputs.
    """
    if sdpa.keys_3d:
        return None
    keys, values = _cache_concat(m, sdpa.key), _cache_concat(m, sdpa.value)
    if keys is None or values is None:
        return None
    operands = [sdpa.query_heads, keys[1], values[1], *([sdpa.mask] if sdpa.mask is not None else [])]
    if _computed_from(operands, [sdpa.key, sdpa.value]):
        return None
    return KvCache(keys[0], keys[1], values[0], values[1], sdpa.key, sdpa.value)


def split_source(m: Match, heads: gs.Tensor, split: HeadSplit) -> gs.Tensor | None:
    """The 3-D ``[B, S, H*D]`` value that ``heads`` (``[B, H, S, D]``) is ``Transpose(Reshape(x, [B, S, H, D]),
    [0, 2, 1, 3])`` of in this graph, with the heads ``split``; else None."""
    transpose = heads.inputs[0] if len(heads.inputs) == 1 else None
    if transpose is None or transpose.op != "Transpose" or transpose.domain not in ("", None) \
            or not ir.is_local(m.graph, transpose) or list(transpose.attrs.get("perm", [])) != HEADS_FIRST:
        return None
    split_heads = transpose.inputs[0]
    reshape = split_heads.inputs[0] if len(split_heads.inputs) == 1 else None
    if reshape is None or reshape.op != "Reshape" or reshape.domain not in ("", None) \
            or not ir.is_local(m.graph, reshape):
        return None
    source = reshape.inputs[0]
    return source if reshape_head_split(reshape, source.shape) == split else None


@dataclass(frozen=True)
class SplitCache:
    """A key/value cache whose new keys and values are head splits of 3-D values: MultiHeadAttention's ``key`` and
    ``value`` beside its ``past_key``/``past_value``."""

    cache: KvCache
    key: gs.Tensor  # [B, S, H*D]
    value: gs.Tensor  # [B, S, H*D]


def split_cache(m: Match, sdpa: Sdpa) -> SplitCache | None:
    """The cache MultiHeadAttention can take in: ``kv_cache``'s, with the new keys and values split from 3-D values
    into the query's heads (the operator takes 3-D new keys and values beside a past; it was measured exact with
    values of the keys' head size only)."""
    cache = kv_cache(m, sdpa)
    if cache is None or sdpa.value_head_size != sdpa.head_size:
        return None
    split = HeadSplit(sdpa.heads, sdpa.head_size)
    key, value = split_source(m, cache.new_key, split), split_source(m, cache.new_value, split)
    return None if key is None or value is None else SplitCache(cache, key, value)


def _total_keys(op, m: Match, sdpa: Sdpa, cache: KvCache | SplitCache | None) -> gs.Tensor:
    """``T``, the number of keys, at run time: from the keys, or ``P + S`` from an absorbed cache (whose
    Concat the operator replaces, so it cannot be read). ``S`` is read from the 3-D new keys where the operator
    takes them, so that their split into heads dies with the match."""
    opset = m.opset() or 0
    if isinstance(cache, SplitCache):
        new_keys = _dim(op, leading_dims_source(cache.key), 1, opset)
        return op.Add(_dim(op, cache.cache.past_key, 2, opset), new_keys)
    if cache is not None:
        return op.Add(_dim(op, cache.past_key, 2, opset), _dim(op, cache.new_key, 2, opset))
    keys = leading_dims_source(sdpa.key) if sdpa.keys_3d else sdpa.key
    return _dim(op, keys, 1 if sdpa.keys_3d else 2, opset)


def mask_for(op, m: Match, sdpa: Sdpa, cache: KvCache | SplitCache | None = None) -> gs.Tensor | None:
    """The mask with its last two dimensions ``S`` and ``T``: as it is when known to have them, else expanded.

    ``B`` and ``S`` are the query's batch and sequence dimensions; ``T`` is the keys' sequence dimension. The
    Add broadcast the mask to ``[B, H, S, T]``; expanding it to ``[B, 1, S, T]`` broadcasts it the same way
    but for the heads, which both operators broadcast themselves.
    """
    if sdpa.mask is None:
        return None
    mask_shape = m.shape("mask")
    source, batch_axis, sequence_axis = _batch_and_sequence(sdpa)
    query_shape, key_shape = source.shape or [None] * 4, sdpa.key.shape or [None] * 4
    batch, sequence = query_shape[batch_axis], query_shape[sequence_axis]
    total = key_shape[1] if sdpa.keys_3d else key_shape[2]
    if len(mask_shape) == 4 and _same_dim(mask_shape[2], sequence) and _same_dim(mask_shape[3], total) \
            and (mask_shape[0] == 1 or _same_dim(mask_shape[0], batch)) and mask_shape[1] in (1, sdpa.heads):
        return sdpa.mask
    opset = m.opset() or 0
    target = op.Concat(_dim(op, source, batch_axis, opset), op.const(np.array([1], np.int64), "one"),
                       _dim(op, source, sequence_axis, opset), _total_keys(op, m, sdpa, cache), axis=0)
    return op.Expand(sdpa.mask, target)


def typed(value: gs.Tensor, dtype: np.dtype | None, shape: list | None) -> gs.Tensor:
    """``value`` with its dtype and shape set: onnx's shape inference knows nothing of ``com.microsoft``
    operators, so without them every value after one would lose its shape."""
    value.dtype, value.shape = dtype, shape
    return value


def merged(op, m: Match, sdpa: Sdpa, output: gs.Tensor) -> gs.Tensor:
    """``output`` (``[B, S, H*Dv]``) reshaped the way the matched merge reshaped ``[B, S, H, Dv]``.

    Reshape keeps the order of elements, so reshaping either to the same target gives the same tensor,
    except where the target copies a dimension (a ``0``, without ``allowzero``) past the first two, which
    the two differ in: then the 4-D shape is restored first. A target computed at run time is dropped
    when inferred shapes show that the merge gives ``[B, S, H*Dv]`` with the query's own ``B`` and ``S``.
    """
    node = m.node("merge")
    constant = ir.constant_value(node.inputs[1])
    target = None if constant is None else [int(t) for t in constant.reshape(-1)]
    allow_zero = int(node.attrs.get("allowzero", 0))
    query_shape = sdpa.query.shape or [None] * 3
    width = sdpa.heads * sdpa.value_head_size
    merges_heads = target is not None and len(target) == 3 and target[2] in (-1, width)
    if merges_heads and not allow_zero and all(t == 0 or (isinstance(d, int) and t == d)
                                               for t, d in zip(target[:2], query_shape)):
        return output
    merged_shape = node.outputs[0].shape
    if target is None and merged_shape is not None and len(merged_shape) == 3 and merged_shape[2] == width \
            and all(_named_same_dim(merged_shape[axis], query_shape[axis]) for axis in (0, 1)):
        return output
    if not allow_zero and (target is None or 0 in target[2:]):
        heads_shape = np.array([0, 0, sdpa.heads, sdpa.value_head_size], np.int64)
        output = op.Reshape(output, op.const(heads_shape, "heads_shape"))
    return op.Reshape(output, m["out_shape"], **m.attrs("merge"))


# ---------------------------------------------------------------------------------------------------
# Rows the Softmax makes NaN


NON_FINITE = frozenset({"-inf", "+inf", "nan"})
# Operators whose output holds only values of their first input (or of every input, for Concat).
_MOVES_DATA = frozenset({"Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Flatten", "Slice",
                         "Gather", "GatherElements", "GatherND", "Tile", "Concat"})
_PROOF_DEPTH = 16


def _kinds_in(values: np.ndarray) -> frozenset[str]:
    kinds = {"nan"} if np.isnan(values).any() else set()
    if np.isposinf(values).any():
        kinds.add("+inf")
    if np.isneginf(values).any():
        kinds.add("-inf")
    return frozenset(kinds)


def _cast_keeps_finite(node: gs.Node) -> bool:
    """Whether a Cast makes a float of a bool or of an integer type whose every value the float holds."""
    source = node.inputs[0].dtype
    to = node.attrs.get("to")
    if source is None or to is None:
        return False
    source, target = np.dtype(source), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    if target.kind != "f":
        return False
    return source == np.bool_ or (source.kind in "iu" and np.iinfo(source).max <= np.finfo(target).max)


def non_finite_kinds(tensor: gs.Tensor, depth: int = _PROOF_DEPTH) -> frozenset[str]:
    """Which of ``-inf``, ``+inf`` and ``nan`` the values of ``tensor`` may be: those of a constant; those of the
    data a ``Where`` picks from or an operator only moves; none for integers cast to a float that holds them;
    all three where nothing is proven. transformers' masks are ``Where(keep, 0, lowest)`` (none) and
    ``Where(keep, 0, -inf)`` (``-inf``); ``(1 - m) * lowest`` proves nothing (``m = -1`` gives ``-inf``)."""
    value = ir.constant_value(tensor)
    if value is not None:
        return _kinds_in(value) if value.dtype.kind == "f" else frozenset()
    if depth == 0 or len(tensor.inputs) != 1 or tensor.inputs[0].domain not in ("", None):
        return NON_FINITE
    node = tensor.inputs[0]
    if node.op == "Where":
        return non_finite_kinds(node.inputs[1], depth - 1) | non_finite_kinds(node.inputs[2], depth - 1)
    if node.op == "Cast":
        return frozenset() if _cast_keeps_finite(node) else NON_FINITE
    if node.op in _MOVES_DATA:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        return frozenset().union(*(non_finite_kinds(input_, depth - 1) for input_ in data))
    return NON_FINITE


def _same_input(a: gs.Tensor, b: gs.Tensor) -> bool:
    if a is b:
        return True
    if not (ir.is_constant(a) and ir.is_constant(b)):
        return False
    x, y = ir.constant_value(a, max_size=64), ir.constant_value(b, max_size=64)
    return x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y)


def reused(op, m: Match, op_type: str, *inputs: gs.Tensor, **attrs) -> gs.Tensor:
    """The output of a node computing ``op_type(*inputs, **attrs)`` already, in the graph (built for the attention
    of another layer that reads the same mask) or in this replacement, else of a new node: what is made of a
    mask is made once."""
    for node in inputs[0].outputs:
        if node.op == op_type and node.domain in ("", None) and node.attrs == attrs and len(node.outputs) == 1 \
                and len(node.inputs) == len(inputs) and all(map(_same_input, node.inputs, inputs)) \
                and (ir.is_local(m.graph, node) or any(built is node for built in op.nodes)):
            return node.outputs[0]
    return getattr(op, op_type)(*inputs, **attrs)


def _axes(op, *axes: int) -> gs.Tensor:
    return op.const(np.array(axes, np.int64), "axes")


def _mask_4d(op, m: Match, mask: gs.Tensor) -> gs.Tensor:
    """The mask with leading axes of 1 up to 4-D (it broadcasts as before): ``[Bm, Hm, Sm, Tm]``."""
    rank = len(m.shape("mask"))
    return mask if rank == 4 else reused(op, m, "Unsqueeze", mask, _axes(op, *range(4 - rank)))


def _mask_heads(m: Match):
    """The mask's dimension that meets the heads (of its 4-D form)."""
    return ([1] * 4 + list(m.shape("mask")))[-3]


def softmax_sums(op, m: Match, mask: gs.Tensor) -> gs.Tensor:
    """``ReduceSum(Softmax(mask), keys)`` of the 4-D mask, ``[Bm, Hm, Sm, 1]``: NaN on exactly the rows where
    the Softmax of finite scores plus the mask is NaN (keys all ``-inf``, or one ``+inf`` or NaN), near 1
    elsewhere. Both Softmaxes run on the same engine, which decides alike for both."""
    probabilities = reused(op, m, "Softmax", _mask_4d(op, m, mask), axis=-1)
    return reused(op, m, "ReduceSum", probabilities, _axes(op, -1), keepdims=1)


def zero_or_nan_rows(op, m: Match, mask: gs.Tensor) -> gs.Tensor:
    """``[Bm, Hm, Sm, 1]``: NaN on the rows the Softmax makes NaN, 0 on the others (``sum - sum``)."""
    sums = softmax_sums(op, m, mask)
    return reused(op, m, "Sub", sums, sums)


def masked_out_where_nan(op, m: Match, mask: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
    """The mask with the rows the Softmax makes NaN set to ``-inf`` throughout: the standard operator gives them
    zeros, as the NaN guard does."""
    minus_infinity = op.const(np.array(-np.inf, dtype), "minus_infinity")
    return reused(op, m, "Where", reused(op, m, "IsNaN", softmax_sums(op, m, mask)), minus_infinity,
                  _mask_4d(op, m, mask))


def rows_of_merged_heads(op, m: Match, sdpa: Sdpa, rows: gs.Tensor) -> gs.Tensor:
    """``rows`` (``[Bm, Hm, Sm, 1]``, per head and query) laid out for the merged heads ``[B, S, H*Dv]``: the head
    axis dropped where the mask has none, else each head's flag repeated over its ``Dv`` columns."""
    if _mask_heads(m) == 1:
        return reused(op, m, "Squeeze", rows, _axes(op, 1))
    per_column = reused(op, m, "Expand", rows, op.const(np.array([1, sdpa.heads, 1, sdpa.value_head_size],
                                                                 np.int64), "per_column"))
    by_query = reused(op, m, "Transpose", per_column, perm=HEADS_FIRST)
    merged_width = np.array([0, 0, sdpa.heads * sdpa.value_head_size], np.int64)
    return reused(op, m, "Reshape", by_query, op.const(merged_width, "merged_width"))


@dataclass(frozen=True)
class NanRows:
    """How a rule makes its operator exact on the rows the Softmax makes NaN: the mask it gives the operator,
    and, if any, the ``[Bm, Hm, Sm, 1]`` zeros-or-NaN to add to the operator's heads."""

    mask: gs.Tensor | None
    added: gs.Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# Rules


class _SdpaRule(RewriteRule):
    """The attention match shared by the rules; subclasses build the replacement."""

    dtypes: ClassVar[tuple[np.dtype, ...]] = (np.dtype(np.float32),)
    any_query: ClassVar[bool] = True  # whether the operator takes any 4-D query, or only one split from 3-D
    # Shape nodes may read values inside the match (the dynamo exporter's); check says which others may not.
    allow_shared_intermediates = True

    def pattern(self, op, q, k, v, query, key, value, q_shape, k_shape, v_shape, q_scale, q_heads_scale, k_scale,
                scale, divisor, mask, nan_fill, out_shape):
        return sdpa_pattern(op, q, k, v, query, key, value, q_shape, k_shape, v_shape, q_scale, q_heads_scale,
                            k_scale, scale, divisor, mask, nan_fill, out_shape, any_query=self.any_query)

    def check(self, m: Match) -> MatchResult:
        found = describe_attention(m, self.dtypes)
        return found if isinstance(found, MatchResult) else self.takes(found, m)

    def takes(self, sdpa: Sdpa, m: Match) -> MatchResult:
        """Whether the rule's operator takes this attention as it is."""
        return m.ok()


def lowest_spared(op, m: Match, mask: gs.Tensor | None, dtype: np.dtype) -> gs.Tensor | None:
    """The mask with its type's lowest value, exporters' "masked out", replaced by half of it.

    Both add nothing to a score that survives the Softmax, and both make a row that is masked out
    entirely uniform, so the specification's result is the same. onnxruntime's CPU kernel (1.32) takes the
    lowest value for a masked-out key and returns zeros for such a row instead (a left-padded GPT-2 batch
    has them), so without this its results would differ from the original's.
    """
    if mask is None:
        return None
    lowest = np.array(np.finfo(dtype).min, dtype)
    masked_out = reused(op, m, "Equal", mask, op.const(lowest, "lowest"))
    return reused(op, m, "Where", masked_out, op.const(np.array(lowest / 2, dtype), "half_lowest"), mask)


def _made_by_repeat_kv(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is a Reshape of an Expand of an Unsqueeze: transformers' ``repeat_kv``."""
    chain = ["Reshape", "Expand", "Unsqueeze"]
    while chain:
        if len(tensor.inputs) != 1 or tensor.inputs[0].op != chain.pop(0):
            return False
        tensor = tensor.inputs[0].inputs[0]
    return True


def zeros_for_nan(op, output: gs.Tensor) -> gs.Tensor:
    """``output`` with NaN replaced by 0: the matched NaN guard, moved after MultiHeadAttention.

    onnxruntime's MultiHeadAttention gives NaN for the heads of a query row whose keys are all masked out
    with ``-inf`` (and numbers everywhere else), where the guarded original gives that row's ``0 · V = 0``.
    """
    zero = op.const(np.zeros((), np.dtype(output.dtype)), "zero")
    return op.Where(op.IsNaN(output), zero, output)


class SdpaToAttention(_SdpaRule):
    """Replaces multi-head scaled dot-product attention with the standard Attention operator (opset 23)."""

    name = "sdpa_to_attention"
    min_opset = 23
    targets = frozenset({Target.GENERIC, Target.OPENVINO, Target.TENSORRT})
    dtypes = (np.dtype(np.float32), np.dtype(np.float16))
    # Whether the engine's operator gives NaN for a row of NaN in its mask (onnxruntime's does): then the rows
    # the Softmax makes NaN are made NaN through the mask. OpenVINO's ONNX frontend replaces every NaN the
    # operator gives with 0, so for the generic, OpenVINO and TensorRT targets the NaN is added to its result.
    nan_through_mask: ClassVar[bool] = False
    # A key/value cache's Concats become the operator's present_key/present_value outputs (see kv_cache).
    replaces_found_values = True

    def nan_rows(self, op, m: Match, sdpa: Sdpa, dtype: np.dtype) -> NanRows:
        """The mask for the operator, and what to add to its heads, so that the rows the Softmax makes NaN come
        out as in the original (see "Rows the Softmax makes NaN" in the module docstring)."""
        kinds = frozenset() if sdpa.mask is None else non_finite_kinds(sdpa.mask)
        if sdpa.nan_guarded:
            # The guard's zeros: the operator gives them for rows of -inf, onnxruntime's NaN for one with +inf or NaN.
            masked_out = kinds & {"+inf", "nan"}
            return NanRows(masked_out_where_nan(op, m, sdpa.mask, dtype) if masked_out else sdpa.mask)
        # The original's NaN: onnxruntime's operator gives zeros for a row of -inf, OpenVINO's for any such row.
        if not kinds & ({"-inf"} if self.nan_through_mask else NON_FINITE):
            return NanRows(sdpa.mask)
        rows = zero_or_nan_rows(op, m, sdpa.mask)
        if self.nan_through_mask:
            return NanRows(reused(op, m, "Add", _mask_4d(op, m, sdpa.mask), rows))
        return NanRows(sdpa.mask, rows)

    def rewrite(self, op, m: Match):
        sdpa = describe_attention(m, self.dtypes)
        dtype = np.dtype(sdpa.query_heads.dtype)
        nan_rows = self.nan_rows(op, m, sdpa, dtype)
        if sdpa.keys_3d:
            mask = lowest_spared(op, m, mask_for(op, m, replace(sdpa, mask=nan_rows.mask)), dtype)
            output = op.Attention(sdpa.query, sdpa.key, sdpa.value, mask, q_num_heads=sdpa.heads,
                                  kv_num_heads=sdpa.heads, scale=sdpa.scale, _name=m.node("attended").name)
            if nan_rows.added is not None:
                output = op.Add(output, rows_of_merged_heads(op, m, sdpa, nan_rows.added))
            return merged(op, m, sdpa, output)
        # Attention wants Q, K and V of one rank: with 4-D keys and values (a key/value cache, grouped heads),
        # the 4-D heads of the query; their head counts are then the operator's.
        cache = kv_cache(m, sdpa)
        mask = lowest_spared(op, m, mask_for(op, m, replace(sdpa, mask=nan_rows.mask), cache), dtype)
        if cache is None:
            heads = op.Attention(sdpa.query_heads, sdpa.key, sdpa.value, mask, scale=sdpa.scale,
                                 _name=m.node("attended").name)
            presents = []
        else:
            heads, present_key, present_value = op.Attention(
                sdpa.query_heads, cache.new_key, cache.new_value, mask, cache.past_key, cache.past_value,
                scale=sdpa.scale, _outputs=3, _name=m.node("attended").name)
            presents = [(cache.present_key, present_key), (cache.present_value, present_value)]
        if nan_rows.added is not None:
            heads = op.Add(heads, nan_rows.added)
        output = op.Reshape(op.Transpose(heads, perm=HEADS_FIRST), m["out_shape"], **m.attrs("merge"))
        return Replacement(output, found=presents)


class SdpaToMultiHeadAttention(_SdpaRule):
    """Replaces multi-head scaled dot-product attention with onnxruntime's MultiHeadAttention."""

    name = "sdpa_to_multi_head_attention"
    domain = ORT_DOMAIN
    targets = frozenset({Target.ORT})
    any_query = False
    # A key/value cache's Concats become the operator's present_key/present_value outputs (see split_cache).
    replaces_found_values = True

    def takes(self, sdpa: Sdpa, m: Match) -> MatchResult:
        if sdpa.kv_heads != sdpa.heads:
            return m.fail(f"MultiHeadAttention has no grouped heads: keys and values have {sdpa.kv_heads} heads, "
                          f"the query {sdpa.heads}")
        if not sdpa.keys_3d and any(_made_by_repeat_kv(tensor) for tensor in (sdpa.key, sdpa.value)):
            # Measured: no faster than the unfused graph (see OrtSdpaToAttention), which keeps the grouping.
            return m.fail("MultiHeadAttention would read the heads repeat_kv repeated for grouped heads")
        return m.ok()

    def rewrite(self, op, m: Match):
        sdpa = describe_attention(m, self.dtypes)
        absorbed = split_cache(m, sdpa)
        if absorbed is None:
            output = op.MultiHeadAttention(sdpa.query, sdpa.key, sdpa.value, None, None, mask_for(op, m, sdpa),
                                           num_heads=sdpa.heads, scale=sdpa.scale, _domain=ORT_DOMAIN,
                                           _name=m.node("attended").name)
            presents = []
        else:
            cache = absorbed.cache
            output, present_key, present_value = op.MultiHeadAttention(
                sdpa.query, absorbed.key, absorbed.value, None, None, mask_for(op, m, sdpa, absorbed), cache.past_key,
                cache.past_value, num_heads=sdpa.heads, scale=sdpa.scale, _domain=ORT_DOMAIN, _outputs=3,
                _name=m.node("attended").name)
            presents = [(cache.present_key, typed(present_key, cache.present_key.dtype, cache.present_key.shape)),
                        (cache.present_value, typed(present_value, cache.present_value.dtype,
                                                    cache.present_value.shape))]
        leading = list(sdpa.query.shape or [None, None])[:2]
        shape = [*leading, sdpa.heads * sdpa.value_head_size]
        typed(output, sdpa.query.dtype, shape)
        if sdpa.nan_guarded:
            output = typed(zeros_for_nan(op, output), sdpa.query.dtype, shape)
        return Replacement(merged(op, m, sdpa, output), found=presents)


class OrtSdpaToAttention(SdpaToAttention):
    """Replaces attention that MultiHeadAttention does not take (tried after it: grouped heads, a query that is
    no head split of a 3-D value, as Llama's) with the standard Attention operator, for onnxruntime (opset 23).

    onnxruntime 1.32's CPU kernel (one thread) ran Llama-sized grouped attention (32 query heads on 8, head size
    64) 2.8x faster than the unfused graph when decoding one token after 512 and 8% faster on a 128-token
    prompt; MultiHeadAttention on the repeated keys and values ran no faster than the unfused graph.
    """

    name = "sdpa_to_attention_for_ort"
    targets = frozenset({Target.ORT})
    dtypes = (np.dtype(np.float32),)
    nan_through_mask = True


def import_domain(graph: gs.Graph, domain: str, version: int = 1) -> None:
    """Makes the model import ``domain`` (unused imports are dropped when the model is written)."""
    if ir.opset_version(graph, domain) is None:
        graph.import_domains = [*(graph.import_domains or []), onnx.helper.make_opsetid(domain, version)]


class ScoreBiasesSummed(RewriteRule):
    """Replaces Softmax((scores + a) + b) with Softmax(scores + (a + b)): one additive mask for attention."""

    name = "score_biases_summed"

    def pattern(self, op, query, key_transposed, scale, divisor, bias, mask):
        scores = op.MatMul(query, key_transposed, _tag="scores")
        scaled = op.either(op.Mul(scores, scale, _tag="scores_scale"), op.Div(scores, divisor, _tag="scores_divisor"),
                           scores)
        return op.Softmax(op.Add(op.Add(scaled, bias, _tag="bias_add"), mask, _tag="mask_add"))

    def check(self, m: Match) -> MatchResult:
        dtype = m.dtype("bias")
        if dtype is None or dtype.kind != "f" or m.dtype("mask") != dtype:
            return m.fail("the two addends are not floats of one type")
        if m.node("scores").outputs[0].dtype is None or np.dtype(m.node("scores").outputs[0].dtype) != dtype:
            return m.fail("the scores are not of the addends' type")
        return m.ok()

    def rewrite(self, op, m: Match):
        inner = m.node("bias_add")
        scaled = next(t for t in inner.inputs if t is not m["bias"])
        shapes = (m.shape("bias"), m.shape("mask"))
        biases = typed(op.Add(m["bias"], m["mask"]), np.dtype(m.dtype("bias")),
                       None if None in shapes else broadcast_dims(*shapes))
        softmax = m.node("Softmax")
        output = op.Add(scaled, biases, _name=m.node("mask_add").name)
        return typed(op.Softmax(output, _name=softmax.name, **m.attrs("Softmax")), softmax.outputs[0].dtype,
                     softmax.outputs[0].shape)


def _last_axis_part(node: gs.Node, size: int) -> tuple[int, int] | None:
    """``[start, end)`` that a Slice takes of the last of 4 axes (of ``size`` elements), if not empty."""
    part = slice_range(node, 4, size)
    return part if part is not None and part[0] < part[1] else None


def _interleaved_heads_pattern(op, x, w, b, target):
    """The heads ``[B, H, S, G]`` of ``x @ W (+ b)``: a projection reshaped to ``[B, S, H, G]``, heads first."""
    product = op.MatMul(x, w, _tag="project")
    projected = op.either(op.Add(product, b, _tag="bias_add"), product)
    return op.Transpose(op.Reshape(projected, target, _tag="split"), perm=HEADS_FIRST, _tag="heads")


class _InterleavedHeadsRule(RewriteRule):
    """Cuts of the heads of a projection by constant weights, made projections of their own (for onnxruntime)."""

    targets = frozenset({Target.ORT})

    def split(self, m: Match) -> HeadSplit | str:
        return reshape_head_split(m.node("split"), m.node("split").inputs[0].shape)

    def check(self, m: Match) -> MatchResult:
        weight = m.value("w")
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            return m.fail("W is not a constant float matrix")
        split = self.split(m)
        if isinstance(split, str):
            return m.fail(split)
        bias = m.value("b") if m["b"] is not None else None
        if m["b"] is not None and (bias is None or bias.shape != (weight.shape[1],) or bias.dtype != weight.dtype):
            return m.fail("the bias is not a constant with one value per column")
        return self.check_parts(m, split)

    def check_parts(self, m: Match, split: HeadSplit) -> MatchResult:
        raise NotImplementedError


class InterleavedHeadsSplit(_InterleavedHeadsRule):
    """Replaces a Slice of the heads of x @ W (+ b) with the heads of x @ W' (+ b'): GPT-NeoX's fused Q/K/V."""

    name = "interleaved_heads_split"
    allow_shared_intermediates = True  # the other parts read the same heads until they are split too

    def pattern(self, op, x, w, b, target):
        return op.Slice(_interleaved_heads_pattern(op, x, w, b, target), _allow_other_inputs=True, _tag="part")

    def check_parts(self, m: Match, split: HeadSplit) -> MatchResult:
        heads = m.node("heads").outputs[0]
        parts = [_last_axis_part(reader, split.head_size) if reader.op == "Slice" else None for reader in heads.outputs]
        if any(part is None for part in parts) or ir.is_graph_output(m.graph, heads):
            return m.fail("the heads are read by more than Slices of their last axis")
        # Query, key and value of each head side by side: parts of one size that tile the head (those split
        # off already read it no more).
        size = parts[0][1] - parts[0][0]
        if size == split.head_size or split.head_size % size or any(
                end - start != size or start % size for start, end in parts):
            return m.fail(f"the Slices {sorted(set(parts))} do not cut each head of {split.head_size} into equal parts")
        return m.ok()

    def rewrite(self, op, m: Match):
        split = self.split(m)
        start, end = _last_axis_part(m.node("part"), split.head_size)
        output = m.node("part").outputs[0]
        return typed(_heads_of_columns(op, m, split, start, end), output.dtype, output.shape)


def _equal_thirds(node: gs.Node, size: int) -> bool:
    """Whether a Split of 3 outputs cuts the last of 4 axes (of ``size`` elements) into equal thirds."""
    if int(node.attrs.get("axis", 0)) not in (3, -1) or len(node.outputs) != 3 or size % 3:
        return False
    sizes = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    if sizes is None:
        sizes = node.attrs.get("split")
    if sizes is None:  # num_outputs (opset 18), or an even split by default
        return True
    return [int(v) for v in np.asarray(sizes).reshape(-1)] == [size // 3] * 3


class InterleavedHeadsSplitInThree(_InterleavedHeadsRule):
    """Replaces a Split in three of the heads of x @ W (+ b) with the heads of three products (GPT-NeoX, dynamo)."""

    name = "interleaved_heads_split_in_three"

    def pattern(self, op, x, w, b, target):
        return op.Split(_interleaved_heads_pattern(op, x, w, b, target), _outputs=3, _allow_other_inputs=True,
                        _tag="parts")

    def check_parts(self, m: Match, split: HeadSplit) -> MatchResult:
        if not _equal_thirds(m.node("parts"), split.head_size):
            return m.fail("the Split does not cut each head's last axis in equal thirds")
        return m.ok()

    def rewrite(self, op, m: Match):
        split = self.split(m)
        size = split.head_size // 3
        parts = []
        for index, output in enumerate(m.node("parts").outputs):
            part = _heads_of_columns(op, m, split, index * size, (index + 1) * size)
            parts.append(typed(part, output.dtype, output.shape))
        return tuple(parts)


def _heads_of_columns(op, m: Match, split: HeadSplit, start: int, end: int) -> gs.Tensor:
    """The heads of ``x @ W[:, cols] (+ b[cols])``, ``cols`` the elements ``[start, end)`` of each head."""
    weight = m.value("w")
    columns = np.array([h * split.head_size + j for h in range(split.heads) for j in range(start, end)])
    product = op.MatMul(m["x"], op.const(np.ascontiguousarray(weight[:, columns]), "part_weight"))
    if m["b"] is not None:
        product = op.Add(product, op.const(np.ascontiguousarray(m.value("b")[columns]), "part_bias"))
    target = op.const(np.array([0, 0, split.heads, end - start], np.int64), "part_heads")
    return op.Transpose(op.Reshape(product, target), perm=HEADS_FIRST)


# The biases first, so that attention finds one mask; for onnxruntime, MultiHeadAttention before the
# standard operator, which takes what it leaves.
RULES = (ScoreBiasesSummed(), InterleavedHeadsSplit(), InterleavedHeadsSplitInThree(), SdpaToAttention(),
         SdpaToMultiHeadAttention(), OrtSdpaToAttention())


@dataclass(frozen=True)
class ContribRewritePass(RewritePass):
    """A rule pass that may emit onnxruntime's contrib operators: for ``--target ort`` the model imports
    their domain while the rules run, and keeps the import only if an operator of it is used."""

    needs_shapes: ClassVar[bool] = True

    def prepare(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.target == Target.ORT:
            import_domain(graph, ORT_DOMAIN)
        super().prepare(graph, ctx)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        imported = ir.opset_version(graph, ORT_DOMAIN) is not None
        result = super().run(graph, ctx)
        # An import left unused would be dce's to drop, a change every round: the pipeline would never
        # reach its fixed point.
        if not imported and not any(node.domain == ORT_DOMAIN for node in ir.all_nodes(graph)):
            graph.import_domains = [d for d in graph.import_domains or [] if d.domain != ORT_DOMAIN]
        return result


@dataclass(frozen=True)
class Attention(ContribRewritePass):
    """Recovers multi-head attention: the standard Attention (opset 23), or MultiHeadAttention for onnxruntime."""

    name: ClassVar[str] = "attention"
    rules: ClassVar[tuple] = RULES
