"""Shape-only operators: chains collapsed into one Reshape, pairs around element-wise regions removed, and
operators that change nothing removed.

* ``reshape_chain``: two of Reshape, Flatten, Squeeze, Unsqueeze in a row -> one ``Reshape`` (or nothing
  when the pair gives back the input's shape). Longer chains collapse a pair at a time.
* ``noop_reshape``: a Reshape or Flatten whose result has its input's shape -> its input.
* ``nested_concat``: ``Concat(a, Concat(b, c), d)`` on one axis, the inner Concat read only by Concats on
  that axis -> ``Concat(a, b, c, d)`` (concatenation is associative).
* ``noop_concat``: Concat of one input, and Sum, Mean, Max, Min of one input [``noop_variadic``]; Split
  into a single output without explicit sizes [``noop_split``]; Tile by ones [``noop_tile``]; Identity
  [``noop_identity``] -> the input.
* ``reshapes_around_elementwise``: ``Reshape(E(Reshape(a, S), c), shape of a)`` -> ``E(a, c')`` for a
  region ``E`` of element-wise operators (any number, values read several times inside it), e.g. GPT-2's
  written-out tanh Gelu between a ``[S, 4H] -> [1, S, 4H]`` Reshape and the Reshape back: the region is
  computed in ``a``'s shape and both shape operators go (the entry stays when something outside the
  region reads it too). Any of Reshape, Flatten, Squeeze, Unsqueeze counts as a Reshape here.

* ``flattened_gemm``: ``Reshape(Gemm(Reshape(x, [-1, K]), W, c), [*x's leading dims, N])`` -> ``MatMul(x, W) + c``
  (or ``MatMul(x, W)``), for a constant ``[K, N]`` ``W``, no transposition or scaling, and a bias of one
  value per column: GPT-2's Conv1D, which flattens its input for ``addmm`` and restores the leading
  dimensions from a run-time ``Shape``. A row-major Reshape to ``[M, K]`` keeps each row of ``x``, the
  product maps row to row, and the Reshape back restores the same leading dimensions (checked on the
  inferred shapes, numbers or symbols), so MatMul's batched rows are the same rows. The bias is added
  after the product instead of in the Gemm, which can change the last bit. For onnxruntime, which adds a
  Gemm's bias faster, the Gemm stays and a run-time target made of one Gather per leading dimension
  becomes ``Concat(Shape(x, end=-1), [N])`` [``flattened_gemm_leading_shape``]; a constant target stays.
* ``reshaped_matmul_bias``: ``Reshape(MatMul(Reshape(x, s), W) + c, t)`` -> ``Reshape(Gemm(Reshape(x, [-1, K]),
  W, c), t)`` for a constant ``[K, N]`` ``W``, ``c`` one value per column (or one value) and a constant ``t``
  without 0 (which would copy a dimension of the input): Swin's window projections. MatMul multiplies
  each row of its input's last axis by ``W``, so flattening the leading axes into rows computes the same
  rows in the same row-major order, and ``t`` gives them the same final shape; one node fewer.

When a chain is exact: the result's shape is worked out from the input's (from shape inference, known
rank) symbolically, each dimension a known size, "dimension ``i`` of the input", or unknown. The new
Reshape's target says a known size as itself, dimension ``j`` of the input at position ``j`` as ``0`` (copy),
and at most one other dimension as ``-1`` (what the element count leaves; exporters write it the same
way). Anything else - two unknown dimensions, an empty dimension (``0`` would mean copy), axes or shapes
that are not constants, a Reshape with ``allowzero`` and a 0 in its target - is left alone (without a 0,
``allowzero``, which the dynamo exporter writes on every Reshape, changes nothing). Squeeze without axes needs every
dimension known. Element counts never change, so the ``-1`` is the same size the chain computes.

When a region is exact: reshaping never reorders elements, so an element-wise region computes the same
element at each row-major position in any shape, provided every operand from outside broadcasts the
same way in both. The region's inputs must be the entry shape operators' outputs (shape ``S``, from
inputs of the exit's static shape ``A``) and constants; every value inside has shape ``S`` and no reader
outside the region. A constant varying only over a trailing block of ``S`` (a scalar, a per-channel
vector), padded with leading 1s, repeats that block along the flattened tensor; reshaped to the suffix
of ``A`` of the same size, it repeats the same block in ``A``'s shape. Other constants stop the rewrite,
and so do shapes that are not static and regions of more than ``REGION_LIMIT`` nodes. The region is
rebuilt node for node, so the node count falls by the exit and every entry read only inside. The old
region's nodes are left unread for ``dce``: a region has no fixed form for the pattern to bind.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Target
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import ALL_TARGETS, known_dims
from .transposes import data_operands, is_elementwise

SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class InputDim:
    """Dimension ``index`` of the chain's input, whose size is not known."""

    index: int


Dim = int | InputDim | None  # a known size, an input dimension, or unknown
Spec = list[Dim]


def reshape_like_pattern(op, value, tag: str):
    """``value`` through any one of Reshape, Flatten, Squeeze or Unsqueeze (its node tagged ``tag``)."""
    return op.either(*(getattr(op, op_type)(value, _allow_other_inputs=True, _tag=tag) for op_type in SHAPE_OPS))


def input_spec(shape: list | None) -> Spec | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else InputDim(i) for i, d in enumerate(shape)]


def _factors(dims: Spec) -> tuple[int, Counter] | None:
    """The product of ``dims`` as (known part, counter of input dimensions), or ``None`` if one is unknown."""
    known, symbolic = 1, Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, InputDim):
            symbolic[d] += 1
        else:
            known *= d
    return known, symbolic


def _quotient(total: tuple[int, Counter] | None, part: tuple[int, Counter] | None) -> Dim:
    """``total / part`` as one dimension when it is a known size or a single input dimension."""
    if total is None or part is None or part[0] == 0 or total[0] % part[0]:
        return None
    left = total[1] - part[1]
    if sum((part[1] - total[1]).values()):
        return None  # part has a dimension the total lacks
    ratio = total[0] // part[0]
    if not left:
        return ratio
    if sum(left.values()) == 1 and ratio == 1:
        return next(iter(left))
    return None


def _axes(node: gs.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes from the attribute (before opset 13) or the constant input; ``[]`` if absent."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = ir.constant_value(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return []


def through(node: gs.Node, spec: Spec) -> Spec | None:
    """The shape spec after ``node`` (a Reshape, Flatten, Squeeze or Unsqueeze) given its input's."""
    rank = len(spec)
    if node.op == "Reshape":
        target = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None:
            return None
        target = [int(v) for v in target.reshape(-1)]
        if node.attrs.get("allowzero", 0) and 0 in target:
            return None  # an empty dimension, not a copy; without a 0, allowzero changes nothing
        if target.count(-1) > 1 or any(v < -1 for v in target):
            return None
        out: Spec = []
        for j, v in enumerate(target):
            if v == 0:
                if j >= rank:
                    return None
                out.append(spec[j])
            else:
                out.append(v if v > 0 else None)
        if -1 in target:
            j = target.index(-1)
            out[j] = _quotient(_factors(spec), _factors(out[:j] + out[j + 1:]))
        return out
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis <= rank:
            return None
        one = (1, Counter())
        return [_quotient(_factors(spec[:axis]), one), _quotient(_factors(spec[axis:]), one)]
    axes = _axes(node)
    if axes is None:
        return None
    if node.op == "Squeeze":
        if not axes:
            if any(not isinstance(d, int) for d in spec):
                return None
            return [d for d in spec if d != 1]
        axes = {a + rank if a < 0 else a for a in axes}
        if any(not 0 <= a < rank for a in axes) or any(isinstance(spec[a], int) and spec[a] != 1 for a in axes):
            return None
        return [d for i, d in enumerate(spec) if i not in axes]
    out_rank = rank + len(axes)
    axes = sorted(a + out_rank if a < 0 else a for a in axes)
    if len(set(axes)) != len(axes) or any(not 0 <= a < out_rank for a in axes):
        return None
    rest = iter(spec)
    return [1 if i in axes else next(rest) for i in range(out_rank)]


def is_identity(spec: Spec, source: Spec) -> bool:
    """Whether ``spec`` is ``source``'s shape: equal dimensions, or one unknown the element count fixes."""
    if len(spec) != len(source):
        return False
    different = [i for i, (a, b) in enumerate(zip(spec, source)) if a != b]
    return not different or (len(different) == 1 and spec[different[0]] is None)


def reshape_target(spec: Spec) -> list[int] | None:
    """The Reshape target that gives ``spec`` from the chain's input, or ``None``."""
    target = []
    for j, d in enumerate(spec):
        if isinstance(d, int):
            if d == 0:
                return None  # 0 would copy the input's dimension; allowzero is not for every target
            target.append(d)
        elif d == InputDim(j):
            target.append(0)
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def chain_spec(m: Match, labels: tuple[str, ...]) -> tuple[Spec, Spec] | None:
    """(the input's spec, the spec after the tagged nodes in order), or ``None`` when not exact."""
    source = input_spec(m.shape("x"))
    if source is None:
        return None
    spec = source
    for label in labels:
        spec = through(m.node(label), spec)
        if spec is None:
            return None
    return source, spec


class ReshapeChainToReshape(RewriteRule):
    """Replaces two Reshape/Flatten/Squeeze/Unsqueeze in a row with one Reshape (or nothing)."""

    name = "reshape_chain"
    min_opset = 5  # Reshape's target is an input from opset 5 on
    targets = ALL_TARGETS
    # An inner node read only by shape operators (Unsqueeze(Unsqueeze(x)) twice, from the dynamo exporter's
    # masks) dies once each reader reads x itself: every rewrite keeps the count, the last removes the inner.
    allow_shared_intermediates = True

    def pattern(self, op, x):
        return reshape_like_pattern(op, reshape_like_pattern(op, x, "inner"), "outer")

    def check(self, m: Match) -> MatchResult:
        inner = m.node("inner").outputs[0]
        if any(reader.op not in SHAPE_OPS for reader in inner.outputs) or ir.is_graph_output(m.graph, inner):
            return m.fail("the inner node has readers other than shape operators, or is a graph output")
        specs = chain_spec(m, ("inner", "outer"))
        if specs is None:
            return m.fail("the shapes through the chain are not known exactly (rank, constants, dimensions)")
        source, spec = specs
        if not is_identity(spec, source) and reshape_target(spec) is None:
            return m.fail(f"the result's shape {spec} is not one Reshape target of the input's {source}")
        return m.ok()

    def rewrite(self, op, m: Match):
        source, spec = chain_spec(m, ("inner", "outer"))
        if is_identity(spec, source):
            return m["x"]
        target = np.array(reshape_target(spec), np.int64)
        return op.Reshape(m["x"], op.const(target, "reshape_shape"), _name=m.node("outer").name)


class NoopReshape(RewriteRule):
    """Removes a Reshape or Flatten whose result has its input's shape."""

    name = "noop_reshape"
    min_opset = 5
    targets = ALL_TARGETS

    def pattern(self, op, x):
        return op.either(op.Reshape(x, _allow_other_inputs=True, _tag="node"), op.Flatten(x, _tag="node"))

    def check(self, m: Match) -> MatchResult:
        specs = chain_spec(m, ("node",))
        if specs is None or not is_identity(specs[1], specs[0]):
            return m.fail("the result's shape may differ from the input's")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


class NoopConcat(RewriteRule):
    """Removes a Concat of a single input."""

    name = "noop_concat"
    targets = ALL_TARGETS

    def pattern(self, op, x):
        return op.Concat(x)

    def rewrite(self, op, m: Match):
        return m["x"]


def _same_concat_axis(outer: gs.Node, inner: gs.Node) -> bool:
    axes = [outer.attrs.get("axis"), inner.attrs.get("axis")]
    if None in axes:
        return False
    if axes[0] == axes[1]:
        return True
    shape = inner.outputs[0].shape
    return shape is not None and axes[0] % len(shape) == axes[1] % len(shape)


def _is_concat(node: gs.Node) -> bool:
    return node.op == "Concat" and node.domain in ("", None, "ai.onnx")


def _inner_concat(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The Concat that computes ``tensor`` if only Concats on its axis read it (each then takes its
    inputs, and it dies), else ``None``."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or not _is_concat(producer) or ir.is_graph_output(graph, tensor):
        return None
    if not all(_is_concat(reader) and _same_concat_axis(reader, producer) for reader in tensor.outputs):
        return None
    return producer


class NestedConcat(RewriteRule):
    """``Concat(a, Concat(b, c), d)`` on one axis -> ``Concat(a, b, c, d)``, where only Concats on that axis
    read the inner one (RAFT's update block feeds one to two).

    Concatenation is associative: the same elements in the same order, copied once instead of twice. The
    inner Concat is left unread for ``dce`` (it is not part of the pattern, which cannot say "any input")."""

    name = "nested_concat"
    targets = ALL_TARGETS

    def pattern(self, op):
        return op.Concat(_allow_other_inputs=True, _tag="outer")

    def check(self, m: Match) -> MatchResult:
        outer = m.node("outer")
        if all(_inner_concat(m.graph, tensor) is None for tensor in outer.inputs):
            return m.fail("no input is a Concat on the same axis that only such Concats read")
        return m.ok()

    def rewrite(self, op, m: Match):
        outer = m.node("outer")
        inputs: list[gs.Tensor] = []
        for tensor in outer.inputs:
            inner = _inner_concat(m.graph, tensor)
            inputs.extend(inner.inputs if inner is not None else [tensor])
        return op.Concat(*inputs, _name=outer.name, **m.attrs("outer"))


class NoopVariadic(RewriteRule):
    """Removes Sum, Mean, Max or Min of a single input."""

    name = "noop_variadic"
    targets = ALL_TARGETS

    def pattern(self, op, x):
        return op.either(op.Sum(x), op.Mean(x), op.Max(x), op.Min(x))

    def rewrite(self, op, m: Match):
        return m["x"]


class NoopSplit(RewriteRule):
    """Removes a Split into one output without explicit sizes (or with the one size of the whole axis)."""

    name = "noop_split"
    targets = ALL_TARGETS

    def pattern(self, op, x):
        return op.Split(x, _allow_other_inputs=True)

    def check(self, m: Match) -> MatchResult:
        split = m.node("Split")
        if len(split.outputs) != 1:
            return m.fail("Split has several outputs")
        sizes = split.attrs.get("split")
        if sizes is None and len(split.inputs) > 1 and split.inputs[1].name:
            sizes = ir.constant_value(split.inputs[1])
            if sizes is None:
                return m.fail("the split sizes are not constant")
        if sizes is not None:
            shape = m.shape("x")
            axis = int(split.attrs.get("axis", 0))
            sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
            if shape is None or not -len(shape) <= axis < len(shape) or sizes != [shape[axis]]:
                return m.fail("the split size may not be the whole axis")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


class NoopTile(RewriteRule):
    """Removes a Tile whose repeats are all 1."""

    name = "noop_tile"
    min_opset = 6  # repeats is an input from opset 6 on
    targets = ALL_TARGETS

    def pattern(self, op, x, repeats):
        return op.Tile(x, repeats)

    def check(self, m: Match) -> MatchResult:
        repeats = m.value("repeats")
        if repeats is None or repeats.size == 0 or np.any(repeats != 1):
            return m.fail("the repeats are not all the constant 1")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


class NoopIdentity(RewriteRule):
    """Removes an Identity, so that the operators around it can fuse in this same pass."""

    name = "noop_identity"
    targets = ALL_TARGETS

    def pattern(self, op, x):
        return op.Identity(x)

    def check(self, m: Match) -> MatchResult:
        # An Identity naming a graph output stays: the driver would have to put an Identity back.
        if ir.is_graph_output(m.graph, m.root.outputs[0]):
            return m.fail("the Identity gives a graph output its name")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


REGION_LIMIT = 32  # element-wise nodes in one region: the check walks it at every candidate


def _is_shape_op(node: gs.Node) -> bool:
    return node.op in SHAPE_OPS and node.domain in ("", None, "ai.onnx") and len(node.outputs) == 1


def _static(tensor: gs.Tensor) -> list[int] | None:
    """The tensor's shape when every dimension is a known size above 0."""
    dims = known_dims(tensor.shape)
    return None if dims is None or 0 in dims else dims


def constant_in_shape(value: np.ndarray, region_shape: list[int], source_shape: list[int]) -> np.ndarray | None:
    """The constant that meets each element of a ``source_shape`` tensor as ``value`` meets it in ``region_shape``.

    ``None`` unless ``value`` varies only over a trailing block of the region's axes and a suffix of the
    source's axes holds exactly as many elements (see the module docstring).
    """
    if value.ndim > len(region_shape):
        return None
    padded = [1] * (len(region_shape) - value.ndim) + list(value.shape)
    first = next((axis for axis, size in enumerate(padded) if size != 1), len(padded))
    if padded[first:] != region_shape[first:]:
        return None
    block = math.prod(padded[first:])
    for start in range(len(source_shape), -1, -1):
        size = math.prod(source_shape[start:])
        if size == block:
            return value.reshape(source_shape[start:])
        if size > block:
            return None
    return None


def _same_broadcast(value: np.ndarray, adapted: np.ndarray, source_rank: int) -> bool:
    """Whether ``value`` itself broadcasts over the source shape as ``adapted`` does (it can stay as it is)."""
    def significant(shape):
        return list(shape)[next((i for i, d in enumerate(shape) if d != 1), len(shape)):]
    return value.ndim <= source_rank and significant(value.shape) == significant(adapted.shape)


@dataclass
class Region:
    """Element-wise nodes computing one value from shape operators' outputs and constants."""

    nodes: list[gs.Node] = field(default_factory=list)  # producers first
    entries: list[gs.Node] = field(default_factory=list)  # the shape operators it reads


def elementwise_region(value: gs.Tensor, source_shape: list[int], graph: gs.Graph) -> Region | str:
    """The region computing ``value`` (of the region's shape) from entries of ``source_shape``, or why not."""
    region_shape = _static(value)
    if region_shape is None:
        return f"'{value.name}' has no static shape"
    region = Region()
    seen: set[int] = set()

    def visit(node: gs.Node) -> str | None:
        seen.add(id(node))
        if len(seen) > REGION_LIMIT:
            return f"the element-wise region has more than {REGION_LIMIT} nodes"
        if _static(node.outputs[0]) != region_shape:
            return f"'{node.outputs[0].name}' does not have the region's shape {region_shape}"
        for index in data_operands(node):
            operand = node.inputs[index]
            if ir.is_constant(operand):
                constant = ir.constant_value(operand)
                if constant is None or constant_in_shape(constant, region_shape, source_shape) is None:
                    return f"constant '{operand.name}' does not broadcast the same way in shape {source_shape}"
                continue
            producer = operand.inputs[0] if len(operand.inputs) == 1 else None
            if producer is None or not ir.is_local(graph, producer):
                return f"'{operand.name}' comes from outside the graph's nodes"
            if id(producer) in seen:
                continue
            if is_elementwise(producer):
                reason = visit(producer)
                if reason is not None:
                    return reason
            elif (_is_shape_op(producer) and _static(producer.inputs[0]) == source_shape
                  and _static(operand) == region_shape):
                seen.add(id(producer))
                region.entries.append(producer)
            else:
                return (f"'{operand.name}' is computed by {producer.op}, not inside the region or a shape "
                        f"operator of {source_shape}")
        region.nodes.append(node)
        return None

    producer = value.inputs[0] if len(value.inputs) == 1 else None
    if producer is None or not ir.is_local(graph, producer) or not is_elementwise(producer):
        return f"'{value.name}' is not computed by an element-wise operator"
    reason = visit(producer)
    if reason is not None:
        return reason
    if not region.entries:
        return "the region reads no shape operator (it is constant)"
    inside = {id(n) for n in region.nodes}
    for node in region.nodes:
        out = node.outputs[0]
        if out is not value and (ir.is_graph_output(graph, out) or any(id(r) not in inside for r in out.outputs)):
            return f"'{out.name}' inside the region is read outside it"
    return region


class ReshapesAroundElementwise(RewriteRule):
    """Computes an element-wise region between shape operators in the shape it is reshaped back to."""

    name = "reshapes_around_elementwise"
    min_opset = 7  # numpy-style broadcasting
    targets = ALL_TARGETS

    def pattern(self, op, y):
        return reshape_like_pattern(op, y, "outer")

    def region(self, m: Match) -> Region | str:
        source_shape = _static(m.root.outputs[0])
        if source_shape is None:
            return "the result has no static shape"
        y = m["y"]
        if ir.is_graph_output(m.graph, y) or len(y.outputs) != 1:
            return f"'{y.name}' is read elsewhere too"
        return elementwise_region(y, source_shape, m.graph)

    def check(self, m: Match) -> MatchResult:
        region = self.region(m)
        return m.fail(region) if isinstance(region, str) else m.ok()

    def rewrite(self, op, m: Match):
        region = self.region(m)
        source_shape = _static(m.root.outputs[0])
        region_shape = _static(m["y"])
        replaced: dict[int, gs.Tensor] = {id(entry.outputs[0]): entry.inputs[0] for entry in region.entries}

        def operand(tensor: gs.Tensor) -> gs.Tensor:
            if id(tensor) in replaced:
                return replaced[id(tensor)]
            value = ir.constant_value(tensor)
            adapted = constant_in_shape(value, region_shape, source_shape)
            if _same_broadcast(value, adapted, len(source_shape)):
                return tensor
            return op.const(np.ascontiguousarray(adapted), f"{tensor.name}_reshaped")

        for node in region.nodes:
            data = set(data_operands(node))
            inputs = [operand(t) if i in data else t for i, t in enumerate(node.inputs)]
            replaced[id(node.outputs[0])] = getattr(op, node.op)(*inputs, **dict(node.attrs))
        return replaced[id(m["y"])]


def _known(shape: list | None) -> bool:
    """Whether every dimension is a number or a symbol (one symbol is one size across the graph)."""
    return shape is not None and all(isinstance(d, int) or (isinstance(d, str) and d) for d in shape)


class FlattenedGemmToMatMul(RewriteRule):
    """Replaces Reshape(Gemm(Reshape(x, [-1, K]), W, c), [*x's leading dims, N]) with MatMul(x, W) + c."""

    name = "flattened_gemm"
    min_opset = 7  # numpy-style broadcasting of the bias
    targets = ALL_TARGETS - {Target.ORT}

    def pattern(self, op, x, w, c):
        flat = op.either(op.Reshape(x, _allow_other_inputs=True, _tag="flatten"), op.Flatten(x, _tag="flatten"))
        return op.Reshape(op.Gemm(flat, w, op.optional(c)), _allow_other_inputs=True, _tag="unflatten")

    def check(self, m: Match) -> MatchResult:
        attrs = m.attrs("Gemm")
        if attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or (m["c"] is not None and attrs.get("beta", 1.0) != 1.0):
            return m.fail("the Gemm transposes or scales an operand")
        x_shape, w_shape = m.shape("x"), m.shape("w")
        if not _known(x_shape) or len(x_shape) < 3:
            return m.fail(f"x of shape {x_shape} is not known with 3 or more dimensions")
        if not m.is_constant("w") or w_shape is None or len(w_shape) != 2 or w_shape[0] != x_shape[-1]:
            return m.fail(f"W of shape {w_shape} is not a constant [K, N] matrix for x's last dimension")
        flat_shape = m.node("flatten").outputs[0].shape
        if flat_shape is None or len(flat_shape) != 2 or flat_shape[1] != x_shape[-1]:
            return m.fail(f"x is flattened to {flat_shape}, not to rows of its last dimension")
        result_shape = m.root.outputs[0].shape
        if not _known(result_shape) or list(result_shape) != [*x_shape[:-1], w_shape[1]]:
            return m.fail(f"the result's shape {result_shape} is not x's leading dimensions and N")
        if m["c"] is not None:
            c_shape = m.shape("c")
            if c_shape is None or len(c_shape) > 2 or any(d != 1 for d in c_shape[:-1]) \
                    or (c_shape and c_shape[-1] not in (1, w_shape[1])):
                return m.fail(f"the bias of shape {c_shape} is not one value per column")
        return m.ok()

    def rewrite(self, op, m: Match):
        product = op.MatMul(m["x"], m["w"], _name=m.node("Gemm").name)
        return product if m["c"] is None else op.Add(product, m["c"])


class FlattenedGemmLeadingShape(FlattenedGemmToMatMul):
    """Restores a flattened Gemm's leading dimensions with Shape(x, end=-1) instead of one Gather per dimension."""

    name = "flattened_gemm_leading_shape"
    min_opset = 15  # Shape's start and end
    targets = frozenset({Target.ORT})

    def check(self, m: Match) -> MatchResult:
        checked = super().check(m)
        if not checked:
            return checked
        target = m.node("unflatten").inputs[1]
        if ir.is_constant(target):
            # A constant target costs no node; computing it would only be folded back (static shapes).
            return m.fail("the leading dimensions are constant")
        concat = target.inputs[0] if target.inputs and target.inputs[0].op == "Concat" else None
        if concat is not None and any(t.inputs and t.inputs[0].op == "Shape" and t.inputs[0].inputs[0] is m["x"]
                                      for t in concat.inputs):
            return m.fail("the leading dimensions are already read from x's shape in one piece")
        if concat is not None and len(concat.inputs) == 2 and concat.inputs[0].inputs \
                and concat.inputs[0].inputs[0].op == "Shape" and ir.is_constant(concat.inputs[1]):
            # fold's read_shapes_from_inputs moves that Shape to the graph input that names the dimensions.
            return m.fail("the leading dimensions are already read by one Shape")
        return m.ok()

    def rewrite(self, op, m: Match):
        rows = np.array([-1, m.shape("w")[0]], np.int64)
        columns = np.array([m.shape("w")[1]], np.int64)
        gemm = m.node("Gemm")
        product = op.Gemm(op.Reshape(m["x"], op.const(rows, "rows_shape")), m["w"], m["c"], _name=gemm.name,
                          **gemm.attrs)
        leading = op.Shape(m["x"], end=-1)
        return op.Reshape(product, op.Concat(leading, op.const(columns, "columns"), axis=0),
                          _name=m.node("unflatten").name)


class ReshapedMatMulBiasToGemm(RewriteRule):
    """Replaces Reshape(MatMul(Reshape(x, s), W) + c, t) with Reshape(Gemm(Reshape(x, [-1, K]), W, c), t)."""

    name = "reshaped_matmul_bias"
    min_opset = 7  # numpy-style broadcasting of the bias, and Gemm's C

    def pattern(self, op, x, w, c, t):
        rows = op.Reshape(x, _allow_other_inputs=True, _tag="flatten")
        return op.Reshape(op.Add(op.MatMul(rows, w), c), t, _tag="unflatten")

    def check(self, m: Match) -> MatchResult:
        weight = m.value("w")
        if weight is None or weight.ndim != 2 or weight.shape[0] == 0:
            return m.fail("W is not a constant [K, N] matrix")
        if weight.dtype.name not in ("float32", "float64") or m.dtype("x") != weight.dtype:
            return m.fail(f"Gemm here only for float32/float64 operands, not {weight.dtype}")
        bias = m.value("c")
        if bias is None or bias.dtype != weight.dtype or not (
                bias.size == 1 or (bias.size == weight.shape[1] and bias.shape[-1] == weight.shape[1])):
            return m.fail("the addend is not a constant with one value per column")
        target = m.value("t")
        if target is None or not np.all(target != 0):
            return m.fail("the final shape is not constant, or copies a dimension (0) of the input")
        return m.ok()

    def rewrite(self, op, m: Match):
        weight, bias = m.value("w"), m.value("c")
        rows = op.Reshape(m["x"], op.const(np.array([-1, weight.shape[0]], np.int64), "rows_shape"),
                          _name=m.node("flatten").name)
        # Gemm's C broadcasts one way to [M, N]: a bias of leading 1s becomes a row.
        bias = m["c"] if bias.ndim <= 1 else op.const(bias.reshape(-1), f"{m['c'].name}_row")
        product = op.Gemm(rows, m["w"], bias, _name=m.node("MatMul").name)
        return op.Reshape(product, m["t"], _name=m.node("unflatten").name, **m.attrs("unflatten"))


RULES = (ReshapeChainToReshape(), NoopReshape(), NoopConcat(), NestedConcat(), NoopVariadic(), NoopSplit(), NoopTile(),
         NoopIdentity(), ReshapesAroundElementwise(), FlattenedGemmToMatMul(), FlattenedGemmLeadingShape(),
         ReshapedMatMulBiasToGemm())
