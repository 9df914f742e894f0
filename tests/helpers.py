"""Shared test helpers: build models with onnx.helper, run them in onnxruntime, compare outputs.

Every numeric check runs onnxruntime with graph optimizations disabled, so tests judge our passes and
not onnxruntime's own optimizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import Pass, PassContext, Target

OPSET = 17


def tensor(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def value(name: str, dtype=TensorProto.FLOAT, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, ir_version: int = 8,
               check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, dynamic_dim: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tensor_type = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dynamic_dim for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.integers(0, 3, shape).astype(dtype)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, optimized: onnx.ModelProto, feeds=None,
                        rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Both models compute the same outputs (in onnxruntime, optimizations off) on the same inputs."""
    feeds = feeds if feeds is not None else random_feeds(original)
    want = run(original, feeds)
    got = run(optimized, feeds)
    assert [o.name for o in original.graph.output] == [o.name for o in optimized.graph.output]
    for expected, actual in zip(want, got):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def apply(pass_: Pass, model: onnx.ModelProto, ctx: PassContext | None = None):
    """Runs one pass on a model; returns (new model, PassResult). The model given is not changed."""
    graph = ir.import_model(model)
    result = pass_(graph, ctx or PassContext(original=model))
    return ir.export_model(graph, model), result


def apply_checked(pass_: Pass, model: onnx.ModelProto, target: Target = Target.GENERIC):
    """Like ``apply``, and checks the pass contracts and onnx.checker on the result."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = pass_(graph, PassContext(original=model, target=target))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.all_nodes(gs.import_onnx(model)):
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    """A model from onnx's textual syntax (the graph part), checked."""
    import onnx.parser

    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def apply_rules(model: onnx.ModelProto, *rules, ctx: PassContext | None = None, explanation=None):
    """Runs rewrite rules on a model; checks the contracts and onnx.checker; returns (model, counts)."""
    from onnxopt.contracts import IOSignature, check_graph
    from onnxopt.pattern import RuleSet

    graph = ir.import_model(model)
    ir.infer_shapes(graph)
    signature = IOSignature.of(graph)
    counts = RuleSet(rules).apply(graph, ctx or PassContext(original=model), explanation)
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, counts
