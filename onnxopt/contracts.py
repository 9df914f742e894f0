"""Invariants every pass must keep, checked by the pass manager between passes.

A graph is well formed when its nodes are topologically sorted, every value is produced exactly once,
every value a node reads exists (in its graph or an enclosing one), every operator's domain is imported,
and the graph's inputs and outputs have the names, order and types the original model declared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir


@dataclass(frozen=True)
class IOSignature:
    """Names, dtypes and shapes of a graph's inputs and outputs, in order."""

    inputs: tuple[tuple[str, str | None, tuple | None], ...]
    outputs: tuple[tuple[str, str | None, tuple | None], ...]

    @classmethod
    def of(cls, graph: gs.Graph) -> IOSignature:
        return cls(tuple(_describe(t) for t in graph.inputs), tuple(_describe(t) for t in graph.outputs))


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _describe(tensor: gs.Tensor) -> tuple[str, str | None, tuple | None]:
    shape = tuple(tensor.shape) if tensor.shape is not None else None
    return tensor.name, _dtype_name(tensor.dtype), shape


def _check_scope(graph: gs.Graph, available: set[str], where: str, problems: list[str]) -> None:
    produced_later = {t.name for node in graph.nodes for t in node.outputs}
    defined = set(available) | {t.name for t in graph.inputs}
    for tensor in graph.inputs:
        if tensor.inputs:
            problems.append(f"{where}input '{tensor.name}' is also produced by node '{tensor.inputs[0].name}'")
    for node in graph.nodes:
        for tensor in node.inputs:
            if not tensor.name or isinstance(tensor, gs.Constant) or tensor.name in defined:
                continue
            if tensor.name in produced_later:
                problems.append(f"{where}not topologically sorted: node '{node.name}' ({node.op}) reads "
                                f"'{tensor.name}' before it is produced")
            else:
                problems.append(f"{where}dangling reference: node '{node.name}' ({node.op}) reads "
                                f"'{tensor.name}', which nothing produces")
        for sub in ir.subgraphs(node):
            _check_scope(sub, defined, f"{where}subgraph '{sub.name}' of node '{node.name}': ", problems)
        for tensor in node.outputs:
            if not tensor.name:
                continue
            if tensor.name in defined:
                problems.append(f"{where}value '{tensor.name}' is produced more than once (again by node "
                                f"'{node.name}')")
            defined.add(tensor.name)
            if len(tensor.inputs) > 1:
                problems.append(f"{where}value '{tensor.name}' has {len(tensor.inputs)} producers")
    for tensor in graph.outputs:
        if not isinstance(tensor, gs.Constant) and tensor.name not in defined:
            problems.append(f"{where}graph output '{tensor.name}' is not produced")


def check_graph(graph: gs.Graph, signature: IOSignature | None = None) -> list[str]:
    """Returns a description of every broken invariant; an empty list means the graph is well formed."""
    problems: list[str] = []
    _check_scope(graph, set(), "", problems)
    imported = {domain for domain in ir.imported_domains(graph)}
    for domain in sorted(ir.used_domains(graph) - imported - {"ai.onnx"}):
        problems.append(f"operator domain '{domain or 'ai.onnx'}' is used but not imported")
    if signature is not None:
        now = IOSignature.of(graph)
        if [n for n, _, _ in now.inputs] != [n for n, _, _ in signature.inputs]:
            problems.append(f"graph inputs changed from {[n for n, _, _ in signature.inputs]} to "
                            f"{[n for n, _, _ in now.inputs]}")
        if [n for n, _, _ in now.outputs] != [n for n, _, _ in signature.outputs]:
            problems.append(f"graph outputs changed from {[n for n, _, _ in signature.outputs]} to "
                            f"{[n for n, _, _ in now.outputs]}")
        sides = (("input", signature.inputs, now.inputs), ("output", signature.outputs, now.outputs))
        for kind, before, after in sides:
            for (name, dtype, shape), (_, new_dtype, new_shape) in zip(before, after):
                if dtype is not None and new_dtype is not None and dtype != new_dtype:
                    problems.append(f"graph {kind} '{name}' changed dtype from {dtype} to {new_dtype}")
                if kind == "input" and shape != new_shape:
                    problems.append(f"graph input '{name}' changed shape from {shape} to {new_shape}")
    return problems
