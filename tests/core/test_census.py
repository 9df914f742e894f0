"""The fusion census: what onnxruntime's (and OpenVINO's) own optimizer makes of two models."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import make_model, tensor, value
from onnx import helper
from rich.console import Console

from onnxopt import ir
from onnxopt.census import NCHWC_DOMAIN, SHAPE_ONLY, Census, RuntimeGraph, fusion_census, is_fused, runtime_graph

HIDDEN = 8


def _add_layernorm(skip: bool) -> onnx.ModelProto:
    """LayerNormalization(x + s) (which onnxruntime fuses into SkipLayerNormalization), or of x alone."""
    rng = np.random.default_rng(0)
    inits = [tensor("gamma", rng.standard_normal(HIDDEN).astype(np.float32)),
             tensor("beta", rng.standard_normal(HIDDEN).astype(np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["sum" if skip else "x", "gamma", "beta"], ["y"], axis=-1)]
    inputs = [value("x", shape=[1, 4, HIDDEN])]
    if skip:
        nodes.insert(0, helper.make_node("Add", ["x", "s"], ["sum"]))
        inputs.append(value("s", shape=[1, 4, HIDDEN]))
    return make_model(nodes, inputs, [value("y", shape=[1, 4, HIDDEN])], inits)


def test_counts_onnxruntime_fusions_and_flags_a_lost_one():
    census = fusion_census(_add_layernorm(skip=True), _add_layernorm(skip=False))
    rows = {row.label: row for row in census.rows}
    lost = rows["com.microsoft.SkipLayerNormalization"]
    assert (lost.original, lost.ours, lost.change, lost.regression) == (1, 0, -1, True)
    assert rows["LayerNormalization"].ours == 1 and not rows["LayerNormalization"].regression
    assert [row.label for row in census.regressions] == ["com.microsoft.SkipLayerNormalization"]
    assert census.fused_total("original") == 1 and census.fused_total("ours") == 1


def test_same_model_has_no_regression_and_plain_ops_are_not_rows():
    model = _add_layernorm(skip=True)
    census = fusion_census(model, model)
    assert census.regressions == []
    assert all(row.change == 0 for row in census.rows)
    assert all(is_fused(row.domain, row.op_type) for row in census.rows)
    assert not is_fused("", "Softmax") and is_fused("", "Gemm") and is_fused("com.microsoft", "FusedMatMul")


def test_renders_as_a_table_and_as_json():
    census = fusion_census(_add_layernorm(skip=True), _add_layernorm(skip=False))
    console = Console(width=120, record=True)
    console.print(census)
    text = console.export_text()
    assert "com.microsoft.SkipLayerNormalization" in text and "regression" in text
    data = json.loads(json.dumps(census.to_dict()))
    assert data["target"] == "ort" and data["regressions"] == ["com.microsoft.SkipLayerNormalization"]
    assert data["original"]["error"] is None and data["ours"]["nodes"] >= 1


def test_a_model_onnxruntime_cannot_load_is_reported_not_raised():
    unknown = helper.make_node("NoSuchOperator", ["x"], ["y"], domain="my.domain")
    graph = helper.make_graph([unknown], "g", [value("x", shape=[2])], [value("y", shape=[2])])
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    census = fusion_census(_add_layernorm(skip=True), broken)
    assert census.original.ok and not census.ours.ok
    assert "NoSuchOperator" in census.ours.error
    assert all(row.ours is None and row.change is None and not row.regression for row in census.rows)
    assert census.to_dict()["ours"]["fused"] is None
    Console(width=120, record=True).print(census)  # the error becomes the caption, not an exception


def test_paths_with_external_data(tmp_path):
    model = _add_layernorm(skip=True)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    graph = runtime_graph(path)
    assert graph.ok and graph.counts[("com.microsoft", "SkipLayerNormalization")] == 1


@pytest.mark.slow
def test_model_over_two_gib_is_saved_with_external_data():
    # A row of a 2.1 GB table, gathered by a graph input so that onnxruntime cannot fold it away. The
    # table is built in place (one copy of its bytes) to keep the test's memory near the model's size.
    nodes = [helper.make_node("Gather", ["table", "index"], ["row"]),
             helper.make_node("LayerNormalization", ["row", "gamma", "beta"], ["y"], axis=-1)]
    inits = [tensor("gamma", np.ones(HIDDEN, np.float32)), tensor("beta", np.zeros(HIDDEN, np.float32))]
    big = make_model(nodes, [value("index", onnx.TensorProto.INT64, [1])], [value("y", shape=[1, HIDDEN])], inits,
                     check=False)
    rows = (2**31 + 2**25) // (4 * HIDDEN)
    table = big.graph.initializer.add(name="table", data_type=onnx.TensorProto.FLOAT, dims=[rows, HIDDEN])
    table.raw_data = bytes(rows * HIDDEN * 4)
    assert ir.model_weight_bytes(big) > 2**31
    graph = runtime_graph(big)
    assert graph.ok, graph.error
    assert graph.counts[("", "LayerNormalization")] == 1


def test_unknown_target_is_a_value_error():
    with pytest.raises(ValueError, match="unknown census target"):
        fusion_census(_add_layernorm(True), _add_layernorm(True), target="tvm")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_runtime_graph():
    census = fusion_census(_add_layernorm(skip=True), _add_layernorm(skip=False), target="openvino")
    assert isinstance(census, Census) and census.original.ok and census.ours.ok, census.to_dict()
    rows = {row.label: row for row in census.rows}
    # The CPU plugin runs LayerNormalization as its MVN node (then scale and shift).
    assert rows["MVN"].original == rows["MVN"].ours == 1
    assert not is_fused("", "Reorder", "openvino") and is_fused("", "FullyConnected", "openvino")
    # OpenVINO's names for Slice, Where and Resize: one ONNX operator each, no fusion.
    assert not any(is_fused("", op, "openvino") for op in ("StridedSlice", "Select", "Interpolate"))


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_nodes_on_shapes_only_are_no_fusion():
    # DeBERTa's TorchScript export: OpenVINO fused shape arithmetic into Subgraphs, which folding removes;
    # the census called that a lost fusion.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, M] x) => (float[N, M] y) {
            shape = Shape(x)
            count = ReduceProd<keepdims = 1>(shape)
            divisor = Cast<to = 1>(count)
            y = Div(x, divisor)
        }""")
    graph = runtime_graph(model, target="openvino")
    assert graph.ok, graph.error
    shape_only = {op for (domain, op) in graph.counts if domain == SHAPE_ONLY}
    assert "ShapeOf" in shape_only and graph.counts[("", "Eltwise")] == 1  # the division reads x's values
    assert not any(is_fused(SHAPE_ONLY, op, "openvino") for op in ("Subgraph", *shape_only))
    assert is_fused("", "Subgraph", "openvino")



def test_a_drop_a_larger_fusion_accounts_for_is_absorbed_not_a_regression():
    # A MultiHeadAttention that took in onnxruntime's FusedMatMul of Q·Kᵀ, as the attention pass does.
    original = RuntimeGraph({("com.microsoft", "FusedMatMul"): 12, ("com.microsoft", "SkipLayerNormalization"): 25})
    ours = RuntimeGraph({("com.microsoft", "MultiHeadAttention"): 12, ("com.microsoft", "SkipLayerNormalization"): 20})
    rows = {row.op_type: row for row in Census.compare(original, ours).rows}
    assert rows["FusedMatMul"].absorbed and not rows["FusedMatMul"].regression
    assert rows["FusedMatMul"].absorbed_by == ("com.microsoft.MultiHeadAttention",)
    assert rows["SkipLayerNormalization"].regression  # nothing that gained takes it in
    # More than the gains can account for stays a regression.
    more = Census.compare(RuntimeGraph({("com.microsoft", "FusedMatMul"): 30}), ours)
    assert [row.op_type for row in more.regressions] == ["FusedMatMul"]


def test_onnxruntime_layout_conversions_are_no_fusion():
    assert not is_fused(NCHWC_DOMAIN, "ReorderInput") and not is_fused(NCHWC_DOMAIN, "ReorderOutput")
    assert is_fused(NCHWC_DOMAIN, "Conv")


def test_fewer_blocked_layout_convs_are_no_loss_while_no_conv_stays_unconverted():
    # DenseNet: the original's BatchNormalization + Mul + Add made more NCHWc Convs than onnxopt's BatchNormalization.
    original = RuntimeGraph({(NCHWC_DOMAIN, "Conv"): 245, (NCHWC_DOMAIN, "ReorderInput"): 62, ("", "Add"): 62})
    ours = RuntimeGraph({(NCHWC_DOMAIN, "Conv"): 183})
    census = Census.compare(original, ours)
    (row,) = census.rows
    assert row.fewer_to_convert and not row.regression and census.regressions == []
    # A Conv that the engine no longer converts is a lost conversion.
    unconverted = RuntimeGraph({(NCHWC_DOMAIN, "Conv"): 183, ("", "Conv"): 1})
    assert [row.label for row in Census.compare(original, unconverted).regressions] == ["com.microsoft.nchwc.Conv"]


def _gelu_of_projection(bias: np.ndarray | None) -> onnx.ModelProto:
    """Gelu written with erf, of ``x @ W (+ bias)``: what onnxruntime fuses into (Bias)Gelu."""
    rng = np.random.default_rng(1)
    inits = [tensor("w", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)),
             tensor("half", np.float32(0.5)), tensor("one", np.float32(1.0)), tensor("root2", np.float32(2 ** 0.5))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if bias is not None:
        inits.append(tensor("b", bias))
        nodes.append(helper.make_node("Add", ["h", "b"], ["hb"]))
    h = "hb" if bias is not None else "h"
    nodes += [helper.make_node("Div", [h, "root2"], ["scaled"]), helper.make_node("Erf", ["scaled"], ["erf"]),
              helper.make_node("Add", ["erf", "one"], ["shifted"]), helper.make_node("Mul", [h, "shifted"], ["p"]),
              helper.make_node("Mul", ["p", "half"], ["y"])]
    return make_model(nodes, [value("x", shape=["batch", "sequence", HIDDEN])],
                      [value("y", shape=["batch", "sequence", HIDDEN])], inits)


def test_a_bias_gelu_whose_bias_of_zeros_is_gone_is_declined_not_a_regression():
    # transformers initializes biases to zeros: the original's BiasGelu adds nothing that onnxopt kept.
    census = fusion_census(_gelu_of_projection(np.zeros(HIDDEN, np.float32)), _gelu_of_projection(None))
    rows = {row.op_type: row for row in census.rows}
    assert (rows["BiasGelu"].original, rows["BiasGelu"].ours) == (1, 0)
    assert rows["BiasGelu"].declined and census.regressions == []
    # Without a Gelu in its place, the drop is a regression.
    lost = Census.compare(RuntimeGraph({("com.microsoft", "BiasGelu"): 2}), RuntimeGraph({("", "Add"): 2}))
    assert [row.op_type for row in lost.regressions] == ["BiasGelu"]
