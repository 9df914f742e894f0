"""The optimizers under comparison, each run the way its README tells a user to, with default options.

This module is also the child process the runner starts once per (model, tool), so that each tool's
peak memory is its own::

    python benchmarks/peers.py TOOL INPUT.onnx OUTPUT.onnx RESULT.json

The child imports only what the tool needs, then times ``load + optimize + save`` (the work a user
waits for from a file on disk to a file on disk; onnxruntime's offline optimizer cannot be split any
other way), in wall time and in CPU time, and writes a JSON record with the times, its peak resident memory (``ru_maxrss`` of itself
and of any children it started) and the error text if the tool failed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

# A model whose weights approach protobuf's 2 GiB limit is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _save(model, path: str) -> None:
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path, save_as_external_data=True, location=Path(path).name + ".data")
    else:
        onnx.save_model(model, path)


def run_onnxopt(src: str, dst: str, verify: bool = True) -> dict:
    """onnxopt's default pipeline (fold, fuse, dce to a fixed point), verification as configured, written to
    ``dst`` the way the CLI writes it (verified from the written file before it is renamed into place)."""
    import onnxopt

    result = onnxopt.optimize_model(src, verify=verify, output=dst)
    report = result.report
    extra = {"iterations": report.iterations, "converged": report.converged, "pass_runs": len(report.records),
             "report_seconds": round(report.seconds, 3)}
    if report.verification is not None:
        extra["verification"] = report.verification.summary()
    return extra


def run_onnxopt_noverify(src: str, dst: str) -> dict:
    return run_onnxopt(src, dst, verify=False)


# fold's size guard lifted: constants may grow without bound, as the peers let them.
UNGUARDED_FOLD = "fold{max_growth=1024GiB,max_expansion=1000000000000}"


def run_onnxopt_noguard(src: str, dst: str) -> dict:
    """The default pipeline with fold's size guard lifted (no verification): which node counts the guard
    alone keeps above the peers'. The harness still compares the outputs."""
    import onnxopt
    from onnxopt.passes import DEFAULT_PIPELINE

    passes = [UNGUARDED_FOLD if name == "fold" else name for name in DEFAULT_PIPELINE]
    result = onnxopt.optimize_model(src, passes, verify=False, output=dst)
    return {"iterations": result.report.iterations, "converged": result.report.converged}


def run_onnxsim(src: str, dst: str) -> dict:
    """``onnxsim.simplify(model)`` with its defaults (check_n=0: no numeric check)."""
    import onnx
    from onnxsim import simplify

    model, check = simplify(onnx.load(src))
    _save(model, dst)
    return {"check": bool(check)}


def run_onnxslim(src: str, dst: str) -> dict:
    """``onnxslim.slim(path)`` with its defaults."""
    import onnxslim

    model = onnxslim.slim(src)
    _save(model, dst)
    return {}


def run_onnxoptimizer(src: str, dst: str) -> dict:
    """``onnxoptimizer.optimize(model)``: its default fuse-and-eliminate passes."""
    import onnx
    import onnxoptimizer

    model = onnxoptimizer.optimize(onnx.load(src))
    _save(model, dst)
    return {}


def run_graphsurgeon(src: str, dst: str) -> dict:
    """onnx-graphsurgeon ``fold_constants().cleanup()``, the step Polygraphy's sanitize runs."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(src))
    graph.fold_constants().cleanup()
    _save(gs.export_onnx(graph), dst)
    return {}


def run_ort_basic(src: str, dst: str) -> dict:
    """onnxruntime's offline optimizer: a session at ORT_ENABLE_BASIC that saves the optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    return {}


def run_load_save(src: str, dst: str) -> dict:
    """``onnx.load`` then save, nothing else: the time any tool that reads and writes models with onnx's
    Python API pays before it optimizes anything (a floor for the time ratios, not a peer)."""
    import onnx

    _save(onnx.load(src), dst)
    return {}


TOOLS = {
    "onnxopt": run_onnxopt,
    "onnxopt-noverify": run_onnxopt_noverify,
    "onnxopt-noguard": run_onnxopt_noguard,
    "onnxsim": run_onnxsim,
    "onnxslim": run_onnxslim,
    "onnxoptimizer": run_onnxoptimizer,
    "graphsurgeon": run_graphsurgeon,
    "ort-basic": run_ort_basic,
    "load-save": run_load_save,
}

# onnxopt imports its passes and onnx's reference evaluator on first use, in every run, where onnxsim and
# onnxslim import what they use with their package: all are imports, excluded from every tool's time
# alike. onnxruntime's symbolic shape inference (and sympy) stays lazy: only dynamic shapes need it, and
# importing it for every model would add its memory to runs that never use it (its package path also
# imports torch, which onnxopt's own loader avoids).
ONNXOPT_MODULES = ["onnxopt", "onnxopt.passes", "onnx.reference"]

# The modules each tool needs: imported before the clock starts.
TOOL_PACKAGES = {
    "onnxopt": ONNXOPT_MODULES,
    "onnxopt-noverify": ONNXOPT_MODULES,
    "onnxopt-noguard": ONNXOPT_MODULES,
    "onnxsim": ["onnxsim"],
    "onnxslim": ["onnxslim"],
    "onnxoptimizer": ["onnxoptimizer"],
    "graphsurgeon": ["onnx_graphsurgeon"],
    "ort-basic": ["onnxruntime"],
    "load-save": ["onnx"],
}

PEERS = ["onnxsim", "onnxslim", "onnxoptimizer", "graphsurgeon", "ort-basic"]


def _peak_rss_bytes() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024  # Linux reports kilobytes


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and of children it waited for.

    Less sensitive than wall time to other work on a shared machine; more than wall time for tools that
    run on several threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_main(tool: str, src: str, dst: str, result_path: str) -> int:
    record: dict = {"tool": tool, "ok": False}
    start = time.perf_counter()
    try:
        import importlib

        for package in TOOL_PACKAGES[tool]:
            importlib.import_module(package)
        record["import_seconds"] = round(time.perf_counter() - start, 3)
        record["rss_after_import_bytes"] = _peak_rss_bytes()
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        record["extra"] = TOOLS[tool](src, dst)
        record["seconds"] = time.perf_counter() - start
        record["cpu_seconds"] = _cpu_seconds() - cpu_start
        record["ok"] = Path(dst).exists()
        if not record["ok"]:
            record["error"] = "the tool returned without writing a model"
    except BaseException as error:  # noqa: BLE001 - every failure is a result to record
        record["seconds"] = time.perf_counter() - start
        message = str(error).strip()
        record["error"] = f"{type(error).__name__}: {message}"[:4000]
        record["traceback"] = "".join(traceback.format_exception(error))[-6000:]
    record["peak_rss_bytes"] = _peak_rss_bytes()
    Path(result_path).write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in TOOLS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TOOLS)}}} INPUT OUTPUT RESULT_JSON")
    sys.exit(child_main(*sys.argv[1:]))
