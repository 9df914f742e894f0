"""``fold``: constant folding.

A node whose inputs are all constant computes the same value on every run, so it is evaluated once and
its outputs become initializers. Evaluation uses onnxruntime (graph optimizations disabled) on one model
holding every foldable node at once, so each operator keeps its exact ONNX semantics; if that batch
fails, nodes are evaluated one by one and the ones onnxruntime cannot run are left alone.

Never folded: operators outside the standard domain, random operators, nodes with subgraphs, sequence and
optional operators, and QuantizeLinear/DequantizeLinear (folding them would turn a quantized model's
int8 weights back into floats).

Size guard: folding may not grow the constants of the model by more than ``max_growth`` bytes in total.
Growth counts the bytes of new initializers minus the bytes of constants that lose their last reader.
While the budget is exceeded, the node whose output grows the model most stays a node (for example a
ConstantOfShape that would write a huge tensor, or a Transpose of a weight that another node still reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult

NEVER_FOLDED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
    "OptionalHasElement",
}


def _may_fold(node: gs.Node) -> bool:
    return node.domain in ("", None, "ai.onnx") and node.op not in NEVER_FOLDED and not any(True for _ in node.subgraphs())


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _evaluation_model(graph: gs.Graph, nodes: list[gs.Node], feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """A model computing every output of ``nodes``; constant inputs are initializers or ``feeds``."""
    outputs = [t.name for node in nodes for t in node.outputs if t.name]
    produced = set(outputs)
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for tensor in node.inputs:
            if not tensor.name or tensor.name in produced or tensor.name in initializers:
                continue
            if tensor.name in feeds:
                initializers[tensor.name] = onnx.numpy_helper.from_array(feeds[tensor.name], tensor.name)
            elif isinstance(tensor, gs.Constant):
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(tensor)
    exported = [OnnxExporter.export_node(node) for node in nodes]
    model_graph = onnx.helper.make_graph(
        exported, "fold", [], [onnx.ValueInfoProto(name=name) for name in outputs], list(initializers.values())
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in _opsets(graph).items()]
    model = onnx.helper.make_model(model_graph, opset_imports=opsets)
    model.ir_version = max(graph.ir_version or 0, 8)
    return model, outputs


def _opsets(graph: gs.Graph) -> dict[str, int]:
    opsets = {"": graph.opset}
    for opset in graph.import_domains or []:
        if opset.domain in ("", "ai.onnx"):
            opsets[""] = opset.version
    return opsets


def _usable(value) -> bool:
    return isinstance(value, np.ndarray) and (value.dtype.kind in "biufc" or value.dtype.kind == "O")


def evaluate(graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """Values of every output of ``nodes`` (topologically ordered) that onnxruntime can compute."""
    try:
        model, names = _evaluation_model(graph, nodes, {})
        values = dict(zip(names, _session(model).run(names, {})))
        if all(_usable(v) for v in values.values()):
            return values
    except Exception:  # noqa: BLE001 - fall back to node-by-node evaluation below
        pass
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        needed = [t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if any(name not in values for name in needed):
            continue
        try:
            model, names = _evaluation_model(graph, [node], {name: values[name] for name in needed})
            results = dict(zip(names, _session(model).run(names, {})))
        except Exception:  # noqa: BLE001 - a node onnxruntime cannot run stays a node
            continue
        if all(_usable(v) for v in results.values()):
            values.update(results)
    return values


@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Evaluates nodes whose inputs are all constant and replaces them with initializers."""

    name: ClassVar[str] = "fold"
    max_growth: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        constant_names: set[str] = set()
        candidates: list[gs.Node] = []
        for node in graph.nodes:
            if not _may_fold(node):
                continue
            if all(not t.name or isinstance(t, gs.Constant) or t.name in constant_names for t in node.inputs):
                candidates.append(node)
                constant_names |= {t.name for t in node.outputs if t.name}
        if not candidates:
            return PassResult(modified=False, stats={"folded": 0})
        values = evaluate(graph, candidates)
        folded = [n for n in candidates if all(not t.name or t.name in values for t in n.outputs)]
        kept = self._apply_size_guard(graph, folded, values)
        removed = [n for n in folded if id(n) not in kept]
        if not removed:
            return PassResult(modified=False, stats={"folded": 0, "kept_by_size_guard": len(kept)})
        removed_ids = {id(n) for n in removed}
        for node in removed:
            for tensor in node.outputs:
                if tensor.name and (ir.is_graph_output(graph, tensor)
                                    or any(id(c) not in removed_ids for c in tensor.outputs)):
                    ir.replace_with_constant(graph, tensor, values[tensor.name])
        ir.remove_nodes(graph, removed)
        return PassResult(modified=True, stats={"folded": len(removed), "kept_by_size_guard": len(kept)})

    def _apply_size_guard(self, graph: gs.Graph, folded: list[gs.Node], values: dict[str, np.ndarray]) -> set[int]:
        """Ids of folded nodes that stay nodes so that the model grows by at most ``max_growth`` bytes."""
        kept: set[int] = set()
        while True:
            active = {id(n) for n in folded if id(n) not in kept}
            needed = [
                t for n in folded if id(n) in active for t in n.outputs
                if t.name and (ir.is_graph_output(graph, t) or any(id(c) not in active for c in t.outputs))
            ]
            freed: dict[int, gs.Constant] = {}
            for node in folded:
                if id(node) not in active:
                    continue
                for tensor in node.inputs:
                    if isinstance(tensor, gs.Constant) and all(id(c) in active for c in tensor.outputs) \
                            and not ir.is_graph_output(graph, tensor):
                        freed[id(tensor)] = tensor
            growth = sum(values[t.name].nbytes for t in needed) - sum(ir.tensor_nbytes(c) for c in freed.values())
            if growth <= self.max_growth or not needed:
                return kept

            def local_growth(tensor: gs.Tensor) -> int:
                inputs = [i for i in tensor.inputs[0].inputs if isinstance(i, gs.Constant) and id(i) in freed]
                return values[tensor.name].nbytes - sum(ir.tensor_nbytes(i) for i in inputs)

            worst = max(needed, key=local_growth)
            kept.add(id(worst.inputs[0]))
