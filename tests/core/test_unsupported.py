"""Models graphsurgeon cannot carry without changing them are refused with one clear line."""

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper

import onnxopt

SHADOWING = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] y, float[2] k) {
  k = Relu(x)
  y = If(c) <then_branch = t () => (float[2] a) <float[2] k = {1., 2.}> { a = Add(x, k) },
             else_branch = e () => (float[2] b) { b = Neg(x) }>
}"""


def test_subgraph_name_that_shadows_an_outer_value_is_refused():
    with pytest.raises(onnxopt.UserError, match="reuses the name 'k'"):
        onnxopt.optimize(onnx.parser.parse_model(SHADOWING), passes=[], verify=False)


def test_sparse_constant_is_refused():
    values = onnx.numpy_helper.from_array(np.array([1.0], np.float32), "v")
    indices = onnx.numpy_helper.from_array(np.array([0], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [2])
    nodes = [helper.make_node("Constant", [], ["s"], sparse_value=sparse), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnxopt.UserError, match="sparse tensor attributes"):
        onnxopt.optimize(model, passes=[], verify=False)
