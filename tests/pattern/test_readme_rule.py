"""The README's "Writing a rewrite rule" example runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from helpers import assert_same_outputs, op_counts

from onnxopt import ir
from onnxopt.pass_infra import PassContext
from onnxopt.pattern import explain

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> dict:
    text = README.read_text()
    section = text[text.index("## Writing a rewrite rule"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {"__name__": "readme_example"}
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
