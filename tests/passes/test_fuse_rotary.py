"""Tests of ``fuse``'s rotary rules: RotaryEmbedding (opset 23) from Llama's rotate-half form.

The hand-built graphs write the rotation the way both torch exporters write Hugging Face's Llama
(``tests/fixtures/make_llama.py`` exports the tiny models these are read from): cos and sin computed at
run time as ``cos(concat(f, f))`` with ``f = positions * inv_freq``, unsqueezed on the heads axis;
``rotate_half`` as two Slices, a Neg and a Concat, the slice bounds constant (dynamo) or computed from
the head size at run time and multiplied by a scaling of 1 and cast (TorchScript, which ``fold`` first
makes constant). Every rewrite is checked in onnxruntime with graph optimizations off.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import apply_checked, assert_same_outputs, make_model, op_counts, run, tensor, value
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxopt import optimize_model
from onnxopt.pass_infra import Target
from onnxopt.passes.fuse import Fuse
from onnxopt.passes.ort_fusions import OrtFuse

ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
FIXTURES = Path(__file__).parents[1] / "fixtures" / "models"
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Rope:
    """One rotary site, ``y = x * cos + rotate_half(x) * sin``; the defaults are Llama's as dynamo exports it.

    The fields that make a wrong graph (``split``, ``order``, ``cos_halves``, ...) are for the tests where
    the rule must not fire.
    """

    batch: int | str = "batch"
    heads: int = 4
    seq: int | str = "seq"
    head_size: int = 16
    positions_batch: str = "one"  # "one": positions of shape (1, S); "x": (B, S), x's batch
    form: str = "dynamo"  # "torchscript": slice bounds from x's shape, cos and sin scaled by 1.0 and cast
    negate: str = "neg"  # or "mul": times -1
    rotary_dim: int | None = None  # partial rotation of x[..., :rotary_dim]; the rest passes through
    passed_start: int | None = None  # where the part passed through starts (default: rotary_dim)
    opset: int = 23
    dtype: type = np.float32
    constant_cos: bool = False  # cos and sin as constants (static shapes only)
    split: int | None = None  # where rotate_half splits (default: the middle)
    order: str = "neg_first"  # or "neg_last": concat(x1, -x2)
    slice_axis: int = 3
    cos_halves: str = "same"  # or "different": concat(f, 2 * f)
    unsqueeze_axis: int = 1  # 2: the (B, S, N, d) layout, x then given as (B, S, N, d)
    # Llama's heads: x is Transpose(Reshape(x3, [0, 0, N, d]), [0, 2, 1, 3]) of a 3-D input x3 (B, S, N * d);
    # "read_elsewhere": those heads are an output too.
    from_3d: str | None = None


class Graph:
    """Nodes and constants of a test graph, with fresh value names."""

    def __init__(self, rope: Rope):
        self.rope = rope
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, array, dtype=None) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(tensor(name, np.asarray(array, dtype or self.rope.dtype)))
        return name

    def ints(self, values) -> str:
        return self.const(list(values), np.int64)

    def node(self, op: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out


def cos_sin_values(rope: Rope, rotated: int) -> tuple[np.ndarray, np.ndarray]:
    """Constant (1, 1, S, rotated) cos and sin of positions 0..S-1, halves equal."""
    inv_freq = 10000.0 ** (-np.arange(0, rotated, 2) / rotated)
    angles = np.arange(rope.seq)[:, None] * inv_freq
    angles = np.concatenate([angles, angles if rope.cos_halves == "same" else 2 * angles], -1)
    return (np.cos(angles)[None, None].astype(rope.dtype), np.sin(angles)[None, None].astype(rope.dtype))


def cos_sin(g: Graph, rotated: int) -> tuple[str, str]:
    """cos and sin multiplied with x: ``Unsqueeze(cos(concat(f, f)), 1)`` with ``f = positions * inv_freq``."""
    rope = g.rope
    if rope.constant_cos:
        cos, sin = cos_sin_values(rope, rotated)
        return g.const(cos), g.const(sin)
    inv_freq = (10000.0 ** (-np.arange(0, rotated, 2) / rotated)).astype(np.float32)
    freqs = g.node("Mul", g.node("Cast", g.node("Unsqueeze", "positions", g.ints([2])), to=TensorProto.FLOAT),
                   g.const(inv_freq, np.float32))
    other = freqs if rope.cos_halves == "same" else g.node("Mul", freqs, g.const(2.0, np.float32))
    angles = g.node("Concat", freqs, other, axis=-1)
    outputs = []
    for function in ("Cos", "Sin"):
        wave = g.node(function, angles)
        if rope.form == "torchscript":  # transformers' attention_scaling, then .to(x.dtype)
            wave = g.node("Mul", wave, g.const(1.0, np.float32))
        wave = g.node("Cast", wave, to=ELEM[rope.dtype])
        outputs.append(g.node("Unsqueeze", wave, g.ints([rope.unsqueeze_axis])))
    return outputs[0], outputs[1]


def half_bound(g: Graph, x: str, size: int) -> str:
    """The middle of x's last axis: a constant (dynamo), or x.shape[-1] // 2 computed at run time (TorchScript)."""
    if g.rope.form != "torchscript" or g.rope.split is not None:
        return g.ints([g.rope.split if g.rope.split is not None else size // 2])
    dim = g.node("Gather", g.node("Shape", x), g.const(np.array(3, np.int64), np.int64), axis=0)
    half = g.node("Cast", g.node("Div", dim, g.const(np.array(2, np.int64), np.int64)), to=TensorProto.INT64)
    return g.node("Unsqueeze", half, g.ints([0]))


def rotate_half(g: Graph, x: str, size: int) -> str:
    rope = g.rope
    middle = half_bound(g, x, size)
    axis = g.ints([rope.slice_axis])
    low = g.node("Slice", x, g.ints([0]), middle, axis, g.ints([1]))
    high = g.node("Slice", x, middle, g.ints([INT64_MAX]), axis, g.ints([1]))
    negated = g.node("Neg", high) if rope.negate == "neg" else g.node("Mul", high, g.const(-1.0))
    halves = (negated, low) if rope.order == "neg_first" else (low, negated)
    return g.node("Concat", *halves, axis=-1 if rope.slice_axis == 3 else rope.slice_axis)


def x_shape(rope: Rope) -> list:
    if rope.unsqueeze_axis == 2:
        return [rope.batch, rope.seq, rope.heads, rope.head_size]
    return [rope.batch, rope.heads, rope.seq, rope.head_size]


def rope_model(rope: Rope = Rope()) -> onnx.ModelProto:
    """x (and positions) -> x * cos + rotate_half(x) * sin -> y; with ``rotary_dim``, of x[..., :r] only."""
    g = Graph(rope)
    rotated_size = rope.rotary_dim or rope.head_size
    x = "x"
    if rope.from_3d:
        x = g.node("Transpose", g.node("Reshape", "x", g.ints([0, 0, rope.heads, rope.head_size])), perm=[0, 2, 1, 3])
    if rope.rotary_dim:
        x = g.node("Slice", "x", g.ints([0]), g.ints([rope.rotary_dim]), g.ints([-1]))
    cos, sin = cos_sin(g, rotated_size)
    y = g.node("Add", g.node("Mul", x, cos), g.node("Mul", rotate_half(g, x, rotated_size), sin))
    if rope.rotary_dim:
        start = rope.passed_start if rope.passed_start is not None else rope.rotary_dim
        passed = g.node("Slice", "x", g.ints([start]), g.ints([start + rope.head_size - rope.rotary_dim]),
                        g.ints([-1]))
        y = g.node("Concat", y, passed, axis=-1)
    g.nodes[-1].output[0] = "y"
    elem = ELEM[rope.dtype]
    inputs = [value("x", elem, [rope.batch, rope.seq, rope.heads * rope.head_size] if rope.from_3d else x_shape(rope))]
    if not rope.constant_cos:
        batch = 1 if rope.positions_batch == "one" else rope.batch
        inputs.append(value("positions", TensorProto.INT64, [batch, rope.seq]))
    outputs = [value("y", elem, x_shape(rope))]
    if rope.from_3d == "read_elsewhere":
        heads = next(node.output[0] for node in g.nodes if node.op_type == "Transpose")
        outputs.append(value(heads, elem, x_shape(rope)))
    return make_model(g.nodes, inputs, outputs, g.inits, opset=rope.opset, ir_version=10)


def fuse(model: onnx.ModelProto, target: Target = Target.GENERIC):
    """Runs fuse once; checks the pass contracts and onnx.checker on the result."""
    return apply_checked(Fuse(), model, target)


def rotary_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]


def producer_of(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if name in n.output)


def attribute(node: onnx.NodeProto, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def feeds_for(model: onnx.ModelProto, batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    """Random x and positions 3, 4, ... with the symbolic dimensions set to ``batch`` and ``seq``."""
    sizes = {"batch": batch, "seq": seq}
    shapes = {vi.name: [d.dim_value or sizes[d.dim_param] for d in vi.type.tensor_type.shape.dim]
              for vi in model.graph.input}
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    feeds = {"x": np.random.default_rng(1).standard_normal(shapes["x"]).astype(dtype)}
    if "positions" in shapes:
        rows, length = shapes["positions"]
        feeds["positions"] = np.tile(np.arange(length, dtype=np.int64) + 3, (rows, 1))
    return feeds


def fuses(rope: Rope, rtol: float = 1e-4, atol: float = 1e-5, batch: int = 2, **stats) -> onnx.ModelProto:
    """The rule fires (``stats``: rewrites per rule) and the fused model computes what the original does."""
    model = rope_model(rope)
    optimized, result = fuse(model)
    for rule, count in {"rotary_embedding": 1, **stats}.items():
        assert result.stats[rule] == count, result.stats
    assert op_counts(optimized).get("RotaryEmbedding") == 1, op_counts(optimized)
    assert "Neg" not in op_counts(optimized)
    assert_same_outputs(model, optimized, feeds_for(model, batch), rtol=rtol, atol=atol)
    return optimized


def does_not_fuse(rope: Rope, target: Target = Target.GENERIC) -> None:
    model = rope_model(rope)
    optimized, result = fuse(model, target)
    assert not result.stats.get("rotary_embedding") and not rotary_nodes(optimized)
    assert_same_outputs(model, optimized, feeds_for(model))


# ---------------------------------------------------------------------------------------------------
# Where the rule fires


def test_llama_rotation_becomes_rotary_embedding():
    optimized = fuses(Rope())
    (node,) = rotary_nodes(optimized)
    assert node.input[0] == "x" and list(node.output) == ["y"]
    assert attribute(node, "interleaved") == 0 and attribute(node, "rotary_embedding_dim", 0) == 0


def test_cos_of_batch_one_is_expanded_to_the_batch_of_x():
    # onnxruntime's kernel refuses (1, S, d/2) caches for x of batch 2: they are expanded (numbers checked at 2).
    optimized = fuses(Rope(positions_batch="one"), batch=2)
    assert op_counts(optimized)["Expand"] == 2


def test_cos_of_the_batch_of_x_is_taken_as_it_is():
    optimized = fuses(Rope(positions_batch="x"), batch=3)
    assert "Expand" not in op_counts(optimized)


def test_static_batch_of_one_needs_no_expansion():
    optimized = fuses(Rope(batch=1, seq=5), batch=1)
    assert "Expand" not in op_counts(optimized)


def test_rotation_times_minus_one():
    fuses(Rope(negate="mul"))


@pytest.mark.parametrize("batch", [1, 2])
def test_constant_cos_and_sin_become_constant_caches(batch):
    optimized = fuses(Rope(batch=batch, seq=6, constant_cos=True), batch=batch)
    caches = {t.name: list(t.dims) for t in optimized.graph.initializer}
    assert sorted(dims for dims in caches.values() if dims[-1:] == [8]) == [[1, 6, 8], [1, 6, 8]]
    assert op_counts(optimized).get("Expand", 0) == (0 if batch == 1 else 2)


def test_float16():
    fuses(Rope(dtype=np.float16), rtol=1e-2, atol=2e-3)


def test_torchscript_form_fuses_once_fold_has_made_the_bounds_constant():
    model = rope_model(Rope(form="torchscript"))
    assert not rotary_nodes(fuse(model)[0])  # slice bounds computed at run time: not provably the halves
    optimized = optimize_model(model, passes="fold,cse,fuse,dce", verify=False).model
    assert len(rotary_nodes(optimized)) == 1 and "Neg" not in op_counts(optimized)
    assert_same_outputs(model, optimized, feeds_for(model))


def test_partial_rotation_becomes_one_rotary_embedding_with_its_dimension():
    optimized = fuses(Rope(head_size=16, rotary_dim=8), rotary_embedding_partial=1)
    (node,) = rotary_nodes(optimized)
    assert node.input[0] == "x" and list(node.output) == ["y"] and attribute(node, "rotary_embedding_dim") == 8


def test_partial_rotation_with_another_part_passed_keeps_the_concat():
    # concat(rotate(x[..., :8]), x[..., 4:12]) is not a partial rotation of x.
    optimized = fuses(Rope(head_size=16, rotary_dim=8, passed_start=4), rotary_embedding_partial=0)
    assert producer_of(optimized, "y").op_type == "Concat"


# ---------------------------------------------------------------------------------------------------
# Where it must not


@pytest.mark.parametrize("rope", [
    Rope(split=6),                          # rotate_half split off the middle
    Rope(order="neg_last"),                 # concat(x1, -x2): the opposite rotation
    Rope(cos_halves="different"),           # cos(concat(f, 2f)): halves differ
    Rope(seq=5, constant_cos=True, batch=2, cos_halves="different"),  # a constant whose halves differ
    Rope(opset=22),                         # no RotaryEmbedding in this opset
    Rope(unsqueeze_axis=2),                 # (B, S, N, d): not the operator's 4-D layout
    Rope(head_size=16, seq=16, slice_axis=2),  # rotates along the sequence axis
], ids=["wrong-halves", "wrong-order", "cos-not-concat-c-c", "constant-halves-differ", "opset22",
        "bsnh-layout", "wrong-axis"])
def test_rotary_does_not_fire(rope):
    does_not_fuse(rope)


@pytest.mark.parametrize("target", [Target.OPENVINO, Target.TENSORRT])
def test_rotary_is_not_emitted_for_openvino_or_tensorrt(target):
    does_not_fuse(Rope(), target)


def test_sequence_of_cos_not_provably_that_of_x_does_not_fire():
    model = rope_model(Rope())
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "other"  # positions of another length
    optimized, result = fuse(model)
    assert not result.stats["rotary_embedding"]


def test_a_rotate_half_read_elsewhere_stays():
    model = rope_model(Rope())
    rotated = next(n for n in model.graph.node if n.op_type == "Concat" and n.input[0].startswith("neg")).output[0]
    model.graph.output.append(value(rotated, TensorProto.FLOAT, x_shape(Rope())))
    optimized, result = fuse(model)
    assert not result.stats["rotary_embedding"]


# ---------------------------------------------------------------------------------------------------
# RotaryEmbedding with caches of batch 1 (as the dynamo exporter writes it at opset 23)


def rotary_op_model(x_batch="batch", cache_batch=1, position_ids=False) -> onnx.ModelProto:
    """y = RotaryEmbedding(x, cos, sin[, position_ids]) with x (B, 4, S, 16), caches (cache_batch, S, 8)."""
    inputs = [value("x", TensorProto.FLOAT, [x_batch, 4, "seq", 16]),
              value("cos", TensorProto.FLOAT, [cache_batch, "seq", 8]),
              value("sin", TensorProto.FLOAT, [cache_batch, "seq", 8])]
    names = ["x", "cos", "sin"]
    if position_ids:
        inputs[1:] = [value(n, TensorProto.FLOAT, [32, 8]) for n in ("cos", "sin")]
        inputs.append(value("position_ids", TensorProto.INT64, [x_batch, "seq"]))
        names.append("position_ids")
    node = helper.make_node("RotaryEmbedding", names, ["y"])
    return make_model([node], inputs, [value("y", TensorProto.FLOAT, [x_batch, 4, "seq", 16])], opset=23,
                      ir_version=10)


def cache_feeds(batch: int, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    angles = rng.standard_normal((1, seq, 8))
    return {"x": rng.standard_normal((batch, 4, seq, 16)).astype(np.float32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}


def test_caches_of_batch_one_are_expanded_for_onnxruntime():
    model = rotary_op_model()
    feeds = cache_feeds(batch=2)
    with pytest.raises(Exception, match="cos_cache"):
        run(model, feeds)  # onnxruntime 1.32 refuses caches of another batch than x's
    optimized, result = fuse(model)
    assert result.stats["rotary_cache_batch"] == 1 and op_counts(optimized)["Expand"] == 2
    expected = ReferenceEvaluator(model).run(None, feeds)[0]  # the specification's reference broadcasts
    np.testing.assert_allclose(run(optimized, feeds)[0], expected, rtol=1e-5, atol=1e-6)
    assert_same_outputs(model, optimized, cache_feeds(batch=1))
    assert fuse(optimized)[1].stats["rotary_cache_batch"] == 0  # expanded once


@pytest.mark.parametrize("case", [dict(x_batch=1), dict(cache_batch="batch"), dict(position_ids=True)],
                         ids=["x-of-batch-one", "caches-of-x-batch", "position-ids"])
def test_caches_are_left_alone(case):
    optimized, result = fuse(rotary_op_model(**case))
    assert result.stats["rotary_cache_batch"] == 0 and "Expand" not in op_counts(optimized)


# ---------------------------------------------------------------------------------------------------
# Engines


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_computes_the_fused_model_as_onnxruntime_does():
    import openvino as ov

    model = rope_model(Rope(positions_batch="x"))
    optimized, _ = fuse(model)
    feeds = feeds_for(model, batch=2)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(optimized.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The tiny Llama exports (tests/fixtures/make_llama.py): 2 layers, q and k rotated in each; eager attention and
# transformers' default (``*_sdpa``), whose rotation is the same


LLAMA_LAYERS = 2
LLAMA_FIXTURES = ["llama_tiny_torchscript17.onnx", "llama_tiny_dynamo18.onnx",
                  "llama_tiny_past_torchscript17.onnx", "llama_tiny_past_dynamo18.onnx",
                  "llama_tiny_sdpa_torchscript17.onnx", "llama_tiny_sdpa_dynamo18.onnx",
                  "llama_tiny_past_sdpa_torchscript17.onnx", "llama_tiny_past_sdpa_dynamo18.onnx"]


def llama_feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 5, past: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = {"batch": batch, "sequence": seq, "past_sequence": past}
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or sizes.get(d.dim_param, past + seq) for d in vi.type.tensor_type.shape.dim]
        if vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, 64, dims).astype(np.int64)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones(dims, np.int64)
        elif vi.name == "position_ids":
            feeds[vi.name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("target", ["generic", "ort"])
@pytest.mark.parametrize("fixture", LLAMA_FIXTURES)
def test_llama_fixture_gets_two_rotary_sites_per_layer(fixture, target):
    model = onnx.load(str(FIXTURES / fixture))
    optimized = optimize_model(model, target=target, upgrade_opset=23, verify=False).model
    assert len(rotary_nodes(optimized)) == 2 * LLAMA_LAYERS
    assert not any(n.op_type == "Neg" for n in optimized.graph.node)
    feeds = llama_feeds(model)
    for expected, actual in zip(run(model, feeds), run(optimized, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_llama_exported_at_opset_23_runs_in_onnxruntime_at_batch_2_once_optimized():
    model = onnx.load(str(FIXTURES / "llama_tiny_dynamo23.onnx"))
    assert len(rotary_nodes(model)) == 2 * LLAMA_LAYERS  # the exporter fused them itself
    feeds = llama_feeds(model, batch=2)
    with pytest.raises(Exception, match="cos_cache"):
        run(model, feeds)
    optimized = optimize_model(model, target="ort", verify=False).model
    assert len(rotary_nodes(optimized)) == 2 * LLAMA_LAYERS
    # Each row alone (batch 1) is what the original computes; the optimized model takes both at once.
    rows = [run(model, {name: feed[i:i + 1] for name, feed in feeds.items()})[0] for i in range(2)]
    np.testing.assert_allclose(run(optimized, feeds)[0], np.concatenate(rows), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_llama_fixture_keeps_the_decomposed_rotation_for_openvino():
    model = onnx.load(str(FIXTURES / "llama_tiny_dynamo18.onnx"))
    optimized = optimize_model(model, target="openvino", upgrade_opset=23, verify=False).model
    assert not rotary_nodes(optimized)
    assert sum(n.op_type == "Neg" for n in optimized.graph.node) == 2 * LLAMA_LAYERS



# ---------------------------------------------------------------------------------------------------
# onnxruntime below opset 23: com.microsoft.RotaryEmbedding (ort_fuse), whose caches are (rows, d/2) tables
# indexed by position ids


def ort_fuse(model: onnx.ModelProto, target: Target = Target.ORT):
    return apply_checked(OrtFuse(), model, target)


def contrib_fuses(rope: Rope, batch: int = 2, rtol: float = 1e-4, atol: float = 1e-5, **stats) -> onnx.NodeProto:
    model = rope_model(rope)
    optimized, result = ort_fuse(model)
    for rule, count in {"contrib_rotary_embedding": 1, **stats}.items():
        assert result.stats[rule] == count, result.stats
    (node,) = rotary_nodes(optimized)
    assert node.domain == "com.microsoft" and "Neg" not in op_counts(optimized)
    assert_same_outputs(model, optimized, feeds_for(model, batch), rtol=rtol, atol=atol)
    assert_same_outputs(model, optimized, feeds_for(model, 1, seq=3), rtol=rtol, atol=atol)
    return node


def test_contrib_rotation_with_positions_of_batch_one_reads_its_table_from_offset_zero():
    node = contrib_fuses(Rope(opset=17, positions_batch="one"))
    assert node.input[0] == "x" and attribute(node, "interleaved") == 0


def test_contrib_rotation_with_positions_per_batch_numbers_the_rows_of_each_batch():
    contrib_fuses(Rope(opset=17, positions_batch="x"), batch=3)


@pytest.mark.parametrize("batch", [1, 2])
def test_contrib_rotation_of_constant_cos_and_sin(batch):
    contrib_fuses(Rope(opset=18, batch=batch, seq=6, constant_cos=True), batch=batch)


def test_contrib_rotation_in_float16():
    contrib_fuses(Rope(opset=17, dtype=np.float16), rtol=1e-2, atol=2e-3)


def test_contrib_partial_rotation_names_its_dimension_and_heads():
    node = contrib_fuses(Rope(opset=17, head_size=16, rotary_dim=8), contrib_rotary_embedding_partial=1)
    assert node.input[0] == "x" and attribute(node, "rotary_embedding_dim") == 8 and attribute(node, "num_heads") == 4


@pytest.mark.parametrize("rope, target", [
    (Rope(opset=23), Target.ORT),                 # the standard operator's opset: rotary_embedding's
    (Rope(opset=17), Target.GENERIC),             # contrib operators are for onnxruntime only
    (Rope(opset=17), Target.OPENVINO),
    (Rope(opset=17, cos_halves="different"), Target.ORT),
    (Rope(opset=17, order="neg_last"), Target.ORT),
], ids=["opset23", "generic", "openvino", "halves-differ", "wrong-order"])
def test_contrib_rotation_does_not_fire(rope, target):
    model = rope_model(rope)
    optimized, result = ort_fuse(model, target)
    assert not result.stats.get("contrib_rotary_embedding") and not rotary_nodes(optimized)
    assert_same_outputs(model, optimized, feeds_for(model))


@pytest.mark.parametrize("positions_batch", ["one", "x"])
def test_contrib_rotation_of_split_heads_rotates_the_projection_before_the_split(positions_batch):
    # Llama's query: RotaryEmbedding(Transpose(Reshape(q))) becomes Transpose(Reshape(RotaryEmbedding(q))),
    # the operator's 3-D form with num_heads, which makes the query a head split for MultiHeadAttention.
    node = contrib_fuses(Rope(opset=17, from_3d="plain", positions_batch=positions_batch),
                         contrib_rotary_before_head_split=1)
    assert node.input[0] == "x" and attribute(node, "num_heads") == 4


def test_contrib_rotation_of_heads_read_elsewhere_stays_after_the_split():
    model = rope_model(Rope(opset=17, from_3d="read_elsewhere"))
    optimized, result = ort_fuse(model)
    assert result.stats["contrib_rotary_embedding"] == 1 and not result.stats["contrib_rotary_before_head_split"]
    (node,) = rotary_nodes(optimized)
    assert node.input[0] != "x"
    assert_same_outputs(model, optimized, feeds_for(model))


def test_contrib_rotation_needs_range_for_per_batch_positions():
    rule = next(rule for rule in OrtFuse.rules if rule.name == "contrib_rotary_embedding")
    assert "opset 11" in rule.applies_to({"": 10, "com.microsoft": 1})
    assert rule.applies_to({"": 11, "com.microsoft": 1}) is None


@pytest.mark.slow
@pytest.mark.parametrize("fixture", LLAMA_FIXTURES)
def test_llama_fixture_gets_contrib_rotary_for_onnxruntime_at_its_own_opset(fixture):
    model = onnx.load(str(FIXTURES / fixture))
    optimized = optimize_model(model, target="ort", verify=False).model
    nodes = rotary_nodes(optimized)
    assert len(nodes) == 2 * LLAMA_LAYERS and all(n.domain == "com.microsoft" for n in nodes)
    assert not any(n.op_type == "Neg" for n in optimized.graph.node)
    feeds = llama_feeds(model)
    for expected, actual in zip(run(model, feeds), run(optimized, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
