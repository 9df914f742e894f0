"""The rewrite driver: finds matches, asks permission, splices replacements in and cleans up.

Every graph mutation a rule causes happens here, so statistics, bisection (``ctx.allow``), name
keeping and dead-node removal are handled once for all rules.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult
from onnxopt.pattern._pattern import Bindings, Matcher, _same_domain
from onnxopt.pattern._rule import (
    CompiledPattern,
    Match,
    Replacement,
    ReplacementBuilder,
    RewriteRefused,
    RewriteRule,
    _Namer,
)

__all__ = ["Attempt", "Explanation", "RewritePass", "RuleSet", "explain", "rule_pass"]


@dataclass(frozen=True)
class Attempt:
    """One rule tried at one candidate node (a node whose operator is the pattern's root)."""

    rule: str
    graph: str
    node: str
    outcome: str  # "rewritten", "no match", "check failed", "shared", "denied", "refused", "not applicable"
    reason: str = ""

    def __str__(self) -> str:
        where = f" at '{self.node}'" if self.node else ""
        scope = f" in graph '{self.graph}'" if self.graph else ""
        reason = f": {self.reason}" if self.reason else ""
        return f"{self.rule}{where}{scope}: {self.outcome}{reason}"


@dataclass
class Explanation:
    """Why each rule did or did not fire at each candidate; filled in by ``RuleSet.apply``."""

    attempts: list[Attempt] = field(default_factory=list)
    _seen: set[Attempt] = field(default_factory=set, repr=False, compare=False)

    def record(self, attempt: Attempt) -> None:
        # Every sweep of the fixed point asks again; each answer is kept once.
        if attempt not in self._seen:
            self._seen.add(attempt)
            self.attempts.append(attempt)

    def misses(self, rule: str | None = None) -> list[Attempt]:
        """Attempts that did not rewrite, optionally of one rule."""
        fired = {(a.rule, a.graph, a.node) for a in self.attempts if a.outcome == "rewritten"}
        return [a for a in self.attempts if a.outcome != "rewritten" and (rule is None or a.rule == rule)
                and (a.rule, a.graph, a.node) not in fired]

    def format(self, rule: str | None = None) -> str:
        return "\n".join(str(a) for a in self.attempts if rule is None or a.rule == rule)


def _opsets(graph: gs.Graph) -> dict[str, int]:
    versions = {domain: ir.opset_version(graph, domain) for domain in ir.imported_domains(graph)}
    return {("" if d == "ai.onnx" else d): v for d, v in versions.items() if v is not None}


class RuleSet:
    """Rules applied together, over the graph and every subgraph body, until none fires any more."""

    def __init__(self, rules: Iterable[RewriteRule | type[RewriteRule]], max_sweeps: int = 32) -> None:
        self.rules: list[RewriteRule] = [r() if isinstance(r, type) else r for r in rules]
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique in a rule set; repeated: {', '.join(duplicates)}")
        self.max_sweeps = max_sweeps
        for rule in self.rules:
            rule.compiled()  # a broken pattern fails when the set is made, not half way through a model

    def apply(self, graph: gs.Graph, ctx: PassContext | None = None, explain: Explanation | None = None,
              skip: Iterable[str] = ()) -> dict[str, int]:
        """Rewrites ``graph`` in place; returns the number of rewrites per rule name.

        Rules named in ``skip`` do not run (they count 0). ``explain`` (or ``ctx.explain`` when the
        context has one) collects why each rule did or did not fire at each candidate node.
        """
        ctx = ctx or PassContext()
        explain = explain if explain is not None else getattr(ctx, "explain", None)
        opsets = _opsets(graph)
        counts = {rule.name: 0 for rule in self.rules}
        skip = set(skip)
        by_root: dict[str, list[RewriteRule]] = {}
        for rule in self.rules:
            if rule.name in skip:
                continue
            reason = rule.applies_to(opsets) or rule.runs_for(ctx.target)
            if reason is not None:
                if explain is not None:
                    explain.record(Attempt(rule.name, "", "", "not applicable", reason))
                continue
            for op_type in dict.fromkeys(root.op_type for root in rule.compiled().roots):
                by_root.setdefault(op_type, []).append(rule)
        if not by_root:
            return counts
        state = _RunState(graph, ctx, opsets, _Namer(graph), explain)
        for _ in range(self.max_sweeps):
            if not self._sweep(graph, state, by_root, counts):
                break
        else:
            ctx.log.warning("rewrite rules still firing after %d sweeps; stopped", self.max_sweeps)
        return counts

    def _sweep(self, sub: gs.Graph, state: _RunState, by_root: dict[str, list[RewriteRule]],
               counts: dict[str, int]) -> bool:
        """Tries the rules at every node of ``sub``, then in the bodies of the nodes still there."""
        changed = False
        state.begin(sub)
        for node in list(sub.nodes):
            for rule in by_root.get(node.op, ()):
                if not node.outputs:
                    break  # removed by an earlier rewrite of this sweep
                if state.try_rule(rule, sub, node):
                    counts[rule.name] += 1
                    changed = True
                    break
        if changed:
            state.finish(sub)
            ir.toposort(sub)
        # Bodies of removed nodes are skipped: rewriting them would count changes the model no longer has.
        for node in list(sub.nodes):
            for body in ir.subgraphs(node):
                changed |= self._sweep(body, state, by_root, counts)
        return changed


@dataclass
class _RunState:
    graph: gs.Graph
    ctx: PassContext
    opsets: dict[str, int]
    namer: _Namer
    explain: Explanation | None
    # The nodes of the graph being swept, by id, and those removed from it: a membership test and
    # one filtering of the node list per sweep, instead of a scan of the graph for every rewrite.
    members: dict[int, gs.Node] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)

    def begin(self, sub: gs.Graph) -> None:
        self.members = {id(n): n for n in sub.nodes}
        self.removed = set()

    def finish(self, sub: gs.Graph) -> None:
        sub.nodes = [n for n in sub.nodes if id(n) not in self.removed]

    def is_member(self, node: gs.Node) -> bool:
        return self.members.get(id(node)) is node

    def note(self, rule: RewriteRule, sub: gs.Graph, node: gs.Node, outcome: str, reason: str = "") -> None:
        if self.explain is not None:
            scope = "" if sub is self.graph else (sub.name or "subgraph")
            self.explain.record(Attempt(rule.name, scope, _site(node), outcome, reason))

    def try_rule(self, rule: RewriteRule, sub: gs.Graph, node: gs.Node) -> bool:
        compiled = rule.compiled()
        roots = [root for root in compiled.roots if root.op_type == node.op and _same_domain(node.domain, root.domain)]
        if not roots:
            return False
        matcher = Matcher(sub, commute=rule.commute, is_member=self.is_member)
        last: tuple[str, str] | None = None
        for bound in (bound for root in roots for bound in matcher.match_root(root, node)):
            shared = _containment(compiled, bound, sub, node, rule.allow_shared_intermediates, rule.also_replaces)
            if shared is not None:
                last = ("shared", shared)
                continue
            match = _make_match(compiled, bound, sub, self.graph, node)
            try:
                result = rule.check(match)
            except Exception as error:  # any failure in a rule's code: name the rule and the node
                raise RuntimeError(f"rule '{rule.name}' failed checking node '{_site(node)}': "
                                   f"{type(error).__name__}: {error}") from error
            if not result:
                last = ("check failed", result.reason or "check failed")
                continue
            return self._rewrite(rule, compiled, match, sub, node, bound)
        outcome, reason = last if last is not None else ("no match", matcher.failure or "no match")
        self.note(rule, sub, node, outcome, reason)
        return False

    def _rewrite(self, rule: RewriteRule, compiled: CompiledPattern, match: Match, sub: gs.Graph, node: gs.Node,
                 bound: Bindings) -> bool:
        builder = ReplacementBuilder(self.namer, self.opsets, node.name or rule.name)
        try:
            replacement = rule.rewrite(builder, match)
        except RewriteRefused as refused:
            self.note(rule, sub, node, "refused", str(refused))
            return False
        except Exception as error:  # any failure in a rule's code: name the rule and the node
            raise RuntimeError(f"rule '{rule.name}' failed rewriting node '{_site(node)}': "
                               f"{type(error).__name__}: {error}") from error
        result = replacement if isinstance(replacement, Replacement) else Replacement(replacement)
        pairs = _root_pairs(rule, compiled, result.outputs, node)
        inner = _inner_pairs(rule, compiled, result.inner, bound, sub)
        found = _found_pairs(rule, result.found, bound, self.is_member)
        _check_replacements(rule, pairs, inner + found, builder.nodes)
        if not self.ctx.allow(rule.name, _site(node)):
            self.note(rule, sub, node, "denied", "switched off (bisection)")
            return False
        site = _site(node)
        also = [old.name for old, new in inner + found if new is not old]
        found_producers = [old.inputs[0] for old, _ in found]  # read now: splicing detaches them
        _splice(sub, node, pairs + inner + found, builder.nodes, bound, found_producers, self)
        if self.explain is not None:
            made = ", ".join(f"{n.op} '{_site(n)}'" for n in builder.nodes)
            scope = "" if sub is self.graph else (sub.name or "subgraph")
            reason = f"made {made}" if made else "replaced by an existing value"
            if also:
                reason += f"; also replaced {', '.join(repr(name) for name in also)}"
            self.explain.record(Attempt(rule.name, scope, site, "rewritten", reason))
        self.ctx.log.debug("%s rewrote '%s'", rule.name, _site(node))
        return True


def _site(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "")


def _containment(compiled: CompiledPattern, bound: Bindings, sub: gs.Graph, root: gs.Node,
                 allow_shared: bool, replaceable: Sequence[str]) -> str | None:
    """Why this match would lose or duplicate a value, or ``None``.

    Outputs of the root that the pattern does not replace must be unused; values made inside the
    pattern must have no reader outside it and must not be graph outputs (unless the rule allows
    shared intermediates: those nodes then stay), except outputs of the inner nodes labelled in
    ``replaceable`` (the rule's ``also_replaces``), which the rewrite replaces.
    """
    matched = {id(n) for n in bound.nodes.values()}
    replaced = {o.index for o in compiled.outputs}
    for index, tensor in enumerate(root.outputs):
        if index not in replaced and tensor.name and (tensor.outputs or ir.is_graph_output(sub, tensor)):
            return f"output '{tensor.name}' of '{_site(root)}' is used, but the rule does not replace it"
    if allow_shared:
        return None
    labels = compiled.labels()
    for pattern_id, node in bound.nodes.items():
        if node is root or labels[pattern_id] in replaceable:
            continue
        for tensor in node.outputs:
            if ir.is_graph_output(sub, tensor):
                return f"'{tensor.name}' inside the pattern is a graph output"
            if _read_outside(tensor, matched):
                return f"'{tensor.name}' inside the pattern has other readers"
    return None


def _read_outside(tensor: gs.Tensor, matched: set[int]) -> bool:
    return any(id(reader) not in matched for reader in tensor.outputs)


def _root_pairs(rule: RewriteRule, compiled: CompiledPattern, outputs,
                root: gs.Node) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """The root's replaced outputs, each with its new value."""
    values = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if len(values) != len(compiled.outputs) or not all(isinstance(v, gs.Tensor) for v in values):
        raise TypeError(f"rule '{rule.name}': rewrite() must return {len(compiled.outputs)} value(s), "
                        f"got {outputs!r}")
    # Read all replaced values first: taking one over detaches it from the root, shifting the others.
    return [(root.outputs[pattern_output.index], new) for pattern_output, new in zip(compiled.outputs, values)]


def _inner_pairs(rule: RewriteRule, compiled: CompiledPattern, given: Mapping, bound: Bindings,
                 sub: gs.Graph) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """Outputs of the matched nodes the rule lists in ``also_replaces``, each with the value ``rewrite`` gave."""
    unlisted = [label for label in given if label not in rule.also_replaces]
    if unlisted:
        raise TypeError(f"rule '{rule.name}': rewrite() replaces {', '.join(repr(u) for u in unlisted)}, "
                        "which the rule's also_replaces does not list")
    labels = compiled.labels()
    matched = {id(n) for n in bound.nodes.values()}
    pairs = []
    for label in rule.also_replaces:
        nodes = [node for pattern_id, node in bound.nodes.items() if labels[pattern_id] == label]
        if not nodes:  # in an alternative of op.either that did not match
            if given.get(label) is not None:
                raise TypeError(f"rule '{rule.name}': rewrite() replaces '{label}', which did not match here")
            continue
        if len(nodes) > 1:
            raise TypeError(f"rule '{rule.name}': '{label}' in also_replaces names {len(nodes)} matched nodes; "
                            "tell them apart with _tag")
        if label not in given:
            raise TypeError(f"rule '{rule.name}': rewrite() gives no value for '{label}', which the rule's "
                            "also_replaces lists (return a Replacement with inner={...})")
        node = nodes[0]
        values = list(given[label]) if isinstance(given[label], (tuple, list)) else [given[label]]
        if len(values) > len(node.outputs) or not all(v is None or isinstance(v, gs.Tensor) for v in values):
            raise TypeError(f"rule '{rule.name}': the value for '{label}' must be one value or one per output "
                            f"of its node ({len(node.outputs)}), got {given[label]!r}")
        for index, old in enumerate(node.outputs):
            new = values[index] if index < len(values) else None
            if new is not None:
                pairs.append((old, new))
            elif ir.is_graph_output(sub, old) or _read_outside(old, matched):
                raise TypeError(f"rule '{rule.name}': rewrite() gives no value for '{old.name}' (output {index} "
                                f"of '{label}'), which is used outside the pattern")
    return pairs


def _found_pairs(rule: RewriteRule, found: Sequence, bound: Bindings,
                 is_member: Callable[[gs.Node], bool]) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """Values outside the match the rule replaces (``Replacement.found``), checked."""
    pairs = list(found)
    if pairs and not rule.replaces_found_values:
        raise TypeError(f"rule '{rule.name}': rewrite() replaces found values, but the rule does not set "
                        "replaces_found_values")
    matched = {id(n) for n in bound.nodes.values()}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(v, gs.Tensor) for v in pair):
            raise TypeError(f"rule '{rule.name}': Replacement.found holds (old value, new value) pairs, "
                            f"got {pair!r}")
        old = pair[0]
        if len(old.inputs) != 1 or not is_member(old.inputs[0]):
            raise TypeError(f"rule '{rule.name}': found value '{old.name}' is not made by a node of this graph")
        if id(old.inputs[0]) in matched:
            raise TypeError(f"rule '{rule.name}': found value '{old.name}' is made by a matched node "
                            "(list its label in also_replaces instead)")
    return [(old, new) for old, new in pairs]


def _check_replacements(rule: RewriteRule, root_pairs: list, extra_pairs: list, new_nodes: list[gs.Node]) -> None:
    """Refuses a value replaced twice, or a replacement that reads a value it replaces (a cycle)."""
    olds = [id(old) for old, _ in root_pairs + extra_pairs]
    if len(set(olds)) != len(olds):
        raise TypeError(f"rule '{rule.name}': rewrite() replaces one value twice")
    replaced = {id(old): old for old, new in extra_pairs if new is not old}
    if not replaced:
        return  # the root's outputs: nothing the replacement reads can depend on them
    starts = [t for node in new_nodes for t in node.inputs] + [new for _, new in extra_pairs]
    read = _first_ancestor_in(starts, replaced)
    if read is not None:
        raise TypeError(f"rule '{rule.name}': the replacement reads '{read.name}', which it replaces")


def _first_ancestor_in(starts: list[gs.Tensor], targets: dict[int, gs.Tensor]) -> gs.Tensor | None:
    """A value of ``targets`` among ``starts`` and the values they are computed from, or ``None``."""
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in targets:
            return tensor
        for producer in tensor.inputs:
            stack.extend(producer.inputs)
    return None


def _make_match(compiled: CompiledPattern, bound: Bindings, sub: gs.Graph, graph: gs.Graph,
                root: gs.Node) -> Match:
    labels = compiled.labels()
    nodes: dict[str, list[gs.Node]] = {}
    for pattern in compiled.nodes:  # pattern order: inner nodes first, as written
        node = bound.nodes.get(id(pattern))
        if node is not None:
            nodes.setdefault(labels[id(pattern)], []).append(node)
    values = {name: bound.values.get(name) for name in compiled.variables}
    return Match(sub, graph, values, nodes, root)


def _splice(sub: gs.Graph, root: gs.Node, pairs: list[tuple[gs.Tensor, gs.Tensor]], new_nodes: list[gs.Node],
            bound: Bindings, found_producers: list[gs.Node], state: _RunState) -> None:
    """Puts each new value of ``pairs`` in place of its old value and removes the nodes left unused.

    A replacement value made by a new node takes over the old value itself (its name, and its place
    as a graph output); an existing value replaces the old one through ``ir.replace_all_uses``.
    Matched nodes left unused are removed, and so are the makers of replaced found values with what
    only they read.
    """
    named = {new.name for new in new_nodes if new.name}
    if new_nodes and not new_nodes[0].name and root.name not in named:
        new_nodes[0].name = root.name
    sub.nodes.extend(new_nodes)
    state.members.update((id(n), n) for n in new_nodes)
    producers = {id(t): n for n in new_nodes for t in n.outputs}
    taken_over: dict[int, gs.Tensor] = {}  # id of a new value -> the old value now standing for it
    for old, new in pairs:
        new = taken_over.get(id(new), new)  # one new value returned for two outputs
        if new is old:
            continue
        producer = producers.get(id(new))
        if producer is not None and isinstance(old, gs.Variable):
            taken_over[id(new)] = old
            for reader in list(new.outputs):
                for slot, tensor in enumerate(reader.inputs):
                    if tensor is new:
                        reader.inputs[slot] = old
            old.inputs.clear()
            slot = next(i for i, t in enumerate(producer.outputs) if t is new)
            producer.outputs[slot] = old
            if old.dtype is None:
                old.dtype = new.dtype
        else:
            ir.replace_all_uses(sub, old, new)
    candidates = [root] + [n for n in bound.nodes.values() if n is not root] + found_producers
    walk_back = {id(n) for n in found_producers}  # outside the match: what only they read is found by walking
    gone: set[int] = set()
    removed = True
    while removed:
        removed = False
        for node in candidates:
            if id(node) not in gone and not any(t.outputs or ir.is_graph_output(sub, t) for t in node.outputs):
                if id(node) in walk_back:
                    for producer in (p for t in node.inputs for p in t.inputs if state.is_member(p)):
                        if id(producer) not in walk_back:
                            walk_back.add(id(producer))
                            candidates.append(producer)
                # Detached now, dropped from the node list when the sweep of this graph ends. Unlinked by
                # identity: graphsurgeon's own removal compares every reader of an input by value.
                ir.unlink(node)
                gone.add(id(node))
                state.members.pop(id(node), None)
                state.removed.add(id(node))
                removed = True


# ---------------------------------------------------------------------------------------------------
# Passes made of rules


@dataclass(frozen=True)
class RewritePass(Pass):
    """A pass that applies the class's ``rules`` (a ``RuleSet``) to a fixed point.

    ``PassResult.stats`` holds the number of rewrites per rule name. Subclasses set ``name`` and
    ``rules`` (rule objects or classes), ``needs_shapes`` when rules read shapes or dtypes of values
    inside the graph, and may override ``prepare`` for other preparation.
    """

    rules: ClassVar[Sequence[RewriteRule | type[RewriteRule]]] = ()
    needs_shapes: ClassVar[bool] = False  # run ir.infer_shapes first, for rules that read shapes or dtypes
    # Rule names to leave out, joined by '+': ``fuse{disable=noop_pad+conv_mul}``.
    disable: str = ""

    def __post_init__(self) -> None:
        known = [rule.name for rule in self.rule_set().rules]
        unknown = [name for name in self.disabled() if name not in known]
        if unknown:
            raise ValueError(f"no rule named {', '.join(repr(n) for n in unknown)} to disable "
                             f"(rules: {', '.join(known)})")

    def disabled(self) -> list[str]:
        return [name.strip() for name in self.disable.replace(" ", "+").split("+") if name.strip()]

    def rule_set(self) -> RuleSet:
        cached = vars(type(self)).get("_rule_set")
        if cached is None:
            cached = RuleSet(self.rules)
            type.__setattr__(type(self), "_rule_set", cached)
        return cached

    def prepare(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Called before the rules run; infers shapes when ``needs_shapes`` is set."""
        if self.needs_shapes:
            ir.infer_shapes(graph)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.prepare(graph, ctx)
        counts = self.rule_set().apply(graph, ctx, skip=self.disabled())
        return PassResult(modified=any(counts.values()), stats=dict(counts))


def rule_pass(name: str, rules: Sequence[RewriteRule | type[RewriteRule]], description: str | None = None,
              module: str | None = None) -> type[RewritePass]:
    """Makes a pass class named ``name`` from rules: ``MyRules = rule_pass("my-rules", [AddZeroToX()])``.

    The class belongs to the calling module (so that ``--plugin`` files find it).
    """
    module = module or sys._getframe(1).f_globals.get("__name__", __name__)
    rule_set = RuleSet(rules)  # checks the rules (unique names, buildable patterns) now, not at the first run
    doc = description or f"Applies the rewrite rules {', '.join(r.name for r in rule_set.rules)}."
    class_name = "".join(part.capitalize() for part in name.replace("_", "-").split("-") if part) or "Rules"
    cls = type(class_name, (RewritePass,), {"name": name, "rules": tuple(rule_set.rules), "__doc__": doc,
                                            "__module__": module})
    return dataclasses.dataclass(frozen=True)(cls)


def explain(model: onnx.ModelProto | gs.Graph,
            rules: RewritePass | type[RewritePass] | Iterable[RewriteRule | type[RewriteRule]],
            ctx: PassContext | None = None) -> Explanation:
    """Runs rules on a copy of ``model`` and tells, for every candidate node, why each rule fired or not.

    ``rules`` is a list of rules, or a ``RewritePass`` (class or object), whose own preparation (shape
    inference) and disabled rules then apply.
    """
    ctx = ctx or PassContext()
    graph = ir.import_model(model) if isinstance(model, onnx.ModelProto) else model.copy()
    explanation = Explanation()
    if isinstance(rules, type) and issubclass(rules, RewritePass):
        rules = rules()
    if isinstance(rules, RewritePass):
        rules.prepare(graph, ctx)
        rules.rule_set().apply(graph, ctx, explanation, skip=rules.disabled())
        return explanation
    ir.infer_shapes(graph)
    RuleSet(rules).apply(graph, ctx, explanation)
    return explanation
