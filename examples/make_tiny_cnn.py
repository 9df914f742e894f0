"""Builds examples/models/tiny_cnn.onnx, the small model the README's first command optimizes.

It looks like what exporters emit for a small classifier: Conv+BatchNormalization blocks, a Constant
node, shape arithmetic on constants, an Identity, MatMul+Add for the classifier head and a redundant
Transpose pair. Weights are random (seeded), so nothing is downloaded. Run it again to regenerate.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(2026)
    initializers, nodes = [], []

    def const(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    x = "input"
    channels = 3
    for block, width in enumerate((8, 16)):
        w = const(f"conv{block}.weight", rng.standard_normal((width, channels, 3, 3)).astype(np.float32) * 0.3)
        b = const(f"conv{block}.bias", rng.standard_normal(width).astype(np.float32) * 0.1)
        bn = [const(f"bn{block}.{p}", v.astype(np.float32)) for p, v in (
            ("scale", rng.uniform(0.5, 1.5, width)), ("bias", rng.standard_normal(width) * 0.1),
            ("mean", rng.standard_normal(width) * 0.1), ("var", rng.uniform(0.5, 1.5, width)))]
        nodes += [
            helper.make_node("Conv", [x, w, b], [f"conv{block}"], pads=[1, 1, 1, 1], name=f"conv{block}"),
            helper.make_node("BatchNormalization", [f"conv{block}", *bn], [f"bn{block}"], name=f"bn{block}"),
            helper.make_node("Relu", [f"bn{block}"], [f"relu{block}"], name=f"relu{block}"),
            helper.make_node("MaxPool", [f"relu{block}"], [f"pool{block}"], kernel_shape=[2, 2], strides=[2, 2],
                             name=f"pool{block}"),
        ]
        x, channels = f"pool{block}", width
    nodes += [
        helper.make_node("Constant", [], ["flat_dims"], value=numpy_helper.from_array(np.array([1, 16 * 4 * 4], np.int64))),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Add", ["one", "one"], ["two"], name="two"),
        helper.make_node("Div", ["one", "two"], ["half"], name="half"),
        helper.make_node("Reshape", [x, "flat_dims"], ["flat"], name="flatten"),
        helper.make_node("Identity", ["flat"], ["features"], name="features"),
        helper.make_node("Mul", ["features", "half"], ["scaled"], name="scale"),
        helper.make_node("MatMul", ["scaled", const("fc.weight", rng.standard_normal((256, 10)).astype(np.float32) * 0.1)],
                         ["fc"], name="fc"),
        helper.make_node("Add", ["fc", const("fc.bias", rng.standard_normal(10).astype(np.float32) * 0.1)], ["fc_out"],
                         name="fc_bias"),
        helper.make_node("Transpose", ["fc_out"], ["fc_t"], perm=[1, 0], name="to_columns"),
        helper.make_node("Transpose", ["fc_t"], ["logits"], perm=[1, 0], name="to_rows"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxopt-examples",
                              doc_string="A tiny CNN with the redundancy exporters leave behind.")
    model.ir_version = 8
    helper.set_model_props(model, {"license": "Apache-2.0", "generated_by": "examples/make_tiny_cnn.py"})
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(__file__).parent / "models" / "tiny_cnn.onnx"
    out.parent.mkdir(exist_ok=True)
    onnx.save(build(), out)
    print(f"wrote {out}")
