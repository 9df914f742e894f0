"""Running the ``onnxopt`` command in a real subprocess, and checking what it left on disk.

Test modules in tests/core import this as ``cli_harness`` (pytest puts a test's own folder on sys.path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CNN = REPO / "examples" / "models" / "tiny_cnn.onnx"

# A wide terminal keeps rich tables on one line per row; no bytecode keeps plugin folders unchanged, so
# that "nothing was written" can be checked by comparing the folder before and after.
CLI_ENV = {"COLUMNS": "200", "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1", "TERM": "dumb"}


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli_env() -> dict[str, str]:
    return {**os.environ, **CLI_ENV}


def run_cli(*args, cwd: Path | None = None, timeout: float = 120) -> CliResult:
    """Runs ``python -m onnxopt.cli ARGS`` and returns its exit code and output."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def copy_tiny_cnn(folder: Path, name: str = "tiny_cnn.onnx") -> Path:
    target = folder / name
    shutil.copyfile(TINY_CNN, target)
    return target


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (hidden ones too) with its bytes and modification time."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr starting with 'error:', no traceback, the fragments in it."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
