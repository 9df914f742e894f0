"""``cse``: common-subexpression elimination.

Two nodes with the same operator, domain, attributes and inputs compute the same outputs, so the later
one is dropped and its readers read the earlier one's outputs. Two constants with the same dtype, shape
and bytes are the same value, so readers of the later one read the first. Never merged: operators that
draw random numbers (their results differ on every call), nodes with subgraph attributes, nodes in
custom domains (their semantics are unknown), constants that are graph outputs or that callers may
override as graph inputs. Runs in subgraph bodies too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult

NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}


def _tensor_bytes(array: np.ndarray) -> bytes:
    return array.tobytes() if array.dtype != object else repr(array.tolist()).encode()


def _attribute_key(value) -> object | None:
    """A hashable stand-in for an attribute value; ``None`` when the value cannot be compared."""
    if isinstance(value, gs.Graph):
        return None
    if isinstance(value, gs.Constant):
        array = ir.constant_array(value)
        # dtype.str is "<V1" for several float8 and 4-bit types: the name tells them apart. A string
        # tensor's tobytes() are pointers (to objects freed and reused between calls): hash the contents.
        return ("tensor", array.dtype.name, array.shape, hashlib.sha256(_tensor_bytes(array)).hexdigest())
    if isinstance(value, (list, tuple)):
        parts = [_attribute_key(v) for v in value]
        return None if any(p is None for p in parts) else tuple(parts)
    if isinstance(value, float):
        return ("float", np.float32(value).tobytes())
    if isinstance(value, (int, str, bytes, bool)):
        return value
    return repr(value)


def _node_key(node: gs.Node) -> tuple | None:
    if node.domain not in ("", None, "ai.onnx") or node.op in NONDETERMINISTIC:
        return None
    attributes = []
    for name in sorted(node.attrs):
        key = _attribute_key(node.attrs[name])
        if key is None:
            return None
        attributes.append((name, key))
    inputs = tuple(id(t) if t.name else None for t in node.inputs)
    return node.op, inputs, tuple(attributes), len(node.outputs)


def _merge_nodes(graph: gs.Graph) -> int:
    seen: dict[tuple, gs.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if not node.outputs:
            continue
        key = _node_key(node)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(bool(a.name) != bool(b.name) for a, b in zip(first.outputs, node.outputs)):
            continue
        outputs = list(node.outputs)
        ir.remove_nodes(graph, [node])
        for duplicate, original in zip(outputs, first.outputs):
            if duplicate.name:
                ir.replace_all_uses(graph, duplicate, original)
        merged += 1
    return merged


def _merge_constants(graph: gs.Graph) -> int:
    """Makes readers of identical constants read one of them; hashes only tensors whose shapes collide."""
    protected = {id(t) for sub in ir.all_graphs(graph) for t in sub.outputs}
    constants: dict[int, gs.Constant] = {}
    for sub in ir.all_graphs(graph):
        for node in sub.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and id(tensor) not in protected:
                    constants.setdefault(id(tensor), tensor)
    names: dict[str, set[int]] = {}
    for sub in ir.all_graphs(graph):
        for tensor in [*sub.inputs, *sub.outputs, *(t for n in sub.nodes for t in (*n.inputs, *n.outputs))]:
            names.setdefault(tensor.name, set()).add(id(tensor))
    by_layout: dict[tuple, list[gs.Constant]] = {}
    for constant in constants.values():
        by_layout.setdefault((str(constant.dtype), tuple(constant.shape)), []).append(constant)
    merged = 0
    for group in by_layout.values():
        if len(group) < 2:
            continue
        first_of: dict[bytes, gs.Constant] = {}
        by_sample: dict[bytes, int] = {}
        candidates = []
        for constant in group:
            if len(names.get(constant.name, ())) > 1:
                # Sibling subgraphs may reuse a name for different values: a reader moved to this constant
                # could then read another tensor of the same name in its own scope.
                continue
            # Hashing every large weight in full is slow on big models where many share a shape; a
            # strided sample tells most apart, and only tensors whose samples collide are hashed whole.
            array = ir.constant_array(constant)
            sample = hashlib.sha256(_tensor_bytes(array.reshape(-1)[:: max(1, array.size // 4096)])).digest()
            by_sample[sample] = by_sample.get(sample, 0) + 1
            candidates.append((constant, sample))
        for constant, sample in candidates:
            if by_sample[sample] < 2:
                continue
            digest = hashlib.sha256(_tensor_bytes(ir.constant_array(constant))).digest()
            keeper = first_of.setdefault(digest, constant)
            if keeper is constant:
                continue
            for consumer in list(constant.outputs):
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is constant:
                        consumer.inputs[index] = keeper
            merged += 1
    return merged


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merges nodes that compute the same thing from the same inputs, and identical constants."""

    name: ClassVar[str] = "cse"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        constants = _merge_constants(graph)
        nodes = 0
        for sub in list(ir.all_graphs(graph)):
            nodes += _merge_nodes(sub)
        return PassResult(modified=bool(constants or nodes),
                          stats={"nodes_merged": nodes, "constants_merged": constants})
