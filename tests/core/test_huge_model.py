"""Peak memory on a model with external weights: the CI-sized variant of benchmarks/huge_model.py.

The benchmark runs about 3 GB of weights; here 0.4 GB keeps CI quick. The interpreter and its imports
cost the same on any model, so they are measured on a tiny model first and not charged to the weights.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cli_harness import TINY_CNN, cli_env

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "huge_model.py"


def _huge_model_module():
    spec = importlib.util.spec_from_file_location("huge_model_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_rss(*args) -> int:
    """Peak RSS in bytes of ``onnxopt run ARGS`` in a child process of its own."""
    code = ("import resource, subprocess, sys\n"
            "done = subprocess.run(sys.argv[1:])\n"
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "onnxopt.cli", "run", *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), check=True)
    code_, peak = done.stdout.split()
    assert code_ == "0", done.stderr
    return int(peak)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_default_pipeline_holds_external_weights_once(tmp_path):
    model, weight_bytes = _huge_model_module().build(tmp_path, 0.4)
    baseline = _peak_rss(TINY_CNN, "-q", "--no-verify", "-o", tmp_path / "tiny.onnx")
    peak = _peak_rss(model, "-q", "--no-verify", "-o", tmp_path / "out.onnx")
    assert peak - baseline <= 1.5 * weight_bytes, (peak, baseline, weight_bytes)
    x = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "out.onnx.data").is_file()
