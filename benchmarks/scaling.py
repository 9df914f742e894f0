"""Optimizer cost against graph size: generated graphs of 10k, 100k and 300k nodes.

Each graph repeats a block exporters typically emit (a foldable constant chain, a duplicated
subexpression, MatMul+Add, a cancelling Transpose pair, Identity and element-wise ops) over a
[1, 8] activation, so every pass has work proportional to the size. Each size runs the default
pipeline in its own process (``--no-verify``: this measures the optimizer, not onnxruntime) and the
table reports seconds, microseconds per node and peak RSS. Linear cost shows as a flat us/node.

    python benchmarks/scaling.py                 # 10k, 100k, 300k nodes
    python benchmarks/scaling.py --sizes 10000 30000
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
NODES_PER_BLOCK = 10


def build(nodes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.1, "w")
    initializers = [weight, numpy_helper.from_array(np.ones(8, np.float32) * 0.01, "b"),
                    numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph_nodes = []
    x = "x"
    for i in range(nodes // NODES_PER_BLOCK):
        p = f"b{i}_"
        graph_nodes += [
            helper.make_node("Mul", ["half", "half"], [p + "q"]),               # folds
            helper.make_node("Add", [p + "q", "half"], [p + "k"]),              # folds
            helper.make_node("MatMul", [x, "w"], [p + "mm"]),
            helper.make_node("Add", [p + "mm", "b"], [p + "lin"]),              # MatMul+Add -> Gemm
            helper.make_node("Relu", [p + "lin"], [p + "r1"]),
            helper.make_node("Relu", [p + "lin"], [p + "r2"]),                  # cse merges it
            helper.make_node("Add", [p + "r1", p + "r2"], [p + "s"]),
            helper.make_node("Transpose", [p + "s"], [p + "t1"], perm=[1, 0]),
            helper.make_node("Transpose", [p + "t1"], [p + "t2"], perm=[1, 0]),  # the pair cancels
            helper.make_node("Mul", [p + "t2", p + "k"], [p + "out"]),
        ]
        x = p + "out"
    graph = helper.make_graph(graph_nodes, "scaling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure(path: Path) -> dict:
    code = (
        "import resource, sys, time, json\n"
        "import onnxopt\n"
        "start = time.perf_counter()\n"
        "result = onnxopt.optimize_model(sys.argv[1], verify=False)\n"
        "seconds = time.perf_counter() - start\n"
        "print(json.dumps({'seconds': seconds, 'nodes_after': result.report.after['nodes'],\n"
        "                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "                  'per_pass': {r['pass']: r['seconds'] for r in result.report.per_pass()}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            path = Path(folder) / f"scaling_{size}.onnx"
            onnx.save(build(size), path)
            print(f"{size} nodes ...", flush=True)
            row = {"nodes": size, **measure(path)}
            row["us_per_node"] = row["seconds"] / size * 1e6
            rows.append(row)
            print(f"  {row['seconds']:.1f} s, {row['us_per_node']:.0f} us/node, peak {row['peak_rss_mb']:.0f} MB, "
                  f"{row['nodes_after']} nodes after", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(rows, indent=2))
    lines = ["| nodes | seconds | us/node | peak RSS (MB) | nodes after | slowest pass |", "|---|---|---|---|---|---|"]
    for row in rows:
        slowest = max(row["per_pass"].items(), key=lambda kv: kv[1])
        lines.append(f"| {row['nodes']} | {row['seconds']:.1f} | {row['us_per_node']:.0f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['nodes_after']} | {slowest[0]} ({slowest[1]:.1f} s) |")
    (RESULTS / "scaling.md").write_text("# Optimizer cost against graph size\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
