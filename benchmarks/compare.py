"""Measures one model's optimized versions against the original (a child process of the runner).

For the original and every tool's output: node count (subgraphs of If/Loop/Scan included), op
histogram, size on disk (external data included), and the outputs computed by onnxruntime with graph
optimizations DISABLED on the same seeded random inputs, so that the comparison judges the tool and
not onnxruntime's own optimizer. Inputs follow the corpus manifest: fixed shapes, integer inputs inside
their range (``input_ids`` in the vocabulary), attention masks all ones.

For each output: ``max_abs`` is the largest absolute difference and ``rel`` that difference divided by
the largest magnitude of the original's output (so 1e-4 means "four digits of the output's scale").
A model's ``max_rel`` is the worst over its outputs; a missing output, a changed shape or dtype, or a
model onnxruntime cannot load or run is an error rather than a number.

    python benchmarks/compare.py JOB.json RESULT.json
"""

from __future__ import annotations

import collections
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

SEED = 0


def iter_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of the subgraphs in its attributes."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from iter_nodes(sub)


def files_bytes(folder: Path) -> int:
    """The model file plus its external data: every file the tool wrote into its own folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def describe(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(iter_nodes(model.graph))
    ops = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in nodes)
    return {
        "nodes": len(nodes),
        "top_level_nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "functions": len(model.functions),
        "inputs": [i.name for i in model.graph.input],
        "ops": dict(sorted(ops.items())),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
    }


def make_feeds(specs: list[dict], seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec["dtype"])
        shape = spec["shape"]
        if spec.get("fill") is not None:
            feeds[spec["name"]] = np.full(shape, spec["fill"], dtype=dtype)
        elif dtype == np.bool_:
            feeds[spec["name"]] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[spec["name"]] = rng.integers(int(spec["low"]), int(spec["high"]), size=shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.uniform(spec.get("low", -1.0), spec.get("high", 1.0), size=shape).astype(dtype)
    return feeds


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    missing = sorted(wanted - set(feeds))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(f"the model requires inputs the original does not have: {shown}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def compare(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    per_output = {}
    problems = []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"output '{name}' is missing")
            continue
        have = got[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            problems.append(f"output '{name}' is {have.dtype}{list(have.shape)} instead of {want.dtype}{list(want.shape)}")
            continue
        want64, have64 = want.astype(np.float64), have.astype(np.float64)
        if want64.size == 0:
            per_output[name] = {"max_abs": 0.0, "rel": 0.0}
            continue
        nan_want, nan_have = np.isnan(want64), np.isnan(have64)
        if not np.array_equal(nan_want, nan_have):
            problems.append(f"output '{name}' has NaN in other places")
            continue
        finite = ~nan_want
        diff = np.abs(want64[finite] - have64[finite])
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(want64[finite]).max()) if diff.size else 0.0
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        per_output[name] = {"max_abs": max_abs, "rel": rel}
    extra = sorted(set(got) - set(expected))
    result = {"outputs": per_output,
              "max_abs": max((o["max_abs"] for o in per_output.values()), default=0.0),
              "max_rel": max((o["rel"] for o in per_output.values()), default=0.0)}
    if extra:
        result["extra_outputs"] = extra
    if problems:
        result["error"] = "; ".join(problems)
    return result


def main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    original = Path(job["original"])
    feeds = make_feeds(job["inputs"])
    result: dict = {"original": {}, "tools": {}}
    start = time.perf_counter()
    try:
        result["original"] = describe(original)
        result["original"]["bytes"] = sum(p.stat().st_size for p in original.parent.glob(original.name + "*"))
        expected = run(original, feeds)
        result["original"]["outputs"] = {k: list(v.shape) for k, v in expected.items()}
        # Outputs that do not depend on the input (onnx's light models: weights are constant fills) make
        # the numeric comparison vacuous; say so.
        result["original"]["constant_outputs"] = sorted(
            k for k, v in expected.items() if v.size and np.issubdtype(v.dtype, np.number) and np.all(v == v.flat[0]))
    except Exception as error:  # noqa: BLE001
        result["original"]["error"] = f"{type(error).__name__}: {error}"[:2000]
        expected = None
    result["original"]["seconds"] = time.perf_counter() - start
    for tool, path in job["outputs"].items():
        path = Path(path)
        entry: dict = {}
        try:
            entry.update(describe(path))
            entry["bytes"] = files_bytes(path.parent)
            if expected is not None:
                entry.update(compare(expected, run(path, feeds)))
        except Exception as error:  # noqa: BLE001 - a model onnxruntime rejects is a finding, not a crash
            entry["error"] = f"{type(error).__name__}: {str(error).strip()}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        result["tools"][tool] = entry
        Path(result_path).write_text(json.dumps(result, indent=2, default=float))
    Path(result_path).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
