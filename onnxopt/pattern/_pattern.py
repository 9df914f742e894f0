"""Patterns: what a rule's ``pattern`` method builds, and the matcher that finds them in a graph.

A pattern is a small expression tree built by calling an ``op`` builder the way the formula reads,
``op.Add(op.MatMul(x, w), b)``. Leaves are pattern variables (``x``, ``w``, ``b``), which bind to any
value; the same variable used twice must bind to the same value. Every operator call is a
``NodePattern``; its outputs are ``NodeOutput`` values.

The matcher walks the tree from the root node's output back to the inputs and backtracks: binary
commutative operators are tried in both operand orders, optional inputs may be present or absent, and
``op.either(a, b)`` tries each alternative in turn. ``op.product(a, b, c)`` is the alternatives that
multiply the factors in every association (``(a * b) * c``, ``a * (b * c)``, ``(a * c) * b``); with
the commuted operands the matcher tries, every order of the factors matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir

__all__ = ["COMMUTATIVE_OPS", "Const", "Either", "NodeOutput", "NodePattern", "Optional", "PatternBuilder", "Var"]

# Binary operators whose operands can be swapped without changing the result (broadcasting is symmetric).
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal", "Max", "Min", "Sum", "Mean",
                             "BitwiseAnd", "BitwiseOr", "BitwiseXor"})

_STANDARD_DOMAINS = ("", "ai.onnx")


def _same_domain(a: str | None, b: str | None) -> bool:
    a, b = a or "", b or ""
    return a == b or (a in _STANDARD_DOMAINS and b in _STANDARD_DOMAINS)


class ValuePattern:
    """Something that matches one value (a tensor) of the graph."""


@dataclass(eq=False)
class Var(ValuePattern):
    """A pattern variable: binds to any value; every use of one name must bind to the same value."""

    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Optional(ValuePattern):
    """An input that may be absent (missing or empty-named): then ``match[name]`` is ``None``."""

    inner: ValuePattern

    def __repr__(self) -> str:
        return f"optional({self.inner!r})"


@dataclass(eq=False)
class Const(ValuePattern):
    """A constant whose every element equals ``value`` (within ``rtol``), e.g. the ``0`` of ``Add(x, 0)``.

    ``ulps`` widens the tolerance to that many units in the last place of the constant's own floating-point
    type, for constants like ``sqrt(2)`` that a float16 model can only hold rounded.
    """

    value: float
    rtol: float = 0.0
    ulps: float = 0.0

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(eq=False)
class Either(ValuePattern):
    """A value that matches any one of several patterns, tried in order (``op.either(a, b)``).

    Variables and nodes of the alternatives that did not match stay unbound: ``match[name]`` is then
    ``None`` and ``match.has_node(label)`` is false.
    """

    alternatives: list[ValuePattern]

    def __repr__(self) -> str:
        return f"either({', '.join(repr(a) for a in self.alternatives)})"


@dataclass(eq=False)
class NodePattern:
    """One operator of a pattern: its type, domain, inputs and attribute constraints."""

    op_type: str
    domain: str
    inputs: list[ValuePattern | None]
    attrs: dict[str, Any]
    num_outputs: int = 1
    allow_other_inputs: bool = False
    tag: str | None = None
    outputs: list[NodeOutput] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How the match names this node: its tag, else its operator type."""
        return self.tag or self.op_type

    def __repr__(self) -> str:
        return f"{self.op_type}({', '.join(repr(i) for i in self.inputs)})"


@dataclass(eq=False)
class NodeOutput(ValuePattern):
    """Output ``index`` of a node of the pattern."""

    node: NodePattern
    index: int

    def __repr__(self) -> str:
        return repr(self.node) if self.index == 0 else f"{self.node!r}[{self.index}]"


class PatternBuilder:
    """The ``op`` a rule's ``pattern`` receives: ``op.Conv(x, w)`` builds a ``NodePattern``.

    Keyword arguments are attribute constraints (a value the attribute must equal, or a predicate on
    it); ``_domain``, ``_outputs`` (how many outputs the node has in the pattern),
    ``_allow_other_inputs`` (extra inputs beyond those listed may be present) and ``_tag`` (the name
    ``match.node`` / ``match.attrs`` use for this node, by default its operator type) configure it.
    """

    def __init__(self) -> None:
        self.nodes: list[NodePattern] = []

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, _allow_other_inputs: bool = False,
                 _tag: str | None = None, **attrs: Any):
            node = NodePattern(op_type, _domain, [_as_value(i) for i in inputs], attrs, _outputs,
                               _allow_other_inputs, _tag)
            node.outputs = [NodeOutput(node, i) for i in range(_outputs)]
            self.nodes.append(node)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

        return make

    @staticmethod
    def optional(value: ValuePattern) -> Optional:
        """An input that may be absent; ``match[name]`` is then ``None``."""
        return Optional(value)

    @staticmethod
    def const(value: float, rtol: float = 0.0, ulps: float = 0.0) -> Const:
        """A constant all of whose elements equal ``value``, within ``rtol`` or ``ulps`` of its type."""
        return Const(value, rtol, ulps)

    @staticmethod
    def either(*alternatives: Any) -> ValuePattern:
        """A value matching any of ``alternatives`` (the first that matches, then the others on backtracking).

        A rule's ``pattern`` may return an ``either`` of operator calls: the rule then has several roots,
        possibly of different operator types, each output 0 of its node.
        """
        values = [_as_value(a) for a in alternatives]
        if not values or any(v is None for v in values):
            raise TypeError("either() needs one or more patterns, none of them None")
        return values[0] if len(values) == 1 else Either(values)

    def product(self, *factors: Any, _op: str = "Mul") -> ValuePattern:
        """The product of ``factors`` in any association and order: ``op.product(x, 0.5, y)``.

        Builds every binary tree of ``_op`` nodes (``Mul`` by default, or another associative and
        commutative operator such as ``Add``) over the factors, once per shape up to swapped operands,
        which the matcher tries itself: 3 trees for three factors, 15 for four.
        """
        leaves = [_as_value(f) for f in factors]
        if len(leaves) < 2 or len(leaves) > 4 or any(leaf is None for leaf in leaves):
            raise TypeError("product() takes two to four factors, none of them None")
        return self.either(*self._trees(_op, leaves))

    def _trees(self, op_type: str, leaves: list[ValuePattern]) -> list[ValuePattern]:
        if len(leaves) == 1:
            return leaves
        first, rest = leaves[0], leaves[1:]
        trees = []
        # The group holding the first factor goes left; the swapped operands are the matcher's business.
        for mask in range(2 ** len(rest) - 1):
            left = [first] + [leaf for i, leaf in enumerate(rest) if mask >> i & 1]
            right = [leaf for i, leaf in enumerate(rest) if not mask >> i & 1]
            for left_tree in self._trees(op_type, left):
                for right_tree in self._trees(op_type, right):
                    trees.append(getattr(self, op_type)(left_tree, right_tree))
        return trees


def _as_value(item: Any) -> ValuePattern | None:
    if item is None or isinstance(item, ValuePattern):
        return item
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return Const(float(item))
    raise TypeError(f"a pattern input must be a pattern variable, an op call, a number or None, not {item!r}")


# ---------------------------------------------------------------------------------------------------
# Matching


@dataclass
class Bindings:
    """What a partial match has bound so far; copied on every branch of the search."""

    values: dict[str, gs.Tensor | None] = field(default_factory=dict)
    nodes: dict[int, gs.Node] = field(default_factory=dict)  # id(NodePattern) -> node

    def copy(self) -> Bindings:
        return Bindings(dict(self.values), dict(self.nodes))


def _absent(tensor: gs.Tensor | None) -> bool:
    return tensor is None or not tensor.name


def _attr_matches(expected: Any, actual: Any) -> bool:
    if callable(expected):
        return bool(expected(actual))
    if isinstance(actual, bytes):
        actual = actual.decode()
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return list(expected) == list(actual)
    return expected == actual


class Matcher:
    """Finds one pattern rooted at a given node; remembers why the last attempt failed."""

    def __init__(self, graph: gs.Graph, commute: bool = True,
                 is_member: Callable[[gs.Node], bool] | None = None) -> None:
        self.graph = graph
        self.commute = commute
        self.is_member = is_member or (lambda node: ir.is_local(graph, node))
        self.failures: list[str] = []

    @property
    def failure(self) -> str | None:
        """Why the pattern did not match: every distinct reason met on the way (both operand orders)."""
        return "; ".join(self.failures) or None

    def fail(self, reason: str) -> None:
        if reason not in self.failures:
            self.failures.append(reason)

    def match_root(self, root: NodePattern, node: gs.Node) -> Iterator[Bindings]:
        yield from self._node(root, node, Bindings())

    def _value(self, pattern: ValuePattern | None, tensor: gs.Tensor | None, bound: Bindings) -> Iterator[Bindings]:
        if pattern is None:
            if _absent(tensor):
                yield bound
            else:
                self.fail(f"input '{tensor.name}' is present where the pattern has none")
            return
        if isinstance(pattern, Either):
            for alternative in pattern.alternatives:
                yield from self._value(alternative, tensor, bound)
            return
        if isinstance(pattern, Optional):
            if _absent(tensor):
                if isinstance(pattern.inner, Var):
                    if pattern.inner.name in bound.values and bound.values[pattern.inner.name] is not None:
                        self.fail(f"'{pattern.inner.name}' is bound to a value but absent here")
                        return
                    bound = bound.copy()
                    bound.values[pattern.inner.name] = None
                yield bound
                return
            yield from self._value(pattern.inner, tensor, bound)
            return
        if _absent(tensor):
            self.fail(f"a required input of the pattern ({pattern!r}) is absent")
            return
        if isinstance(pattern, Var):
            previous = bound.values.get(pattern.name, _UNBOUND)
            if previous is _UNBOUND:
                bound = bound.copy()
                bound.values[pattern.name] = tensor
                yield bound
            elif previous is tensor:
                yield bound
            else:
                self.fail(f"'{pattern.name}' would bind to both '{getattr(previous, 'name', None)}' "
                          f"and '{tensor.name}'")
            return
        if isinstance(pattern, Const):
            array = ir.constant_value(tensor)
            if array is None:
                self.fail(f"'{tensor.name}' is not a constant (the pattern wants {pattern.value})")
            elif array.dtype.kind not in "biuf" or array.size == 0 or not np.allclose(
                    array.astype(np.float64), pattern.value, rtol=_tolerance(pattern, array.dtype), atol=0.0):
                self.fail(f"constant '{tensor.name}' is not {pattern.value} everywhere")
            else:
                yield bound
            return
        if isinstance(pattern, NodeOutput):
            if len(tensor.inputs) != 1:
                self.fail(f"'{tensor.name}' is not produced by a node (the pattern wants {pattern.node.op_type})")
                return
            producer = tensor.inputs[0]
            if not self.is_member(producer):
                self.fail(f"'{tensor.name}' is produced outside this graph")
                return
            if pattern.index >= len(producer.outputs) or producer.outputs[pattern.index] is not tensor:
                self.fail(f"'{tensor.name}' is not output {pattern.index} of '{_name(producer)}'")
                return
            yield from self._node(pattern.node, producer, bound)
            return
        raise TypeError(f"unknown pattern element {pattern!r}")

    def _node(self, pattern: NodePattern, node: gs.Node, bound: Bindings) -> Iterator[Bindings]:
        already = bound.nodes.get(id(pattern))
        if already is not None:
            if already is node:
                yield bound
            else:
                self.fail(f"the pattern's {pattern.label} would be two different nodes")
            return
        if node.op != pattern.op_type or not _same_domain(node.domain, pattern.domain):
            self.fail(f"'{_name(node)}' is {node.op}, the pattern wants {pattern.op_type}")
            return
        if any(other is node for other in bound.nodes.values()):
            self.fail(f"node '{_name(node)}' would match two nodes of the pattern")
            return
        if len(node.outputs) < pattern.num_outputs:
            self.fail(f"'{_name(node)}' has {len(node.outputs)} outputs, the pattern wants {pattern.num_outputs}")
            return
        for key, expected in pattern.attrs.items():
            if not _attr_matches(expected, node.attrs.get(key)):
                self.fail(f"attribute {key} of '{_name(node)}' is {node.attrs.get(key)!r}")
                return
        listed = len(pattern.inputs)
        if not pattern.allow_other_inputs and any(not _absent(t) for t in node.inputs[listed:]):
            self.fail(f"'{_name(node)}' has more inputs than the pattern lists")
            return
        actual = [node.inputs[i] if i < len(node.inputs) else None for i in range(listed)]
        bound = bound.copy()
        bound.nodes[id(pattern)] = node
        orders = [pattern.inputs]
        if self.commute and pattern.op_type in COMMUTATIVE_OPS and listed == 2 and _standard(pattern.domain):
            orders.append(pattern.inputs[::-1])
        for order in orders:
            yield from self._inputs(order, actual, 0, bound)

    def _inputs(self, patterns: list, tensors: list, index: int, bound: Bindings) -> Iterator[Bindings]:
        if index == len(patterns):
            yield bound
            return
        for partial in self._value(patterns[index], tensors[index], bound):
            yield from self._inputs(patterns, tensors, index + 1, partial)


def _tolerance(pattern: Const, dtype: np.dtype) -> float:
    if pattern.ulps and dtype.kind == "f":
        return max(pattern.rtol, pattern.ulps * float(np.finfo(dtype).eps))
    return pattern.rtol


def _name(node: gs.Node) -> str:
    """How messages name a node: its name, else its first output (nodes are often unnamed)."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def _standard(domain: str | None) -> bool:
    return (domain or "") in _STANDARD_DOMAINS


class _Unbound:
    def __repr__(self) -> str:
        return "<unbound>"


_UNBOUND = _Unbound()
