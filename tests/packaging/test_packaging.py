"""Packaging: ``passes/`` ships as ``onnxopt.passes`` and never as a top-level ``passes`` package.

The wheel is built from a copy of the sources in a temporary folder, so that the build leaves nothing
(build/, *.egg-info) in the working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _copy_sources(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("onnxopt", "passes"):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    for path in REPO.iterdir():
        if path.is_file() and (path.name in ("pyproject.toml", "setup.cfg", "MANIFEST.in")
                               or path.name.upper().startswith(("README", "LICENSE"))):
            shutil.copy2(path, target / path.name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    _copy_sources(source)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, cwd=source,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel_path,) = dist.glob("onnxopt-*.whl")
    return wheel_path


def test_wheel_holds_only_onnxopt_and_its_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        outside = [n for n in names if not (n.startswith("onnxopt/") or n.startswith(dist_info + "/"))]
        assert outside == []
        assert not any(n.startswith("passes/") for n in names)
        assert archive.read(f"{dist_info}/top_level.txt").decode().split() == ["onnxopt"]
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "onnxopt = onnxopt.cli:main" in entry_points
    assert "onnxopt/passes/__init__.py" in names and "onnxopt/passes/fold.py" in names
    # Every built-in pass module is packaged under onnxopt/passes/, none is left behind.
    for module in (REPO / "passes").glob("*.py"):
        assert f"onnxopt/passes/{module.name}" in names, module.name
    # Every module of the core, subpackages included (a package missing from pyproject's list would
    # still import in an editable install, and only break for users of the wheel).
    for module in (REPO / "onnxopt").rglob("*.py"):
        assert f"onnxopt/{module.relative_to(REPO / 'onnxopt').as_posix()}" in names, module.name


def test_installed_wheel_imports_passes_only_under_onnxopt(wheel, tmp_path):
    target = tmp_path / "target"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (target / "passes").exists()
    probe = (
        "import importlib.util, json, onnxopt.passes, onnxopt.cli\n"
        "print(json.dumps({'passes_spec': importlib.util.find_spec('passes') is None,\n"
        "                  'onnxopt': onnxopt.__file__, 'fold': importlib.util.find_spec('onnxopt.passes.fold').origin}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    import json

    found = json.loads(result.stdout)
    assert found["passes_spec"] is True
    assert found["onnxopt"].startswith(str(target)) and found["fold"].startswith(str(target / "onnxopt" / "passes"))
    listing = subprocess.run([sys.executable, "-m", "onnxopt.cli", "passes"], capture_output=True, text=True,
                             cwd=tmp_path, env={**env, "COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    assert "fold" in listing.stdout and "built-in" in listing.stdout


def test_no_top_level_passes_module_in_this_environment(tmp_path):
    # From a neutral folder (not the repository root, where ./passes would be importable as a folder).
    probe = (
        "import importlib.util, onnxopt.passes\n"
        "assert importlib.util.find_spec('passes') is None, importlib.util.find_spec('passes')\n"
        "from onnxopt.passes import BUILTIN_PASSES\n"
        "print(sorted(p.name for p in BUILTIN_PASSES))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr
    assert "'fold'" in result.stdout and "'dce'" in result.stdout


def test_repository_has_no_onnxopt_passes_folder():
    # passes/ is mapped to onnxopt.passes by package-dir; a real onnxopt/passes/ folder would shadow it.
    assert not (REPO / "onnxopt" / "passes").exists()
    assert not (REPO / "conftest.py").exists()  # style: keep conftest.py out of the repository root
