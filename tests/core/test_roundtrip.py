"""What survives import into the graph and export back: model fields, names, order, opsets, defaults."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, run, tensor, value
from onnx import TensorProto, helper

import onnxopt
from onnxopt import ir


def _annotated_model(ir_version: int = 8) -> onnx.ModelProto:
    """Two inputs and three outputs in a deliberate order, a custom-domain node, an unused opset import."""
    nodes = [
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Scale", ["b"], ["b_scaled"], name="custom_scale", domain="com.example.ops", factor=1.5),
        helper.make_node("Add", ["a_relu", "b_scaled"], ["sum"], name="add"),
        helper.make_node("Neg", ["a"], ["neg_a"], name="neg"),
        helper.make_node("Mul", ["sum", "sum"], ["square"], name="square"),
        helper.make_node("Sigmoid", ["b"], ["unused"], name="dead_sigmoid"),
    ]
    model = make_model(
        nodes,
        [value("b", shape=["batch", 4]), value("a", shape=["batch", 4])],
        [value("square", shape=["batch", 4]), value("neg_a", shape=["batch", 4]), value("sum", shape=["batch", 4])],
        ir_version=ir_version, check=False,
    )
    model.opset_import.append(helper.make_opsetid("com.example.ops", 3))
    model.opset_import.append(helper.make_opsetid("com.example.unused", 1))
    model.producer_name = "exporter"
    model.producer_version = "4.2.0"
    model.model_version = 7
    model.domain = "org.example.models"
    model.doc_string = "A model with every model-level field set."
    model.graph.doc_string = "the main graph"
    model.graph.input[0].doc_string = "input b"
    helper.set_model_props(model, {"license": "MIT", "source": "unit test", "z_last": "kept in order"})
    onnx.checker.check_model(model)
    return model


@pytest.fixture(params=[8, 10], ids=lambda v: f"ir{v}")
def annotated(request) -> onnx.ModelProto:
    return _annotated_model(request.param)


def test_model_fields_survive_dce(annotated):
    optimized = onnxopt.optimize(annotated, passes="dce", verify=False)
    for field in ("ir_version", "producer_name", "producer_version", "model_version", "domain", "doc_string"):
        assert getattr(optimized, field) == getattr(annotated, field), field
    assert [(p.key, p.value) for p in optimized.metadata_props] == [
        ("license", "MIT"), ("source", "unit test"), ("z_last", "kept in order")]
    assert optimized.graph.name == annotated.graph.name
    assert optimized.graph.doc_string == "the main graph"


def test_io_order_names_and_types_survive_dce(annotated):
    optimized = onnxopt.optimize(annotated, passes="dce", verify=False)
    assert [i.name for i in optimized.graph.input] == ["b", "a"]
    assert [o.name for o in optimized.graph.output] == ["square", "neg_a", "sum"]
    for before, after in zip(list(annotated.graph.input) + list(annotated.graph.output),
                             list(optimized.graph.input) + list(optimized.graph.output)):
        assert after.type == before.type  # symbolic "batch" dims included
        assert after.doc_string == before.doc_string


def test_node_and_value_names_survive_dce(annotated):
    optimized = onnxopt.optimize(annotated, passes="dce", verify=False)
    nodes = {n.name: n for n in optimized.graph.node}
    assert set(nodes) == {"relu_a", "custom_scale", "add", "neg", "square"}  # only the dead Sigmoid went
    assert list(nodes["add"].input) == ["a_relu", "b_scaled"] and list(nodes["add"].output) == ["sum"]
    custom = nodes["custom_scale"]
    assert custom.domain == "com.example.ops" and custom.op_type == "Scale"
    assert helper.get_attribute_value(custom.attribute[0]) == pytest.approx(1.5)


def test_custom_domain_kept_and_unused_opset_dropped(annotated):
    optimized = onnxopt.optimize(annotated, passes="dce", verify=False)
    assert {(o.domain, o.version) for o in optimized.opset_import} == {("", 17), ("com.example.ops", 3)}
    onnx.checker.check_model(optimized)


def test_custom_domain_is_no_error_with_verification_on(annotated):
    # onnxruntime cannot run com.example.ops::Scale: verification is skipped with a reason, not failed.
    result = onnxopt.optimize_model(annotated, passes="dce")
    assert result.report.verification.ok
    assert "onnxruntime cannot load" in result.report.verification.skipped


def test_input_model_is_not_changed(annotated):
    before = annotated.SerializeToString()
    onnxopt.optimize(annotated, passes="fold,fuse,dce", verify=False)
    assert annotated.SerializeToString() == before


def test_graph_metadata_props_survive():
    model = _annotated_model(10)
    model.graph.metadata_props.add(key="graph_key", value="graph value")
    optimized = onnxopt.optimize(model, passes="dce", verify=False)
    assert [(p.key, p.value) for p in optimized.graph.metadata_props] == [("graph_key", "graph value")]


def test_import_export_without_passes_is_stable():
    model = _annotated_model()
    once = ir.export_model(ir.import_model(model), model)
    twice = ir.export_model(ir.import_model(once), once)
    assert once.SerializeToString() == twice.SerializeToString()


def _overridable_default_model() -> onnx.ModelProto:
    """y = x + (w * 2), where w is a graph input with a default value (IR >= 4)."""
    nodes = [helper.make_node("Mul", ["w", "two"], ["w2"]), helper.make_node("Add", ["x", "w2"], ["y"])]
    return make_model(
        nodes,
        [value("x", shape=[3]), value("w", shape=[3])],
        [value("y", shape=[3])],
        [tensor("w", np.array([1.0, 2.0, 3.0], np.float32)), tensor("two", np.float32(2.0))],
    )


def test_overridable_initializer_is_kept_and_not_folded():
    model = _overridable_default_model()
    optimized = onnxopt.optimize(model, passes="fold,fuse,dce")
    assert [i.name for i in optimized.graph.input] == ["x", "w"]
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in optimized.graph.initializer}
    np.testing.assert_array_equal(defaults["w"], [1.0, 2.0, 3.0])
    assert [n.op_type for n in optimized.graph.node] == ["Mul", "Add"]  # w * 2 depends on the caller's w

    x = np.array([0.5, 0.5, 0.5], np.float32)
    assert_same_outputs(model, optimized, feeds={"x": x})
    override = np.array([10.0, 20.0, 30.0], np.float32)
    np.testing.assert_array_equal(run(optimized, {"x": x, "w": override})[0], x + override * 2)


def test_overridable_initializer_keeps_its_place_in_the_inputs():
    model = _overridable_default_model()
    inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend([inputs[1], inputs[0]])  # w before x
    optimized = onnxopt.optimize(model, passes="dce", verify=False)
    assert [i.name for i in optimized.graph.input] == ["w", "x"]


def test_plain_initializer_is_folded():
    # The same model without w among the inputs: w * 2 is constant and folds away.
    model = _overridable_default_model()
    del model.graph.input[1]
    optimized = onnxopt.optimize(model, passes="fold,dce")
    assert [n.op_type for n in optimized.graph.node] == ["Add"]
    assert_same_outputs(model, optimized)


def test_ir3_model_keeps_initializers_as_inputs():
    # IR 3 requires every initializer to be listed as a graph input.
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    model = make_model(nodes, [value("x", shape=[3]), value("w", shape=[3])], [value("y", shape=[3])],
                       [tensor("w", np.ones(3, np.float32))], opset=7, ir_version=3)
    optimized = onnxopt.optimize(model, passes="dce", verify=False)
    assert optimized.ir_version == 3
    assert {i.name for i in optimized.graph.input} == {"x", "w"}
    onnx.checker.check_model(optimized)


def test_opset_version_is_kept():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", shape=[2])], [value("y", shape=[2])],
                       opset=13)
    optimized = onnxopt.optimize(model, passes="fold,fuse,dce")
    assert [(o.domain, o.version) for o in optimized.opset_import] == [("", 13)]


def test_string_and_bool_values_round_trip():
    nodes = [helper.make_node("Identity", ["s"], ["s_out"]), helper.make_node("Not", ["b"], ["b_out"])]
    model = make_model(nodes, [value("s", TensorProto.STRING, [2]), value("b", TensorProto.BOOL, [2])],
                       [value("s_out", TensorProto.STRING, [2]), value("b_out", TensorProto.BOOL, [2])])
    optimized = onnxopt.optimize(model, passes="fold,fuse,dce")
    feeds = {"s": np.array(["x", "y"], dtype=object), "b": np.array([True, False])}
    want, got = run(model, feeds), run(optimized, feeds)
    assert list(got[0]) == list(want[0]) and list(got[1]) == list(want[1])


def _model_with_large_weights() -> onnx.ModelProto:
    """Two 128 KiB weights in the main graph and one inside an If branch: all are left as stubs."""
    rng = np.random.default_rng(0)
    first, second, inner = (rng.standard_normal((128, 256)).astype(np.float32) for _ in range(3))
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "inner_w"], ["branch_out"])], "then",
        [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2, 256])],
        initializer=[onnx.numpy_helper.from_array(inner, "inner_w")])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "h"], ["y"]),
        helper.make_node("MatMul", ["x", "w2"], ["z"]),
        helper.make_node("Constant", [], ["flag"], value=onnx.numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["flag"], ["picked"], then_branch=branch, else_branch=branch),
    ]
    return make_model(nodes, [value("x", shape=[2, 128])],
                      [value("y", shape=[2, 256]), value("z", shape=[2, 256]), value("picked", shape=[2, 256])],
                      initializers=[tensor("w1", first), tensor("w2", second)])


def test_streamed_serialization_is_the_filled_model():
    model = _model_with_large_weights()
    graph = ir.import_model(model)
    weights: dict[str, onnx.TensorProto] = {}
    light = ir.export_model(graph, model, weights=weights)
    assert set(weights) >= {"w1", "w2"}

    parsed = onnx.ModelProto()
    parsed.ParseFromString(ir.model_bytes(light, weights))
    full = ir.export_model(ir.import_model(model), model)
    by_name = {t.name: t for t in parsed.graph.initializer}
    assert by_name == {t.name: t for t in full.graph.initializer}
    parsed.graph.ClearField("initializer")
    full.graph.ClearField("initializer")
    assert parsed == full


def test_save_streams_stubbed_weights_into_one_valid_file(tmp_path):
    model = _model_with_large_weights()
    weights: dict[str, onnx.TensorProto] = {}
    light = ir.export_model(ir.import_model(model), model, weights=weights)
    path = tmp_path / "out.onnx"
    ir.save_model(light, path, weights=weights)
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    assert_same_outputs(model, saved)


def test_large_computed_constant_is_exported_from_a_tensor_proto():
    """A weight a pass computes as a numpy array is converted to a TensorProto once, then stubbed."""
    model = _model_with_large_weights()
    graph = ir.import_model(model)
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    computed = np.full((128, 256), 0.5, np.float32)
    matmul.inputs[1] = ir.make_constant(graph, computed, "computed_w")
    weights: dict[str, onnx.TensorProto] = {}
    light = ir.export_model(graph, model, weights=weights)
    stub = next(t for t in light.graph.initializer if t.name == matmul.inputs[1].name)
    assert not stub.raw_data and matmul.inputs[1].name in weights
    filled = ir.export_model(graph, model)
    feeds = {"x": np.ones((2, 128), np.float32)}
    assert np.allclose(run(filled, feeds)[0], 2 * 64.0 * np.ones((2, 256)))
