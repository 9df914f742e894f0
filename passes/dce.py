"""``dce``: dead-code elimination.

Removes every node no graph output depends on (in subgraph bodies too, where a node counts as used when
anything of an enclosing graph reads its value), bypasses ``Identity`` nodes and what computes the same
(Casts to the type the value already has, adding 0, multiplying or dividing by 1, and-ing with true), drops
the initial states of LSTM, GRU and RNN nodes that are zeros (an absent initial state is zeros; Keras
exports build them with Shape, Expand and friends), and drops opset imports no node uses. Constants that
lose their last reader disappear with them. Graph inputs and outputs are never removed: an ``Identity``
that is the only way to give an output its name stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult


def _is_io(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs) or any(t is tensor for t in graph.outputs)


# x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1 and x ** 1 are x (for every x, NaN and infinities included), and
# so are x and true, x or false, x xor false (masks a converter combined with a constant).
_NEUTRAL = {"Add": (0, (0, 1)), "Sub": (0, (1,)), "Mul": (1, (0, 1)), "Div": (1, (1,)), "Pow": (1, (1,)),
            "And": (True, (0, 1)), "Or": (False, (0, 1)), "Xor": (False, (0, 1))}


def _broadcast_keeps_shape(constant: np.ndarray, shape) -> bool:
    """Broadcasting ``constant`` against a value of ``shape`` leaves the value's shape as it was."""
    if shape is None or constant.ndim > len(shape):
        return False
    dims = list(shape)[len(shape) - constant.ndim:]
    return all(c == 1 or (isinstance(d, int) and c == d) for c, d in zip(constant.shape, dims))


def _identity_source(node: gs.Node) -> gs.Tensor | None:
    """The input a node passes on unchanged, if it is an identity in disguise, else ``None``.

    Identity; Cast to the type its input already has; arithmetic with a neutral constant (adding 0,
    multiplying or dividing by 1) that broadcasting does not widen and that has the value's type.
    """
    if node.domain not in ("", None, "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op == "Identity" and len(node.inputs) == 1:
        return node.inputs[0]
    if node.op == "Cast" and len(node.inputs) == 1 and node.inputs[0].dtype is not None and "to" in node.attrs:
        try:
            same = np.dtype(node.inputs[0].dtype) == onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
        except (TypeError, KeyError, ValueError):
            return None
        return node.inputs[0] if same else None
    if node.op in _NEUTRAL and len(node.inputs) == 2:
        neutral, slots = _NEUTRAL[node.op]
        for slot in slots:
            constant, value = ir.constant_value(node.inputs[slot]), node.inputs[1 - slot]
            if constant is None or constant.size > 1 << 20 or value.dtype is None:
                continue
            try:
                same_type = np.dtype(value.dtype) == constant.dtype
            except TypeError:  # types numpy lacks (bfloat16, float8) are kept as ONNX type numbers
                continue
            if same_type and _broadcast_keeps_shape(constant, value.shape) and constant.dtype.kind in "iufb" \
                    and bool(np.all(constant == neutral)):
                return value
    return None


def _bypass_identities(graph: gs.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        source = _identity_source(node) if node.outputs else None
        if source is None:
            continue
        result = node.outputs[0]
        if not ir.is_graph_output(graph, result):
            ir.remove_nodes(graph, [node])
            for consumer in list(result.outputs):
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is result:
                        consumer.inputs[index] = source
            removed += 1
            continue
        producer_here = len(source.inputs) == 1 and ir.is_local(graph, source.inputs[0])
        if producer_here and not _is_io(graph, source) and isinstance(source, gs.Variable):
            ir.remove_nodes(graph, [node])
            ir.replace_all_uses(graph, result, source)
            removed += 1
    return removed


# Optional inputs of the recurrent operators whose absence means zeros: initial_h (and LSTM's initial_c).
_ZERO_DEFAULT_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
# Operators that give zeros for zeros: moving, repeating, reshaping or converting elements.
_ZERO_PRESERVING = frozenset({"Expand", "Tile", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast",
                              "Identity"})


def _is_zeros(tensor: gs.Tensor, depth: int = 8) -> bool:
    """Whether every element of ``tensor`` is zero whatever the inputs (an all-zero constant, a
    ConstantOfShape of zero, or one of those moved, repeated, reshaped or cast)."""
    value = ir.constant_value(tensor)
    if value is not None:
        return value.dtype.kind in "iufb" and not np.any(value)
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if producer.domain not in ("", None, "ai.onnx"):
        return False
    if producer.op == "ConstantOfShape":
        fill = producer.attrs.get("value")
        return fill is None or (isinstance(fill, gs.Constant) and not np.any(fill.values))
    return producer.op in _ZERO_PRESERVING and bool(producer.inputs) and _is_zeros(producer.inputs[0], depth - 1)


def _drop_zero_initial_states(graph: gs.Graph) -> int:
    """Removes initial states that are zeros from LSTM, GRU and RNN nodes: absent, they are zeros."""
    dropped = 0
    for node in graph.nodes:
        slots = _ZERO_DEFAULT_INPUTS.get(node.op, ()) if node.domain in ("", None, "ai.onnx") else ()
        for index in slots:
            if index < len(node.inputs) and node.inputs[index].name and _is_zeros(node.inputs[index]):
                node.inputs[index] = gs.Variable.empty()
                dropped += 1
        while node.inputs and not node.inputs[-1].name:
            node.inputs.pop()
    return dropped


def _remove_dead(graph: gs.Graph) -> int:
    live: set[str] = {t.name for t in graph.outputs}
    kept: list[gs.Node] = []
    dead: list[gs.Node] = []
    for node in reversed(graph.nodes):
        if any(t.name in live for t in node.outputs if t.name):
            kept.append(node)
            live |= {t.name for t in node.inputs if t.name}
            for sub in ir.subgraphs(node):
                live |= ir.outer_scope_names(sub)
        else:
            dead.append(node)
    if dead:
        ir.remove_nodes(graph, dead)
    return len(dead)


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Removes nodes, constants, Identity nodes and opset imports that no graph output depends on."""

    name: ClassVar[str] = "dce"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        identities = nodes = states = 0
        for sub in reversed(list(ir.all_graphs(graph))):
            identities += _bypass_identities(sub)
            states += _drop_zero_initial_states(sub)
            nodes += _remove_dead(sub)
        used = ir.used_domains(graph) | {"", "ai.onnx"}
        domains_before = len(graph.import_domains or [])
        if graph.import_domains is not None:
            graph.import_domains = [d for d in graph.import_domains if d.domain in used]
        opsets = domains_before - len(graph.import_domains or [])
        stats = {"identities_removed": identities, "dead_nodes_removed": nodes, "opset_imports_removed": opsets,
                 "zero_initial_states_dropped": states}
        return PassResult(modified=bool(identities or nodes or opsets or states), stats=stats)
