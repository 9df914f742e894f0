"""The ``onnxopt`` command end to end, in a subprocess: what it writes, prints and reports."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import onnx
import pytest
from cli_harness import TINY_CNN, cli_env, copy_tiny_cnn, run_cli, snapshot
from helpers import assert_same_outputs

from onnxopt import default_registry
from onnxopt.passes import DEFAULT_PIPELINE


def test_run_writes_default_output_prints_table_and_report(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    original_bytes = model.read_bytes()
    report_path = tmp_path / "report.json"
    result = run_cli("run", model, "--report", report_path)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr

    output = tmp_path / "tiny_cnn.opt.onnx"
    assert output.is_file()
    assert model.read_bytes() == original_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "tiny_cnn.onnx", "tiny_cnn.opt.onnx"]

    # One row per pass of the default pipeline, a total row, and the verification line.
    rows = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")}
    assert {*DEFAULT_PIPELINE, "total"} <= rows
    assert "verified in onnxruntime" in result.stdout
    assert f"wrote {output}" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["pipeline"] == DEFAULT_PIPELINE
    assert report["converged"] is True
    assert report["input_path"] == str(model) and report["output_path"] == str(output)
    assert report["verification"]["ok"] is True
    records = report["records"]
    assert {r["name"] for r in records} == set(DEFAULT_PIPELINE)
    # A pass runs again only when another pass changed the graph since its last run found nothing.
    assert len(records) <= len(DEFAULT_PIPELINE) * report["iterations"]
    assert not any(r["modified"] for r in records if r["iteration"] == report["iterations"])
    for record in records:
        assert {"seconds", "modified", "stats", "nodes_before", "nodes_after", "bytes_before",
                "bytes_after"} <= set(record)
    assert report["after"]["nodes"] < report["before"]["nodes"]

    original, optimized = onnx.load(model), onnx.load(output)
    assert len(optimized.graph.node) < len(original.graph.node)
    assert_same_outputs(original, optimized)


def test_run_with_explicit_output_leaves_input_untouched(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    before = snapshot(tmp_path)
    time.sleep(0.01)  # so that a rewrite of the input would show in its mtime
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    result = run_cli("run", model, "--passes", "fuse,dce", "-o", output, "-q")
    assert result.code == 0, result.stderr
    assert result.stdout == ""  # --quiet
    assert snapshot(tmp_path)["tiny_cnn.onnx"] == before["tiny_cnn.onnx"]
    assert_same_outputs(onnx.load(model), onnx.load(output))


def test_output_naming_the_input_overwrites_it(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    original = onnx.load(model)
    result = run_cli("run", model, "-o", model)
    assert result.code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_cnn.onnx"]  # no temp files, no .opt.onnx
    optimized = onnx.load(model)
    assert len(optimized.graph.node) < len(original.graph.node)
    assert_same_outputs(original, optimized)


def test_installed_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "onnxopt"
    if not script.exists():
        pytest.skip("no onnxopt script beside the interpreter")
    import subprocess

    model = copy_tiny_cnn(tmp_path)
    proc = subprocess.run([str(script), "run", str(model), "-q"], capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tiny_cnn.opt.onnx").is_file()


def test_passes_lists_builtins_with_description_and_origin():
    result = run_cli("passes")
    assert result.code == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0]:
            rows[cells[0]] = cells
    for name in ("dce", "fold", "fuse"):
        assert name in rows, result.stdout
        _, description, _, origin = rows[name]
        assert description and origin == "built-in"
        assert description == default_registry().get(name).description()
    assert "max_growth=" in rows["fold"][2]


def test_passes_lists_a_plugin_with_its_origin(tmp_path):
    plugin = tmp_path / "my_rules.py"
    plugin.write_text(
        "import onnxopt\n"
        "@onnxopt.function_pass('noop')\n"
        "def noop(graph, ctx):\n"
        "    '''Does nothing at all.'''\n"
        "    return False\n"
    )
    result = run_cli("passes", "--plugin", plugin)
    assert result.code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "│ noop" in line)
    assert "Does nothing at all." in line and "plugin" in line
    # The origin names the file; rich may fold a long path over several lines of the cell.
    origin_cells = "".join(line.split("│")[-2].strip() for line in result.stdout.splitlines() if "│" in line)
    assert str(plugin) in origin_cells


def test_inspect_shows_operators_io_and_opsets(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    result = run_cli("inspect", model)
    assert result.code == 0, result.stderr
    assert "IR 8" in result.stdout and "opsets ai.onnx 17" in result.stdout
    assert "input" in result.stdout and "float[1, 3, 16, 16]" in result.stdout
    assert "logits" in result.stdout and "float[1, 10]" in result.stdout
    ops = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2 and cells[1].isdigit():
            ops[cells[0]] = int(cells[1])
    proto = onnx.load(model)
    expected: dict[str, int] = {}
    for node in proto.graph.node:
        expected[node.op_type] = expected.get(node.op_type, 0) + 1
    assert ops == expected


def test_inspect_json(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    result = run_cli("inspect", model, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["opsets"] == {"ai.onnx": 17}
    assert summary["inputs"] == {"input": "float[1, 3, 16, 16]"}
    assert summary["outputs"] == {"logits": "float[1, 10]"}
    assert summary["nodes"] == len(onnx.load(model).graph.node)
    assert summary["external_data"] is False


def test_inspect_shows_symbolic_dims_literally(tmp_path):
    # "[batch, 3]" looks like a rich style tag; it must be printed, not swallowed.
    from helpers import make_model, value
    from onnx import helper

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", shape=["batch", 3])],
                       [value("y", shape=["batch", 3])])
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    result = run_cli("inspect", path)
    assert result.code == 0, result.stderr
    assert "float[batch, 3]" in result.stdout


@pytest.mark.parametrize("command", ["run", "passes", "inspect"])
def test_help_shows_an_example(command):
    result = run_cli(command, "--help")
    assert result.code == 0, result.stderr
    assert "Example:" in result.stdout
    assert f"onnxopt {command}" in result.stdout.split("Example:")[1]


def test_top_level_help_and_version():
    result = run_cli("--help")
    assert result.code == 0
    for command in ("run", "passes", "inspect"):
        assert command in result.stdout
    version = run_cli("--version")
    assert version.code == 0 and "0.1.0" in version.stdout


# ---------------------------------------------------------------------------------------------------
# Plugin passes that fail: internal errors, broken invariants, changed numerics


def _write_plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text("import numpy as np\nimport onnx_graphsurgeon as gs\nimport onnxopt\n\n" + body)
    return path


RAISES = '''
@onnxopt.function_pass("explode")
def explode(graph, ctx):
    """Raises on purpose."""
    raise RuntimeError("boom")
'''

BREAKS_GRAPH = '''
@onnxopt.function_pass("drop-first-node")
def drop_first_node(graph, ctx):
    """Removes the first node although its output is still read."""
    graph.nodes.remove(graph.nodes[0])
    return True
'''

DOUBLES_WEIGHT = '''
@onnxopt.function_pass("double-weight")
def double_weight(graph, ctx):
    """Multiplies the first float weight by 2, once."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and tensor.values.size > 1:
            if getattr(graph, "doubled", False):
                return False
            tensor.values = tensor.values * 2
            graph.doubled = True
            return True
    return False
'''


def test_internal_error_in_a_pass_exits_1_and_names_it(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "raising", RAISES)
    before = snapshot(tmp_path)
    result = run_cli("run", model, "--plugin", plugin, "--passes", "fold,explode")
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1
    line = result.error_lines[0]
    assert "internal error in pass 'explode'" in line and "RuntimeError: boom" in line
    assert "passes run before it: fold" in line
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback_of_an_internal_error(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "raising", RAISES)
    result = run_cli("run", model, "--plugin", plugin, "--passes", "explode", "--debug")
    assert result.code == 1
    assert "Traceback" in result.stderr and "boom" in result.stderr
    assert not (tmp_path / "tiny_cnn.opt.onnx").exists()


def test_contract_violation_names_the_pass(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "breaker", BREAKS_GRAPH)
    before = snapshot(tmp_path)
    result = run_cli("run", model, "--plugin", plugin, "--passes", "drop-first-node")
    assert result.code == 1
    assert "Traceback" not in result.stderr
    line = result.error_lines[0]
    assert "pass 'drop-first-node' broke the graph" in line and "dangling reference" in line
    assert snapshot(tmp_path) == before


def test_changed_numerics_fail_verification_and_nothing_is_written(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "doubler", DOUBLES_WEIGHT)
    report_path = tmp_path / "report.json"
    result = run_cli("run", model, "--plugin", plugin, "--passes", "double-weight,dce", "--report", report_path)
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert "computes different outputs" in result.error_lines[0] and "'logits'" in result.error_lines[0]
    assert "nothing was written" in result.error_lines[0]
    assert "outputs that differ" in result.stdout
    diff_row = next(line for line in result.stdout.splitlines() if line.startswith("│ logits"))
    assert "float32" in diff_row
    assert not (tmp_path / "tiny_cnn.opt.onnx").exists()
    report = json.loads(report_path.read_text())
    assert report["verification"]["ok"] is False
    assert report["verification"]["outputs"][0]["max_abs_diff"] > 1e-3


def test_verify_each_names_the_pass_that_changed_numerics(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "doubler", DOUBLES_WEIGHT)
    report_path = tmp_path / "report.json"
    result = run_cli("run", model, "--plugin", plugin, "--passes", "fold,double-weight,dce", "--verify", "each",
                     "--report", report_path)
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert "pass 'double-weight' changed the model's outputs" in result.error_lines[0]
    assert "outputs that differ" in result.stdout
    assert not (tmp_path / "tiny_cnn.opt.onnx").exists()
    report = json.loads(report_path.read_text())
    assert [r["name"] for r in report["records"]] == ["fold", "double-weight"]
    assert report["verification"]["ok"] is False


def test_no_verify_writes_a_model_with_changed_numerics(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    plugin = _write_plugin(tmp_path, "doubler", DOUBLES_WEIGHT)
    result = run_cli("run", model, "--plugin", plugin, "--passes", "double-weight", "--no-verify", "-q")
    assert result.code == 0, result.stderr
    assert (tmp_path / "tiny_cnn.opt.onnx").is_file()


def test_input_shape_and_inputs_file(tmp_path):
    import numpy as np

    model = copy_tiny_cnn(tmp_path)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, input=np.ones((1, 3, 16, 16), np.float32))
    result = run_cli("run", model, "--inputs", inputs, "--input-shape", "input:1x3x16x16", "--report",
                     tmp_path / "r.json")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["input_shapes"] == {"input": [1, 3, 16, 16]}
    assert os.path.exists(tmp_path / "tiny_cnn.opt.onnx")


def test_tiny_cnn_ships_unchanged():
    # Every test copies the shipped model; none may write beside it.
    assert not (TINY_CNN.parent / "tiny_cnn.opt.onnx").exists()


def test_run_leaves_no_stray_files_in_the_working_directory(tmp_path):
    """Nothing but the output appears anywhere, even when shape inference cannot follow the whole graph.

    A custom-domain operator stops shape inference half way; a tool that spills its state to the current
    directory (onnxruntime's symbolic shape inference writes sym_shape_infer_temp.onnx there) must not run.
    """
    from helpers import make_model, value
    from onnx import helper

    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Opaque", ["t1"], ["o"], domain="com.example"),
             helper.make_node("Transpose", ["o"], ["t2"], perm=[1, 0]),
             helper.make_node("Transpose", ["t2"], ["y"], perm=[1, 0])]
    model = make_model(nodes, [value("x", shape=["n", 3])], [value("y", shape=["n", 3])], check=False)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(model, models / "opaque.onnx")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli("run", models / "opaque.onnx", "--no-verify", "-q", cwd=cwd)
    assert result.code == 0, result.stderr
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in models.iterdir()) == ["opaque.onnx", "opaque.opt.onnx"]


def _split_model_opset11(path: Path) -> Path:
    """Split with a ``split`` attribute (opset 11), which opset 13 moves to an input."""
    from helpers import make_model, value
    from onnx import helper

    model = make_model([helper.make_node("Split", ["x"], ["a", "b"], axis=0, split=[1, 3]),
                        helper.make_node("Relu", ["b"], ["r"])],
                       [value("x", shape=[4, 2])], [value("a", shape=[1, 2]), value("r", shape=[3, 2])], opset=11)
    onnx.save(model, path)
    return path


def test_upgrade_opset_converts_then_optimizes(tmp_path):
    model = _split_model_opset11(tmp_path / "m.onnx")
    result = run_cli("run", model, "--upgrade-opset", "18", "-o", tmp_path / "out.onnx", "-q")
    assert result.code == 0, result.stderr
    optimized = onnx.load(tmp_path / "out.onnx")
    assert {op.domain: op.version for op in optimized.opset_import}[""] == 18
    assert_same_outputs(onnx.load(model), optimized)


def test_upgrade_opset_with_the_default_domain_imported_twice(tmp_path):
    # skl2onnx writes ('', 17) twice; onnx's converter bumps only the first, and the second used to take
    # the result back to the old opset, silently.
    path = _split_model_opset11(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.opset_import.add(domain="", version=11)
    onnx.save(model, path)
    result = run_cli("run", path, "--upgrade-opset", "18", "-o", tmp_path / "out.onnx", "-q")
    assert result.code == 0, result.stderr
    optimized = onnx.load(tmp_path / "out.onnx")
    assert [(op.domain, op.version) for op in optimized.opset_import] == [("", 18)]
    assert_same_outputs(model, optimized)


def test_two_versions_of_one_opset_domain_are_refused(tmp_path):
    path = _split_model_opset11(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.opset_import.add(domain="ai.onnx", version=13)
    onnx.save(model, path)
    result = run_cli("run", path, "-o", tmp_path / "out.onnx")
    assert result.code == 2 and "twice, at versions 11 and 13" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.onnx").exists()


def _ml_only_model(path):
    """A model of ai.onnx.ml operators alone, as onnxmltools writes XGBoost: no default-domain import."""
    node = onnx.helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")
    graph = onnx.helper.make_graph([node], "ml", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                      ["N", 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_a_model_of_ml_operators_alone_needs_no_default_opset(tmp_path):
    path = _ml_only_model(tmp_path / "m.onnx")
    result = run_cli("run", path, "-o", tmp_path / "out.onnx")
    assert result.code == 0 and "verified" in result.stdout + result.stderr, result.stderr
    optimized = onnx.load(tmp_path / "out.onnx")
    assert [(op.domain, op.version) for op in optimized.opset_import] == [("ai.onnx.ml", 1)]


def test_onnx_operators_without_a_default_opset_are_refused(tmp_path):
    path = _ml_only_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.graph.node.append(onnx.helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    onnx.save(model, path)
    result = run_cli("run", path, "-o", tmp_path / "out.onnx")
    assert result.code == 2 and "imports no ONNX opset" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(("version", "message"), [("10", "only goes up"), ("99", "knows opsets up to")])
def test_upgrade_opset_refuses_going_down_or_past_onnx(tmp_path, version, message):
    model = _split_model_opset11(tmp_path / "m.onnx")
    result = run_cli("run", model, "--upgrade-opset", version, "-o", tmp_path / "out.onnx")
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_run_for_ort_takes_a_fusion_census_into_the_report(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    report_path = tmp_path / "report.json"
    result = run_cli("run", model, "--target", "ort", "-o", tmp_path / "out.onnx", "--report", report_path)
    assert result.code == 0, result.stderr
    assert "fused operators after onnxruntime" in result.stdout
    census = json.loads(report_path.read_text())["census"]
    assert census["target"] == "ort" and census["regressions"] == []
    rows = {row["op_type"]: row for row in census["rows"]}
    assert rows["Gemm"]["original"] == rows["Gemm"]["ours"] == 1


def test_census_needs_an_engine_target(tmp_path):
    model = copy_tiny_cnn(tmp_path)
    result = run_cli("run", model, "--census", "-o", tmp_path / "out.onnx")
    assert result.code == 2 and "--census needs --target" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_for_ort_counts_fused_operators(tmp_path):
    result = run_cli("inspect", TINY_CNN, "--target", "ort", "--json")
    assert result.code == 0, result.stderr
    engine = json.loads(result.stdout)["engine"]
    assert engine["target"] == "ort" and engine["fused"]["Gemm"] == 1
