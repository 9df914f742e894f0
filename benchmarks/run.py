"""Runs onnxopt and its peers on the benchmark corpus and writes results.md, results.json and results.png.

    python benchmarks/run.py              # the whole corpus (builds it first if it is missing)
    python benchmarks/run.py --quick      # the small subset: onnx's light models, MobileNetV2, Whisper, GPT-2
    python benchmarks/run.py --models 'bert_*' --tools onnxopt,onnxslim
    python benchmarks/run.py --report-only   # redo the tables and plot from the last run's records

Each (model, tool) runs in its own child process (``peers.py``) with a timeout, so that peak memory is
that tool's alone; a second child per model (``compare.py``) counts nodes and compares every output
with the original's in onnxruntime with graph optimizations disabled. Per-model records are kept in
``benchmarks/work/runs/`` (git-ignored); ``--resume`` reuses those already there.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402
from peers import PEERS, TOOLS  # noqa: E402

WORK = HERE / "work"
RUNS = WORK / "runs"
RESULTS = HERE / "results"

# The targets.
NODE_REL_TOLERANCE = 1e-4  # onnxopt's outputs may differ from the original by this much, relative
PEER_REL_TOLERANCE = 1e-3  # a peer's result counts as "best peer" only when it is this close to the original
TIME_TARGETS = {"onnxslim": 0.5, "onnxsim": 0.25}
MEMORY_PEERS = ["onnxslim", "onnxsim"]
FLOOR_TOOL = "load-save"  # onnx.load + save alone: the part of every tool's time no optimizer can remove

console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_child(argv: list[str], timeout: float, log_path: Path, cwd: Path = HERE.parent) -> dict:
    """Runs a child in its own process group; polls its tree's RSS as a fallback peak-memory measure."""
    start = time.perf_counter()
    peak = 0
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        handle = psutil.Process(process.pid)
        timed_out = False
        while process.poll() is None:
            try:
                rss = handle.memory_info().rss + sum(c.memory_info().rss for c in handle.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            if time.perf_counter() - start > timeout:
                timed_out = True
                _kill_tree(process)
                process.wait()
                break
            time.sleep(0.05)
        _kill_tree(process)  # nothing it started may outlive it
    return {"returncode": process.returncode, "timed_out": timed_out, "wall_seconds": time.perf_counter() - start,
            "polled_peak_rss_bytes": peak}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_tool(tool: str, model: dict, corpus_dir: Path, timeout: float) -> dict:
    folder = WORK / "out" / model["name"] / tool
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    output = folder / f"{model['name']}.onnx"
    result_file = folder.parent / f"{tool}.result.json"
    result_file.unlink(missing_ok=True)
    log_path = folder.parent / f"{tool}.log"
    argv = [sys.executable, str(HERE / "peers.py"), tool, str(corpus_dir / model["path"]), str(output),
            str(result_file)]
    # Each tool runs in an empty folder of its own: some write temporary files into the current directory.
    cwd = folder.parent / f"{tool}.cwd"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    load_before = os.getloadavg()[0]
    process = run_child(argv, timeout, log_path, cwd)
    if result_file.exists():
        record = json.loads(result_file.read_text())
    else:
        record = {"tool": tool, "ok": False}
        if process["timed_out"]:
            record["error"] = f"timeout after {timeout:.0f} s"
        else:
            record["error"] = (f"the process died (exit code {process['returncode']}) without a result: "
                               f"{_log_tail(log_path, 5)}")
    record.update(process)
    record["load_average_before"] = load_before
    stray = sorted(p.name for p in cwd.iterdir())
    if stray:
        record["stray_files"] = stray
    if not record.get("peak_rss_bytes"):
        record["peak_rss_bytes"] = process["polled_peak_rss_bytes"]
    record["output"] = str(output) if record.get("ok") else None
    return record


def evaluate(model: dict, corpus_dir: Path, records: dict[str, dict], timeout: float) -> dict:
    folder = WORK / "out" / model["name"]
    job = {"original": str(corpus_dir / model["path"]), "inputs": model["inputs"],
           "outputs": {tool: r["output"] for tool, r in records.items() if r.get("output")}}
    job_file = folder / "compare.job.json"
    result_file = folder / "compare.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job, indent=2))
    process = run_child([sys.executable, str(HERE / "compare.py"), str(job_file), str(result_file)], timeout,
                        folder / "compare.log")
    result = json.loads(result_file.read_text()) if result_file.exists() else {"original": {}, "tools": {}}
    if process["timed_out"] or process["returncode"] != 0:
        result["error"] = (f"evaluation {'timed out' if process['timed_out'] else 'died'}: "
                           f"{_log_tail(folder / 'compare.log', 5)}")
    return result


def benchmark_model(model: dict, tools: list[str], corpus_dir: Path, timeout: float, progress, task) -> dict:
    records = {}
    for tool in tools:
        progress.update(task, description=f"{model['name']}: {tool}")
        records[tool] = run_tool(tool, model, corpus_dir, timeout)
        progress.advance(task)
    progress.update(task, description=f"{model['name']}: comparing outputs")
    evaluation = evaluate(model, corpus_dir, records, timeout)
    for tool, record in records.items():
        record["eval"] = evaluation["tools"].get(tool, {})
    run = {"model": model["name"], "original": evaluation.get("original", {}), "tools": records,
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if evaluation.get("error"):
        run["eval_error"] = evaluation["error"]
    # Optimized models are large and reproducible: keep the records, drop the files.
    shutil.rmtree(WORK / "out" / model["name"], ignore_errors=True)
    return run


# ---------------------------------------------------------------------------------------------------
# summarizing
# ---------------------------------------------------------------------------------------------------


def status_of(record: dict) -> tuple[bool, str]:
    """(usable, reason): a tool's result is usable when it ran, saved a model that loads and runs, and
    produced every output with its shape."""
    if not record.get("ok"):
        return False, record.get("error", "failed")
    evaluation = record.get("eval", {})
    if evaluation.get("error"):
        return False, f"output model: {evaluation['error']}"
    if "max_rel" not in evaluation:
        return False, "not evaluated"
    return True, ""


def summarize(runs: list[dict], tools: list[str]) -> dict:
    per_model = []
    time_ratios = {peer: [] for peer in TIME_TARGETS}
    time_ratios_noverify = {peer: [] for peer in TIME_TARGETS}
    time_ratios_floor = {peer: [] for peer in TIME_TARGETS}
    memory = {peer: {"ratios": [], "not_higher": 0, "compared": 0} for peer in MEMORY_PEERS}
    failures = []
    warnings = []
    exported = {r["model"] for r in runs if not r["model"].startswith("light_")}
    time_ratios_exported = {peer: [] for peer in TIME_TARGETS}
    cpu_ratios = {peer: [] for peer in TIME_TARGETS}
    loads = []
    for run in runs:
        records = run["tools"]
        mine = records.get("onnxopt")
        if mine is None:
            continue
        ok, reason = status_of(mine)
        row = {"model": run["model"], "onnxopt_ok": ok, "onnxopt_error": reason,
               "original_nodes": run["original"].get("nodes"),
               "constant_outputs": bool(run["original"].get("constant_outputs"))
               and len(run["original"]["constant_outputs"]) == len(run["original"].get("outputs", {}))}
        extra = mine.get("extra") or {}
        row["onnxopt_verification"] = extra.get("verification", "")
        row["onnxopt_converged"] = extra.get("converged")
        row["onnxopt_iterations"] = extra.get("iterations")
        if ok and row["onnxopt_verification"].startswith("verification skipped"):
            warnings.append({"model": run["model"], "tool": "onnxopt",
                             "warning": f"onnxopt's own check did not run: {row['onnxopt_verification']}"})
        if ok and extra.get("converged") is False:
            warnings.append({"model": run["model"], "tool": "onnxopt",
                             "warning": f"the pipeline stopped at the iteration cap ({extra.get('iterations')} "
                                        "iterations) without reaching a fixed point"})
        if mine.get("stray_files"):
            warnings.append({"model": run["model"], "tool": "onnxopt",
                             "warning": f"left files in the working directory: {mine['stray_files']}"})
        if not ok:
            failures.append({"model": run["model"], "tool": "onnxopt", "error": reason,
                             "traceback": mine.get("traceback", "")})
        elif mine["eval"]["max_rel"] > NODE_REL_TOLERANCE:
            failures.append({"model": run["model"], "tool": "onnxopt",
                             "error": f"outputs differ from the original: max rel {mine['eval']['max_rel']:.3g} "
                                      f"(max abs {mine['eval']['max_abs']:.3g})"})
        candidates = []
        for peer in PEERS:
            if peer in records:
                peer_ok, _ = status_of(records[peer])
                if peer_ok and records[peer]["eval"]["max_rel"] <= PEER_REL_TOLERANCE:
                    candidates.append((records[peer]["eval"]["nodes"], peer))
        if candidates:
            best_nodes, best_peer = min(candidates)
            row.update(best_peer=best_peer, best_peer_nodes=best_nodes)
        if ok:
            row.update(onnxopt_nodes=mine["eval"]["nodes"], onnxopt_max_rel=mine["eval"]["max_rel"])
            row["numerics_met"] = mine["eval"]["max_rel"] <= NODE_REL_TOLERANCE
            if candidates:
                row["node_ratio"] = mine["eval"]["nodes"] / max(best_nodes, 1)
                row["nodes_met"] = mine["eval"]["nodes"] <= best_nodes
            unguarded = records.get("onnxopt-noguard")
            if unguarded is not None and status_of(unguarded)[0] \
                    and unguarded["eval"]["max_rel"] <= NODE_REL_TOLERANCE:
                row["noguard_nodes"] = unguarded["eval"]["nodes"]
                if candidates:
                    row["nodes_met_noguard"] = unguarded["eval"]["nodes"] <= best_nodes
            for peer in TIME_TARGETS:
                buckets = [("onnxopt", time_ratios), ("onnxopt-noverify", time_ratios_noverify),
                           (FLOOR_TOOL, time_ratios_floor)]
                if run["model"] in exported:
                    buckets.append(("onnxopt", time_ratios_exported))
                for variant, bucket in buckets:
                    if variant in records and records[variant].get("ok") and records.get(peer, {}).get("ok"):
                        bucket[peer].append(records[variant]["seconds"] / max(records[peer]["seconds"], 1e-9))
                if records.get(peer, {}).get("ok") and "cpu_seconds" in mine and "cpu_seconds" in records[peer]:
                    cpu_ratios[peer].append(mine["cpu_seconds"] / max(records[peer]["cpu_seconds"], 1e-9))
            for peer in MEMORY_PEERS:
                if records.get(peer, {}).get("ok") and mine.get("peak_rss_bytes") and records[peer].get("peak_rss_bytes"):
                    ratio = mine["peak_rss_bytes"] / records[peer]["peak_rss_bytes"]
                    memory[peer]["ratios"].append(ratio)
                    memory[peer]["compared"] += 1
                    memory[peer]["not_higher"] += ratio <= 1.0
        per_model.append(row)
        loads += [r["load_average_before"] for r in records.values() if "load_average_before" in r]

    def median(values):
        return statistics.median(values) if values else None

    targets = {
        "nodes_le_best_peer_every_model": bool(per_model) and all(r.get("nodes_met") for r in per_model),
        "nodes_met_on": sum(bool(r.get("nodes_met")) for r in per_model),
        "nodes_met_on_noguard": sum(bool(r.get("nodes_met_noguard") or r.get("nodes_met")) for r in per_model),
        "noguard_measured": any("noguard_nodes" in r for r in per_model),
        "numerics_met_every_model": bool(per_model) and all(r.get("numerics_met") for r in per_model),
        "every_model_optimizes": bool(per_model) and all(r["onnxopt_ok"] for r in per_model),
        "models": len(per_model),
    }
    time_summary = {}
    for peer, limit in TIME_TARGETS.items():
        value = median(time_ratios[peer])
        time_summary[peer] = {"median_ratio": value, "target": limit, "met": value is not None and value <= limit,
                              "models": len(time_ratios[peer]), "median_ratio_noverify": median(time_ratios_noverify[peer]),
                              "median_ratio_exported_models": median(time_ratios_exported[peer]),
                              "median_ratio_load_save": median(time_ratios_floor[peer]),
                              "median_cpu_ratio": median(cpu_ratios[peer])}
    memory_summary = {}
    for peer, data in memory.items():
        memory_summary[peer] = {"median_ratio": median(data["ratios"]),
                                "max_ratio": max(data["ratios"]) if data["ratios"] else None,
                                "not_higher_on": data["not_higher"], "models": data["compared"],
                                "met": data["compared"] > 0 and data["not_higher"] == data["compared"]}
    # Failures and numeric errors of the peers, for the record.
    peer_failures = []
    for run in runs:
        for tool, record in run["tools"].items():
            if tool.startswith("onnxopt"):
                if tool != "onnxopt":
                    ok, reason = status_of(record)
                    if not ok:
                        failures.append({"model": run["model"], "tool": tool, "error": reason,
                                         "traceback": record.get("traceback", "")})
                continue
            ok, reason = status_of(record)
            if record.get("stray_files"):
                peer_failures.append({"model": run["model"], "tool": tool,
                                      "error": f"left files in the working directory: {record['stray_files']}"})
            if not ok:
                peer_failures.append({"model": run["model"], "tool": tool, "error": reason})
            elif record["eval"]["max_rel"] > PEER_REL_TOLERANCE:
                peer_failures.append({"model": run["model"], "tool": tool,
                                      "error": f"outputs differ: max rel {record['eval']['max_rel']:.3g}"})
    load = {"median": median(loads), "max": max(loads) if loads else None}
    return {"per_model": per_model, "targets": targets, "time": time_summary, "load_average": load, "memory": memory_summary,
            "onnxopt_failures": failures, "onnxopt_warnings": warnings, "peer_failures": peer_failures}


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def _mib(value) -> str:
    return f"{value / 2**20:.1f}" if value else "–"


def _cell(record: dict, field: str) -> str:
    ok, _ = status_of(record)
    if not record.get("ok"):
        return "timeout" if record.get("timed_out") else "FAIL"
    evaluation = record.get("eval", {})
    if field == "nodes":
        text = str(evaluation.get("nodes", "?"))
    elif field == "seconds":
        text = f"{record['seconds']:.2f}"
    elif field == "cpu":
        text = f"{record['cpu_seconds']:.2f}" if "cpu_seconds" in record else "–"
    elif field == "rss":
        text = _mib(record.get("peak_rss_bytes"))
    elif field == "bytes":
        text = _mib(evaluation.get("bytes"))
    elif field == "rel":
        text = f"{evaluation['max_rel']:.1e}" if "max_rel" in evaluation else "–"
    else:
        raise ValueError(field)
    if not ok:
        return f"{text} (broken)"
    if field in ("nodes", "bytes") and evaluation.get("max_rel", 0) > PEER_REL_TOLERANCE:
        return f"{text} (wrong)"
    return text


def _pivot(runs, tools, field, title, original_field=None) -> list[str]:
    header = ["model"] + (["original"] if original_field else []) + tools
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["model"]]
        if original_field == "nodes":
            cells.append(str(run["original"].get("nodes", "?")))
        elif original_field == "bytes":
            cells.append(_mib(run["original"].get("bytes")))
        for tool in tools:
            cells.append(_cell(run["tools"][tool], field) if tool in run["tools"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_markdown(path: Path, payload: dict) -> None:
    runs, tools, summary = payload["runs"], payload["tools"], payload["summary"]
    env = payload["environment"]
    lines = ["# onnxopt vs peers", "",
             f"Generated {payload['generated']} by `python benchmarks/run.py{' ' + payload['args'] if payload['args'] else ''}` "
             f"on {env['cpu']} ({env['cores']} cores, {env['memory_gib']:.0f} GiB), Python {env['python']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".", "",
             f"onnxopt from {env.get('onnxopt_source')} at commit {env.get('onnxopt_commit', 'unknown')}"
             f"{' with uncommitted changes' if env.get('onnxopt_dirty') else ''}.", "",
             "Every tool runs with its default options in its own process; time is load + optimize + save "
             "(imports excluded, for onnxopt also the passes and onnx.reference it imports on first use), peak memory is the process's peak RSS (interpreter and imports included). "
             "`onnxopt` is the default call (verification in onnxruntime on); `onnxopt-noverify` passes "
             "`verify=False`; `onnxopt-noguard` is the default pipeline with fold's size guard lifted (no "
             f"verification), for reference only; `{FLOOR_TOOL}` only loads the model with onnx and saves it (what "
             "reading and writing the file costs the tools that use onnx's Python API: a floor for the time ratios). Outputs are compared with the original's in onnxruntime with graph optimizations "
             "disabled on the same random inputs (batch 1, sequence 16, past 4; token ids inside the "
             "vocabulary); `rel` = max |difference| / max |original output|.", "",
             f"The 1-minute load average before each tool run had median {_fmt(summary['load_average']['median'])} "
             f"and max {_fmt(summary['load_average']['max'])} on {env['cores']} cores: above the core count, other "
             "work shared the machine and wall times are inflated; CPU times are less affected.", "",
             "## Targets", ""]
    targets = summary["targets"]
    lines += ["| target | result | met |", "|---|---|---|"]
    lines.append(f"| node count <= best peer on every model (peers counted only if rel diff <= {PEER_REL_TOLERANCE:g}) "
                 f"| {targets['nodes_met_on']}/{targets['models']} models | {'yes' if targets['nodes_le_best_peer_every_model'] else 'no'} |")
    if targets.get("noguard_measured"):
        lines.append(f"| ... with fold's size guard lifted (`onnxopt-noguard`; constants then grow as the peers' do) "
                     f"| {targets['nodes_met_on_noguard']}/{targets['models']} models | (for reference) |")
    bad_numerics = [r["model"] for r in summary["per_model"] if r.get("onnxopt_ok") and not r.get("numerics_met")]
    lines.append(f"| no output diff beyond {NODE_REL_TOLERANCE:g} relative | "
                 f"{'exceeded on ' + ', '.join(bad_numerics) if bad_numerics else 'within on every optimized model'} "
                 f"| {'yes' if targets['numerics_met_every_model'] else 'no'} |")
    for peer, data in summary["time"].items():
        lines.append(f"| median wall time onnxopt / {peer} <= {data['target']} | {_fmt(data['median_ratio'])} over "
                     f"{data['models']} models (without verification: {_fmt(data['median_ratio_noverify'])}; "
                     f"exported models only: {_fmt(data.get('median_ratio_exported_models'))}; "
                     f"CPU time: {_fmt(data.get('median_cpu_ratio'))}"
                     + (f"; `{FLOOR_TOOL}` alone: {_fmt(data['median_ratio_load_save'])}"
                        if data.get("median_ratio_load_save") is not None else "") + ") | "
                     f"{'yes' if data['met'] else 'no'} |")
    for peer, data in summary["memory"].items():
        lines.append(f"| peak memory no higher than {peer} | not higher on {data['not_higher_on']}/{data['models']}; "
                     f"median ratio {_fmt(data['median_ratio'])}, max {_fmt(data['max_ratio'])} | "
                     f"{'yes' if data['met'] else 'no'} |")
    failed = [r["model"] for r in summary["per_model"] if not r["onnxopt_ok"]]
    lines.append(f"| every model optimizes without error | {'failed on ' + ', '.join(failed) if failed else 'all did'} "
                 f"| {'yes' if targets['every_model_optimizes'] else 'no'} |")
    lines += ["", "### Node count: onnxopt vs the best peer", "",
              "`rel diff` is this harness's comparison; `own check` is what onnxopt's built-in verification "
              "reported; `iterations` is the pass manager's count (`cap` when it stopped without a fixed point). "
              "Models marked * have outputs that do not depend on the input, so their numeric check is vacuous.", "",
              "| model | original | onnxopt | best peer | ratio | rel diff | own check | iterations |",
              "|---|---|---|---|---|---|---|---|"]
    for row in summary["per_model"]:
        check = row.get("onnxopt_verification", "")
        check = "skipped" if check.startswith("verification skipped") else ("passed" if check.startswith("verified") else check[:40] or "–")
        iterations = row.get("onnxopt_iterations")
        iterations = "–" if iterations is None else f"{iterations}{' (cap)' if row.get('onnxopt_converged') is False else ''}"
        lines.append(f"| {row['model']}{' *' if row.get('constant_outputs') else ''} | {row.get('original_nodes', '?')} | "
                     f"{row.get('onnxopt_nodes', 'FAIL')} | {row.get('best_peer_nodes', '–')} ({row.get('best_peer', '–')}) | "
                     f"{_fmt(row.get('node_ratio'))} | "
                     f"{'%.1e' % row['onnxopt_max_rel'] if 'onnxopt_max_rel' in row else '–'} | {check} | {iterations} |")
    lines += ["", "## Results", "",
              "`FAIL`: the tool raised or crashed; `timeout`; `(broken)`: the saved model does not load, run or "
              f"produce the original's outputs in onnxruntime; `(wrong)`: outputs differ by more than {PEER_REL_TOLERANCE:g} "
              "relative.", ""]
    lines += _pivot(runs, tools, "nodes", "Node count (subgraphs included)", "nodes")
    lines += _pivot(runs, tools, "seconds", "Wall time (s): load + optimize + save")
    lines += _pivot(runs, tools, "cpu", "CPU time (s, user + system, all threads): load + optimize + save")
    lines += _pivot(runs, tools, "rss", "Peak RSS (MiB)")
    lines += _pivot(runs, tools, "bytes", "File size (MiB)", "bytes")
    lines += _pivot(runs, tools, "rel", "Largest relative output difference")
    lines += ["## Corpus", "", "| model | source | architecture | size | parameters | exporter | opset | file MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for model in payload["corpus"]:
        params = f"{model['parameters'] / 1e6:.1f}M" if model.get("parameters") else "–"
        exporter = model.get("exporter") or "–"
        failures = [n for n in model.get("notes", []) if "exporter failed" in n]
        if failures:
            exporter += " (" + "; ".join(failures)[:200] + ")"
        lines.append(f"| {model['name']} | {model['source']} | {model['architecture']} | {model['size_note']} | "
                     f"{params} | {exporter} | {model.get('opset') or '–'} | {_mib(model.get('file_bytes'))} |")
    lines += ["", "## onnxopt failures and miscompiles", ""]
    if summary["onnxopt_failures"]:
        for failure in summary["onnxopt_failures"]:
            lines.append(f"- **{failure['model']}** ({failure['tool']}): `{failure['error'][:1500]}`")
    else:
        lines.append("None.")
    lines += ["", "## onnxopt warnings", ""]
    if summary.get("onnxopt_warnings"):
        for warning in summary["onnxopt_warnings"]:
            lines.append(f"- **{warning['model']}**: {warning['warning'][:600]}")
    else:
        lines.append("None.")
    lines += ["", "## Peer failures and numeric differences", ""]
    if summary["peer_failures"]:
        for failure in summary["peer_failures"]:
            lines.append(f"- {failure['model']} / {failure['tool']}: `{failure['error'][:400]}`")
    else:
        lines.append("None.")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    runs = payload["runs"]
    peers = [t for t in payload["tools"] if t != "onnxopt"]
    models = [r["model"] for r in runs if "onnxopt" in r["tools"]]
    if not models or not peers:
        return
    panels = [("nodes", "node count: peer / onnxopt"), ("seconds", "wall time: peer / onnxopt"),
              ("rss", "peak RSS: peer / onnxopt")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 + 2.2 * len(peers), max(4.0, 2.0 + 0.4 * len(models))), sharey=True)

    def value(record, field):
        if field == "nodes":
            ok, _ = status_of(record)
            return record["eval"]["nodes"] if ok else None
        if not record.get("ok"):
            return None
        return record["seconds"] if field == "seconds" else record.get("peak_rss_bytes")

    for ax, (field, title) in zip(axes, panels):
        grid = np.full((len(models), len(peers)), np.nan)
        labels = [["" for _ in peers] for _ in models]
        for i, run in enumerate(r for r in runs if "onnxopt" in r["tools"]):
            mine = value(run["tools"]["onnxopt"], field)
            for j, peer in enumerate(peers):
                theirs = value(run["tools"][peer], field) if peer in run["tools"] else None
                if mine and theirs:
                    grid[i, j] = theirs / mine
                    labels[i][j] = f"{theirs / mine:.2f}"
                else:
                    labels[i][j] = "x" if peer in run["tools"] else ""
        finite = grid[np.isfinite(grid)]
        # A symmetric log scale around 1 wide enough for the data: at least 2x, at most 100x either way.
        decades = float(np.max(np.abs(np.log10(finite)))) if finite.size else 0.0
        bound = 10 ** min(max(decades, np.log10(2.0)), 2.0)
        image = ax.imshow(np.where(np.isfinite(grid), grid, 1.0), cmap="RdYlGn",
                          norm=LogNorm(vmin=1 / bound, vmax=bound), aspect="auto")
        for i in range(len(models)):
            for j in range(len(peers)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(peers)), peers, rotation=35, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_title(title + "\n(> 1: onnxopt smaller/faster; x: a tool failed)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle("onnxopt vs peers, per model", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(summary: dict) -> None:
    table = Table(title="onnxopt node count vs the best peer")
    for column in ("model", "onnxopt", "best peer", "ratio", "rel diff"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in summary["per_model"]:
        table.add_row(row["model"], str(row.get("onnxopt_nodes", "FAIL")),
                      f"{row.get('best_peer_nodes', '–')} {row.get('best_peer', '')}", _fmt(row.get("node_ratio")),
                      f"{row['onnxopt_max_rel']:.1e}" if "onnxopt_max_rel" in row else "–")
    console.print(table)
    for peer, data in summary["time"].items():
        console.print(f"median time onnxopt / {peer}: {_fmt(data['median_ratio'])} (target <= {data['target']}: "
                      f"{'met' if data['met'] else 'not met'}; without verification {_fmt(data['median_ratio_noverify'])}; "
                      f"{FLOOR_TOOL} alone {_fmt(data.get('median_ratio_load_save'))})")
    for peer, data in summary["memory"].items():
        console.print(f"peak memory onnxopt / {peer}: median {_fmt(data['median_ratio'])}, max {_fmt(data['max_ratio'])}, "
                      f"not higher on {data['not_higher_on']}/{data['models']} ({'met' if data['met'] else 'not met'})")
    targets = summary["targets"]
    console.print(f"node count <= best peer: {targets['nodes_met_on']}/{targets['models']}; "
                  f"numerics within {NODE_REL_TOLERANCE:g}: {'yes' if targets['numerics_met_every_model'] else 'no'}; "
                  f"every model optimizes: {'yes' if targets['every_model_optimizes'] else 'no'}")
    for failure in summary["onnxopt_failures"]:
        console.print(f"[red]onnxopt problem[/] {failure['model']} ({failure['tool']}): {failure['error'][:300]}")
    for warning in summary.get("onnxopt_warnings", []):
        console.print(f"[yellow]onnxopt warning[/] {warning['model']}: {warning['warning'][:300]}")


def environment() -> dict:
    packages = {}
    for name in ("onnxopt", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxsim", "onnxslim", "onnxoptimizer",
                 "onnxscript", "torch", "transformers", "numpy"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
            "python": platform.python_version(), "packages": packages, **onnxopt_source()}


def onnxopt_source() -> dict:
    """Where the benchmarked onnxopt comes from: its folder, and the git commit when that is a checkout."""
    spec = importlib.util.find_spec("onnxopt")
    if spec is None or spec.origin is None:
        return {"onnxopt_source": "not installed"}
    folder = Path(spec.origin).resolve().parent.parent
    try:  # a wheel built from a folder remembers it (PEP 610)
        url = json.loads(importlib.metadata.distribution("onnxopt").read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            folder = Path(url.removeprefix("file://"))
    except importlib.metadata.PackageNotFoundError:
        pass
    info = {"onnxopt_source": str(folder)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
    if commit.returncode == 0:
        info["onnxopt_commit"] = commit.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxopt", "passes"], cwd=folder,
                               capture_output=True, text=True).stdout.strip()
        info["onnxopt_dirty"] = bool(dirty)
    elif (folder / "COMMIT").exists():  # a snapshot made with `git archive` (see README)
        info["onnxopt_commit"] = (folder / "COMMIT").read_text().strip()
        info["onnxopt_dirty"] = False
    return info


def write_results(runs: list[dict], tools: list[str], models: list[dict], results_dir: Path, args: str) -> dict:
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, tools)
    payload = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": args,
               "environment": environment(), "tools": tools, "corpus": models,
               "targets": {"node_rel_tolerance": NODE_REL_TOLERANCE, "peer_rel_tolerance": PEER_REL_TOLERANCE,
                           "time": TIME_TARGETS, "memory_peers": MEMORY_PEERS},
               "summary": summary, "runs": runs}
    (results_dir / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    write_markdown(results_dir / "results.md", payload)
    write_plot(results_dir / "results.png", payload)
    return payload


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def select(manifest: list[dict], patterns: list[str] | None) -> list[dict]:
    if not patterns:
        return manifest
    return [m for m in manifest if any(fnmatch.fnmatch(m["name"], p) for p in patterns)]


def ensure_corpus(corpus_dir: Path, patterns: list[str] | None) -> list[dict]:
    manifest_path = corpus_dir / corpus.MANIFEST
    have = corpus.load_manifest(corpus_dir) if manifest_path.exists() else []
    present = [m for m in have if (corpus_dir / m["path"]).exists()]
    expected_bases = [f"{b}_{s}" for b in corpus.BUILDER_NAMES for s in ("dynamic", "static")]
    missing = [n for n in expected_bases if (not patterns or any(fnmatch.fnmatch(n, p) for p in patterns))
               and n not in {m["name"] for m in present}]
    if missing or not present:
        console.print(f"[bold]building the corpus[/] ({', '.join(missing) if missing else 'light models'}) ...")
        argv = [sys.executable, str(HERE / "corpus.py"), "--out", str(corpus_dir)]
        for name in (missing or ["light_*"]):
            argv += ["--only", name]
        argv += ["--only", "light_*"]
        subprocess.run(argv, check=True)
        present = [m for m in corpus.load_manifest(corpus_dir) if (corpus_dir / m["path"]).exists()]
    return present


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"only the quick subset ({', '.join(corpus.QUICK)})")
    parser.add_argument("--models", action="append", metavar="GLOB", help="only these models (repeatable)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tool run (default 600)")
    parser.add_argument("--resume", action="store_true", help="reuse per-model records already in benchmarks/work/runs")
    parser.add_argument("--report-only", action="store_true", help="only rewrite results from the stored records")
    parser.add_argument("--corpus", type=Path, default=corpus.CORPUS_DIR, help="corpus folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.corpus, args.results = args.corpus.resolve(), args.results.resolve()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    if "onnxopt" not in tools:
        tools.insert(0, "onnxopt")
    patterns = args.models or (corpus.QUICK if args.quick else None)
    shown_args = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))

    RUNS.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        manifest = select(corpus.load_manifest(args.corpus), patterns) if (args.corpus / corpus.MANIFEST).exists() else []
        names = {m["name"] for m in manifest}
        runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
        runs = [r for r in runs if not names or r["model"] in names]
        order = {m["name"]: i for i, m in enumerate(manifest)}
        runs.sort(key=lambda r: order.get(r["model"], len(order)))
        tools = [t for t in TOOLS if any(t in r["tools"] for r in runs)]
    else:
        manifest = select(ensure_corpus(args.corpus, patterns), patterns)
        runs = []
        todo = []
        for model in manifest:
            stored = RUNS / f"{model['name']}.json"
            if args.resume and stored.exists():
                run = json.loads(stored.read_text())
                if all(t in run["tools"] for t in tools):
                    runs.append(run)
                    continue
            todo.append(model)
        console.print(f"{len(manifest)} models x {len(tools)} tools; {len(todo)} models to run, "
                      f"timeout {args.timeout:.0f} s per tool run")
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("starting", total=len(todo) * len(tools))
            for model in todo:
                run = benchmark_model(model, tools, args.corpus, args.timeout, progress, task)
                stored = RUNS / f"{model['name']}.json"
                if stored.exists():  # a run of some tools only keeps the other tools' earlier records
                    earlier = json.loads(stored.read_text())
                    kept = {t: r for t, r in earlier["tools"].items() if t not in run["tools"]}
                    if kept:
                        run["tools"] = {t: run["tools"].get(t) or kept[t] for t in TOOLS
                                        if t in run["tools"] or t in kept}
                stored.write_text(json.dumps(run, indent=1, default=float))
                runs.append(run)
                mine = run["tools"]["onnxopt"]
                ok, reason = status_of(mine)
                progress.console.print(
                    f"{model['name']}: original {run['original'].get('nodes', '?')} nodes; " + ", ".join(
                        f"{t} {r['eval'].get('nodes', 'FAIL') if status_of(r)[0] else 'FAIL'}" for t, r in run["tools"].items())
                    + ("" if ok else f"  [red]onnxopt: {reason[:200]}[/]"))
        order = {m["name"]: i for i, m in enumerate(manifest)}
        runs.sort(key=lambda r: order.get(r["model"], len(order)))
        tools = [t for t in TOOLS if any(t in r["tools"] for r in runs)]
    if not runs:
        console.print("no records to report")
        return 1
    payload = write_results(runs, tools, manifest, args.results, shown_args)
    print_summary(payload["summary"])
    console.print(f"wrote {args.results / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
