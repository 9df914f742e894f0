"""examples/rules/my_rules.py: each rule in process, and the whole file through the CLI as a plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, op_counts, random_feeds, run

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.pass_infra import PassContext
from onnxopt.registry import PassRegistry

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "rules" / "my_rules.py"


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>' + text)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def my_rules():
    (pass_class,) = PassRegistry().load_plugin_file(PLUGIN)
    assert pass_class.name == "my-rules"
    return pass_class


def run_pass(pass_class, model):
    graph = ir.import_model(model)
    signature = IOSignature.of(graph)
    result = pass_class()(graph, PassContext(original=model))
    assert check_graph(graph, signature) == []
    optimized = ir.export_model(graph, model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, result


@pytest.mark.parametrize("text,rule,expected", [
    ("""g (float[2,3] x) => (float[2,3] y) { n = Neg(x)
                                           m = Neg(n)
                                           y = Relu(m) }""", "neg_neg_to_input", {"Relu": 1}),
    ("""g (float[2,3] x) => (float[2,3] y) <float[3] z = {0., 0., 0.}> { a = Add(z, x)
                                                                      y = Relu(a) }""",
     "add_zero_to_input", {"Relu": 1}),
    ("""g (float[2,3] x) => (float[2,3] y) { s = Softmax<axis = 0>(x)
                                           y = Log(s) }""", "softmax_log_to_logsoftmax", {"LogSoftmax": 1}),
])
def test_each_rule_fires(my_rules, text, rule, expected):
    model = parse(text)
    optimized, result = run_pass(my_rules, model)
    assert result.stats[rule] == 1 and sum(result.stats.values()) == 1
    assert op_counts(optimized) == expected
    assert_same_outputs(model, optimized)


@pytest.mark.parametrize("text,rule", [
    ("""g (float[2,3] x) => (float[2,3] y) { n = Neg(x)
                                           y = Abs(n) }""", "neg_neg_to_input"),
    ("""g (float[2,3] x) => (float[4,2,3] y) <float[4,1,1] z = {0., 0., 0., 0.}> { y = Add(x, z) }""",
     "add_zero_to_input"),
    ("""g (float[2,3] x) => (float[2,3] y) <float[3] z = {0., 1., 0.}> { y = Add(x, z) }""", "add_zero_to_input"),
    ("""g (float[2,3] x) => (float[2,3] y, float[2,3] s) { s = Softmax(x)
                                                          y = Log(s) }""", "softmax_log_to_logsoftmax"),
])
def test_each_rule_stays_where_it_must(my_rules, text, rule):
    model = parse(text)
    optimized, result = run_pass(my_rules, model)
    assert not result.modified, result.stats
    assert op_counts(optimized) == op_counts(model)


def test_plugin_rules_through_the_cli(tmp_path):
    model = parse("""
    g (float[2,3,4] x) => (float[2,3,4] y, float[2,3,4] z) <float[4] zero = {0., 0., 0., 0.}> {
      n = Neg(x)
      m = Neg(n)
      a = Add(m, zero)
      s = Softmax<axis = 1>(a)
      y = Log(s)
      z = Add(zero, x)
    }""")
    source, target, report = tmp_path / "model.onnx", tmp_path / "model.opt.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "run", str(source), "--plugin", str(PLUGIN), "--passes", "my-rules,dce",
         "-o", str(target), "--report", str(report), "-q"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    optimized = onnx.load(target)
    onnx.checker.check_model(optimized, full_check=True)
    assert op_counts(optimized) == {"LogSoftmax": 1, "Identity": 1}
    stats = {}
    for record in json.loads(report.read_text())["records"]:
        for key, value in record["stats"].items():
            stats[key] = stats.get(key, 0) + value
    assert stats["neg_neg_to_input"] == 1 and stats["add_zero_to_input"] == 2
    assert stats["softmax_log_to_logsoftmax"] == 1
    feeds = random_feeds(model)
    assert_same_outputs(model, optimized, feeds, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(run(optimized, feeds)[1], feeds["x"])
