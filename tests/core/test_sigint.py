"""Ctrl-C during ``onnxopt run``: exit code 130, and neither an output nor a temporary file is left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from cli_harness import cli_env, copy_tiny_cnn, snapshot

SLOW_PLUGIN = '''
import pathlib
import time

import onnxopt


@onnxopt.function_pass("wait-for-signal")
def wait_for_signal(graph, ctx):
    """Says it started, then sleeps long enough to be interrupted."""
    pathlib.Path({marker!r}).write_text("started")
    time.sleep(60)
    return False
'''


def _restore_default_sigint() -> None:
    # A shell's background job (or a CI runner) may start us with SIGINT ignored, which the child would
    # inherit; Python only turns SIGINT into KeyboardInterrupt when it starts with the default handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("verify", ["end", "each"])
def test_sigint_exits_130_and_writes_nothing(tmp_path, verify):
    work = tmp_path / "work"
    work.mkdir()
    model = copy_tiny_cnn(work)
    marker = tmp_path / "started"
    plugin = work / "slow.py"
    plugin.write_text(SLOW_PLUGIN.format(marker=str(marker)))
    before = snapshot(work)

    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxopt.cli", "run", str(model), "--plugin", str(plugin), "--passes",
         "fold,wait-for-signal", "--verify", verify, "--report", str(work / "report.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), preexec_fn=_restore_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the slow pass never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: interrupted; nothing was written"]
    assert snapshot(work) == before  # no output, no report, no hidden temporary folder
