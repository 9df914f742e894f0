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
from onnx.reference import ReferenceEvaluator
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
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufcOU"


def _run_onnxruntime(model: onnx.ModelProto, names: list[str]) -> list:
    return _session(model).run(names, {})


def _run_reference(model: onnx.ModelProto, names: list[str]) -> list:
    with np.errstate(all="ignore"):
        return ReferenceEvaluator(model).run(names, {})


def _evaluate_with(run, graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """Every output of ``nodes`` that ``run`` computes: the whole batch at once, else node by node."""
    try:
        model, names = _evaluation_model(graph, nodes, {})
        values = dict(zip(names, run(model, names)))
        if all(_usable(v) for v in values.values()):
            return values
    except Exception:  # noqa: BLE001 - fall back to node-by-node evaluation below
        pass
    values = {}
    for node in nodes:
        needed = [t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if any(name not in values for name in needed):
            continue
        try:
            model, names = _evaluation_model(graph, [node], {name: values[name] for name in needed})
            results = dict(zip(names, run(model, names)))
        except Exception:  # noqa: BLE001 - a node this evaluator cannot run is judged by the other one
            continue
        if all(_usable(v) for v in results.values()):
            values.update(results)
    return values


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        rtol = 1e-3 if a.dtype.itemsize <= 2 else 1e-5
        scale = float(np.max(np.abs(a[np.isfinite(a)]), initial=1.0))
        return bool(np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True))
    return bool(np.array_equal(a, b))


def evaluate(graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """Values of the outputs of ``nodes`` (topologically ordered) that can be trusted.

    onnxruntime and onnx's reference evaluator both compute every value. Where both succeed they must
    agree, or the value is not folded: each has operators where it departs from the ONNX specification
    (onnxruntime's align-corners Resize, for example), and two independent implementations rarely
    depart in the same way. The reference value is kept: it is computed closer to the specification
    (onnxruntime's float32 DFT and half-precision Attention are less exact). Where only one can run an
    operator, its value is used.
    """
    by_runtime = _evaluate_with(_run_onnxruntime, graph, nodes)
    by_reference = _evaluate_with(_run_reference, graph, nodes)
    values: dict[str, np.ndarray] = {}
    for name in by_runtime.keys() | by_reference.keys():
        runtime, reference = by_runtime.get(name), by_reference.get(name)
        if runtime is not None and reference is not None:
            if _agree(runtime, reference):
                values[name] = reference
        else:
            values[name] = runtime if runtime is not None else reference
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
        folded: list[gs.Node] = []
        folded_names: set[str] = set()
        for node in candidates:
            inputs_known = all(not t.name or isinstance(t, gs.Constant) or t.name in folded_names for t in node.inputs)
            if inputs_known and all(not t.name or t.name in values for t in node.outputs):
                folded.append(node)
                folded_names |= {t.name for t in node.outputs if t.name}
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
