"""Shape and dtype inference for the in-memory graph.

Passes that read shapes (``fold``'s shape folding, fusions that need ranks) call ``infer_shapes`` first.
It combines onnxruntime's symbolic inference (consistent dimension symbols) with onnx's own inference.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir

log = logging.getLogger("onnxopt")

__all__ = ["infer_shapes"]


def infer_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None) -> None:
    """Fills in dtypes and shapes of intermediate tensors with onnx shape inference.

    Inference runs on a copy of the graph without large weights (shapes rarely depend on them), so it
    stays cheap on huge models. Graph inputs and outputs keep their declared types. Failures leave
    the graph as it was.
    """
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in ir._graph_opsets(graph).items()]
    light = onnx.ModelProto()
    light.ir_version = max(graph.ir_version or 8, 8) if template is None else max(template.ir_version, 4)
    light.opset_import.extend(opsets)
    ir.purge_detached(graph)
    ir._detach_constant_protos(graph)
    with ir._weights_stubbed(graph):
        exported = gs.export_onnx(graph, do_type_check=False)
    light.graph.CopyFrom(exported.graph)
    light.functions.extend(exported.functions)
    # Large weights become graph inputs of the same type: inference still knows their shapes, and
    # neither engine copies or reads their data (shapes do not depend on large tensors' values).
    small = []
    for init in light.graph.initializer:
        if (ir._declared_nbytes(init) or 0) > 1 << 16:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            small.append(init)
    del light.graph.initializer[:]
    light.graph.initializer.extend(small)
    inferred = _symbolic_inference(light) or _onnx_inference(light)
    if inferred is None:
        return
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    protected = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    for name, tensor in graph.tensors().items():
        if id(tensor) in protected or not isinstance(tensor, gs.Variable) or name not in infos:
            continue
        type_proto = infos[name].type
        if not type_proto.HasField("tensor_type"):
            continue
        tensor_type = type_proto.tensor_type
        if tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type not in ir._NON_NUMPY else tensor_type.elem_type
        if tensor_type.HasField("shape"):
            tensor.shape = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            ]


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference, which keeps dimension symbols consistent across the graph.

    onnx's own inference invents a fresh symbol (``unk__N``) wherever it loses track, so two equal
    dynamic dimensions rarely share a name; onnxruntime's tool propagates them through MatMul,
    Transpose, Reshape and broadcasting. Symbols are never merged on a guess (``auto_merge=False``):
    a model where that would be needed falls back to onnx's inference.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    # The steps of SymbolicShapeInference.infer_shapes, which on incomplete inference also writes a
    # debug model into the current directory; any change in those internals falls back to onnx's inference.
    try:
        inference = SymbolicShapeInference(2**31 - 1, False, False, 0)
        inference._preprocess(model)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_ if complete else None
    except Exception as error:  # noqa: BLE001 - inference is best effort by contract
        log.debug("symbolic shape inference failed: %s", error)
        return None


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 - inference is best effort by contract
        log.debug("shape inference failed: %s", error)
        return None
