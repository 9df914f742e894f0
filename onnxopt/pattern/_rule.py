"""Rules: a pattern, a check that explains itself, and a rewrite that only builds nodes."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pattern._pattern import Either, NodeOutput, NodePattern, PatternBuilder, ValuePattern, Var

__all__ = ["Match", "MatchResult", "Replacement", "ReplacementBuilder", "RewriteRule"]


@dataclass(frozen=True)
class MatchResult:
    """The answer of ``check``: success, or failure with the reason (which ``explain`` shows)."""

    success: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.success


class Match:
    """One place where a rule's pattern matched: bound values, matched nodes and helpers for ``check``.

    ``match["x"]`` is the value bound to variable ``x`` (``None`` for an absent optional input);
    ``match.node("Conv")`` is the matched node with that operator type (or ``_tag``), ``match.attrs(...)``
    a copy of its attributes.
    """

    def __init__(self, graph: gs.Graph, root_graph: gs.Graph, values: dict[str, gs.Tensor | None],
                 nodes: dict[str, list[gs.Node]], root: gs.Node) -> None:
        self.graph = graph
        self.root_graph = root_graph
        self.values = values
        self._nodes = nodes
        self.root = root
        self._values: dict[str, np.ndarray | None] = {}  # check and rewrite read weights more than once

    def __getitem__(self, name: str) -> gs.Tensor | None:
        if name not in self.values:
            raise KeyError(f"the pattern has no variable '{name}' (it has: {', '.join(self.values) or 'none'})")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return self.values.get(name) is not None

    @property
    def nodes(self) -> list[gs.Node]:
        """Every matched node, the root first."""
        seen = [self.root]
        for group in self._nodes.values():
            seen.extend(n for n in group if all(n is not s for s in seen))
        return seen

    def node(self, label: str, index: int = 0) -> gs.Node:
        """The matched node whose operator type (or ``_tag``) is ``label``; ``index`` picks among several."""
        found = self._nodes.get(label)
        if not found:
            raise KeyError(f"the pattern has no node '{label}' (it has: {', '.join(self._nodes)})")
        return found[index]

    def has_node(self, label: str) -> bool:
        """Whether a node with this operator type (or ``_tag``) matched: alternatives of ``op.either`` may not."""
        return bool(self._nodes.get(label))

    def attrs(self, label: str, index: int = 0) -> dict[str, Any]:
        """A copy of the attributes of ``node(label)``, to pass on to a replacement node."""
        return dict(self.node(label, index).attrs)

    def attr(self, label: str, key: str, default: Any = None) -> Any:
        value = self.node(label).attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def is_constant(self, name: str) -> bool:
        """Whether ``match[name]`` is an initializer or a ``Constant`` node output (not an overridable input)."""
        tensor = self.values.get(name)
        return tensor is not None and ir.is_constant(tensor)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of ``match[name]`` (read-only), or ``None`` if it is absent or not constant."""
        if name not in self._values:
            tensor = self.values.get(name)
            array = None if tensor is None else ir.constant_value(tensor)
            if array is not None:
                # A read-only view: the array may be the graph's own data, which a rule must not change.
                array = array.view()
                array.flags.writeable = False
            self._values[name] = array
        return self._values[name]

    def shape(self, name: str) -> list | None:
        tensor = self.values.get(name)
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        return None if tensor.shape is None else list(tensor.shape)

    def dtype(self, name: str) -> np.dtype | None:
        tensor = self.values.get(name)
        if tensor is None or tensor.dtype is None:
            return None
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None

    def opset(self, domain: str = "") -> int | None:
        """The model's version of ``domain`` (subgraphs share the model's)."""
        return ir.opset_version(self.root_graph, domain)

    @staticmethod
    def ok() -> MatchResult:
        return MatchResult(True)

    @staticmethod
    def fail(reason: str) -> MatchResult:
        return MatchResult(False, reason)


@dataclass(frozen=True)
class Replacement:
    """What ``rewrite`` returns when it replaces more than the root's outputs.

    ``outputs`` is what ``rewrite`` would return otherwise (one value, or a tuple, one per pattern
    output). ``inner`` maps each label the rule lists in ``also_replaces`` to the new value of that
    matched node's output (or a tuple, one per output; an output left out or ``None`` must be unused
    outside the pattern). ``found`` pairs values outside the match that the rule found itself (in a rule
    with ``replaces_found_values``) with their new values. Every replaced value keeps its name and its
    place among the graph outputs, and nodes left unused are removed, as for the root's outputs.
    """

    outputs: gs.Tensor | Sequence[gs.Tensor]
    inner: Mapping[str, gs.Tensor | Sequence[gs.Tensor | None]] = field(default_factory=dict)
    found: Sequence[tuple[gs.Tensor, gs.Tensor]] = ()


class RewriteRefused(Exception):
    """Raised by the replacement builder for a replacement the model cannot hold (an unknown operator)."""


class ReplacementBuilder:
    """The ``op`` a rule's ``rewrite`` receives: ``op.Conv(x, w2, b2, **attrs)`` builds a new node.

    Inputs are values of the match, outputs of other built nodes, or ``None`` for an absent input.
    ``op.const(array)`` makes a new constant. ``_outputs`` gives the number of outputs (a tuple is
    returned for more than one), ``_domain`` the operator's domain and ``_name`` the node's name. Nothing
    touches the graph: the driver splices the built nodes in.
    """

    def __init__(self, namer: _Namer, opsets: dict[str, int], hint: str) -> None:
        self._namer = namer
        self._opsets = opsets
        self._hint = hint
        self.nodes: list[gs.Node] = []
        self.constants: list[gs.Constant] = []

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: gs.Tensor | None, _outputs: int = 1, _domain: str = "", _name: str | None = None,
                 **attrs: Any):
            self._check_operator(op_type, _domain)
            tensors = []
            for item in inputs:
                if item is None:
                    tensors.append(gs.Variable.empty())
                elif isinstance(item, gs.Tensor):
                    tensors.append(item)
                else:
                    raise TypeError(f"input of {op_type} must be a value or None, not {type(item).__name__} "
                                    "(use op.const(array) for new constants)")
            while tensors and not tensors[-1].name:
                tensors.pop()
            outputs = [gs.Variable(self._namer.fresh(f"{self._hint}_{op_type.lower()}")) for _ in range(_outputs)]
            node = gs.Node(op_type, name=_name or "", domain=_domain or None, attrs=attrs, inputs=tensors,
                           outputs=outputs)
            self.nodes.append(node)
            return outputs[0] if _outputs == 1 else tuple(outputs)

        return make

    def const(self, values: np.ndarray, hint: str = "const") -> gs.Constant:
        """A new constant with a name unique in the whole model (subgraphs included)."""
        # The name is made unique here, once per run; make_constant on an empty graph keeps it and
        # stores the data the way graphsurgeon exports (types numpy lacks, strings, scalars).
        constant = ir.make_constant(_NO_NAMES, values, self._namer.fresh(hint))
        self.constants.append(constant)
        return constant

    def _check_operator(self, op_type: str, domain: str) -> None:
        domain = domain or ""
        key = "" if domain == "ai.onnx" else domain
        version = self._opsets.get(key)
        if version is None:
            raise RewriteRefused(f"the model does not import domain '{domain}' for {op_type}")
        if key in ("", "ai.onnx.ml") and not onnx.defs.has(op_type, version, key):
            raise RewriteRefused(f"{op_type} does not exist in opset {version} of domain '{key}'")


_NO_NAMES = gs.Graph()


class _Namer:
    """Unique names across the whole model, scanned once per rule-set run instead of once per constant."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken: set[str] = set()
        for sub in ir.all_graphs(graph):
            self.taken |= set(sub.tensors().keys())
            self.taken |= {t.name for t in sub.inputs}
            self.taken |= {n.name for n in sub.nodes if n.name}
        self._counter = 0

    def fresh(self, hint: str) -> str:
        name = hint or "v"
        while name in self.taken:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self.taken.add(name)
        return name


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


class RewriteRule:
    """Base class of a rewrite rule.

    Subclasses define ``pattern(self, op, <variables>)`` (the parameters after ``op`` become the
    pattern's variables), optionally ``check(self, match) -> MatchResult`` and ``rewrite(self, op,
    match)`` returning the replacement value (or a tuple, one per pattern output, or a ``Replacement``
    that replaces more). Class attributes:

    * ``name``: how statistics, ``ctx.allow`` and ``explain`` name the rule (default: the class name in
      snake case); read as "source to target";
    * ``domain``, ``min_opset``, ``max_opset``: the rule only runs on models importing ``domain`` at a
      version in that range (the operators it matches or emits must exist there);
    * ``targets``: the engines (``Target`` values) the rule runs for, ``None`` for all; a rule whose
      replacement an engine cannot run or would run slower leaves that target out;
    * ``allow_shared_intermediates``: match even when a value inside the pattern has readers outside
      it (those nodes are then kept); off by default, so that a fusion never duplicates work;
    * ``also_replaces``: labels (``_tag`` or operator type) of inner nodes of the pattern whose outputs
      ``rewrite`` replaces too, through ``Replacement.inner``: those may have readers outside the pattern
      or be graph outputs (a value computed anyway by the replacement, e.g. a KV cache's ``present``);
      a listed node that matched must be given a value;
    * ``replaces_found_values``: ``rewrite`` may also replace values outside the match that the rule
      found in the graph (``Replacement.found``), for a rule that makes several values in one rewrite;
    * ``commute``: also try swapped operands of commutative binary operators (default on).
    """

    name: ClassVar[str] = ""
    domain: ClassVar[str] = ""
    min_opset: ClassVar[int] = 1
    max_opset: ClassVar[int | None] = None
    targets: ClassVar[frozenset[str] | None] = None
    allow_shared_intermediates: ClassVar[bool] = False
    commute: ClassVar[bool] = True
    also_replaces: ClassVar[tuple[str, ...]] = ()
    replaces_found_values: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__)

    def pattern(self, op: PatternBuilder, *variables: Var):
        raise NotImplementedError(f"rule '{self.name}' defines no pattern()")

    def check(self, match: Match) -> MatchResult:
        return match.ok()

    def rewrite(self, op: ReplacementBuilder, match: Match):
        raise NotImplementedError(f"rule '{self.name}' defines no rewrite()")

    def applies_to(self, opsets: dict[str, int]) -> str | None:
        """``None`` if the rule applies to a model with these opsets, else why not."""
        version = opsets.get("" if self.domain == "ai.onnx" else self.domain)
        if version is None:
            return f"the model does not import domain '{self.domain}'"
        if version < self.min_opset or (self.max_opset is not None and version > self.max_opset):
            upper = "" if self.max_opset is None else f" to {self.max_opset}"
            return f"the rule needs opset {self.min_opset}{upper} of domain '{self.domain}', the model has {version}"
        return None

    def runs_for(self, target: str) -> str | None:
        """``None`` if the rule runs when optimizing for ``target`` (a ``Target`` or its name), else why not."""
        if self.targets is None:
            return None
        name = getattr(target, "value", target)
        if name in {getattr(t, "value", t) for t in self.targets}:
            return None
        return f"the rule does not run for target '{name}'"

    def compiled(self) -> CompiledPattern:
        """The pattern, built once per rule object."""
        cached = self.__dict__.get("_compiled")
        if cached is None:
            cached = CompiledPattern.build(self)
            self.__dict__["_compiled"] = cached
        return cached


@dataclass
class CompiledPattern:
    """A rule's pattern as the matcher uses it: the root node(s), the outputs, and node labels.

    ``roots`` has one node per alternative when ``pattern`` returns an ``op.either`` of operator calls
    (each then stands for output 0 of its node); ``root`` is the first.
    """

    root: NodePattern
    outputs: list[NodeOutput]
    nodes: list[NodePattern]
    variables: list[str]
    roots: list[NodePattern] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.roots:
            self.roots = [self.root]

    @classmethod
    def build(cls, rule: RewriteRule) -> CompiledPattern:
        parameters = list(inspect.signature(rule.pattern).parameters.values())[1:]
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        builder = PatternBuilder()
        result = rule.pattern(builder, *[Var(n) for n in names])
        if isinstance(result, Either):
            alternatives = _flatten(result)
            if not all(isinstance(a, NodeOutput) and a.index == 0 for a in alternatives):
                raise TypeError(f"rule '{rule.name}': every alternative a pattern returns must be an op call")
            return cls(alternatives[0].node, [alternatives[0]], builder.nodes, names,
                       [a.node for a in alternatives]).checked_inner_labels(rule)
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        if not outputs or not all(isinstance(o, NodeOutput) for o in outputs):
            raise TypeError(f"rule '{rule.name}': pattern() must return the output of an op call")
        root = outputs[0].node
        if any(o.node is not root for o in outputs):
            raise TypeError(f"rule '{rule.name}': every output a pattern returns must come from its root node")
        return cls(root, outputs, builder.nodes, names).checked_inner_labels(rule)

    def checked_inner_labels(self, rule: RewriteRule) -> CompiledPattern:
        """Itself, once every label in ``rule.also_replaces`` is known to name an inner node of the pattern."""
        inner = {n.label for n in self.nodes if all(n is not root for root in self.roots)}
        roots = {root.label for root in self.roots}
        for label in rule.also_replaces:
            if label in roots:
                raise TypeError(f"rule '{rule.name}': also_replaces names the root '{label}', whose outputs "
                                "rewrite() replaces anyway")
            if label not in inner:
                raise TypeError(f"rule '{rule.name}': also_replaces names '{label}', which is no node of the "
                                f"pattern (its inner nodes: {', '.join(sorted(inner)) or 'none'})")
        return self

    def labels(self) -> dict[int, str]:
        return {id(n): n.label for n in self.nodes}


def _flatten(either: Either) -> list[ValuePattern]:
    """The alternatives of nested ``either`` calls, in order."""
    flat: list[ValuePattern] = []
    for alternative in either.alternatives:
        flat.extend(_flatten(alternative) if isinstance(alternative, Either) else [alternative])
    return flat
