"""Transposes folded into matrix products, and moved through element-wise operators until they cancel.

* ``transpose_gemm``: ``Gemm(Transpose(A), B)`` -> ``Gemm(A, B, transA=1)`` (either operand, each flag
  flipped), for the 2-D transpose ``perm = [1, 0]``.
* ``transpose_matmul``: ``MatMul(a, Transpose(W))`` with ``W`` a constant read by nothing else -> ``MatMul(a,
  W')`` with ``W'`` the transposed constant (any ``perm``; either operand); and, for 2-D operands of a
  floating-point type, ``MatMul(Transpose(a), Transpose(b))`` -> ``Gemm(a, b, transA, transB)`` (opset 11,
  where Gemm's ``C`` is optional).
* ``transpose_elementwise``: ``Transpose(E(u, v))`` for an element-wise ``E`` -> ``E(Transpose(u),
  Transpose(v))``, only when the Transpose count goes down: a Transpose put on an operand disappears
  when the operand is a constant (transposed here, after padding its shape with leading 1s as
  broadcasting does), has only dimensions of size 1 (it stays as it is), or is computed - through more
  such element-wise operators read by nothing else - from Transposes read by nothing else, with which
  the moved one composes (``transpose_transpose``). An operand of the full rank where it does not
  disappear keeps a new Transpose, allowed only when fewer stay than go: the moved one, and each
  operand's own Transpose that it undoes (ConvNeXt's ``Transpose(x + Transpose(m))`` at stage ends).
* ``elementwise_transposes``: ``E(Transpose(a, p), Transpose(b, p))`` -> ``Transpose(E(a, b), p)``: two
  Transposes become one.

Both are exact: an element-wise operator commutes with any permutation of the axes of all its operands,
and broadcasting aligns trailing axes, which a constant padded to the full rank keeps aligned.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pattern import Match, MatchResult, RewriteRule

from .common import ALL_TARGETS

UNARY_OPS = ("Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Cast", "LeakyRelu",
             "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Sin", "Cos", "Floor",
             "Ceil", "Round", "Sign", "Not", "Gelu", "Mish", "ThresholdedRelu", "IsNaN")
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Equal", "Less", "Greater", "LessOrEqual",
              "GreaterOrEqual", "And", "Or", "Xor")
# Clip's bounds are scalars: they stay as they are when its data input is transposed.
SCALAR_OPERANDS = {"Clip": (1, 2)}
PUSH_DEPTH = 8  # how far back the look for absorbing Transposes goes
GEMM_TYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def perm_of(node: gs.Node) -> list[int] | None:
    """A Transpose's permutation; without ``perm`` it reverses the axes, which needs the rank."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    shape = node.inputs[0].shape
    return None if shape is None else list(reversed(range(len(shape))))


def is_elementwise(node: gs.Node) -> bool:
    if node.domain not in ("", None, "ai.onnx") or len(node.outputs) != 1:
        return False
    if node.op in UNARY_OPS or node.op == "Clip":
        return True
    return node.op in BINARY_OPS and len(node.inputs) == 2


def data_operands(node: gs.Node) -> list[int]:
    """The input slots of an element-wise node that carry data (not Clip's scalar bounds)."""
    scalars = SCALAR_OPERANDS.get(node.op, ())
    return [i for i, t in enumerate(node.inputs) if t.name and i not in scalars]


def all_ones(tensor: gs.Tensor, rank: int) -> bool:
    shape = tensor.shape
    return shape is not None and len(shape) <= rank and all(d == 1 for d in shape)


def single_reader(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return len(tensor.outputs) == 1 and not ir.is_graph_output(graph, tensor)


def absorbs(tensor: gs.Tensor, rank: int, graph: gs.Graph, depth: int = PUSH_DEPTH) -> bool:
    """Whether a Transpose of ``rank`` axes placed on ``tensor`` disappears once moved as far as it goes."""
    value = ir.constant_value(tensor) if ir.is_constant(tensor) else None
    if value is not None:
        return value.ndim <= rank
    if all_ones(tensor, rank):
        return True
    if len(tensor.inputs) != 1 or not single_reader(tensor, graph) or depth == 0:
        return False
    producer = tensor.inputs[0]
    if not ir.is_local(graph, producer):
        return False
    if producer.op == "Transpose" and producer.domain in ("", None, "ai.onnx"):
        perm = perm_of(producer)
        return perm is not None and len(perm) == rank
    return is_elementwise(producer) and all(
        absorbs(producer.inputs[i], rank, graph, depth - 1) for i in data_operands(producer))


def cancels(tensor: gs.Tensor, perm: list[int], graph: gs.Graph) -> bool:
    """Whether ``tensor`` is the only use of a Transpose that ``perm`` undoes: both go."""
    if len(tensor.inputs) != 1 or not single_reader(tensor, graph):
        return False
    producer = tensor.inputs[0]
    inner = perm_of(producer) if producer.op == "Transpose" and producer.domain in ("", None, "ai.onnx") else None
    return inner is not None and len(inner) == len(perm) and [inner[p] for p in perm] == list(range(len(perm)))


def transposed_operand(op, tensor: gs.Tensor, perm: list[int]):
    """``tensor`` with ``perm`` applied: a transposed constant, itself (all ones), or a new Transpose."""
    value = ir.constant_value(tensor) if ir.is_constant(tensor) else None
    if value is not None:
        padded = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
        return op.const(np.ascontiguousarray(np.transpose(padded, perm)), f"{tensor.name}_transposed")
    if all_ones(tensor, len(perm)):
        return tensor
    return op.Transpose(tensor, perm=perm)


class TransposeIntoGemm(RewriteRule):
    """Replaces Gemm(Transpose(A), Transpose(B), C) with Gemm(A, B, C) and transA/transB flipped."""

    name = "transpose_gemm"
    targets = ALL_TARGETS

    def pattern(self, op, a, b, c):
        return op.Gemm(op.either(op.Transpose(a, _tag="left"), a), op.either(op.Transpose(b, _tag="right"), b),
                       op.optional(c))

    def check(self, m: Match) -> MatchResult:
        tags = [tag for tag in ("left", "right") if m.has_node(tag)]
        if not tags:
            return m.fail("no operand is transposed")
        if any(perm_of(m.node(tag)) != [1, 0] for tag in tags):
            return m.fail("a Transpose is not the 2-D [1, 0]")
        return m.ok()

    def rewrite(self, op, m: Match):
        attrs = m.attrs("Gemm")
        if m.has_node("left"):
            attrs["transA"] = 1 - int(attrs.get("transA", 0))
        if m.has_node("right"):
            attrs["transB"] = 1 - int(attrs.get("transB", 0))
        return op.Gemm(m["a"], m["b"], m["c"], _name=m.node("Gemm").name, **attrs)


class TransposeIntoMatMul(RewriteRule):
    """Folds a Transpose of a constant MatMul operand into the constant, or 2-D transposes into a Gemm."""

    name = "transpose_matmul"
    targets = ALL_TARGETS

    def pattern(self, op, a, b):
        return op.MatMul(op.either(op.Transpose(a, _tag="left"), a), op.either(op.Transpose(b, _tag="right"), b))

    def check(self, m: Match) -> MatchResult:
        tags = [tag for tag in ("left", "right") if m.has_node(tag)]
        if not tags:
            return m.fail("no operand is transposed")
        if self.folded_constants(m):
            return m.ok()
        if (m.opset() or 0) < 11:
            return m.fail("Gemm needs its C input before opset 11")
        if any(perm_of(m.node(tag)) != [1, 0] for tag in tags):
            return m.fail("a Transpose of a non-constant operand is not the 2-D [1, 0]")
        shapes = [m.shape(name) for name in ("a", "b")]
        if any(shape is None or len(shape) != 2 for shape in shapes):
            return m.fail("the operands are not known to be 2-D")
        if m.dtype("a") not in GEMM_TYPES:
            return m.fail(f"Gemm here only for floating-point types, not {m.dtype('a')}")
        return m.ok()

    def folded_constants(self, m: Match) -> list[str]:
        """Operands whose transposed constant can replace the Transpose (no other reader keeps the original)."""
        folded = []
        for tag, name in (("left", "a"), ("right", "b")):
            if m.has_node(tag) and m.value(name) is not None and len(m[name].outputs) == 1 and perm_of(m.node(tag)):
                folded.append(name)
        return folded

    def rewrite(self, op, m: Match):
        folded = self.folded_constants(m)
        if folded:
            operands = []
            for tag, name in (("left", "a"), ("right", "b")):
                if name in folded:
                    value = np.transpose(m.value(name), perm_of(m.node(tag)))
                    operands.append(op.const(np.ascontiguousarray(value), f"{m[name].name}_transposed"))
                else:
                    operands.append(m.node(tag).outputs[0] if m.has_node(tag) else m[name])
            return op.MatMul(*operands, _name=m.node("MatMul").name)
        return op.Gemm(m["a"], m["b"], transA=int(m.has_node("left")), transB=int(m.has_node("right")),
                       _name=m.node("MatMul").name)


class TransposeThroughElementwise(RewriteRule):
    """Moves a Transpose above an element-wise operator when that lowers the number of Transposes."""

    name = "transpose_elementwise"
    min_opset = 7  # numpy-style broadcasting
    targets = ALL_TARGETS

    def pattern(self, op, x, other):
        return op.Transpose(op.either(*(getattr(op, name)(x, _tag="elementwise") for name in UNARY_OPS),
                                      op.Clip(x, _allow_other_inputs=True, _tag="elementwise"),
                                      *(getattr(op, name)(x, other, _tag="elementwise") for name in BINARY_OPS)))

    def check(self, m: Match) -> MatchResult:
        perm = perm_of(m.node("Transpose"))
        if perm is None:
            return m.fail("the permutation is unknown")
        node = m.node("elementwise")
        if not is_elementwise(node):
            return m.fail(f"{node.op} is not element-wise here")
        staying, cancelled = [], 0
        for index in data_operands(node):
            operand = node.inputs[index]
            if not absorbs(operand, len(perm), m.graph):
                staying.append(operand)
            elif cancels(operand, perm, m.graph):
                cancelled += 1
        # The Transpose moved up goes; each operand it cannot be absorbed into gets one of its own.
        if staying and len(staying) >= 1 + cancelled:
            return m.fail(f"a Transpose on operand '{staying[0].name}' would stay and none would cancel")
        for operand in staying:
            if operand.shape is None or len(operand.shape) != len(perm):
                return m.fail(f"operand '{operand.name}' is not known to have rank {len(perm)}")
        return m.ok()

    def rewrite(self, op, m: Match):
        perm = perm_of(m.node("Transpose"))
        node = m.node("elementwise")
        operands = data_operands(node)
        inputs = [transposed_operand(op, t, perm) if i in operands else t for i, t in enumerate(node.inputs)]
        return getattr(op, node.op)(*inputs, **dict(node.attrs))


class ElementwiseOfTransposes(RewriteRule):
    """Replaces E(Transpose(a, p), Transpose(b, p)) with Transpose(E(a, b), p): two Transposes become one."""

    name = "elementwise_transposes"
    min_opset = 7
    targets = ALL_TARGETS

    def pattern(self, op, a, b):
        return op.either(*(getattr(op, name)(op.Transpose(a, _tag="left"), op.Transpose(b, _tag="right"),
                                             _tag="elementwise") for name in BINARY_OPS))

    def check(self, m: Match) -> MatchResult:
        left, right = perm_of(m.node("left")), perm_of(m.node("right"))
        if left is None or left != right:
            return m.fail("the two permutations differ or are unknown")
        return m.ok()

    def rewrite(self, op, m: Match):
        node = m.node("elementwise")
        combined = getattr(op, node.op)(m["a"], m["b"], **dict(node.attrs))
        return op.Transpose(combined, perm=perm_of(m.node("left")), _name=node.name)


RULES = (TransposeIntoGemm(), TransposeIntoMatMul(), TransposeThroughElementwise(), ElementwiseOfTransposes())
