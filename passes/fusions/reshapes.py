"""Shape-only operators: chains collapsed into one Reshape, and operators that change nothing removed.

* ``reshape_chain``: two of Reshape, Flatten, Squeeze, Unsqueeze in a row -> one ``Reshape`` (or nothing
  when the pair gives back the input's shape). Longer chains collapse a pair at a time.
* ``noop_reshape``: a Reshape or Flatten whose result has its input's shape -> its input.
* ``noop_concat``: Concat of one input, and Sum, Mean, Max, Min of one input [``noop_variadic``]; Split
  into a single output without explicit sizes [``noop_split``]; Tile by ones [``noop_tile``]; Identity
  [``noop_identity``] -> the input.

When a chain is exact: the result's shape is worked out from the input's (from shape inference, known
rank) symbolically, each dimension a known size, "dimension ``i`` of the input", or unknown. The new
Reshape's target says a known size as itself, dimension ``j`` of the input at position ``j`` as ``0`` (copy),
and at most one other dimension as ``-1`` (what the element count leaves; exporters write it the same
way). Anything else - two unknown dimensions, an empty dimension (``0`` would mean copy), axes or shapes
that are not constants, Reshape's ``allowzero`` - is left alone. Squeeze without axes needs every
dimension known. Element counts never change, so the ``-1`` is the same size the chain computes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import ALL_TARGETS

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
        if target is None or node.attrs.get("allowzero", 0):
            return None
        target = [int(v) for v in target.reshape(-1)]
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

    def pattern(self, op, x):
        return reshape_like_pattern(op, reshape_like_pattern(op, x, "inner"), "outer")

    def check(self, m: Match) -> MatchResult:
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


RULES = (ReshapeChainToReshape(), NoopReshape(), NoopConcat(), NoopVariadic(), NoopSplit(), NoopTile(),
         NoopIdentity())
