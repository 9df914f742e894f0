"""Tests of the ``attention`` pass: multi-head attention as exporters write it, recovered into one operator.

The graphs are written the way both torch exporters write transformers' eager attention (BERT, ViT, GPT-2
with a key/value cache, Whisper's pre-scaled query, the dynamo exporter's scale on both Q and K), torch's
scaled_dot_product_attention (transformers' default: a -inf mask and a NaN guard after the Softmax, the
dynamo exporter's Kᵀ through 3-D reshapes), and Llama's (a rotated 4-D query, grouped key/value heads
repeated by repeat_kv). Every rewrite is checked in onnxruntime with graph optimizations off
(MultiHeadAttention, and the standard Attention of opset 23), and the standard operator also in onnx's
reference evaluator, also where a query has no key to attend to. Masks whose rows the Softmax makes NaN (all
-inf, one +inf or NaN; transformers' older ``(1 - m) * lowest`` of odd ``m``) must give NaN in the same places
there, and in OpenVINO when it is installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from helpers import make_model, op_counts, random_feeds, run, tensor, value
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt import ir
from onnxopt.census import fusion_census
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext, Target
from onnxopt.passes.attention import Attention
from onnxopt.pattern import explain

ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


@dataclass(frozen=True)
class Spec:
    """One attention block: shapes, where the scale sits, the mask, and how heads are split and merged."""

    batch: int | str = 2
    seq: int | str = 5
    kv_seq: int | str = 5
    heads: int = 3
    head_size: int = 4
    kv_heads: int | None = None  # fewer key/value heads: grouped-query attention
    kv_batch: int | str | None = None  # the keys' and values' batch, when not the query's
    scale: float = 0.5
    scale_at: str = "scores_mul"  # scores_mul, scores_div, scores_input (a graph input), query, both_heads, none
    mask: tuple | None = None  # the mask's shape, an input of the graph
    cache: bool = False  # keys and values as 4-D [B, H, T, D] inputs (a key/value cache)
    opset: int = 17
    dtype: type = np.float32
    softmax_axis: int = -1
    cast_after_softmax: bool = False
    split_target: tuple | None = None  # the query's head split target, default [0, 0, -1, D]
    merge_target: tuple | None = None  # default [0, 0, -1]
    merge_from_shape: bool = False  # the merge target computed from the query's shape at run time
    # The dynamo exporter: every head split's target is Concat(Shape(ids)[0:1], Shape(ids)[1:2], [-1, D]), with
    # allowzero=1, read from another input "ids" of these dimensions; merge_from: the merge's target likewise,
    # Concat(Shape(merge_ids)[0:1], Shape(merge_ids)[1:2], [-1]), followed by an Identity.
    split_from: tuple | None = None
    merge_from: tuple | None = None
    # torch's scaled_dot_product_attention as exporters write it (transformers' default "sdpa"): the mask a
    # Where(keep, 0, -inf) of a boolean input "keep" of the mask's shape; the probabilities guarded by
    # Where(IsNaN(p), nan_fill, p); the dynamo exporter's Kᵀ: K [B, H, T, D] reshaped to [-1, T, D] (or to
    # key_flat, as constants), transposed [0, 2, 1] and reshaped back to [B, H, D, T], the targets read from
    # Shape(K); and its view of the attended heads, reshaped to heads_view (a constant target).
    bool_mask: bool = False
    masked_with: float = -np.inf  # what Where(keep, 0, ·) puts on the keys masked out
    # transformers' older eager mask, (1 - m) * lowest of an int64 input "attention_mask" [B, T] as [B, 1, 1, T]:
    # m = -1 gives -inf, m = 3 gives +inf.
    hf_mask: bool = False
    nan_guard: bool = False
    nan_fill: float = 0.0
    key_through_matrices: bool = False
    key_flat: tuple | None = None
    heads_view: tuple | None = None
    # Llama: the query a 4-D input [B, H, S, D] (as rotated by RotaryEmbedding), and with a cache of kv_heads
    # heads, transformers' repeat_kv: Unsqueeze at axis 2, Expand to H / kv_heads there, Reshape to H heads
    # ("consecutive"); or, wrongly for grouped heads, at axis 1 ("tiled": heads 0, 1, 0, 1).
    query_4d: bool = False
    repeat_kv: str | None = None
    # MPNet and T5: a relative position bias, an input "position_bias" of this shape, added before the mask.
    position_bias: tuple | None = None


def attention_model(spec: Spec) -> onnx.ModelProto:
    """``y = merge(Softmax(split(q)·split(k)ᵀ * scale + mask)·split(v))`` with q, k, v graph inputs."""
    elem = ELEM[spec.dtype]
    kv_heads = spec.kv_heads or spec.heads
    hidden, kv_hidden = spec.heads * spec.head_size, kv_heads * spec.head_size
    nodes, inits, count = [], [], [0]

    def const(array, dtype=None) -> str:
        count[0] += 1
        name = f"c{count[0]}"
        inits.append(tensor(name, np.asarray(array, dtype or spec.dtype)))
        return name

    def node(op: str, *inputs: str, **attrs) -> str:
        count[0] += 1
        out = f"{op.lower()}{count[0]}"
        nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def scaled(x: str, factor: float) -> str:
        return node("Mul", x, const(factor))

    q_shape = [spec.batch, spec.heads, spec.seq, spec.head_size] if spec.query_4d else [spec.batch, spec.seq, hidden]
    inputs = [value("q", elem, q_shape)]
    q = scaled("q", spec.scale) if spec.scale_at == "query" else "q"

    def split_heads(x: str, constant_target: list) -> str:
        if spec.split_from is None:
            return node("Reshape", x, const(constant_target, np.int64))
        dims = [node("Shape", "ids", start=axis, end=axis + 1) for axis in (0, 1)]
        target = node("Concat", *dims, const([-1, spec.head_size], np.int64), axis=0)
        return node("Reshape", x, target, allowzero=1)

    if spec.split_from is not None:
        inputs.append(value("ids", TensorProto.INT64, list(spec.split_from)))
    split = list(spec.split_target or (0, 0, -1, spec.head_size))
    query = q if spec.query_4d else node("Transpose", split_heads(q, split), perm=[0, 2, 1, 3])

    def repeated(heads: str) -> str:
        if spec.repeat_kv is None:
            return heads
        axis, times = (2 if spec.repeat_kv == "consecutive" else 1), spec.heads // kv_heads
        expand_to = [1, 1, 1, 1, 1]
        expand_to[axis] = times
        expanded = node("Expand", node("Unsqueeze", heads, const([axis], np.int64)), const(expand_to, np.int64))
        return node("Reshape", expanded, const([0, spec.heads, -1, spec.head_size], np.int64))

    def transposed_through_matrices(key: str) -> str:
        shape = node("Shape", key)
        leading, sequence, size = (node("Slice", shape, const([start], np.int64), const([end], np.int64))
                                   for start, end in ((0, -2), (-2, -1), (-1, 4)))
        flat_target = (const(list(spec.key_flat), np.int64) if spec.key_flat
                       else node("Concat", const([-1], np.int64), sequence, size, axis=0))
        flat = node("Transpose", node("Reshape", key, flat_target), perm=[0, 2, 1])
        return node("Reshape", flat, node("Concat", leading, size, sequence, axis=0))

    if spec.cache:
        kv_batch = spec.kv_batch or spec.batch
        inputs += [value("k", elem, [kv_batch, kv_heads, spec.kv_seq, spec.head_size]),
                   value("v", elem, [kv_batch, kv_heads, spec.kv_seq, spec.head_size])]
        keys, values = repeated("k"), repeated("v")
        key_t = (transposed_through_matrices(keys) if spec.key_through_matrices
                 else node("Transpose", keys, perm=[0, 1, 3, 2]))
    else:
        inputs += [value("k", elem, [spec.batch, spec.kv_seq, kv_hidden]),
                   value("v", elem, [spec.batch, spec.kv_seq, kv_hidden])]
        kv_split = [0, 0, -1, spec.head_size]
        if spec.key_through_matrices:
            key_t = transposed_through_matrices(node("Transpose", split_heads("k", kv_split), perm=[0, 2, 1, 3]))
        else:
            key_t = node("Transpose", split_heads("k", kv_split), perm=[0, 2, 3, 1])
        values = node("Transpose", split_heads("v", kv_split), perm=[0, 2, 1, 3])
    if spec.scale_at == "both_heads":
        root = float(np.sqrt(spec.scale))
        query, key_t = scaled(query, root), scaled(key_t, root)
    scores = node("MatMul", query, key_t)
    if spec.scale_at == "scores_mul":
        scores = scaled(scores, spec.scale)
    elif spec.scale_at == "scores_div":
        scores = node("Div", scores, const(1 / spec.scale))
    elif spec.scale_at == "scores_input":
        inputs.append(value("scale", elem, []))
        scores = node("Mul", scores, "scale")
    if spec.position_bias is not None:
        inputs.append(value("position_bias", elem, list(spec.position_bias)))
        scores = node("Add", scores, "position_bias")
    # The mask is always the value named "mask" (see softmaxes_over_scores).
    if spec.bool_mask:
        inputs.append(value("keep", TensorProto.BOOL, list(spec.mask)))
        nodes.append(helper.make_node("Where", ["keep", const(0.0), const(spec.masked_with)], ["mask"]))
        scores = node("Add", scores, "mask")
    elif spec.hf_mask:
        inputs.append(value("attention_mask", TensorProto.INT64, [spec.batch, spec.kv_seq]))
        ones = node("Cast", node("Unsqueeze", "attention_mask", const([1, 2], np.int64)), to=elem)
        lowest = const(np.finfo(spec.dtype).min)
        nodes.append(helper.make_node("Mul", [node("Sub", const(1.0), ones), lowest], ["mask"]))
        scores = node("Add", scores, "mask")
    elif spec.mask is not None:
        inputs.append(value("mask", elem, list(spec.mask)))
        scores = node("Add", scores, "mask")
    probabilities = node("Softmax", scores, axis=spec.softmax_axis)
    if spec.cast_after_softmax:
        probabilities = node("Cast", probabilities, to=elem)
    if spec.nan_guard:
        probabilities = node("Where", node("IsNaN", probabilities), const(spec.nan_fill), probabilities)
    attended = node("MatMul", probabilities, values)
    if spec.heads_view is not None:
        attended = node("Reshape", attended, const(list(spec.heads_view), np.int64))
    merged = node("Transpose", attended, perm=[0, 2, 1, 3])
    allow_zero = {}
    if spec.merge_from_shape:
        shape = node("Shape", "q")
        first_two = node("Slice", shape, const([0], np.int64), const([2], np.int64))
        target = node("Concat", first_two, const([-1], np.int64), axis=0)
    elif spec.merge_from is not None:
        inputs.append(value("merge_ids", TensorProto.INT64, list(spec.merge_from)))
        dims = [node("Shape", "merge_ids", start=axis, end=axis + 1) for axis in (0, 1)]
        target, allow_zero = node("Concat", *dims, const([-1], np.int64), axis=0), {"allowzero": 1}
    else:
        target = const(list(spec.merge_target or (0, 0, -1)), np.int64)
    if spec.merge_from is not None:
        nodes.append(helper.make_node("Identity", [node("Reshape", merged, target, allowzero=1)], ["y"]))
    else:
        nodes.append(helper.make_node("Reshape", [merged, target], ["y"], **allow_zero))
    rank = 3 if spec.merge_from_shape or spec.merge_from else len(spec.merge_target or (0, 0, -1))
    graph = helper.make_graph(nodes, "attention", inputs, [value("y", elem, [None] * rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 10 if spec.opset >= 23 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def attention(model: onnx.ModelProto, target: Target) -> tuple[onnx.ModelProto, dict]:
    """Runs the pass once; checks the pass contracts and onnx.checker on the result."""
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = Attention()(graph, PassContext(original=model, target=target))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized)
    return optimized, result.stats


def feeds_for(model: onnx.ModelProto, spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = random_feeds(model, seed, dynamic_dim=3)
    if "mask" in feeds:
        # A padding-like mask: large negative values on some keys, small noise elsewhere.
        rng = np.random.default_rng(seed + 1)
        mask = rng.uniform(-1, 1, feeds["mask"].shape)
        mask[..., :1] = -1e4
        feeds["mask"] = mask.astype(spec.dtype)
    if "keep" in feeds:
        feeds["keep"][..., 1:] = True  # the first key masked out at random, no row masked out entirely
    return feeds


def assert_close(want: list[np.ndarray], got: list[np.ndarray], rtol: float) -> None:
    for expected, actual in zip(want, got):
        assert expected.shape == actual.shape and expected.dtype == actual.dtype
        finite = np.abs(expected[np.isfinite(expected)])
        scale = max(float(finite.max()) if finite.size else 0.0, 1.0)
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def softmaxes_over_scores(model: onnx.ModelProto) -> list[str]:
    """The Softmax nodes left but the one over the mask (or its 4-D form) that finds the rows it makes NaN."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def over_mask(name: str) -> bool:
        made_by = producers.get(name)
        if made_by is not None and made_by.op_type == "Add" and set(made_by.input) == {"mask", "position_bias"}:
            return True  # the position bias and the mask summed into one mask
        return name == "mask" or (made_by is not None and made_by.op_type == "Unsqueeze" and made_by.input[0] == "mask")

    return [node.output[0] for node in model.graph.node if node.op_type == "Softmax" and not over_mask(node.input[0])]


def check_fires(spec: Spec, target: Target, fused_op: str) -> onnx.ModelProto:
    model = attention_model(spec)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1 + (spec.position_bias is not None), stats
    counts = op_counts(optimized)
    assert counts.get(fused_op) == 1 and "MatMul" not in counts and not softmaxes_over_scores(optimized), counts
    feeds = feeds_for(model, spec)
    rtol = 1e-4 if spec.dtype == np.float32 else 1e-2
    assert_close(run(model, feeds), run(optimized, feeds), rtol)
    return optimized


ORT_CASES = {
    "bert": Spec(mask=(2, 1, 5, 5)),
    "bert_padding_mask": Spec(mask=(2, 1, 1, 5)),  # expanded to [B, 1, S, T] first
    "bert_2d_mask": Spec(mask=(5, 5)),
    "vit_cast": Spec(cast_after_softmax=True),
    "divided": Spec(scale_at="scores_div", scale=0.25),
    "whisper_scaled_query": Spec(scale_at="query", split_target=(2, 5, 3, 4), merge_target=(2, 5, -1)),
    "dynamo_sqrt_scales": Spec(scale_at="both_heads", scale=0.3),
    "no_scale": Spec(scale_at="none"),
    "cross_attention": Spec(seq=4, kv_seq=6, mask=(1, 1, 4, 6)),
    "gpt2_cache": Spec(cache=True, kv_seq=7, mask=(2, 1, 5, 7)),
    "gpt2_2d_merge": Spec(batch=1, merge_target=(5, 12), mask=(1, 1, 5, 5)),
    "heads_minus_one": Spec(split_target=(0, 0, 3, -1)),
    "sequence_minus_one": Spec(split_target=(2, -1, 3, 4)),
    "dynamic": Spec(batch="B", seq="S", kv_seq="S", mask=("B", 1, "S", "S")),
    "dynamic_merge": Spec(batch="B", seq="S", kv_seq="S", merge_from_shape=True),
    "merge_keeps_heads": Spec(merge_target=(0, 0, 0, -1)),  # a merge that does not merge: restored first
    "opset_12_softmax": Spec(opset=12, softmax_axis=3),
    "dynamo_split_from_inputs": Spec(batch="B", seq="S", kv_seq="S", split_from=("B", "S"), mask=("B", 1, "S", "S")),
    "dynamo_split_from_static_inputs": Spec(split_from=(2, 5)),
    "dynamo_merge_from_inputs": Spec(batch="B", seq="S", kv_seq="S", split_from=("B", "S"), merge_from=("B", "S")),
    # transformers' default attention, torch's scaled_dot_product_attention with a boolean mask:
    "sdpa_torchscript": Spec(scale_at="both_heads", scale=0.3, mask=(2, 1, 5, 5), bool_mask=True, nan_guard=True),
    "sdpa_dynamo": Spec(scale_at="both_heads", scale=0.3, mask=(2, 1, 5, 5), bool_mask=True, nan_guard=True,
                        key_through_matrices=True),
    "sdpa_dynamo_cache": Spec(cache=True, kv_seq=7, scale_at="both_heads", scale=0.3, mask=(2, 1, 5, 7),
                              bool_mask=True, nan_guard=True, key_through_matrices=True),
    "sdpa_dynamo_dynamic": Spec(batch="B", seq="S", kv_seq="S", mask=("B", 1, "S", "S"), bool_mask=True,
                                nan_guard=True, key_through_matrices=True),
    "sdpa_dynamo_heads_view": Spec(key_through_matrices=True, heads_view=(-1, 3, 5, 4)),
    "mpnet_position_bias": Spec(position_bias=(2, 3, 5, 5), mask=(2, 1, 1, 5)),
    "t5_position_bias_no_scale": Spec(scale_at="none", position_bias=(1, 3, 5, 5), mask=(2, 1, 1, 5)),
}


@pytest.mark.parametrize("case", ORT_CASES, ids=list(ORT_CASES))
def test_multi_head_attention_for_onnxruntime(case):
    optimized = check_fires(ORT_CASES[case], Target.ORT, "MultiHeadAttention")
    assert {o.domain for o in optimized.opset_import} >= {"com.microsoft"}


STANDARD_CASES = {
    "bert": Spec(opset=23, mask=(2, 1, 5, 5)),
    "padding_mask": Spec(opset=23, mask=(2, 1, 1, 5)),
    "position_bias": Spec(opset=23, position_bias=(1, 3, 5, 5), mask=(2, 1, 1, 5)),
    "gpt2_cache": Spec(opset=23, cache=True, kv_seq=7, mask=(2, 1, 5, 7)),
    "dynamo": Spec(opset=23, scale_at="both_heads", scale=0.3, mask=(5, 5)),
    "float16": Spec(opset=23, dtype=np.float16, mask=(2, 1, 5, 5)),
    "dynamic_merge": Spec(opset=23, batch="B", seq="S", kv_seq="S", merge_from_shape=True),
    "dynamo_split_from_inputs": Spec(opset=23, batch="B", seq="S", kv_seq="S", split_from=("B", "S")),
    "sdpa_dynamo": Spec(opset=23, scale_at="both_heads", scale=0.3, mask=(2, 1, 5, 5), bool_mask=True,
                        nan_guard=True, key_through_matrices=True),
    "sdpa_dynamo_cache": Spec(opset=23, cache=True, kv_seq=7, mask=(2, 1, 5, 7), bool_mask=True, nan_guard=True,
                              key_through_matrices=True),
    # Llama: a rotated 4-D query, keys and values of fewer heads repeated by repeat_kv (which goes).
    "llama_grouped": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=2,
                          repeat_kv="consecutive", mask=(2, 1, 5, 7)),
    "llama_grouped_dynamic": Spec(opset=23, query_4d=True, cache=True, batch="B", seq="S", kv_seq="T", heads=4,
                                  kv_heads=2, repeat_kv="consecutive", mask=("B", 1, "S", "T")),
    "llama_sdpa_dynamo": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=1,
                              repeat_kv="consecutive", key_through_matrices=True, bool_mask=True, nan_guard=True,
                              mask=(2, 1, 5, 7), scale_at="both_heads", scale=0.3),
    "grouped_split_query": Spec(opset=23, cache=True, kv_seq=7, heads=4, kv_heads=2, repeat_kv="consecutive",
                                mask=(2, 1, 5, 7)),
    # Heads repeated in turn (0, 1, 0, 1) are no grouping of the operator's: the repeated keys are read as they are.
    "tiled_repeat_kept": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=2, repeat_kv="tiled"),
}


@pytest.mark.parametrize("target", [Target.GENERIC, Target.OPENVINO])
@pytest.mark.parametrize("case", STANDARD_CASES, ids=list(STANDARD_CASES))
def test_standard_attention_at_opset_23(case, target):
    spec = STANDARD_CASES[case]
    optimized = check_fires(spec, target, "Attention")
    model = attention_model(spec)
    feeds = feeds_for(model, spec)
    rtol = 1e-4 if spec.dtype == np.float32 else 1e-2
    reference = ReferenceEvaluator(optimized).run(None, feeds)
    assert_close(run(model, feeds), reference, rtol)


@pytest.mark.parametrize("repeat", ["consecutive", "tiled"])
def test_repeated_heads_become_grouped_heads(repeat):
    # Query head h reads key/value head h // 2 only when repeat_kv repeats each head in a row: then the operator
    # reads the 2 heads themselves (its grouping), else the 4 repeated ones.
    spec = STANDARD_CASES["llama_grouped" if repeat == "consecutive" else "tiled_repeat_kept"]
    optimized = check_fires(spec, Target.GENERIC, "Attention")
    (fused,) = [n for n in optimized.graph.node if n.op_type == "Attention"]
    assert (list(fused.input[1:3]) == ["k", "v"]) == (repeat == "consecutive")
    assert op_counts(optimized).get("Expand", 0) == (0 if repeat == "consecutive" else 2)


@pytest.mark.parametrize("target", [Target.GENERIC, Target.ORT])
@pytest.mark.parametrize("merge_dims", [("B", "S"), ("B2", "S2")])
def test_dynamo_merge_read_from_inputs(target, merge_dims):
    # Split and merge targets read from the shape of an input "ids", as the dynamo exporter writes them: a
    # merge known to give [B, S, H*D] of the query's own B and S is dropped, any other kept after the operator.
    spec = Spec(opset=23, batch="B", seq="S", kv_seq="S", split_from=("B", "S"), merge_from=merge_dims)
    model = attention_model(spec)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1, stats
    assert op_counts(optimized).get("Reshape", 0) == (0 if merge_dims == ("B", "S") else 1)
    feeds = feeds_for(model, spec)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-4)


@pytest.mark.parametrize("target", [Target.GENERIC, Target.ORT])
@pytest.mark.parametrize("grouped", [False, True], ids=["gpt2", "llama"])
@pytest.mark.parametrize("masked_with", ["lowest", "minus_infinity"])
def test_rows_masked_out_entirely(target, grouped, masked_with):
    # GPT-2 or Llama with left padding: padded queries see only padded keys. Eager attention masks them with the
    # type's lowest value (the Softmax makes such a row uniform); torch's scaled_dot_product_attention with -inf,
    # and its NaN guard makes the row's NaNs zeros: the standard operator gives zeros there by its definition,
    # MultiHeadAttention NaN, which the guard moved after it turns into zeros too.
    sdpa = masked_with == "minus_infinity"
    llama = {"query_4d": True, "heads": 4, "kv_heads": 2, "repeat_kv": "consecutive"} if grouped else {}
    spec = Spec(opset=23, cache=True, kv_seq=7, mask=(2, 1, 5, 7), bool_mask=sdpa, nan_guard=sdpa,
                key_through_matrices=sdpa, **llama)
    model = attention_model(spec)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1
    feeds = feeds_for(model, spec)
    if sdpa:
        feeds["keep"][:, :, :2, :] = False
    else:
        feeds["mask"][:, :, :2, :] = np.finfo(np.float32).min
    want = run(model, feeds)
    assert not np.isnan(want[0]).any()
    assert_close(want, run(optimized, feeds), 1e-4)
    if target == Target.GENERIC:
        assert_close(want, ReferenceEvaluator(optimized).run(None, feeds), 1e-4)


# Rows the Softmax makes NaN: a query whose keys are all -inf, or one of them +inf or NaN. Eager attention gives NaN
# there and the operators must too; the NaN guard of torch's scaled_dot_product_attention makes them zeros.
NAN_ROW_CASES = {
    "bert": Spec(opset=23, mask=(2, 1, 5, 5)),
    "padding_mask": Spec(opset=23, mask=(2, 1, 1, 5)),
    "mask_2d": Spec(opset=23, mask=(5, 5)),
    "mask_per_head": Spec(opset=23, mask=(2, 3, 5, 5)),
    "dynamic": Spec(opset=23, batch="B", seq="S", kv_seq="S", mask=("B", 1, "S", "S")),
    "gpt2_cache": Spec(opset=23, cache=True, kv_seq=7, mask=(2, 1, 5, 7)),
    "llama_grouped": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=2, repeat_kv="consecutive",
                          mask=(2, 1, 5, 7)),
    "float16": Spec(opset=23, dtype=np.float16, mask=(2, 1, 5, 5)),
    "eager_minus_infinity": Spec(opset=23, mask=(2, 1, 5, 5), bool_mask=True),
    "guarded": Spec(opset=23, mask=(2, 1, 5, 5), nan_guard=True),
    "guarded_mask_2d": Spec(opset=23, mask=(5, 5), nan_guard=True),
    "guarded_llama": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=2,
                          repeat_kv="consecutive", mask=(2, 1, 5, 7), nan_guard=True),
}


def special_rows(feeds: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """The feeds with the mask's rows made, in turn: all -inf, partly -inf, all +inf, one +inf, one NaN, all the
    lowest float (not in float16, see below), -inf and +inf, finite. A boolean mask gets rows of keys all masked
    out, or some.

    A float16 row of the lowest float is uniform in the original only because ``score - 65504`` rounds the scores
    away; with half of it (``lowest_spared``) onnx's reference evaluator keeps some of them (onnxruntime and
    OpenVINO agree with the original): not a row the Softmax makes NaN, left out here.
    """
    feeds = dict(feeds)
    if "keep" in feeds:
        keep = feeds["keep"].reshape(-1, feeds["keep"].shape[-1]).copy()
        keep[0::2], keep[1::2, 1:] = False, True
        feeds["keep"] = keep.reshape(feeds["keep"].shape)
        return feeds
    mask = feeds["mask"].reshape(-1, feeds["mask"].shape[-1]).copy()
    rows = [np.full(mask.shape[1], -np.inf), np.r_[np.full(2, -np.inf), mask[0, 2:]], np.full(mask.shape[1], np.inf),
            np.r_[mask[0, :1], np.inf, mask[0, 2:]], np.r_[mask[0, :1], np.nan, mask[0, 2:]],
            np.full(mask.shape[1], np.finfo(dtype).min if dtype == np.float32 else -np.inf),
            np.r_[-np.inf, np.inf, np.full(mask.shape[1] - 2, -np.inf)]]
    for index in range(mask.shape[0]):
        if index % (len(rows) + 1) < len(rows):
            mask[index] = rows[index % (len(rows) + 1)]
    feeds["mask"] = mask.reshape(feeds["mask"].shape).astype(dtype)
    return feeds


OPENVINO_INSTALLED = importlib.util.find_spec("openvino") is not None


def openvino_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in OpenVINO's CPU plugin, in float32 (by default it may compute in bfloat16)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return [results[output] for output in compiled.outputs]


def assert_same_nan_rows(spec: Spec, target: Target, feeds: dict[str, np.ndarray]) -> None:
    """The optimized model computes the original's outputs, NaNs in the same places: in onnxruntime; for the
    standard operator also in onnx's reference evaluator and OpenVINO (when installed)."""
    model = attention_model(spec)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1, stats
    rtol = 1e-4 if spec.dtype == np.float32 else 1e-2
    want = run(model, feeds)
    assert np.isnan(want[0]).any() != spec.nan_guard
    assert_close(want, run(optimized, feeds), rtol)
    if target != Target.ORT:
        assert_close(want, ReferenceEvaluator(optimized).run(None, feeds), rtol)
        if OPENVINO_INSTALLED:
            assert_close(want, openvino_outputs(optimized, feeds), rtol)


@pytest.mark.parametrize("case, target", [(case, target) for case, spec in NAN_ROW_CASES.items()
                                           for target in (Target.GENERIC, Target.OPENVINO, Target.ORT)
                                           if spec.dtype == np.float32 or target != Target.ORT])  # ORT: float32 only
def test_rows_the_softmax_makes_nan(case, target):
    spec = NAN_ROW_CASES[case]
    model = attention_model(spec)
    assert_same_nan_rows(spec, target, special_rows(feeds_for(model, spec), spec.dtype))


@pytest.mark.parametrize("target", [Target.GENERIC, Target.OPENVINO, Target.ORT])
@pytest.mark.parametrize("cache", [False, True], ids=["bert", "gpt2"])
@pytest.mark.parametrize("attention_mask", [[[1, -1, 0, 2, 1, 1, 1], [-1] * 7],
                                            [[1, 1, 1, 3, 1, 1, 1], [1, 0] * 3 + [1]]], ids=["minus_one", "three"])
def test_transformers_mask_of_odd_values(target, cache, attention_mask):
    # (1 - m) * lowest: m = -1 gives -inf (a batch row of -1 masks every key out), m = 3 gives +inf; 0 the lowest.
    spec = Spec(opset=23, hf_mask=True, cache=cache, kv_seq=7 if cache else 5)
    model = attention_model(spec)
    feeds = feeds_for(model, spec)
    feeds["attention_mask"] = np.array(attention_mask, np.int64)[:, :spec.kv_seq]
    assert_same_nan_rows(spec, target, feeds)


def two_layers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The attention twice, the second on a query of its own ("q_2", giving "y_2"): keys, values and mask shared."""
    graph = model.graph
    shared = {vi.name for vi in graph.input} - {"q"}

    def renamed(name: str) -> str:
        return name if name in shared or not name else f"{name}_2"

    second = onnx.GraphProto()
    second.CopyFrom(graph)
    for node in second.node:
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for initializer in second.initializer:
        initializer.name = renamed(initializer.name)
    for vi in [*second.input, *second.output]:
        vi.name = renamed(vi.name)
    graph.node.extend(second.node)
    graph.initializer.extend(second.initializer)
    graph.input.extend(vi for vi in second.input if vi.name not in shared)
    graph.output.extend(second.output)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("target, case, made_once", [
    (Target.GENERIC, "bert", {"Softmax": 1, "ReduceSum": 1, "Sub": 1, "Squeeze": 1}),
    (Target.GENERIC, "mask_per_head", {"Softmax": 1, "ReduceSum": 1, "Sub": 1, "Expand": 1, "Transpose": 1}),
    (Target.GENERIC, "mask_2d", {"Unsqueeze": 1, "Softmax": 1, "ReduceSum": 1, "Sub": 1, "Squeeze": 1}),
    (Target.GENERIC, "gpt2_cache", {"Softmax": 1, "ReduceSum": 1, "Sub": 1}),
    (Target.ORT, "llama_grouped", {"Softmax": 1, "ReduceSum": 1, "Sub": 1}),
    (Target.GENERIC, "guarded_mask_2d", {"Unsqueeze": 1, "Softmax": 1, "ReduceSum": 1, "IsNaN": 1}),
    # The mask's rows of the lowest float halved (lowest_spared) once too: an Equal and a Where.
    (Target.GENERIC, "guarded", {"Softmax": 1, "ReduceSum": 1, "IsNaN": 1, "Equal": 1, "Where": 2}),
])
def test_nan_rows_found_once_per_mask(target, case, made_once):
    # Two layers reading one mask share the correction: each node of it is made once. The generic target adds it
    # to each operator's result (an Add per layer); for onnxruntime's standard operator it goes into the mask.
    spec = NAN_ROW_CASES[case]
    model = two_layers(attention_model(spec))
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 2, stats
    counts = op_counts(optimized)
    assert {op: counts.get(op, 0) for op in made_once} == made_once, counts
    per_layer_adds = 2 if target == Target.GENERIC and not spec.nan_guard else 0
    assert counts.get("Add", 0) == per_layer_adds + (1 if target == Target.ORT else 0), counts
    feeds = special_rows(feeds_for(model, spec), spec.dtype)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-4)


PROVEN_MASKS = {
    "eager_lowest": Spec(opset=23, mask=(2, 1, 5, 7), cache=True, kv_seq=7, bool_mask=True,
                         masked_with=float(np.finfo(np.float32).min)),
    "sdpa_minus_infinity": Spec(opset=23, mask=(2, 1, 5, 7), cache=True, kv_seq=7, bool_mask=True, nan_guard=True),
    "llama_eager_lowest": Spec(opset=23, query_4d=True, cache=True, kv_seq=7, heads=4, kv_heads=2,
                               repeat_kv="consecutive", mask=(2, 1, 5, 7), bool_mask=True,
                               masked_with=float(np.finfo(np.float32).min)),
}


@pytest.mark.parametrize("target", [Target.GENERIC, Target.ORT])
@pytest.mark.parametrize("case", PROVEN_MASKS, ids=list(PROVEN_MASKS))
def test_no_correction_where_the_mask_cannot_make_nan_rows(case, target):
    # transformers' masks, Where(keep, 0, lowest) (never a NaN row) and the guarded Where(keep, 0, -inf) (rows of
    # -inf, which the operator gives zeros as the guard does): nothing is added, rows masked out entirely included.
    spec = PROVEN_MASKS[case]
    model = attention_model(spec)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1, stats
    counts = op_counts(optimized)
    assert not {"Softmax", "ReduceSum", "Sub"} & set(counts), counts
    feeds = special_rows(feeds_for(model, spec), spec.dtype)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-4)


@pytest.mark.parametrize("case", ["llama_grouped", "llama_grouped_dynamic", "llama_sdpa_dynamo", "grouped_split_query"])
def test_standard_attention_for_onnxruntime_where_multi_head_attention_does_not_fit(case):
    check_fires(STANDARD_CASES[case], Target.ORT, "Attention")


@pytest.mark.parametrize("case", ["bert", "gpt2_cache", "sdpa_dynamo_cache"])
def test_multi_head_attention_for_onnxruntime_where_it_fits_at_opset_23(case):
    optimized = check_fires(STANDARD_CASES[case], Target.ORT, "MultiHeadAttention")
    assert "Attention" not in op_counts(optimized)


NOT_FUSED = {
    "softmax_not_last_axis": (Spec(softmax_axis=2), "Softmax is not over the last axis"),
    "grouped_query": (Spec(cache=True, kv_heads=1), "heads"),
    "negative_scale": (Spec(scale=-0.5), "not a positive"),
    # [2, 5, 12] -> [1, 10, 3, 4]: every batch's queries against every batch's keys, no attention per batch.
    "split_mixes_batches": (Spec(split_target=(1, 10, -1, 4)), "keep the first two dimensions"),
    "float64": (Spec(dtype=np.float64), "float64"),
    "scale_fed_at_run_time": (Spec(scale_at="scores_input"), "not a scalar float constant"),
    # Targets read from an input whose dimensions are not provably the query's: [B2, S2] may be [S, B].
    "split_from_unrelated_input": (Spec(batch="B", seq="S", kv_seq="S", split_from=("B2", "S2")),
                                   "nor is its output known to keep"),
    # [2, 5, 12] -> [1, 10, 3, 4] again, with the target read at run time.
    "split_from_input_mixes_batches": (Spec(split_from=(1, 10)), "nor is its output known to keep"),
    # Keys and values of batch 1 broadcast against the query's batch of 2.
    "keys_broadcast_over_batch": (Spec(cache=True, kv_batch=1), "query's batch"),
    # MultiHeadAttention takes the query as [B, S, H*D]: a 4-D one (Llama's) is no match.
    "query_4d_for_multi_head_attention": (Spec(query_4d=True, cache=True), "'q' is not produced by a node"),
    # Grouped heads before opset 23: MultiHeadAttention would read them repeated, no faster than unfused.
    "repeated_heads_for_multi_head_attention": (Spec(cache=True, heads=4, kv_heads=2, repeat_kv="consecutive"),
                                                "repeat_kv repeated"),
    # A guard that puts 1 in place of NaN: a row masked out entirely sums the values.
    "nan_guard_fills_one": (Spec(mask=(2, 1, 5, 5), bool_mask=True, nan_guard=True, nan_fill=1.0),
                            "does not put a scalar 0"),
    # Each [T, D] = [5, 4] matrix of K read as [4, 5] before it is transposed: not Kᵀ.
    "key_matrices_misread": (Spec(key_through_matrices=True, key_flat=(-1, 4, 5)), "keep the keys' last two"),
    # The attended [2, 3, 5, 4] read as [2, 5, 3, 4]: heads and sequence mixed.
    "heads_view_reshuffles": (Spec(heads_view=(2, 5, 3, 4)), "not known to keep the shape"),
}


@pytest.mark.parametrize("case", NOT_FUSED, ids=list(NOT_FUSED))
def test_not_fused(case):
    spec, reason = NOT_FUSED[case]
    model = attention_model(spec)
    optimized, stats = attention(model, Target.ORT)
    assert not any(stats.values()), stats
    assert op_counts(optimized) == op_counts(model)
    explanation = explain(model, Attention, PassContext(target=Target.ORT))
    assert any(reason in attempt.reason for attempt in explanation.misses()), explanation.format()
    feeds = feeds_for(model, spec)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-6)


@pytest.mark.parametrize("target", [Target.GENERIC, Target.TENSORRT])
def test_standard_attention_needs_opset_23(target):
    model = attention_model(Spec(mask=(2, 1, 5, 5)))
    optimized, stats = attention(model, target)
    assert not any(stats.values())
    assert op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("read", ["probabilities", "keys"])
def test_intermediate_read_elsewhere_is_not_fused(read):
    # The Softmax's output, or the dynamo exporter's K (read by Shape nodes too, which alone would not stop it).
    model = attention_model(Spec(key_through_matrices=True))
    shape_read = [n.input[0] for n in model.graph.node if n.op_type == "Shape"]
    name = next(n.output[0] for n in model.graph.node if n.op_type == "Softmax") if read == "probabilities" \
        else shape_read[0]
    model.graph.output.append(value(name, TensorProto.FLOAT, [None] * 4))
    optimized, stats = attention(model, Target.ORT)
    assert not any(stats.values())
    assert op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("target", [Target.GENERIC, Target.ORT])
def test_position_bias_read_elsewhere_stays_added_first(target):
    # scores + position_bias is an output too: summing the two addends first would lose it, so neither
    # the biases nor the attention change (the mask of an operator must be one tensor).
    spec = Spec(position_bias=(2, 3, 5, 5), mask=(2, 1, 1, 5))
    model = attention_model(spec)
    biased = next(n.output[0] for n in model.graph.node if n.op_type == "Add" and "position_bias" in n.input)
    model.graph.output.append(value(biased, TensorProto.FLOAT, [None] * 4))
    optimized, stats = attention(model, target)
    assert not any(stats.values())
    assert op_counts(optimized) == op_counts(model)
    feeds = feeds_for(model, spec)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-6)


def test_golden_bert_block():
    """Before: TorchScript's BERT self-attention; after: one MultiHeadAttention reading q, k, v and the mask."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        bert (float[1, 4, 8] q, float[1, 4, 8] k, float[1, 4, 8] v, float[1, 1, 4, 4] mask) => (float[1, 4, 8] y) {
            split = Constant <value = int64[4] {1, 4, -1, 4}> ()
            scale = Constant <value = float {0.5}> ()
            merge = Constant <value = int64[3] {1, 4, -1}> ()
            q4 = Reshape(q, split)
            qh = Transpose <perm = [0, 2, 1, 3]> (q4)
            k4 = Reshape(k, split)
            kt = Transpose <perm = [0, 2, 3, 1]> (k4)
            v4 = Reshape(v, split)
            vh = Transpose <perm = [0, 2, 1, 3]> (v4)
            scores = MatMul(qh, kt)
            scaled = Mul(scores, scale)
            masked = Add(scaled, mask)
            p = Softmax <axis = -1> (masked)
            heads = MatMul(p, vh)
            merged = Transpose <perm = [0, 2, 1, 3]> (heads)
            y = Reshape(merged, merge)
        }
    """)
    optimized, stats = attention(model, Target.ORT)
    assert {rule: count for rule, count in stats.items() if count} == {"sdpa_to_multi_head_attention": 1}
    (fused,) = [n for n in optimized.graph.node if n.op_type != "Constant"]
    assert (fused.op_type, fused.domain, list(fused.input)) == ("MultiHeadAttention", "com.microsoft",
                                                               ["q", "k", "v", "", "", "mask"])
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    assert attrs == {"num_heads": 2, "scale": 0.5}
    assert list(fused.output) == ["y"]
    feeds = feeds_for(model, Spec())
    assert_close(run(model, feeds), run(optimized, feeds), 1e-4)


def test_census_counts_the_attention_and_no_lost_fusion():
    model = attention_model(Spec(mask=(2, 1, 5, 5)))
    optimized, _ = attention(model, Target.ORT)
    census = fusion_census(model, optimized)
    rows = {row.label: row for row in census.rows}
    assert rows["com.microsoft.MultiHeadAttention"].change == 1
    assert census.regressions == [], census.to_dict()  # onnxruntime's FusedMatMul of Q·Kᵀ is taken in


def cache_model(axis: int = -2, heads_concat: bool = False, present_read: bool = False,
                mask_from_present: bool = False) -> onnx.ModelProto:
    """GPT-2's attention over a key/value cache: ``present = Concat(past, new, axis)`` for keys and values (both
    graph outputs), a 4-D query, 3 heads of size 4, batch B, 5 new tokens after P, a mask ``[B, 1, 5, P + 5]``.

    ``heads_concat``: the cache is one head concatenated with two (axis 1), not earlier tokens; ``present_read``:
    the keys' present is also read by a Neg; ``mask_from_present``: the mask adds ``0 * ReduceSum(present_key)``.
    """
    past_heads, new_heads, past = (1, 2, "T") if heads_concat else (3, 3, "P")
    new_len = "T" if heads_concat else 5
    nodes = [helper.make_node("Concat", ["past_key", "key"], ["present_key"], axis=1 if heads_concat else axis),
             helper.make_node("Concat", ["past_value", "value"], ["present_value"], axis=1 if heads_concat else axis),
             helper.make_node("Transpose", ["present_key"], ["keys_t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["query", "keys_t"], ["scores"]),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probabilities"], axis=-1),
             helper.make_node("MatMul", ["probabilities", "present_value"], ["heads"]),
             helper.make_node("Transpose", ["heads"], ["by_query"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["by_query", "merge"], ["y"])]
    initializers = [tensor("scale", np.array(0.5, np.float32)), tensor("merge", np.array([0, 0, -1], np.int64))]
    if mask_from_present:
        nodes[5:6] = [helper.make_node("ReduceSum", ["present_key"], ["key_sum"], keepdims=1),
                      helper.make_node("Mul", ["key_sum", "zero"], ["no_change"]),
                      helper.make_node("Add", ["given_mask", "no_change"], ["mask"]),
                      helper.make_node("Add", ["scaled", "mask"], ["masked"])]
        initializers.append(tensor("zero", np.array(0, np.float32)))
    outputs = [value("y", TensorProto.FLOAT, ["B", 5, 12]), value("present_key", TensorProto.FLOAT, ["B", 3, "T", 4]),
               value("present_value", TensorProto.FLOAT, ["B", 3, "T", 4])]
    if present_read:
        nodes.append(helper.make_node("Neg", ["present_key"], ["negated_keys"]))
        outputs.append(value("negated_keys", TensorProto.FLOAT, ["B", 3, "T", 4]))
    inputs = [value("query", TensorProto.FLOAT, ["B", 3, 5, 4]),
              value("key", TensorProto.FLOAT, ["B", new_heads, new_len, 4]),
              value("value", TensorProto.FLOAT, ["B", new_heads, new_len, 4]),
              value("past_key", TensorProto.FLOAT, ["B", past_heads, past, 4]),
              value("past_value", TensorProto.FLOAT, ["B", past_heads, past, 4]),
              value("given_mask" if mask_from_present else "mask", TensorProto.FLOAT, ["B", 1, 5, "T"])]
    graph = helper.make_graph(nodes, "cache", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def cache_feeds(past: int, padding: int = 2, heads_concat: bool = False) -> dict[str, np.ndarray]:
    """Batch 2, 5 new tokens after ``past``; the second row's first ``padding`` keys are left padding."""
    rng = np.random.default_rng(past)
    total = 5 if heads_concat else past + 5
    past_shape, new_shape = ((2, 1, total, 4), (2, 2, total, 4)) if heads_concat else ((2, 3, past, 4), (2, 3, 5, 4))
    mask = np.zeros((2, 1, 5, total), np.float32)
    mask[1, :, :, :padding] = np.finfo(np.float32).min
    return {"query": rng.standard_normal((2, 3, 5, 4), np.float32),
            "key": rng.standard_normal(new_shape, np.float32), "value": rng.standard_normal(new_shape, np.float32),
            "past_key": rng.standard_normal(past_shape, np.float32),
            "past_value": rng.standard_normal(past_shape, np.float32), "mask": mask}


def assert_cache_outputs_kept(model: onnx.ModelProto, optimized: onnx.ModelProto, target: Target, past: int) -> None:
    """The outputs, presents included, on onnxruntime, and for the standard operator on OpenVINO when installed."""
    feeds = cache_feeds(past)
    want = run(model, feeds)
    assert_close(want, run(optimized, feeds), 1e-5)
    if target != Target.ORT and OPENVINO_INSTALLED:
        assert_close(want, openvino_outputs(optimized, feeds), 1e-5)


@pytest.mark.parametrize("past", [0, 3, 128])
@pytest.mark.parametrize("axis", [2, -2])
@pytest.mark.parametrize("target", [Target.GENERIC, Target.OPENVINO, Target.ORT])
def test_cache_concats_become_past_and_present(target, axis, past):
    model = cache_model(axis)
    optimized, stats = attention(model, target)
    assert sum(stats.values()) == 1, stats
    assert "Concat" not in op_counts(optimized)
    (fused,) = [n for n in optimized.graph.node if n.op_type == "Attention"]
    assert list(fused.input[1:3]) + list(fused.input[4:]) == ["key", "value", "past_key", "past_value"]
    assert list(fused.output[1:]) == ["present_key", "present_value"]
    assert_cache_outputs_kept(model, optimized, target, past)


def test_present_read_by_other_nodes_is_replaced():
    model = cache_model(present_read=True)
    optimized, stats = attention(model, Target.GENERIC)
    assert sum(stats.values()) == 1, stats
    (fused,) = [n for n in optimized.graph.node if n.op_type == "Attention"]
    assert list(fused.output[1:]) == ["present_key", "present_value"]
    assert "Concat" not in op_counts(optimized)
    assert_cache_outputs_kept(model, optimized, Target.GENERIC, 3)


@pytest.mark.parametrize("case", ["heads_concat", "mask_from_present"])
def test_cache_not_absorbed(case):
    # Concat along the heads (not a cache of earlier tokens), or a mask computed from the present keys (the
    # operator would read its own output): the attention is fused, the Concats stay.
    model = cache_model(**{case: True})
    optimized, stats = attention(model, Target.GENERIC)
    assert sum(stats.values()) == 1, stats
    assert op_counts(optimized)["Concat"] == 2
    (fused,) = [n for n in optimized.graph.node if n.op_type == "Attention"]
    assert len(fused.input) == 4 and len(fused.output) == 1
    feeds = cache_feeds(3, heads_concat=case == "heads_concat")
    if case == "mask_from_present":
        feeds["given_mask"] = feeds.pop("mask")
    assert_close(run(model, feeds), run(optimized, feeds), 1e-5)


def split_cache_model(new_keys_4d: bool = False, mask_from_present: bool = False, opset: int = 17) -> onnx.ModelProto:
    """GPT-2's attention over a key/value cache as TorchScript exports it: ``q``, ``k``, ``v`` of ``[B, S, 12]``
    split into 3 heads of size 4 (``Transpose(Reshape(x, [0, 0, 3, 4]))``), ``present = Concat(past, new, axis 2)``
    for keys and values (graph outputs), a mask ``[B, 1, S, P + S]``.

    ``new_keys_4d``: the new keys and values are 4-D inputs, no split of a 3-D value; ``mask_from_present``: the
    mask adds ``0 * ReduceSum(present_key)``.
    """
    nodes, inputs = [], [value("q", TensorProto.FLOAT, ["B", "S", 12])]
    for name in ("q", "k", "v") if not new_keys_4d else ("q",):
        nodes += [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_split"]),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3])]
    if new_keys_4d:
        inputs += [value(f"{name}_heads", TensorProto.FLOAT, ["B", 3, "S", 4]) for name in ("k", "v")]
    else:
        inputs += [value(name, TensorProto.FLOAT, ["B", "S", 12]) for name in ("k", "v")]
    mask = "mask_sum" if mask_from_present else "mask"
    nodes += [helper.make_node("Concat", ["past_key", "k_heads"], ["present_key"], axis=-2),
              helper.make_node("Concat", ["past_value", "v_heads"], ["present_value"], axis=-2),
              helper.make_node("Transpose", ["present_key"], ["keys_t"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_heads", "keys_t"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", mask], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probabilities"], axis=-1),
              helper.make_node("MatMul", ["probabilities", "present_value"], ["heads"]),
              helper.make_node("Transpose", ["heads"], ["by_query"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["by_query", "merge"], ["y"])]
    initializers = [tensor("scale", np.array(0.5, np.float32)), tensor("merge", np.array([0, 0, -1], np.int64)),
                    tensor("heads_shape", np.array([0, 0, 3, 4], np.int64))]
    if mask_from_present:
        nodes += [helper.make_node("ReduceSum", ["present_key"], ["key_sum"], keepdims=1),
                  helper.make_node("Mul", ["key_sum", "zero"], ["no_change"]),
                  helper.make_node("Add", ["mask", "no_change"], ["mask_sum"])]
        initializers.append(tensor("zero", np.array(0, np.float32)))
    inputs += [value("past_key", TensorProto.FLOAT, ["B", 3, "P", 4]),
               value("past_value", TensorProto.FLOAT, ["B", 3, "P", 4]),
               value("mask", TensorProto.FLOAT, ["B", 1, "S", "T"])]
    outputs = [value("y", TensorProto.FLOAT, ["B", "S", 12]), value("present_key", TensorProto.FLOAT, ["B", 3, "T", 4]),
               value("present_value", TensorProto.FLOAT, ["B", 3, "T", 4])]
    graph = helper.make_graph(nodes, "split_cache", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def split_cache_feeds(past: int, new: int, new_keys_4d: bool = False) -> dict[str, np.ndarray]:
    """Batch 2, ``new`` tokens after ``past``, a causal mask of the lowest float; the second row's first 2 keys are
    left padding (with no past and 1 new token, its only key: a query with no key to attend to)."""
    rng = np.random.default_rng(past * 7 + new)
    lowest, total = np.finfo(np.float32).min, past + new
    mask = np.zeros((2, 1, new, total), np.float32)
    mask[:, :, np.triu(np.ones((new, total), bool), k=past + 1)] = lowest
    mask[1, :, :, :2] = lowest
    new_shape = (2, 3, new, 4) if new_keys_4d else (2, new, 12)
    feeds = {"q": rng.standard_normal((2, new, 12), np.float32), "mask": mask,
             "past_key": rng.standard_normal((2, 3, past, 4), np.float32),
             "past_value": rng.standard_normal((2, 3, past, 4), np.float32)}
    names = ("k_heads", "v_heads") if new_keys_4d else ("k", "v")
    feeds.update({name: rng.standard_normal(new_shape, np.float32) for name in names})
    return feeds


@pytest.mark.parametrize("new", [1, 5])
@pytest.mark.parametrize("past", [0, 3, 128])
def test_multi_head_attention_takes_the_cache(past, new):
    # MultiHeadAttention takes the 3-D new keys and values (not their heads) beside past_key/past_value, and its
    # present_key/present_value replace the Concats: measured equal to them on onnxruntime 1.32 CPU.
    model = split_cache_model()
    optimized, stats = attention(model, Target.ORT)
    assert stats["sdpa_to_multi_head_attention"] == sum(stats.values()) == 1, stats
    assert {"Concat", "Transpose", "Softmax"}.isdisjoint(op_counts(optimized)), op_counts(optimized)
    (fused,) = [n for n in optimized.graph.node if n.op_type == "MultiHeadAttention"]
    assert list(fused.input[:3]) + list(fused.input[6:]) == ["q", "k", "v", "past_key", "past_value"]
    assert list(fused.output[1:]) == ["present_key", "present_value"]
    feeds = split_cache_feeds(past, new)
    assert_close(run(model, feeds), run(optimized, feeds), 1e-5)


@pytest.mark.parametrize("case", ["new_keys_4d", "mask_from_present"])
def test_multi_head_attention_keeps_the_cache(case):
    # New keys and values that are no split of a 3-D value (the operator takes those only beside a past), or a
    # mask computed from the present keys (the operator would read its own output): fused, the Concats stay.
    model = split_cache_model(**{case: True})
    optimized, stats = attention(model, Target.ORT)
    assert stats["sdpa_to_multi_head_attention"] == sum(stats.values()) == 1, stats
    assert op_counts(optimized)["Concat"] == 2
    (fused,) = [n for n in optimized.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(fused.input) <= 6 and len(fused.output) == 1
    for past, new in [(0, 5), (3, 1)]:
        feeds = split_cache_feeds(past, new, new_keys_4d=case == "new_keys_4d")
        assert_close(run(model, feeds), run(optimized, feeds), 1e-5)


def fused_qkv_model(parts: str = "slices", sizes: tuple[int, int, int] = (4, 4, 4), heads: int = 3,
                    axes: bool = True) -> onnx.ModelProto:
    """GPT-NeoX's attention: one projection viewed as [B, S, H, 3D] (each head's q, k, v side by side),
    transposed heads first and cut on the last axis by three Slices, or by one Split (the dynamo exporter).
    Without ``axes`` the Slices name no axes and so cut the first axis (the batch) instead."""
    rng = np.random.default_rng(3)
    hidden, width = 8, sum(sizes)
    inits = [tensor("w", rng.standard_normal((hidden, heads * width)).astype(np.float32)),
             tensor("b", rng.standard_normal(heads * width).astype(np.float32)),
             tensor("view", np.array([0, 0, heads, width], np.int64)),
             tensor("merge", np.array([0, 0, -1], np.int64)), tensor("scale", np.float32(0.5))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "view"], ["viewed"]),
             helper.make_node("Transpose", ["viewed"], ["heads"], perm=[0, 2, 1, 3])]
    bounds = np.cumsum((0,) + sizes)
    if parts == "split":
        inits.append(tensor("sizes", np.array(sizes, np.int64)))
        nodes.append(helper.make_node("Split", ["heads", "sizes"], ["q", "k", "v"], axis=-1))
    else:
        for name, start, end in zip("qkv", bounds[:-1], bounds[1:]):
            inits += [tensor(f"{name}_start", np.array([start], np.int64)),
                      tensor(f"{name}_end", np.array([end], np.int64)),
                      tensor(f"{name}_axis", np.array([-1], np.int64))]
            nodes.append(helper.make_node("Slice", ["heads", f"{name}_start", f"{name}_end"]
                                          + [f"{name}_axis"] * axes, [name]))
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["attended"]),
              helper.make_node("Transpose", ["attended"], ["merged"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["merged", "merge"], ["y"])]
    inputs = [value("x", TensorProto.FLOAT, ["B", "S", hidden]), value("mask", TensorProto.FLOAT, ["B", 1, "S", "S"])]
    out_width = heads * (sizes[2] if axes else width)
    return make_model(nodes, inputs, [value("y", TensorProto.FLOAT, ["B", "S", out_width])], inits, opset=18)


@pytest.mark.parametrize("parts", ["slices", "split"])
def test_interleaved_query_key_value_become_multi_head_attention(parts):
    model = fused_qkv_model(parts)
    optimized = onnxopt.optimize(model, passes="fold,cse,fuse,attention,dce", target="ort", verify=False)
    counts = op_counts(optimized)
    assert counts.get("MultiHeadAttention") == 1 and "Softmax" not in counts and "Slice" not in counts, counts
    for batch, seq in ((1, 1), (2, 5)):
        feeds = {"x": np.random.default_rng(seq).standard_normal((batch, seq, 8)).astype(np.float32),
                 "mask": np.random.default_rng(batch).uniform(-1, 0, (batch, 1, seq, seq)).astype(np.float32)}
        assert_close(run(model, feeds), run(optimized, feeds), 1e-5)


def test_slices_without_axes_cut_the_batch_not_the_heads():
    # Slice's axes default to the first ones: these take batch rows 0-3, 4-7 and 8-11, not parts of each head.
    model = fused_qkv_model(axes=False)
    optimized, stats = attention(model, Target.ORT)
    assert not stats.get("interleaved_heads_split")
    feeds = {"x": np.random.default_rng(0).standard_normal((12, 5, 8)).astype(np.float32),
             "mask": np.zeros((4, 1, 5, 5), np.float32)}
    assert_close(run(model, feeds), run(optimized, feeds), 1e-5)


@pytest.mark.parametrize(("parts", "sizes", "target"), [
    ("slices", (4, 4, 4), Target.GENERIC),   # no attention operator to take the parts below opset 23
    ("slices", (4, 4, 2), Target.ORT),       # unequal parts: not query, key and value side by side
    ("split", (4, 4, 2), Target.ORT),
], ids=["generic", "unequal-slices", "unequal-split"])
def test_interleaved_heads_stay_where_no_attention_takes_them(parts, sizes, target):
    model = fused_qkv_model(parts, sizes)
    optimized, stats = attention(model, target)
    assert not stats.get("interleaved_heads_split") and not stats.get("interleaved_heads_split_in_three")
    assert op_counts(optimized) == op_counts(model)
