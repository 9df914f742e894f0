"""``fuse``: operator fusions that are exact for every target.

* Conv + BatchNormalization -> Conv. In inference mode BatchNormalization computes
  ``y = (x - mean) * s + bias`` with ``s = scale / sqrt(var + epsilon)`` per channel, so for
  ``x = Conv(input, W, b)`` it equals ``Conv(input, W * s, (b - mean) * s + bias)`` with ``s`` scaling
  each output channel of ``W``. Computed in float64, then cast to the weight's dtype.
* MatMul + Add -> Gemm, when ``A`` is known to be 2-D, ``B`` is a constant 2-D matrix and the added
  constant broadcasts to the ``[M, N]`` result one way (Gemm's ``C`` rule); float32/float64 only, and
  opset 7 or later (older Add and Gemm broadcast by other rules).
* Transpose + Transpose -> one Transpose with the composed permutation, or nothing when they cancel;
  a Transpose with the identity permutation is removed.
* Pad + Conv -> Conv, when the Pad adds zeros (constant mode, value 0) on spatial axes only: the Conv's
  own ``pads`` add the same zeros.

A fusion only fires when the intermediate value has no other reader and is not a graph output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult


def _standard(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in ("", None, "ai.onnx")


def _single_use_producer(graph: gs.Graph, tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node producing ``tensor`` if it is an ``op`` node of this graph whose output only this use reads."""
    if len(tensor.inputs) != 1 or len(tensor.outputs) != 1 or ir.is_graph_output(graph, tensor):
        return None
    producer = tensor.inputs[0]
    if not _standard(producer, op) or not ir.is_local(graph, producer):
        return None
    return producer


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, offset: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias that include an inference-mode BatchNormalization applied after the Conv."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    new_weight = weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
    base = bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])
    new_bias = (base - mean.astype(np.float64)) * factor + offset.astype(np.float64)
    return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)


def _fuse_conv_batchnorm(graph: gs.Graph, node: gs.Node, root: gs.Graph, allow: Callable[[gs.Node], bool]) -> bool:
    if not _standard(node, "BatchNormalization") or len(node.inputs) != 5:
        return False
    if node.attrs.get("training_mode", 0) or node.attrs.get("spatial", 1) != 1:
        return False
    # Before opset 7, is_test=0 (the default) asks for batch statistics, i.e. training mode.
    if (ir.opset_version(root) or 0) < 7 and not node.attrs.get("is_test", 0):
        return False
    if any(t.name and (t.outputs or ir.is_graph_output(graph, t)) for t in node.outputs[1:]):
        return False
    conv = _single_use_producer(graph, node.inputs[0], "Conv")
    if conv is None or len(conv.inputs) < 2:
        return False
    weight = ir.constant_value(conv.inputs[1])
    bias = ir.constant_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    params = [ir.constant_value(t) for t in node.inputs[1:]]
    if weight is None or (len(conv.inputs) > 2 and conv.inputs[2].name and bias is None) or any(p is None for p in params):
        return False
    channels = weight.shape[0]
    if weight.dtype.kind != "f" or any(p.shape != (channels,) for p in params) or (bias is not None and bias.shape != (channels,)):
        return False
    if not allow(node):
        return False
    new_weight, new_bias = fold_batchnorm(weight, bias, *params, float(node.attrs.get("epsilon", 1e-5)))
    output = node.outputs[0]
    # Names come from the whole model, not just this (sub)graph: a branch constant that reuses an outer
    # name shadows it, and reloading such a model binds the branch to the outer value.
    fused = gs.Node(
        "Conv", name=conv.name, attrs=dict(conv.attrs),
        inputs=[conv.inputs[0], ir.make_constant(root, new_weight, f"{conv.inputs[1].name}_bn"),
                ir.make_constant(root, new_bias, f"{conv.name or 'conv'}_bn_bias")],
        outputs=[],
    )
    ir.remove_nodes(graph, [conv, node])
    fused.outputs = [output]
    graph.nodes.append(fused)
    return True


def _broadcasts_to(shape: tuple, rows, cols: int) -> bool:
    if len(shape) > 2:
        return False
    target = (rows, cols)[2 - len(shape):]
    return all(d == 1 or (isinstance(t, int) and d == t) for d, t in zip(shape, target))


def _fuse_matmul_add(graph: gs.Graph, node: gs.Node, root: gs.Graph, allow: Callable[[gs.Node], bool]) -> bool:
    if not _standard(node, "Add") or len(node.inputs) != 2:
        return False
    # Before opset 7, Add broadcasts the legacy way (broadcast=1 with an axis, e.g. a bias per row)
    # and Gemm's C only broadcasts with broadcast=1: numpy broadcasting rules do not apply.
    if (ir.opset_version(root) or 0) < 7:
        return False
    for slot in (0, 1):
        matmul = _single_use_producer(graph, node.inputs[slot], "MatMul")
        addend = node.inputs[1 - slot]
        if matmul is None:
            continue
        a, b = matmul.inputs
        b_value = ir.constant_value(b)
        c_value = ir.constant_value(addend)
        if b_value is None or c_value is None or b_value.ndim != 2:
            continue
        if a.shape is None or len(a.shape) != 2 or b_value.dtype.name not in ("float32", "float64"):
            continue
        if c_value.dtype != b_value.dtype or (a.dtype is not None and np.dtype(a.dtype) != b_value.dtype):
            continue
        if not _broadcasts_to(c_value.shape, a.shape[0], b_value.shape[1]):
            continue
        if not allow(node):
            return False
        output = node.outputs[0]
        gemm = gs.Node("Gemm", name=matmul.name or node.name, inputs=[a, b, addend], outputs=[])
        ir.remove_nodes(graph, [matmul, node])
        gemm.outputs = [output]
        graph.nodes.append(gemm)
        return True
    return False


def _infer_subgraph_shapes(graph: gs.Graph) -> None:
    """Gives values made inside subgraph bodies the shapes onnx shape inference finds for them.

    ``ir.infer_shapes`` fills in only the main graph, and MatMul+Add must know that ``A`` is 2-D. This
    is a second inference over the model, so it runs only when a subgraph holds a MatMul. Weights are
    stripped first (shapes rarely depend on them), as ``ir.infer_shapes`` does.
    """
    if not any(_standard(n, "MatMul") for sub in list(ir.all_graphs(graph))[1:] for n in sub.nodes):
        return
    exported = gs.export_onnx(graph, do_type_check=False)
    opsets = [onnx.helper.make_opsetid(d, ir.opset_version(graph, d)) for d in ir.imported_domains(graph)]
    model = onnx.helper.make_model(exported.graph, opset_imports=opsets)
    model.ir_version = max(graph.ir_version or 8, 8)
    model.functions.extend(exported.functions)
    pending = [model.graph]
    while pending:
        proto = pending.pop()
        for init in proto.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL and len(init.raw_data) > 1 << 16:
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                init.external_data.add(key="location", value="__stripped__")
        pending += [a.g for n in proto.node for a in n.attribute if a.HasField("g")]
        pending += [g for n in proto.node for a in n.attribute for g in a.graphs]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes only stop fusions
        return
    _copy_local_shapes(graph, inferred.graph, outermost=True)


def _copy_local_shapes(graph: gs.Graph, proto: onnx.GraphProto, outermost: bool) -> None:
    """Copies inferred shapes onto values produced inside (nested) subgraphs that have none yet."""
    if not outermost:
        infos = {vi.name: vi.type for vi in proto.value_info}
        for node in graph.nodes:
            for tensor in node.outputs:
                info = infos.get(tensor.name)
                if tensor.shape is None and info is not None and info.tensor_type.HasField("shape"):
                    tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in info.tensor_type.shape.dim]
    # Node names may be empty or repeated; a node's first output name is unique within its graph.
    protos = {n.output[0]: n for n in proto.node if n.output and n.output[0]}
    for node in graph.nodes:
        node_proto = protos.get(node.outputs[0].name) if node.outputs and node.outputs[0].name else None
        if node_proto is None:
            continue
        for attr in node_proto.attribute:
            sub = node.attrs.get(attr.name)
            if attr.HasField("g") and isinstance(sub, gs.Graph):
                _copy_local_shapes(sub, attr.g, outermost=False)


def _pad_amounts(pad: gs.Node, rank: int) -> list[int] | None:
    """The zero-padding amounts of a constant-mode Pad with value 0, or ``None``."""
    if pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return None
    if "pads" in pad.attrs:
        amounts, value = list(pad.attrs["pads"]), pad.attrs.get("value", 0.0)
    else:
        if len(pad.inputs) < 2 or (len(pad.inputs) > 3 and pad.inputs[3].name):
            return None
        amounts = ir.constant_value(pad.inputs[1])
        if amounts is None:
            return None
        amounts = [int(a) for a in amounts.reshape(-1)]
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2].name:
            constant = ir.constant_value(pad.inputs[2])
            if constant is None or constant.size != 1:
                return None
            value = float(constant.reshape(-1)[0])
    if value != 0.0 or len(amounts) != 2 * rank or any(a < 0 for a in amounts):
        return None
    return amounts


def _fuse_pad_conv(graph: gs.Graph, node: gs.Node, root: gs.Graph, allow: Callable[[gs.Node], bool]) -> bool:
    """Zero padding before a Conv becomes the Conv's own padding (the same zeros, summed per side)."""
    if not _standard(node, "Conv") or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False
    pad = _single_use_producer(graph, node.inputs[0], "Pad")
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if pad is None or weight is None or weight.shape is None:
        return False
    rank = len(weight.shape)
    amounts = _pad_amounts(pad, rank)
    if amounts is None or amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
        return False
    spatial = rank - 2
    conv_pads = list(node.attrs.get("pads", [0] * (2 * spatial)))
    if len(conv_pads) != 2 * spatial or not allow(node):
        return False
    begins = [conv_pads[i] + amounts[2 + i] for i in range(spatial)]
    ends = [conv_pads[spatial + i] + amounts[rank + 2 + i] for i in range(spatial)]
    node.attrs["pads"] = begins + ends
    node.inputs[0] = pad.inputs[0]
    ir.remove_nodes(graph, [pad])
    return True


def _perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return list(perm)
    shape = node.inputs[0].shape
    return list(reversed(range(len(shape)))) if shape is not None else None


def _remove_transpose(graph: gs.Graph, node: gs.Node) -> None:
    source, output = node.inputs[0], node.outputs[0]
    ir.remove_nodes(graph, [node])
    ir.replace_all_uses(graph, output, source)


def _fuse_transposes(graph: gs.Graph, node: gs.Node, root: gs.Graph, allow: Callable[[gs.Node], bool]) -> bool:
    if not _standard(node, "Transpose"):
        return False
    perm = _perm(node)
    if perm is None:
        return False
    if perm == list(range(len(perm))):
        if not allow(node):
            return False
        _remove_transpose(graph, node)
        return True
    first = node.inputs[0]
    if len(first.inputs) != 1 or not _standard(first.inputs[0], "Transpose") \
            or not ir.is_local(graph, first.inputs[0]):
        return False
    inner = first.inputs[0]
    inner_perm = _perm(inner)
    if inner_perm is None or len(inner_perm) != len(perm) or not allow(node):
        return False
    composed = [inner_perm[axis] for axis in perm]
    node.inputs[0] = inner.inputs[0]
    node.attrs["perm"] = composed
    if not first.outputs and not ir.is_graph_output(graph, first):
        ir.remove_nodes(graph, [inner])
    # A cancelling pair leaves an identity permutation; the sweep does not revisit this node, so drop
    # it now: otherwise one run leaves a no-op Transpose and a second run still reports a change.
    if composed == list(range(len(composed))):
        _remove_transpose(graph, node)
    return True


def _allow(ctx: PassContext, rule: str, node: gs.Node) -> bool:
    return ctx.allow(rule, node.name or node.outputs[0].name)


RULES = (("pad_conv", _fuse_pad_conv), ("conv_batchnorm", _fuse_conv_batchnorm), ("matmul_add_to_gemm", _fuse_matmul_add),
         ("transpose_transpose", _fuse_transposes))


@dataclass(frozen=True)
class Fuse(Pass):
    """Fuses Pad and BatchNormalization into Conv, MatMul+Add into Gemm, and merges Transpose pairs."""

    name: ClassVar[str] = "fuse"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {rule: 0 for rule, _ in RULES}
        ir.infer_shapes(graph)
        _infer_subgraph_shapes(graph)
        for sub in list(ir.all_graphs(graph)):
            changed = False
            for node in list(sub.nodes):
                if not node.outputs:
                    continue
                for rule, rewrite in RULES:
                    if rewrite(sub, node, graph, functools.partial(_allow, ctx, rule)):
                        counts[rule] += 1
                        changed = True
                        break
            if changed:
                ir.toposort(sub)
        return PassResult(modified=sum(counts.values()) > 0, stats=counts)
