"""Passes from outside the package: plugin files and installed distributions (entry points)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_harness import cli_env, copy_tiny_cnn

import onnxopt
from onnxopt import UnknownPassError
from onnxopt.errors import PluginError
from onnxopt.registry import ENTRY_POINT_GROUP, PassRegistry

PLUGIN_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar

import onnxopt
from onnxopt import Pass, PassResult


@dataclass(frozen=True)
class CountNodes(Pass):
    """Counts nodes without changing the graph."""

    name: ClassVar[str] = "{prefix}count-nodes"
    limit: int = 10

    def run(self, graph, ctx):
        return PassResult(modified=False, stats={{"nodes": len(graph.nodes)}})


@onnxopt.function_pass("{prefix}noop")
def noop(graph, ctx):
    """Does nothing."""
    return False


BOTH = [CountNodes, noop]
'''


def _make_distribution(site: Path, dist: str, module: str, entry_points: dict[str, str], source: str) -> None:
    """A minimal installed distribution: a module and a dist-info folder with entry_points.txt."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.startswith("onnxopt_demo_")]:
        del sys.modules[name]


def test_entry_point_passes_are_discovered(site):
    _make_distribution(site, "onnxopt-demo-plugin", "onnxopt_demo_plugin",
                       {"count": "onnxopt_demo_plugin:CountNodes", "both": "onnxopt_demo_plugin:BOTH"},
                       PLUGIN_MODULE.format(prefix="demo-"))
    registry = PassRegistry()
    registry.load_entry_points()
    assert {"demo-count-nodes", "demo-noop"} <= set(registry.names())
    assert registry.origin("demo-count-nodes") == "package onnxopt-demo-plugin"
    assert registry.get("demo-noop").description() == "Does nothing."
    (pass_,) = onnxopt.parse_pipeline("demo-count-nodes{limit=3}", registry)
    assert pass_.limit == 3


def test_entry_point_pass_runs_from_the_cli(site, tmp_path):
    _make_distribution(site, "onnxopt-demo-cli", "onnxopt_demo_cli", {"count": "onnxopt_demo_cli:CountNodes"},
                       PLUGIN_MODULE.format(prefix="cli-"))
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "onnxopt.cli", "passes"], capture_output=True, text=True,
                             env=env)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if "cli-count-nodes" in line)
    assert "package onnxopt-demo-cli" in line and "limit=10" in line
    model = copy_tiny_cnn(tmp_path)
    run = subprocess.run([sys.executable, "-m", "onnxopt.cli", "run", str(model), "--passes", "cli-count-nodes",
                          "-q"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr


def test_broken_entry_point_is_a_plugin_error(site):
    _make_distribution(site, "onnxopt-demo-broken", "onnxopt_demo_broken", {"bad": "onnxopt_demo_broken:Missing"},
                       "X = 1\n")
    with pytest.raises(PluginError, match="entry point 'bad'.*failed to load"):
        PassRegistry().load_entry_points()


def test_entry_point_name_clash_with_builtin_is_refused(site):
    source = ("import onnxopt\n@onnxopt.function_pass('dce')\ndef dce(graph, ctx):\n"
              "    '''Pretends to be dce.'''\n    return False\n")
    _make_distribution(site, "onnxopt-demo-clash", "onnxopt_demo_clash", {"dce": "onnxopt_demo_clash:dce"}, source)
    registry = PassRegistry()
    from onnxopt.passes import BUILTIN_PASSES

    for pass_class in BUILTIN_PASSES:
        registry.register(pass_class, "built-in")
    with pytest.raises(PluginError, match="'dce' is already taken by built-in"):
        registry.load_entry_points()


def test_entry_point_that_is_not_a_pass_is_refused(site):
    _make_distribution(site, "onnxopt-demo-notpass", "onnxopt_demo_notpass", {"x": "onnxopt_demo_notpass:X"},
                       "X = 1\n")
    with pytest.raises(PluginError, match="not a named onnxopt Pass"):
        PassRegistry().load_entry_points()


# ---------------------------------------------------------------------------------------------------
# Plugin files


def _plugin_file(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_plugin_file_registers_its_own_passes_only(tmp_path):
    path = _plugin_file(tmp_path, "rules", PLUGIN_MODULE.format(prefix="file-") + (
        "from onnxopt.passes import Fuse  # imported, not defined here: not registered again\n"))
    registry = onnxopt.default_registry([path])
    assert registry.origin("file-count-nodes") == f"plugin {path}"
    assert registry.origin("fuse") == "built-in"
    assert {"file-count-nodes", "file-noop", "fold", "dce"} <= set(registry.names())


def test_same_plugin_file_twice_is_loaded_once(tmp_path):
    path = _plugin_file(tmp_path, "rules", PLUGIN_MODULE.format(prefix="twice-"))
    registry = onnxopt.default_registry([path, path])
    assert registry.get("twice-noop") is registry.get("twice-noop")
    assert onnxopt.optimize(
        onnxopt.load_model(Path(__file__).resolve().parents[2] / "examples/models/tiny_cnn.onnx"),
        passes="twice-noop,dce", plugins=[path, str(path)]) is not None


def test_two_plugin_files_with_the_same_pass_name_clash(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _plugin_file(tmp_path / "a", "rules", PLUGIN_MODULE.format(prefix="same-"))
    second = _plugin_file(tmp_path / "b", "rules", PLUGIN_MODULE.format(prefix="same-"))
    with pytest.raises(PluginError, match=f"already taken by plugin {first}"):
        onnxopt.default_registry([first, second])


def test_plugins_do_not_leak_into_the_default_registry(tmp_path):
    path = _plugin_file(tmp_path, "rules", PLUGIN_MODULE.format(prefix="leak-"))
    onnxopt.default_registry([path])
    with pytest.raises(UnknownPassError):
        onnxopt.default_registry().get("leak-noop")


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('at import')\n", "RuntimeError: at import"),
    ("import a_module_nobody_has\n", "ModuleNotFoundError"),
    ("def f(:\n", "SyntaxError"),
    ("X = 1\n", "defines no pass"),
])
def test_bad_plugin_files(tmp_path, source, message):
    path = _plugin_file(tmp_path, "bad", source)
    with pytest.raises(PluginError, match=message):
        PassRegistry().load_plugin_file(path)


def test_missing_plugin_file(tmp_path):
    with pytest.raises(PluginError, match="plugin file not found"):
        PassRegistry().load_plugin_file(tmp_path / "nowhere.py")
