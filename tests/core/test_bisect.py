"""Bisection: the first pass that changes a model's outputs, and the fewest rewrites that do."""

import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from onnxopt.bisect import bisect, ddmin

TINY_CNN = Path(__file__).parents[2] / "examples" / "models" / "tiny_cnn.onnx"

BROKEN_PLUGIN = textwrap.dedent('''
    import onnxopt
    from onnxopt import ir

    @onnxopt.function_pass("relu-to-abs")
    def relu_to_abs(graph, ctx):
        """Wrongly turns the Relu after the first block into Abs (a broken rewrite)."""
        changed = 0
        for node in list(ir.all_nodes(graph)):
            if node.op == "Relu" and ctx.allow("relu_to_abs", node.name) and node.name == "relu1":
                node.op = "Abs"
                changed += 1
        return changed
''')


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN_PLUGIN)
    return path


@pytest.mark.parametrize("culprits", [{3}, {3, 7}, {0, 9}, set(range(10))])
def test_ddmin_finds_a_minimal_failing_subset(culprits):
    found = ddmin(list(range(10)), lambda subset: culprits <= set(subset))
    assert set(found) == culprits


def test_bisect_names_the_pass_and_the_rewrite(plugin, tmp_path):
    found = bisect(TINY_CNN, "fold,cse,fuse,relu-to-abs,dce", plugins=[plugin], output_dir=tmp_path / "out")
    assert found.pass_name == "relu-to-abs"
    assert found.passes_before == ["fold", "cse", "fuse"]
    assert [str(site) for site in found.minimal_sites] == ["relu_to_abs at 'relu1'"]
    assert found.rules == ["relu_to_abs"]
    assert not found.comparison.ok
    for name in ("before", "after"):
        onnx.checker.check_model(onnx.load(found.files[name]))


def test_bisect_of_a_correct_pipeline_finds_nothing():
    found = bisect(TINY_CNN, "fold,cse,fuse,dce")
    assert found.pass_name is None and "fold" in found.passes_before


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_run_that_fails_verification_bisects_and_saves_models(plugin, tmp_path):
    output = tmp_path / "out.onnx"
    result = _cli("run", TINY_CNN, "-o", output, "--plugin", plugin, "--passes", "fold,relu-to-abs,dce", cwd=tmp_path)
    assert result.returncode == 1
    assert not output.exists()
    assert "first pass that changes the outputs: relu-to-abs" in result.stdout
    assert "relu_to_abs" in result.stdout and "relu1" in result.stdout
    assert (tmp_path / "out.bisect" / "before.onnx").is_file()
    assert "Traceback" not in result.stderr


def test_debug_bisect_command(plugin, tmp_path):
    bad = _cli("debug", "bisect", TINY_CNN, "--plugin", plugin, "--passes", "fold,relu-to-abs", "-o", tmp_path / "b",
               cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert "relu-to-abs" in bad.stdout and (tmp_path / "b" / "after.onnx").is_file()
    good = _cli("debug", "bisect", TINY_CNN, "--passes", "fold,dce", "-o", tmp_path / "g", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "no single pass changed the outputs" in good.stdout
