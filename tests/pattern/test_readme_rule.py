"""The README's "Writing a rewrite rule" example runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, op_counts

from onnxopt import Target, ir
from onnxopt.pass_infra import PassContext
from onnxopt.pattern import explain, rule_pass

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> dict:
    """What the section's Python snippets define, run in order in one namespace."""
    text = README.read_text()
    section = text[text.index("## Writing a rewrite rule"):].split("\n## ")[0]
    namespace: dict = {"__name__": "readme_example"}
    for code in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def model(scale_shape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    s = rng.uniform(0.5, 2, scale_shape).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), onnx.helper.make_node("Mul", ["s", "c"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 5, 5])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(s, "s")])
    result = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    result.ir_version = 8
    return result


def test_readme_rule_fires_and_explains():
    example = readme_example()
    original = model((4, 1, 1))
    graph = ir.import_model(original)
    result = example["MyFusions"]()(graph, PassContext())
    assert result.stats == {"conv_mul_to_conv": 1}
    optimized = ir.export_model(graph, original)
    onnx.checker.check_model(optimized, full_check=True)
    assert op_counts(optimized) == {"Conv": 1}
    assert_same_outputs(original, optimized)

    explanation = explain(model((5,)), [example["ConvMulToConv"]()])
    assert [a.reason for a in explanation.misses()] == ["scale of shape (5,) is not per output channel"]


def gelu_model(order: str, dtype=np.float32, opset: int = 20, half=None) -> onnx.ModelProto:
    """y = x * 0.5 * (1 + erf(x / sqrt(2))), written in one exporter's order; sqrt(2) rounded to ``dtype``."""
    make = onnx.helper.make_node
    half = np.asarray(0.5 if half is None else half, dtype)
    constants = {"half": half, "one": np.asarray(1, dtype), "root2": np.asarray(np.sqrt(2), dtype),
                 "inv_root2": np.asarray(1 / np.sqrt(2), dtype)}
    nodes = {
        # TorchScript: (x * 0.5) * (1 + erf(x / sqrt(2)))
        "scaled-first": [make("Div", ["x", "root2"], ["d"]), make("Erf", ["d"], ["e"]), make("Add", ["e", "one"], ["p"]),
                         make("Mul", ["x", "half"], ["h"]), make("Mul", ["h", "p"], ["y"])],
        # 0.5 * (x * (1 + erf(x * (1 / sqrt(2)))))
        "half-last": [make("Mul", ["x", "inv_root2"], ["d"]), make("Erf", ["d"], ["e"]), make("Add", ["one", "e"], ["p"]),
                      make("Mul", ["x", "p"], ["h"]), make("Mul", ["half", "h"], ["y"])],
    }[order]
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rank = max(2, half.ndim)
    graph = onnx.helper.make_graph(
        nodes, "gelu", [onnx.helper.make_tensor_value_info("x", elem, [3, 4])],
        [onnx.helper.make_tensor_value_info("y", elem, [f"d{i}" for i in range(rank)])],
        [onnx.numpy_helper.from_array(value, name) for name, value in constants.items()
         if any(name in node.input for node in nodes)])
    result = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    result.ir_version = 9
    onnx.checker.check_model(result, full_check=True)
    return result


def apply_gelu_rule(model: onnx.ModelProto, target: Target = Target.GENERIC):
    readme_pass = rule_pass("readme-gelu", [readme_example()["ErfToGelu"]()])
    graph = ir.import_model(model)
    result = readme_pass()(graph, PassContext(target=target))
    return ir.export_model(graph, model), result


@pytest.mark.parametrize("order", ["scaled-first", "half-last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_readme_gelu_rule_fires_in_any_order_and_on_rounded_constants(order, dtype):
    original = gelu_model(order, dtype)
    optimized, result = apply_gelu_rule(original)
    assert result.stats == {"erf_to_gelu": 1}
    assert op_counts(optimized) == {"Gelu": 1}
    tolerance = 1e-4 if dtype == np.float32 else 2e-3
    assert_same_outputs(original, optimized, rtol=tolerance, atol=tolerance)


def test_readme_gelu_rule_stays_off_tensorrt_old_opsets_and_constants_with_axes():
    for model, target in ((gelu_model("scaled-first"), Target.TENSORRT), (gelu_model("scaled-first", opset=17), Target.ORT),
                          (gelu_model("half-last", half=[[[0.5]]]), Target.ORT)):
        optimized, result = apply_gelu_rule(model, target)
        assert not result.modified
        assert_same_outputs(model, optimized)
    explanation = explain(gelu_model("half-last", half=[[[0.5]]]), [readme_example()["ErfToGelu"]()])
    assert [a.reason for a in explanation.misses() if a.node == "y"] == ["a constant has axes"]


def softmax_model(second_axis: int) -> onnx.ModelProto:
    """x read by two Softmax nodes (the second along ``second_axis``), each result a graph output."""
    make = onnx.helper.make_node
    graph = onnx.helper.make_graph(
        [make("Softmax", ["x"], ["a"], axis=-1), make("Softmax", ["x"], ["b"], axis=second_axis),
         make("Abs", ["a"], ["p"])],
        "softmaxes", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [3, 4]) for name in ("b", "p")])
    result = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    result.ir_version = 8
    return result


def test_readme_found_values_rule_replaces_the_copies_in_one_rewrite():
    readme_pass = rule_pass("readme-softmax", [readme_example()["RepeatedSoftmaxToOne"]()])
    original = softmax_model(-1)
    graph = ir.import_model(original)
    result = readme_pass()(graph, PassContext())
    assert result.stats == {"repeated_softmax_to_one": 1}
    optimized = ir.export_model(graph, original)
    onnx.checker.check_model(optimized, full_check=True)
    assert op_counts(optimized) == {"Softmax": 1, "Abs": 1}
    assert [o.name for o in optimized.graph.output] == ["b", "p"]
    assert_same_outputs(original, optimized)

    other_axis = softmax_model(0)
    graph = ir.import_model(other_axis)
    assert not readme_pass()(graph, PassContext()).modified
    assert_same_outputs(other_axis, ir.export_model(graph, other_axis))
