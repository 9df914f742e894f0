"""Tests of ``fuse``'s shape rules: Reshape/Flatten/Squeeze/Unsqueeze chains, element-wise regions between a
Reshape and its way back, and shape no-ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, op_counts
from test_fuse_norm import fuse

from onnxopt import ir, optimize_model
from onnxopt.pass_infra import PassContext, Target
from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fuse import Fuse
from onnxopt.pattern import explain
from onnxopt.passes.fusions.reshapes import (
    InputDim,
    constant_in_shape,
    reshape_target,
    through,
)


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model, dims=None):
    """Random inputs, symbolic dimensions set from ``dims`` (name -> size)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {})[d.dim_param]
                 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def computing_ops(model) -> dict[str, int]:
    """Operator counts without Constant nodes (those left unread are dce's to remove)."""
    return {op: n for op, n in op_counts(model).items() if op != "Constant"}


def collapses(model, expected_ops, rule="reshape_chain", dims=None, count=None):
    optimized, result = fuse(model)
    assert computing_ops(optimized) == expected_ops, (op_counts(optimized), result.stats)
    assert result.stats[rule] >= (count or 1)
    assert_same_outputs(model, optimized, feeds_for(model, dims))
    return optimized


def target_of(model) -> list[int]:
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    shape = next(i for i in model.graph.initializer if i.name == reshape.input[1])
    return onnx.numpy_helper.to_array(shape).tolist()


def test_static_chain_becomes_one_reshape():
    model = parse("""
        g (float[2, 3, 4] x) => (float[6, 4, 1] y) {
            a = Flatten <axis = 2> (x)
            s = Constant <value = int64[2] {6, 4}> ()
            b = Reshape(a, s)
            axes = Constant <value = int64[1] {2}> ()
            y = Unsqueeze(b, axes)
        }""")
    optimized = collapses(model, {"Reshape": 1})
    assert target_of(optimized) == [6, 4, 1]


def test_dynamic_batch_chain_copies_the_batch_dimension():
    # [B, S, 768] -> [B, S, 12, 64] -> [B, S*12, 64]... here: -> Flatten(axis=2) -> [B*S, 768]
    model = parse("""
        g (float[B, S, 8] x) => (float[N, 2, 4] y) {
            s1 = Constant <value = int64[4] {0, 0, 2, 4}> ()
            a = Reshape(x, s1)
            s2 = Constant <value = int64[3] {-1, 2, 4}> ()
            y = Reshape(a, s2)
        }""")
    optimized = collapses(model, {"Reshape": 1}, dims={"B": 2, "S": 3})
    assert target_of(optimized) == [-1, 2, 4]


def test_reshape_with_allowzero_and_no_zero_in_its_target_collapses():
    # The dynamo exporter writes allowzero=1 on every Reshape (torchvision's in-projection unflatten).
    model = parse("""
        g (float[197, 1, 2304] x) => (float[1, 197, 1, 3, 768] y) {
            s = Constant <value = int64[4] {197, 1, 3, 768}> ()
            a = Reshape <allowzero = 1> (x, s)
            axes = Constant <value = int64[1] {0}> ()
            y = Unsqueeze(a, axes)
        }""")
    optimized = collapses(model, {"Reshape": 1})
    assert target_of(optimized) == [1, 197, 1, 3, 768]


def test_reshape_with_allowzero_and_a_zero_in_its_target_is_left_alone():
    model = parse("""
        g (float[2, 0, 3] x) => (float[1, 2, 0, 3] y) {
            s = Constant <value = int64[3] {2, 0, 3}> ()
            a = Reshape <allowzero = 1> (x, s)
            axes = Constant <value = int64[1] {0}> ()
            y = Unsqueeze(a, axes)
        }""")
    optimized, result = fuse(model)
    assert result.stats["reshape_chain"] == 0 and op_counts(optimized) == op_counts(model)


def test_squeeze_unsqueeze_pair_cancels():
    model = parse("""
        g (float[B, 1, 5] x) => (float[B, 1, 5] y) {
            axes = Constant <value = int64[1] {1}> ()
            a = Squeeze(x, axes)
            y = Unsqueeze(a, axes)
        }""")
    collapses(model, {"Identity": 1}, dims={"B": 3})  # an Identity keeps the output's name


def test_three_in_a_row_collapse_pairwise():
    model = parse("""
        g (float[B, 4, 6] x) => (float[B, 24] y) {
            axes = Constant <value = int64[1] {0}> ()
            a = Unsqueeze(x, axes)
            s = Constant <value = int64[4] {0, 0, 4, 6}> ()
            b = Reshape(a, s)
            c = Squeeze(b, axes)
            y = Flatten(c)
        }""")
    # Unsqueeze, Reshape and Squeeze give x back; the Flatten stays.
    collapses(model, {"Flatten": 1}, dims={"B": 2}, count=2)


def test_unsqueeze_before_opset_13_uses_the_attribute():
    model = parse("""
        g (float[B, 6] x) => (float[B, 1, 2, 3] y) {
            a = Unsqueeze <axes = [1]> (x)
            s = Constant <value = int64[4] {0, 1, 2, 3}> ()
            y = Reshape(a, s)
        }""", opset=11)
    optimized = collapses(model, {"Reshape": 1}, dims={"B": 2})
    assert target_of(optimized) == [0, 1, 2, 3]


def test_flatten_then_reshape_with_one_unknown_dimension():
    model = parse("""
        g (float[B, S, 8] x) => (float[M, N, 8] y) {
            a = Flatten <axis = 2> (x)
            s = Constant <value = int64[3] {2, -1, 8}> ()
            y = Reshape(a, s)
        }""")
    optimized = collapses(model, {"Reshape": 1}, dims={"B": 2, "S": 3})
    assert target_of(optimized) == [2, -1, 8]


def test_two_unknown_dimensions_are_not_collapsed():
    # [B, S, T] -> [B*S, T] -> [B*S, T, 1]: neither B*S nor T sits where a 0 would copy it.
    model = parse("""
        g (float[B, S, T] x) => (float[M, T, 1] y) {
            a = Flatten <axis = 2> (x)
            axes = Constant <value = int64[1] {2}> ()
            y = Unsqueeze(a, axes)
        }""")
    optimized, result = fuse(model)
    assert result.stats["reshape_chain"] == 0
    assert_same_outputs(model, optimized, feeds_for(model, {"B": 2, "S": 3, "T": 4}))


def test_chain_with_runtime_shape_is_left_alone():
    model = parse("""
        g (float[B, 2, 4] x, int64[2] shape) => (float[M, N] y) {
            a = Flatten(x)
            y = Reshape(a, shape)
        }""")
    optimized, result = fuse(model)
    assert result.stats["reshape_chain"] == 0
    assert op_counts(optimized) == op_counts(model)
    feeds = {"x": np.ones((2, 2, 4), np.float32), "shape": np.array([4, 4], np.int64)}
    assert_same_outputs(model, optimized, feeds)


def test_chain_whose_middle_is_read_elsewhere_is_left_alone():
    model = parse("""
        g (float[2, 8] x) => (float[16] y, float[4, 4] z) {
            s = Constant <value = int64[2] {4, 4}> ()
            z = Reshape(x, s)
            f = Constant <value = int64[1] {16}> ()
            y = Reshape(z, f)
        }""")
    optimized, result = fuse(model)
    assert result.stats["reshape_chain"] == 0
    assert_same_outputs(model, optimized, feeds_for(model))


def test_chain_whose_middle_only_shape_operators_read_collapses_into_each_reader():
    # The dynamo exporter's masks: Unsqueeze(Unsqueeze(r, 0), 1) and Unsqueeze(Unsqueeze(r, 0), 2).
    model = parse("""
        g (float[N] x) => (float[1, 1, N] y, float[1, N, 1] z) {
            a0 = Constant <value = int64[1] {0}> ()
            a1 = Constant <value = int64[1] {1}> ()
            a2 = Constant <value = int64[1] {2}> ()
            r = Relu(x)
            u = Unsqueeze(r, a0)
            y = Unsqueeze(u, a1)
            z = Unsqueeze(u, a2)
        }""")
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshape_chain"] == 2
    assert computing_ops(optimized) == {"Relu": 1, "Reshape": 2}
    assert_same_outputs(model, optimized, {"x": np.arange(5, dtype=np.float32) - 2})


def test_squeeze_without_axes_and_unknown_dimensions_is_left_alone():
    model = parse("""
        g (float[B, 1, 4] x) => (float[M] y) {
            a = Squeeze(x)
            f = Constant <value = int64[1] {-1}> ()
            y = Reshape(a, f)
        }""")
    optimized, result = fuse(model)
    assert result.stats["reshape_chain"] == 0
    assert_same_outputs(model, optimized, feeds_for(model, {"B": 1}))


def test_noop_reshape_is_removed():
    model = parse("""
        g (float[B, 8] x) => (float[B, 8] y) {
            s = Constant <value = int64[2] {0, -1}> ()
            r = Reshape(x, s)
            y = Relu(r)
        }""")
    collapses(model, {"Relu": 1}, rule="noop_reshape", dims={"B": 3})


def test_reshape_that_changes_the_shape_stays():
    model = parse("""
        g (float[B, 8] x) => (float[M, 4] y) {
            s = Constant <value = int64[2] {-1, 4}> ()
            r = Reshape(x, s)
            y = Relu(r)
        }""")
    optimized, result = fuse(model)
    assert result.stats["noop_reshape"] == 0 and op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("op_type,rule", [("Concat <axis = 0>", "noop_concat"), ("Sum", "noop_variadic"),
                                          ("Max", "noop_variadic"), ("Mean", "noop_variadic"),
                                          ("Identity", "noop_identity")])
def test_single_input_no_ops_are_removed(op_type, rule):
    model = parse(f"""
        g (float[3, 4] x) => (float[3, 4] y) {{
            a = {op_type}(x)
            y = Relu(a)
        }}""")
    collapses(model, {"Relu": 1}, rule=rule)


def test_two_input_concat_stays():
    model = parse("""
        g (float[3, 4] x) => (float[6, 4] y) {
            a = Concat <axis = 0> (x, x)
            y = Relu(a)
        }""")
    optimized, result = fuse(model)
    assert result.stats["noop_concat"] == 0 and op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("inner_axis", ["1", "-1"])
def test_nested_concat_is_merged(inner_axis):
    # RAFT's correlation features: Concat(corr, Concat(flow, hidden)) on channels, twice nested.
    model = parse(f"""
        g (float[1, 2, 3] a, float[1, 3, 3] b, float[1, 4, 3] c) => (float[1, 13, 3] y) {{
            bc = Concat <axis = {inner_axis}> (b, c)
            abc = Concat <axis = 1> (a, bc, a)
            y = Concat <axis = 1> (abc, a)
        }}""".replace("axis = -1", "axis = -2"))
    optimized, result = fuse_and_dce(model)  # the inner Concats are left unread
    assert op_counts(optimized) == {"Concat": 1} and result.stats["nested_concat"] == 2
    assert_same_outputs(model, optimized, feeds_for(model))
    concat = optimized.graph.node[0]
    assert list(concat.input) == ["a", "b", "c", "a", "a"]


def test_concat_read_by_two_concats_is_merged_into_both():
    model = parse("""
        g (float[2, 3] a, float[2, 3] b) => (float[2, 9] y, float[2, 9] z) {
            ab = Concat <axis = 1> (a, b)
            y = Concat <axis = 1> (ab, a)
            z = Concat <axis = -1> (b, ab)
        }""")
    optimized, result = fuse_and_dce(model)
    assert op_counts(optimized) == {"Concat": 2} and result.stats["nested_concat"] == 2
    assert [list(n.input) for n in optimized.graph.node] == [["a", "b", "a"], ["b", "a", "b"]]
    assert_same_outputs(model, optimized, feeds_for(model))


def test_nested_concat_on_another_axis_or_read_elsewhere_stays():
    model = parse("""
        g (float[2, 3] a, float[2, 3] b) => (float[4, 6] y, float[2, 9] w, float[2, 6] z) {
            aa = Concat <axis = 0> (a, a)
            y = Concat <axis = 1> (aa, aa)
            ab = Concat <axis = 1> (a, b)
            w = Concat <axis = 1> (ab, a)
            z = Relu(ab)
        }""")
    optimized, result = fuse(model)
    assert result.stats["nested_concat"] == 0 and op_counts(optimized) == op_counts(model)
    assert_same_outputs(model, optimized, feeds_for(model))


def test_nested_concat_that_is_a_graph_output_stays():
    model = parse("""
        g (float[2, 3] a, float[2, 3] b) => (float[4, 3] ab, float[6, 3] y) {
            ab = Concat <axis = 0> (a, b)
            y = Concat <axis = 0> (ab, a)
        }""")
    optimized, result = fuse(model)
    assert result.stats["nested_concat"] == 0 and op_counts(optimized) == op_counts(model)


def test_identity_that_names_a_graph_output_stays():
    model = parse("""
        g (float[3, 4] x) => (float[3, 4] y) {
            y = Identity(x)
        }""")
    optimized, result = fuse(model)
    assert result.stats["noop_identity"] == 0 and op_counts(optimized) == {"Identity": 1}


@pytest.mark.parametrize("sizes", [None, "{4}"], ids=["no-sizes", "whole-axis"])
def test_split_into_one_output_is_removed(sizes):
    sizes_node = "" if sizes is None else f"s = Constant <value = int64[1] {sizes}> ()"
    call = "Split <axis = 1> (x)" if sizes is None else "Split <axis = 1> (x, s)"
    model = parse(f"""
        g (float[3, 4] x) => (float[3, 4] y) {{
            {sizes_node}
            a = {call}
            y = Relu(a)
        }}""")
    collapses(model, {"Relu": 1}, rule="noop_split")


def test_split_with_runtime_sizes_stays():
    model = parse("""
        g (float[3, 4] x, int64[1] s) => (float[3, N] y) {
            a = Split <axis = 1> (x, s)
            y = Relu(a)
        }""")
    optimized, result = fuse(model)
    assert result.stats["noop_split"] == 0 and op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("repeats,removed", [("{1, 1}", True), ("{1, 2}", False)])
def test_tile_by_ones(repeats, removed):
    out = "float[3, 4]" if removed else "float[3, 8]"
    model = parse(f"""
        g (float[3, 4] x) => ({out} y) {{
            r = Constant <value = int64[2] {repeats}> ()
            a = Tile(x, r)
            y = Relu(a)
        }}""")
    optimized, result = fuse(model)
    assert result.stats["noop_tile"] == int(removed)
    assert_same_outputs(model, optimized, feeds_for(model))


def test_through_tracks_symbolic_dimensions():
    b, s = InputDim(0), InputDim(1)
    import onnx_graphsurgeon as gs

    flatten = gs.Node("Flatten", attrs={"axis": 2}, inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    assert through(flatten, [b, s, 8]) == [None, 8]
    flatten.attrs["axis"] = 1
    assert through(flatten, [b, 4, 8]) == [b, 32]
    assert reshape_target([b, 32]) == [0, 32]
    assert reshape_target([s, b]) is None


def test_two_input_sum_stays():
    model = parse("""
        g (float[3, 4] x) => (float[3, 4] y) {
            a = Sum(x, x)
            y = Relu(a)
        }""")
    optimized, result = fuse(model)
    assert result.stats["noop_variadic"] == 0 and op_counts(optimized) == op_counts(model)


# ---------------------------------------------------------------------------------------------------
# reshapes_around_elementwise

GELU_TANH = """
            cube = Pow(h, three)
            scaled_cube = Mul(cubic, cube)
            inner = Add(h, scaled_cube)
            scaled = Mul(k, inner)
            t = Tanh(scaled)
            half_h = Mul(half, h)
            one_t = Add(one, t)
            y2 = Mul(half_h, one_t)"""
GELU_CONSTANTS = """
            three = Constant <value = float {3.0}> ()
            cubic = Constant <value = float {0.044715}> ()
            k = Constant <value = float {0.7978846}> ()
            half = Constant <value = float {0.5}> ()
            one = Constant <value = float {1.0}> ()"""


def fuse_and_dce(model, target: Target = Target.GENERIC):
    """fuse, then dce for the old region's nodes, which the rule leaves unread."""
    optimized, result = fuse(model, target)
    graph = ir.import_model(optimized)
    DeadCodeElimination()(graph, PassContext(original=optimized))
    return ir.export_model(graph, optimized), result


def region_model(region: str, constants: str = GELU_CONSTANTS, shape="[6, 16]", middle="{1, 6, 16}",
                 back="{6, 16}", extra_outputs="") -> onnx.ModelProto:
    """``x`` reshaped to ``middle``, through ``region`` (from ``h`` to ``y2``), reshaped back to ``back``."""
    return parse(f"""
        g (float{shape} x) => (float{shape} y{extra_outputs}) {{
            s1 = Constant <value = int64[{middle.count(',') + 1}] {middle}> ()
            h = Reshape(x, s1){constants}{region}
            s2 = Constant <value = int64[{back.count(',') + 1}] {back}> ()
            y = Reshape(y2, s2)
        }}""")


def test_gelu_between_a_reshape_and_its_way_back_runs_in_the_first_shape():
    # GPT-2's MLP: Gemm -> Reshape [1, S, 4H] -> tanh Gelu written out -> Reshape [S, 4H] -> Gemm.
    model = region_model(GELU_TANH)
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshapes_around_elementwise"] == 1
    assert computing_ops(optimized) == {"Pow": 1, "Add": 2, "Mul": 4, "Tanh": 1}
    assert_same_outputs(model, optimized, feeds_for(model))


def test_per_channel_constant_is_reshaped_to_the_first_shape():
    # [4, 6] -> [2, 2, 6]: constants along the last axis of 6 meet the same elements in [4, 6].
    model = region_model("""
            scaled = Mul(h, scale)
            y2 = Add(scaled, bias)""", constants="""
            scale = Constant <value = float[6] {1, 2, 3, 4, 5, 6}> ()
            bias = Constant <value = float[1, 1, 6] {1, 2, 3, 4, 5, 6}> ()""",
                         shape="[4, 6]", middle="{2, 2, 6}", back="{4, 6}")
    optimized, _ = fuse_and_dce(model)
    assert computing_ops(optimized) == {"Mul": 1, "Add": 1}
    assert_same_outputs(model, optimized, feeds_for(model))


def test_two_entries_and_a_shared_entry():
    # Add(Reshape(x), Reshape(z)) with the first Reshape also read outside: only it stays.
    model = parse("""
        g (float[4, 6] x, float[4, 6] z) => (float[4, 6] y, float[2, 12] h) {
            s1 = Constant <value = int64[2] {2, 12}> ()
            h = Reshape(x, s1)
            hz = Reshape(z, s1)
            sum = Add(h, hz)
            y2 = Relu(sum)
            s2 = Constant <value = int64[2] {4, 6}> ()
            y = Reshape(y2, s2)
        }""")
    optimized, _ = fuse_and_dce(model)
    assert computing_ops(optimized) == {"Add": 1, "Relu": 1, "Reshape": 1}
    assert_same_outputs(model, optimized, feeds_for(model))


def test_unsqueeze_and_squeeze_count_as_reshapes():
    model = parse("""
        g (float[5, 3] x) => (float[5, 3] y) {
            axes = Constant <value = int64[1] {0}> ()
            h = Unsqueeze(x, axes)
            two = Constant <value = float {2.0}> ()
            doubled = Mul(h, two)
            y2 = Sigmoid(doubled)
            y = Squeeze(y2, axes)
        }""")
    optimized, _ = fuse_and_dce(model)
    assert computing_ops(optimized) == {"Mul": 1, "Sigmoid": 1}
    assert_same_outputs(model, optimized, feeds_for(model))


def test_constant_that_broadcasts_differently_stops_it():
    # A [12] constant over [2, 12] repeats every 12 elements: no suffix of [4, 6] has 12 elements.
    model = region_model("""
            y2 = Add(h, bias)""", constants="""
            bias = Constant <value = float[12] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()""",
                         shape="[4, 6]", middle="{2, 12}", back="{4, 6}")
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshapes_around_elementwise"] == 0
    assert computing_ops(optimized)["Reshape"] == 2
    assert_same_outputs(model, optimized, feeds_for(model))


def test_region_value_read_outside_stops_it():
    model = region_model(GELU_TANH, extra_outputs=", float[1, 6, 16] t")
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshapes_around_elementwise"] == 0
    assert computing_ops(optimized)["Reshape"] == 2
    assert_same_outputs(model, optimized, feeds_for(model))


def test_reshape_back_to_another_shape_stops_it():
    model = parse("""
        g (float[6, 16] x) => (float[3, 32] y) {
            s1 = Constant <value = int64[3] {1, 6, 16}> ()
            h = Reshape(x, s1)
            y2 = Relu(h)
            s2 = Constant <value = int64[2] {3, 32}> ()
            y = Reshape(y2, s2)
        }""")
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshapes_around_elementwise"] == 0
    assert_same_outputs(model, optimized, feeds_for(model))


def test_operand_computed_outside_the_region_stops_it():
    model = parse("""
        g (float[6, 16] x, float[1, 6, 16] z) => (float[6, 16] y) {
            s1 = Constant <value = int64[3] {1, 6, 16}> ()
            h = Reshape(x, s1)
            y2 = Mul(h, z)
            s2 = Constant <value = int64[2] {6, 16}> ()
            y = Reshape(y2, s2)
        }""")
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshapes_around_elementwise"] == 0
    assert computing_ops(optimized)["Reshape"] == 2
    assert_same_outputs(model, optimized, feeds_for(model))


def test_constant_in_shape():
    assert constant_in_shape(np.ones(6), [2, 2, 6], [4, 6]).shape == (6,)
    assert constant_in_shape(np.ones((2, 6)), [2, 2, 6], [4, 6]) is None  # 12-periodic; [4, 6] has no 12 suffix
    assert constant_in_shape(np.ones((2, 6)), [2, 2, 6], [2, 12]).shape == (12,)
    assert constant_in_shape(np.float32(2), [1, 6, 16], [6, 16]).shape == ()
    assert constant_in_shape(np.ones((6, 1)), [1, 6, 16], [6, 16]) is None  # not a trailing block: refused


def conv1d_model(gemm_attrs: str = "", bias: str = "float[3] c = {0.5, -1.0, 2.0}", flatten: str = "{-1, 4}",
                 weight: str = "float[4, 3] w", opset: int = 17) -> onnx.ModelProto:
    """GPT-2's Conv1D as TorchScript exports it: x [B, S, 4] flattened for a Gemm, whose [B*S, 3] result is
    reshaped back to [B, S, 3] with B and S read from x's shape at run time."""
    c_input = ", c" if bias else ""
    return parse(f"""
        g (float[B, S, 4] x) => (float[B, S, 3] y)
          <{weight} = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}{', ' + bias if bias else ''},
           int64[2] rows = {flatten}, int64 zero = {{0}}, int64 one = {{1}}, int64[1] axes = {{0}},
           int64[1] columns = {{3}}> {{
            flat = Reshape(x, rows)
            product = Gemm{gemm_attrs}(flat, w{c_input})
            shape = Shape(x)
            b = Gather(shape, zero)
            s = Gather(shape, one)
            b1 = Unsqueeze(b, axes)
            s1 = Unsqueeze(s, axes)
            target = Concat <axis = 0> (b1, s1, columns)
            y = Reshape(product, target)
        }}""", opset)


@pytest.mark.parametrize("bias", ["float[3] c = {0.5, -1.0, 2.0}", "float[1, 3] c = {0.5, -1.0, 2.0}",
                                  "float[1] c = {0.5}", ""], ids=["vector", "row", "scalar", "none"])
def test_flattened_gemm_becomes_a_batched_matmul(bias):
    model = conv1d_model(bias=bias)
    optimized, result = fuse_and_dce(model)
    assert result.stats["flattened_gemm"] == 1
    assert computing_ops(optimized) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    for dims in ({"B": 2, "S": 5}, {"B": 1, "S": 1}):
        assert_same_outputs(model, optimized, feeds_for(model, dims))


def test_flattened_gemm_for_onnxruntime_reads_the_leading_dimensions_in_one_piece():
    # onnxruntime adds a Gemm's bias faster than a separate Add at 128 rows, so the Gemm stays there; the
    # Gathers and Unsqueezes of B and S become one Shape(x, end=-1). The rule must not match its own result.
    model = conv1d_model()
    optimized, result = fuse_and_dce(model, Target.ORT)
    assert result.stats["flattened_gemm_leading_shape"] == 1 and result.stats["flattened_gemm"] == 0
    assert computing_ops(optimized) == {"Reshape": 2, "Gemm": 1, "Shape": 1, "Concat": 1}
    shape = next(n for n in optimized.graph.node if n.op_type == "Shape")
    assert onnx.helper.get_attribute_value(shape.attribute[0]) == -1
    assert_same_outputs(model, optimized, feeds_for(model, {"B": 2, "S": 5}))
    _, again = fuse(optimized, Target.ORT)
    assert again.stats["flattened_gemm_leading_shape"] == 0


@pytest.mark.parametrize(("model", "reason"), [
    (conv1d_model(gemm_attrs=" <transB = 1>", weight="float[3, 4] w"), "transposes or scales"),
    (conv1d_model(gemm_attrs=" <alpha = 2.0>"), "transposes or scales"),
    (conv1d_model(bias="float[2, 3] c = {1, 2, 3, 4, 5, 6}", flatten="{2, 4}"), "not one value per column"),
], ids=["transB", "alpha", "bias_per_row"])
def test_flattened_gemm_left_alone(model, reason):
    assert_declined(model, "flattened_gemm", reason)


def assert_declined(model, rule: str, reason: str) -> None:
    """``rule`` does not fire on ``model``, and ``explain`` gives ``reason`` for it."""
    _, result = fuse(model)
    assert result.stats[rule] == 0
    misses = explain(model, Fuse, PassContext(target=Target.GENERIC)).misses(rule)
    assert any(reason in attempt.reason for attempt in misses), [str(a) for a in misses]


def test_static_flattened_gemm_for_onnxruntime_keeps_its_constant_target():
    # With static shapes the target is already a constant: reading it from Shape(x) would only be folded
    # back, and fold and fuse would undo each other until the iteration cap.
    model = parse("""
        g (float[2, 5, 4] x) => (float[2, 5, 3] y)
          <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[3] c = {0.5, -1.0, 2.0},
           int64[2] rows = {-1, 4}, int64[3] back = {2, 5, 3}> {
            flat = Reshape(x, rows)
            product = Gemm(flat, w, c)
            y = Reshape(product, back)
        }""")
    _, result = fuse(model, Target.ORT)
    assert result.stats["flattened_gemm_leading_shape"] == 0
    run = optimize_model(model, target="ort", verify=False)
    assert run.report.converged and run.report.iterations <= 2
    assert_same_outputs(model, run.model, feeds_for(model))


def windows_model(bias: str = "float[3] c = {0.5, -1.0, 2.0}", back: str = "{-1, 7, 7, 3}",
                  dtype: str = "float") -> onnx.ModelProto:
    """Swin's window projection: windows [B, 7, 7, 4] flattened to [B, 49, 4] for a Linear, whose result
    is reshaped back to windows."""
    return parse(f"""
        g ({dtype}[B, 7, 7, 4] x) => ({dtype}[B, 7, 7, 3] y)
          <{dtype}[4, 3] w = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}, {bias},
           int64[3] tokens = {{-1, 49, 4}}, int64[4] back = {back}> {{
            h = Reshape(x, tokens)
            product = MatMul(h, w)
            biased = Add(product, c)
            y = Reshape(biased, back)
        }}""")


@pytest.mark.parametrize("bias", ["float[3] c = {0.5, -1.0, 2.0}", "float[1, 1, 3] c = {0.5, -1.0, 2.0}",
                                  "float[1] c = {0.5}"], ids=["vector", "rank3", "scalar"])
def test_matmul_bias_between_reshapes_becomes_a_gemm(bias):
    model = windows_model(bias)
    optimized, result = fuse_and_dce(model)
    assert result.stats["reshaped_matmul_bias"] == 1
    assert computing_ops(optimized) == {"Reshape": 2, "Gemm": 1}
    for dims in ({"B": 3}, {"B": 1}):
        assert_same_outputs(model, optimized, feeds_for(model, dims))


@pytest.mark.parametrize(("model", "reason"), [
    (windows_model(back="{0, 7, 7, 3}"), "copies a dimension"),
    (windows_model(bias="float[49, 3] c = {" + ", ".join(["1"] * 147) + "}"), "one value per column"),
    (windows_model(bias="float16[3] c = {1, 2, 3}", dtype="float16"), "float32/float64"),
], ids=["copied_dim", "bias_per_row", "float16"])
def test_matmul_bias_between_reshapes_left_alone(model, reason):
    assert_declined(model, "reshaped_matmul_bias", reason)
