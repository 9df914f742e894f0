"""End to end on tiny transformers exported by both of torch's exporters (TorchScript and dynamo).

The fixtures in ``tests/fixtures/models`` (BERT, GPT-2 with its key/value cache, ViT, a Whisper encoder;
random weights; eager attention, and for the first three also transformers' default, torch's
scaled_dot_product_attention: ``*_sdpa``) are made by ``tests/fixtures/make_exported.py``, whose
``exported.json`` says what each is made of. Every model goes through the default pipeline of each target;
the result must compute the original's outputs in onnxruntime (optimizations off), also where a query has
no key to attend to, and the fusions must have found every layer norm, attention and Gelu of the model,
whichever exporter wrote it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_counts, run

import onnxopt

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parents[1] / "fixtures" / "models"
MODELS = {entry["file"]: entry for entry in json.loads((FIXTURES / "exported.json").read_text())["models"]}

# The generic target gets the model upgraded to opset 23, where the standard Attention and Gelu exist.
GENERIC_OPSET = 23

# Where the dynamo exporter's models still miss a fusion, and why; each entry must go once the gap closes.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}

TARGETS = [
    "generic",
    "ort",
    pytest.param("openvino", marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                                      reason="openvino is not installed")),
]


def feeds_for(entry: dict) -> dict[str, np.ndarray]:
    """The manifest's inputs; attention masks are ones but for the first key of the last row (padding)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in entry["inputs"]:
        shape, dtype = spec["shape"], np.dtype(spec["dtype"])
        if spec["fill"] is not None:
            feeds[spec["name"]] = np.full(shape, spec["fill"], dtype)
            feeds[spec["name"]][-1, 0] = 0
        elif spec["low"] is not None:
            feeds[spec["name"]] = rng.integers(spec["low"], spec["high"], shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.uniform(-1, 1, shape).astype(dtype)
    return feeds


def optimized(file: str, target: str) -> onnx.ModelProto:
    """The default pipeline of ``target``, unverified: the test compares the outputs itself."""
    upgrade = GENERIC_OPSET if target == "generic" else None
    return onnxopt.optimize(FIXTURES / file, target=target, verify=False, upgrade_opset=upgrade)


def found_fusions(model: onnx.ModelProto) -> dict[str, int]:
    """Fused operators by what they replace, whichever form the target took (contrib operators included)."""
    counts = op_counts(model)
    return {
        "norms": counts.get("LayerNormalization", 0),
        "skip_layer_norms": counts.get("SkipLayerNormalization", 0),
        "residual_sums": counts.get("Sum", 0),
        "attention": counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0),
        "gelus": sum(counts.get(op, 0) for op in ("Gelu", "BiasGelu", "FastGelu")),
        "erf_left": counts.get("Erf", 0),
    }


def expected_fusions(entry: dict, target: str) -> dict[str, int]:
    """What the fusions must find: every layer norm, attention and Gelu the model is made of.

    onnxruntime gets contrib operators at any opset, but no SkipLayerNormalization: a residual sum that
    feeds nothing but its norm (every norm of post-norm BERT, only the final norm of pre-norm blocks) is
    written as Sum, so that onnxruntime keeps it from its slower fused kernel. The standard Gelu needs
    opset 20 and Attention 23 (the generic target upgrades to 23).
    """
    structure = entry["structure"]
    opset = GENERIC_OPSET if target == "generic" else entry["opset"]
    ort = target == "ort"
    gelus = structure["gelus"] if ort or opset >= 20 else 0
    expected = {
        "norms": structure["layer_norms"],
        "skip_layer_norms": 0,
        "residual_sums": (2 * structure["layers"] + 1 if structure["norms"] == "post" else 1) if ort else 0,
        "attention": structure["layers"] if ort or opset >= 23 else 0,
        "gelus": gelus,
    }
    if gelus:
        expected["erf_left"] = 0
    return expected


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("file", sorted(MODELS))
def test_fusions_of_exported_model(file, target):
    entry = MODELS[file]
    original = onnx.load(FIXTURES / file)
    result = optimized(file, target)
    assert_same_outputs(original, result, feeds_for(entry), rtol=1e-4)
    found = found_fusions(result)
    expected = expected_fusions(entry, target)
    found = {key: found[key] for key in expected}
    gap = KNOWN_GAPS.get((entry["model"], entry["exporter"], target))
    if gap:
        assert found != expected, f"the known gap is closed, remove it from KNOWN_GAPS: {gap}"
        pytest.xfail(gap)
    assert found == expected


MASKED_MODELS = sorted(file for file, entry in MODELS.items()
                       if any(spec["name"] == "attention_mask" for spec in entry["inputs"]))


@pytest.mark.parametrize("target", ["generic", "ort"])
@pytest.mark.parametrize("file", MASKED_MODELS)
def test_rows_masked_out_entirely(file, target):
    # The last batch row all padding (BERT), or left-padded over the cache and the first two new tokens (GPT-2):
    # some queries have no key to attend to. Eager attention masks keys with the lowest float, so the Softmax
    # makes those rows uniform; torch's scaled_dot_product_attention with -inf, and its guard makes them zeros.
    entry = MODELS[file]
    feeds = feeds_for(entry)
    with_past = any(spec["name"].startswith("past_") for spec in entry["inputs"])
    padded = feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1] + 2 if with_past else None
    feeds["attention_mask"][-1, :padded] = 0
    original = onnx.load(FIXTURES / file)
    assert not any(np.isnan(output).any() for output in run(original, feeds))
    assert_same_outputs(original, optimized(file, target), feeds, rtol=1e-4)


@pytest.mark.parametrize("target", ["generic", "ort"])
@pytest.mark.parametrize("file", MASKED_MODELS)
def test_attention_mask_of_odd_values(file, target):
    # transformers' older eager mask, (1 - m) * lowest, gave -inf for m = -1 and +inf for m = 3: rows the Softmax
    # makes NaN. These exports mask with Where(keep, 0, lowest) or Where(keep, 0, -inf), which the attention pass
    # proves to need no correction of such rows: none is made (no Softmax left), and the outputs stay the original's.
    entry = MODELS[file]
    feeds = feeds_for(entry)
    feeds["attention_mask"][0, :2] = [-1, 3]
    feeds["attention_mask"][-1] = -1
    original = onnx.load(FIXTURES / file)
    result = optimized(file, target)
    assert "Softmax" not in op_counts(result)
    assert_same_outputs(original, result, feeds, rtol=1e-4)


# The tiny Llama exports of tests/fixtures/make_llama.py (2 layers; 4 query heads on 2 key/value heads, head size
# 16; the ``past`` ones with a key/value cache of 3 tokens; eager attention, and transformers' default, torch's
# scaled_dot_product_attention: ``*_sdpa``), upgraded to opset 23 for every target.
LLAMA_FIXTURES = ["llama_tiny_torchscript17.onnx", "llama_tiny_dynamo18.onnx",
                  "llama_tiny_past_torchscript17.onnx", "llama_tiny_past_dynamo18.onnx",
                  "llama_tiny_sdpa_torchscript17.onnx", "llama_tiny_sdpa_dynamo18.onnx",
                  "llama_tiny_past_sdpa_torchscript17.onnx", "llama_tiny_past_sdpa_dynamo18.onnx"]
LLAMA = {"layers": 2, "batch": 2, "sequence": 5, "past": 3, "kv_heads": 2, "head_size": 16}


def llama_feeds(model: onnx.ModelProto, padding: int) -> dict[str, np.ndarray]:
    """Ids, positions and a random cache; the last row's first ``padding`` keys are padding (left-padded)."""
    rng = np.random.default_rng(0)
    batch, sequence, past = LLAMA["batch"], LLAMA["sequence"], LLAMA["past"]
    names = [vi.name for vi in model.graph.input]
    total = past + sequence if "position_ids" in names else sequence
    feeds = {"input_ids": rng.integers(0, 64, (batch, sequence)).astype(np.int64),
             "attention_mask": np.ones((batch, total), np.int64)}
    feeds["attention_mask"][-1, :padding] = 0
    for name in names:
        if name == "position_ids":
            feeds[name] = np.tile(np.arange(past, total, dtype=np.int64), (batch, 1))
        elif name.startswith("past_"):
            feeds[name] = rng.standard_normal((batch, LLAMA["kv_heads"], past, LLAMA["head_size"])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("file", LLAMA_FIXTURES)
def test_llama_attention_with_grouped_heads(file, target):
    # One standard Attention per layer, reading the 2 key/value heads themselves (repeat_kv goes), for every
    # target: onnxruntime gets it where MultiHeadAttention does not fit. Two padded keys leave the first
    # queries of the last row of the models without a cache with no key to attend to (eager attention masks
    # with the lowest float; sdpa's boolean mask is exported as -inf by TorchScript, the lowest float by dynamo,
    # with a NaN guard after the Softmax).
    original = onnx.load(FIXTURES / file)
    result = onnxopt.optimize(original, target=target, verify=False, upgrade_opset=GENERIC_OPSET)
    counts = op_counts(result)
    assert (counts.get("Attention", 0), counts.get("Softmax", 0)) == (LLAMA["layers"], 0), counts
    producers = {output: node.op_type for node in result.graph.node for output in node.output}
    for node in (n for n in result.graph.node if n.op_type == "Attention"):
        assert producers.get(node.input[1]) != "Reshape" and producers.get(node.input[2]) != "Reshape"
    # With a cache, the operator takes past_key/past_value and makes present_key/present_value: no Concat left.
    presents = [output.name for output in result.graph.output if output.name.startswith("present")]
    assert all(producers[name] == "Attention" for name in presents), {name: producers[name] for name in presents}
    for padding in (0, 2):
        assert_same_outputs(original, result, llama_feeds(original, padding), rtol=1e-4)


def test_fixtures_are_small_and_listed():
    files = {path.name for path in FIXTURES.glob("*.onnx")}
    assert set(MODELS) <= files
    assert {(e["model"], e["exporter"]) for e in MODELS.values()} == {
        (model, exporter) for model in ("bert", "gpt2_past", "vit", "whisper_encoder", "bert_sdpa", "gpt2_past_sdpa",
                                        "vit_sdpa")
        for exporter in ("torchscript", "dynamo")}
    assert sum((FIXTURES / file).stat().st_size for file in MODELS) < 3 * 2**20
    assert all((FIXTURES / file).stat().st_size < 600 * 2**10 for file in LLAMA_FIXTURES)


GPT2_PAST_FIXTURES = sorted(file for file, entry in MODELS.items() if entry["model"].startswith("gpt2_past"))


@pytest.mark.parametrize("file", GPT2_PAST_FIXTURES)
def test_gpt2_cache_taken_by_multi_head_attention(file):
    # For onnxruntime, MultiHeadAttention takes past_key/past_value beside the 3-D new keys and values and makes
    # present_key/present_value: no cache Concat left; outputs kept with the last row left-padded.
    original = onnx.load(FIXTURES / file)
    result = optimized(file, "ort")
    producers = {output: node.op_type for node in result.graph.node for output in node.output}
    presents = [output.name for output in result.graph.output if output.name.startswith("present")]
    assert presents and all(producers[name] == "MultiHeadAttention" for name in presents), \
        {name: producers[name] for name in presents}
    feeds = feeds_for(MODELS[file])
    assert_same_outputs(original, result, feeds, rtol=1e-4)
    feeds["attention_mask"][-1, :feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1] + 2] = 0
    assert_same_outputs(original, result, feeds, rtol=1e-4)
