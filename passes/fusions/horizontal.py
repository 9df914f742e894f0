"""Projections of one input merged into one wider matrix product (horizontal fusion).

* ``parallel_matmuls_to_split``: ``x·W_1 + b_1, ..., x·W_n + b_n`` (n >= 2) ->
  ``Split(x·[W_1 ... W_n] + [b_1 ... b_n], axis=-1)``, e.g. the query, key and value projections of an
  attention layer: three MatMul + Add become one MatMul, one Add and one Split. Each projection is a
  ``MatMul(x, W)``, optionally followed by an ``Add`` of a constant bias read by nothing else, or a
  ``Gemm(x, W, c)`` with ``transA = 0``, ``alpha = beta = 1`` (``transB`` is applied to the constant).

Exactness: column block ``i`` of ``x·[W_1 ... W_n]`` is ``x·W_i`` and the bias is added per column, so
the Split's output ``i`` is projection ``i``'s value; only the summation order of the bigger product may
differ. Conditions: every weight is a constant 2-D matrix of one numeric type (the same ``K`` rows, as
each multiplies ``x``) read by nothing else (a shared weight would be stored twice); every bias is a
constant with one value per column (shape ``[N]``, ``[1, N]``, ... or one value) that does not raise the
product's rank; a projection without a bias gets zeros. The fused product is a Gemm when a member was a
Gemm (``x`` is then 2-D), else a MatMul and, if any projection has a bias, an Add. Opset 11 or later
(Split's negative axis). Each projection's result keeps its name, now as an output of the Split.

The pattern matches one projection; its rewrite builds the packed projection and replaces every member
at once: the matched one as the root's output, the others as values the rule found
(``Replacement.found``), whose nodes the driver then removes. The statistic counts one rewrite per
packing.

Targets: generic only. Not ``ort``: ``ort_fuse``'s ``packed_attention`` packs the three
projections into ``com.microsoft.Attention`` itself and needs them apart, and onnxruntime's own
optimizer, which fuses no Attention on the corpus' BERT either way, would count 24 fewer Gemm there (a
regression to the fusion census). Not TensorRT, which could not be checked here and packs layers that
read one tensor itself. Not OpenVINO: its CPU plugin runs the packed BERT fine (845 -> 714 runtime
nodes, no slower within this machine's noise), but the fusion census counts 24 fewer FullyConnected, and
a packing it cannot tell from a lost fusion is not worth a warning on every transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Target
from onnxopt.pattern import Match, MatchResult, Replacement, RewriteRule

# Types whose constants are concatenated exactly and that MatMul multiplies.
PRODUCT_TYPES = frozenset(np.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64", "uint32", "uint64"))


def _standard(node: gs.Node, op_type: str) -> bool:
    return node.op == op_type and node.domain in ("", None, "ai.onnx")


@dataclass(frozen=True)
class Projection:
    """One ``x·W (+ b)`` reading the shared ``x``: its product node, its bias Add if any, its constants.

    The weight's data is read only when needed (comparing or packing): matching reads only its shape and
    type, and a weight copied out of its TensorProto for every candidate made this rule the slowest part of
    ``fuse`` on transformers.
    """

    product: gs.Node  # MatMul or Gemm
    bias_add: gs.Node | None
    weight_tensor: gs.Tensor
    transposed: bool  # Gemm's transB: the product multiplies by the constant's transpose
    shape: tuple[int, int]  # [K, N], as multiplied
    dtype: np.dtype
    bias: np.ndarray | None  # [N], or None

    @cached_property
    def weight(self) -> np.ndarray:
        """``[K, N]``, as multiplied (Gemm's transB applied)."""
        weight = ir.constant_value(self.weight_tensor)
        return weight.T if self.transposed else weight

    @property
    def last(self) -> gs.Node:
        """The node whose output is the projection's value."""
        return self.bias_add if self.bias_add is not None else self.product

    @property
    def result(self) -> gs.Tensor:
        return self.last.outputs[0]

    @property
    def columns(self) -> int:
        return self.shape[1]

    def bias_or_zeros(self) -> np.ndarray:
        return self.bias if self.bias is not None else np.zeros(self.columns, self.dtype)


def per_column(value: np.ndarray, columns: int, result_rank: int | None) -> np.ndarray | None:
    """``value`` as one bias per column of a ``[..., columns]`` product, or ``None`` if it is not one.

    It must be one value, or ``columns`` values on its last axis with 1 elsewhere, and must not have
    more axes than the product (which would broadcast the result to a larger shape).
    """
    if value.ndim > (1 if result_rank is None else max(result_rank, 1)):
        return None
    if value.size == 1:
        return np.full(columns, value.reshape(-1)[0], value.dtype)
    if value.shape[-1] != columns or value.size != columns:
        return None
    return value.reshape(columns)


def _result_rank(x: gs.Tensor) -> int | None:
    return None if x.shape is None else max(len(x.shape), 1)


def _gemm_projection(node: gs.Node, x: gs.Tensor) -> Projection | str:
    attrs = node.attrs
    if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
        return "the Gemm transposes x or scales by alpha or beta"
    spec = ir.constant_shape_dtype(node.inputs[1])
    if spec is None or len(spec[0]) != 2:
        return "the Gemm's B is not a constant matrix"
    transposed = bool(attrs.get("transB", 0))
    shape = spec[0][::-1] if transposed else spec[0]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = ir.constant_value(node.inputs[2])
        # Gemm's C broadcasts to [M, N]: only a row ([N], [1, N]) or one value is the same for every x.
        bias = None if c is None else per_column(c, shape[1], 2)
        if bias is None:
            return "the Gemm's C is not a constant with one value per column"
    return Projection(node, None, node.inputs[1], transposed, shape, spec[1], bias)


def _bias_add(product: gs.Node, columns: int, rank: int | None, graph: gs.Graph) -> tuple[gs.Node, np.ndarray] | None:
    """The Add of a constant per-column bias that alone reads ``product``'s output, with the bias."""
    out = product.outputs[0]
    if ir.is_graph_output(graph, out) or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if not _standard(add, "Add") or len(add.inputs) != 2 or all(t is out for t in add.inputs):
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = ir.constant_value(other, max_size=columns)
    bias = None if value is None else per_column(value, columns, rank)
    return None if bias is None else (add, bias)


def projection_of(node: gs.Node, x: gs.Tensor, graph: gs.Graph) -> Projection | str:
    """The projection ``node`` (a reader of ``x``) starts, or why it is not one."""
    if len(node.inputs) < 2 or node.inputs[0] is not x or node.inputs[1] is x:
        return f"'{node.name}' does not multiply x on the left"
    if _standard(node, "Gemm"):
        found = _gemm_projection(node, x)
    elif _standard(node, "MatMul") and len(node.inputs) == 2:
        spec = ir.constant_shape_dtype(node.inputs[1])
        if spec is None or len(spec[0]) != 2:
            return "the weight is not a constant matrix"
        shape, dtype = spec
        bias = _bias_add(node, shape[1], _result_rank(x), graph)
        found = Projection(node, None if bias is None else bias[0], node.inputs[1], False, shape, dtype,
                           None if bias is None else bias[1])
    else:
        return f"'{node.name}' is not a MatMul or Gemm"
    if isinstance(found, str):
        return found
    if len(node.inputs[1].outputs) != 1:
        return "the weight is read by other nodes too (packing would store it twice)"
    if found.dtype not in PRODUCT_TYPES:
        return f"the weight is {found.dtype}"
    if found.bias is not None and found.bias.dtype != found.dtype:
        return "the bias and the weight have different types"
    return found


def packing_split(projection: Projection, graph: gs.Graph) -> gs.Node | None:
    """The Split over the last axis that alone reads ``projection``'s value: it is a packed projection."""
    out = projection.result
    if ir.is_graph_output(graph, out) or len(out.outputs) != 1:
        return None
    split = out.outputs[0]
    if not _standard(split, "Split") or split.inputs[0] is not out:
        return None
    axis = int(split.attrs.get("axis", 0))
    rank = None if out.shape is None else len(out.shape)
    return split if axis == -1 or (rank is not None and axis == rank - 1) else None


def readers(x: gs.Tensor, graph: gs.Graph) -> list[gs.Node]:
    """The nodes of ``graph`` reading ``x``, each once, in order."""
    seen: dict[int, gs.Node] = {}
    for node in x.outputs:
        if ir.is_local(graph, node):
            seen.setdefault(id(node), node)
    return list(seen.values())


def siblings(member: Projection, x: gs.Tensor, graph: gs.Graph) -> list[Projection]:
    """The projections of ``x`` that can be packed with ``member``, ``member`` included, in graph order."""
    found = []
    for node in readers(x, graph):
        other = member if node is member.product else projection_of(node, x, graph)
        if isinstance(other, str) or packing_split(other, graph) is not None:
            continue
        if other.dtype == member.dtype and other.shape[0] == member.shape[0]:
            found.append(other)
    return found


class ParallelMatMulsToSplit(RewriteRule):
    """Packs MatMul(x, W_i) (+ b_i) of one x into one MatMul (+ Add) and a Split, all members in one rewrite."""

    name = "parallel_matmuls_to_split"
    min_opset = 11  # Split along axis -1
    targets = frozenset({Target.GENERIC})
    replaces_found_values = True  # the other members: projections of x outside the matched one

    def pattern(self, op, x, w, b):
        return op.either(op.Add(op.MatMul(x, w, _tag="product"), b, _tag="bias"), op.MatMul(x, w, _tag="product"),
                         op.Gemm(x, w, op.optional(b), _tag="product"))

    def member(self, m: Match) -> Projection | str:
        """The projection the matched root ends, or why it is none."""
        member = projection_of(m.node("product"), m["x"], m.graph)
        if isinstance(member, str):
            return member
        if member.last is not m.root:
            if m.has_node("bias"):
                return "the Add does not add a constant per-column bias"
            return "its bias Add joins the packing where the Add is matched"
        if packing_split(member, m.graph) is not None:
            return "it is already a packed projection (read by one Split over the last axis)"
        return member

    def check(self, m: Match) -> MatchResult:
        member = self.member(m)
        if isinstance(member, str):
            return m.fail(member)
        if len(siblings(member, m["x"], m.graph)) < 2:
            return m.fail("no other projection of the same input with the same type")
        return m.ok()

    def rewrite(self, op, m: Match) -> Replacement:
        member = self.member(m)
        x = m["x"]
        members = siblings(member, x, m.graph)
        weight = np.concatenate([p.weight for p in members], axis=1)
        with_bias = any(p.bias is not None for p in members)
        bias = np.concatenate([p.bias_or_zeros() for p in members]) if with_bias else None
        hint = f"{m.root.name or 'projection'}_packed"
        if any(p.product.op == "Gemm" for p in members):
            packed_bias = op.const(bias, f"{hint}_bias") if with_bias else None
            packed = op.Gemm(x, op.const(weight, f"{hint}_weight"), packed_bias)
        else:
            packed = op.MatMul(x, op.const(weight, f"{hint}_weight"))
            if with_bias:
                packed = op.Add(packed, op.const(bias, f"{hint}_bias"))
        sizes = [p.columns for p in members]
        if (m.opset() or 0) >= 13:
            outputs = op.Split(packed, op.const(np.array(sizes, np.int64), f"{hint}_sizes"), axis=-1,
                               _outputs=len(members))
        else:
            outputs = op.Split(packed, axis=-1, split=sizes, _outputs=len(members))
        mine = next(i for i, p in enumerate(members) if p.product is member.product)
        others = [(p.result, output) for i, (p, output) in enumerate(zip(members, outputs)) if i != mine]
        return Replacement(outputs[mine], found=others)


RULES = (ParallelMatMulsToSplit(),)
