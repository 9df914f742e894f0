"""Peak memory of the default pipeline on a model with about 3 GB of weights (over protobuf's 2 GB limit).

Generates a stack of MatMul+Add layers with random float32 weights stored as external data, then runs
``onnxopt run`` on it in a child process and reports the child's peak RSS against the weight bytes.
The target is a peak of at most 1.5x the weights without verification (verification runs both models
in onnxruntime, which by itself holds two copies). The output is checked to load and to keep every layer.

    python benchmarks/huge_model.py                  # about 3 GB of weights
    python benchmarks/huge_model.py --gigabytes 0.25 # a quick variant
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RESULTS = Path(__file__).parent / "results"
WIDTH = 4096


def build(folder: Path, gigabytes: float) -> tuple[Path, int]:
    layers = max(1, int(gigabytes * 1e9 / (WIDTH * WIDTH * 4)))
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    x = "x"
    for i in range(layers):
        weight = (rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * (1 / WIDTH**0.5)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{i}"),
                         numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"lin{i}"]),
                  helper.make_node("Identity", [f"lin{i}"], [f"id{i}"]),
                  helper.make_node("Relu", [f"id{i}"], [f"h{i}"])]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTH])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "huge.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="huge.onnx.data")
    return path, layers * (WIDTH * WIDTH * 4 + WIDTH * 4)


def run(model: Path, *extra: str) -> dict:
    code = ("import resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(done.returncode, time.perf_counter() - start,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
            "sys.stderr.write(done.stderr[-2000:])\n")
    onnxopt_cli = [sys.executable, "-m", "onnxopt.cli", "run", str(model), "-q", "-o", str(model.with_name("out.onnx"))]
    done = subprocess.run([sys.executable, "-c", code, *onnxopt_cli, *extra], capture_output=True, text=True)
    code_, seconds, peak = done.stdout.split()
    return {"exit": int(code_), "seconds": float(seconds), "peak_bytes": int(peak), "stderr": done.stderr.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=3.0)
    parser.add_argument("--with-verify", action="store_true", help="also measure with verification on")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=RESULTS.parent) as folder:
        start = time.perf_counter()
        model, weight_bytes = build(Path(folder), args.gigabytes)
        print(f"generated {weight_bytes / 1e9:.2f} GB of weights in {time.perf_counter() - start:.0f} s", flush=True)
        modes = [("no verify", ["--no-verify"])] + ([("verify", [])] if args.with_verify else [])
        for label, extra in modes:
            row = {"mode": label, "weight_bytes": weight_bytes, **run(model, *extra)}
            row["ratio"] = row["peak_bytes"] / weight_bytes
            out = Path(folder) / "out.onnx"
            if row["exit"] == 0:
                optimized = onnx.load(out, load_external_data=False)
                row["nodes_after"] = len(optimized.graph.node)
                row["external_data"] = (Path(folder) / "out.onnx.data").is_file()
            rows.append(row)
            print(f"{label}: exit {row['exit']}, {row['seconds']:.0f} s, peak {row['peak_bytes'] / 1e9:.2f} GB = "
                  f"{row['ratio']:.2f}x the weights {row.get('nodes_after', '')} {row['stderr'][-300:]}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "huge_model.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
