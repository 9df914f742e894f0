"""Measures CPU inference latency of the corpus models as exported and as each optimizer leaves them.

    python benchmarks/latency.py --quick            # a small subset, about 10 minutes on 2 cores
    python benchmarks/latency.py                    # the whole corpus
    python benchmarks/latency.py --models 'bert_*' --threads 1
    python benchmarks/latency.py --report-only      # redo latency.md/.json/.png from the stored records

Variants of each model (onnxruntime at ORT_ENABLE_ALL unless said otherwise):

* ``ort-original``: the corpus model; ``ort-onnxslim``: ``onnxslim.slim`` (run through ``peers.py``);
* ``ort-transformers``: ``onnxruntime.transformers.optimizer.optimize_model`` with the model type, heads
  and hidden size of the architecture (transformer models only);
* ``ort-onnxopt``: ``onnxopt run MODEL --target ort -O3``;
* ``ov-original`` and ``ov-onnxopt`` (``--target openvino -O3``) in OpenVINO on the CPU, f32 precision;
* ``reference``: the original with onnxruntime's optimizations disabled, never timed: every variant's
  outputs are compared with it (``max_rel`` = largest |difference| / largest |reference output|).

Each variant runs in a child process of its own that holds one inference session and answers the
parent's requests, so that a crash is recorded rather than fatal, and so that the variants can take
turns: every (thread count, scenario) is measured in rounds that visit the variants in rotating order,
which spreads the other work on a shared machine evenly over them. Inputs are random with one seed,
written once per scenario and loaded by every child. Text models with dynamic axes run at sequence
length 128; the GPT-2 model with a key/value cache also decodes one token after 128 cached positions.
Records go to ``benchmarks/work/latency/`` (git-ignored); results to ``benchmarks/results/latency.*``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare
import corpus

WORK = HERE / "work" / "latency"
RECORDS = WORK / "records"
RESULTS = HERE / "results"
DEFAULT_ONNXOPT = HERE.parent / ".venv" / "bin" / "onnxopt"  # the checkout's editable install: the newest code

# Small enough for about 10 minutes on 2 shared cores, and covering a CNN, an encoder, a decoder with
# its cache and a vision transformer.
QUICK = ["mobilenetv2_static", "bert_base_dynamic", "gpt2_past_dynamic", "vit_base_static"]
SEQUENCE = 128  # the text models' sequence length
PAST = 128  # cached positions before the one decoded token

TARGET_TRANSFORMERS_RATIO = 0.95  # the target against onnxruntime's transformers optimizer
TARGET_RATIO = 1.0  # against the original under ORT's full optimizations, and against onnxslim
NUMERIC_TOLERANCE = 1e-4
# A row misses a target "clearly" when the rounds that miss it are too many for chance: a one-sided sign
# test over the rounds' paired ratios (with 10 rounds, 9 or more of them).
SIGN_TEST_P = 0.05
SLOW_RUN_MS = 50  # runs slower than this skip the re-warming run between rounds


@dataclass(frozen=True)
class TransformerSpec:
    """What ``onnxruntime.transformers.optimizer.optimize_model`` needs to know about an architecture."""

    model_type: str
    num_heads: int
    hidden_size: int


# The configurations corpus.py exports (transformers' defaults for BERT, GPT-2 and ViT; whisper-base's
# encoder). onnxruntime's own Whisper export optimizes with model_type "bart", so that is used here too.
TRANSFORMERS = {
    "bert_base": TransformerSpec("bert", 12, 768),
    "gpt2_past": TransformerSpec("gpt2", 12, 768),
    "vit_base": TransformerSpec("vit", 12, 768),
    "whisper_encoder": TransformerSpec("bart", 8, 512),
}


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # "ort" or "openvino"
    source: str  # which file it runs: "original" or the optimizer that wrote it
    label: str
    timed: bool = True
    ort_optimizations: str = "all"


VARIANTS = [
    Variant("reference", "ort", "original", "original, ORT optimizations disabled", timed=False,
            ort_optimizations="disabled"),
    Variant("ort-original", "ort", "original", "ORT: original"),
    Variant("ort-onnxslim", "ort", "onnxslim", "ORT: onnxslim"),
    Variant("ort-transformers", "ort", "ort-transformers", "ORT: transformers optimizer"),
    Variant("ort-onnxopt", "ort", "onnxopt-ort", "ORT: onnxopt --target ort"),
    Variant("ov-original", "openvino", "original", "OpenVINO: original"),
    Variant("ov-onnxopt", "openvino", "onnxopt-openvino", "OpenVINO: onnxopt --target openvino"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
TIMED = [v for v in VARIANTS if v.timed]

# (column title, ours, theirs): ratios of median latencies, < 1 means onnxopt's output is faster.
RATIOS = [
    ("onnxopt / ORT full", "ort-onnxopt", "ort-original"),
    ("onnxopt / onnxslim", "ort-onnxopt", "ort-onnxslim"),
    ("onnxopt / ORT transformers opt.", "ort-onnxopt", "ort-transformers"),
    ("onnxopt / OpenVINO original", "ov-onnxopt", "ov-original"),
]


@dataclass
class Scenario:
    """One set of input shapes: the values given to the models' symbolic dimensions."""

    name: str
    dims: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------------


def transformers_optimizer_child(src: str, dst: str, model_type: str, num_heads: str, hidden_size: str,
                                 result_path: str) -> int:
    """Runs onnxruntime's transformers optimizer the way its documentation shows, and saves the model."""
    record: dict = {"ok": False}
    start = time.perf_counter()
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(src, model_type=model_type, num_heads=int(num_heads),
                                   hidden_size=int(hidden_size))
        optimized.save_model_to_file(dst)
        record["ok"] = True
        statistics_of = getattr(optimized, "get_fused_operator_statistics", None)
        if statistics_of is not None:
            record["fused_operators"] = {k: v for k, v in statistics_of().items() if v}
    except Exception as error:  # noqa: BLE001 - a failing optimizer is a result
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
    record["seconds"] = time.perf_counter() - start
    Path(result_path).write_text(json.dumps(record, indent=1))
    return 0


class OrtRunner:
    """One onnxruntime CPU session with a fixed number of intra-op threads."""

    LEVELS: ClassVar[dict[str, str]] = {"all": "ORT_ENABLE_ALL", "disabled": "ORT_DISABLE_ALL"}

    def __init__(self, path: str, threads: int, optimizations: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.LEVELS[optimizations])
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds_from(self, arrays: dict) -> dict:
        return {i.name: _input_array(arrays, {i.name}) for i in self.session.get_inputs()}

    def run(self, feeds: dict) -> None:
        self.session.run(self.output_names, feeds)

    def outputs(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class OpenVinoRunner:
    """One OpenVINO CPU compiled model, latency hint, one stream, f32 (not the bf16 AMX CPUs default to)."""

    def __init__(self, path: str, threads: int):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def feeds_from(self, arrays: dict) -> dict:
        # By position: OpenVINO may give an input port the names of tensors it merged into it as well.
        return {index: _input_array(arrays, port.get_names()) for index, port in enumerate(self.compiled.inputs)}

    def run(self, feeds: dict) -> None:
        self.request.infer(feeds, share_inputs=True, share_outputs=True)

    def outputs(self, feeds: dict) -> dict:
        self.request.infer(feeds)
        results = {}
        for index, port in enumerate(self.compiled.outputs):
            for name in port.get_names():  # a port may carry several tensor names; keep each
                results[name] = self.request.get_output_tensor(index).data.copy()
        return results


def time_runs(run_once, warmup: int, seconds: float, min_runs: int, max_runs: int) -> list[float]:
    """Milliseconds per run: ``warmup`` untimed runs, then runs until both ``min_runs`` and ``seconds``."""
    for _ in range(warmup):
        run_once()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < seconds):
        begin = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _input_array(arrays: dict, names: set[str]):
    """The array for the input known by any of ``names``."""
    for name in sorted(names):
        if name in arrays:
            return arrays[name]
    raise RuntimeError(f"the model needs an input the original does not have: {' or '.join(sorted(names))}")


def measure_child(job_path: str) -> int:
    """Serves one variant: reads JSON requests on stdin, answers each with one JSON line on stdout."""
    import numpy as np

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the protocol
    job = json.loads(Path(job_path).read_text())
    scenarios = {}
    for name, path in job["scenarios"].items():
        with np.load(path) as data:
            scenarios[name] = {key: data[key] for key in data.files}
    runner = None

    def handle(request: dict) -> dict:
        nonlocal runner
        if request["op"] == "describe":
            graph = compare.describe(Path(job["model"]))
            contrib = {op: n for op, n in graph["ops"].items() if "." in op}
            return {"nodes": graph["nodes"], "contrib_ops": contrib}
        if request["op"] == "load":
            runner = None
            gc.collect()
            start = time.perf_counter()
            if job["engine"] == "ort":
                runner = OrtRunner(job["model"], request["threads"], job["ort_optimizations"])
            else:
                runner = OpenVinoRunner(job["model"], request["threads"])
            return {"seconds": time.perf_counter() - start}
        feeds = runner.feeds_from(scenarios[request["scenario"]])
        if request["op"] == "outputs":
            np.savez(request["path"], **runner.outputs(feeds))
            return {}
        if request["op"] == "measure":
            return {"times_ms": time_runs(lambda: runner.run(feeds), request["warmup"], request["seconds"],
                                          request["min_runs"], request["max_runs"])}
        raise ValueError(f"unknown request {request['op']!r}")

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        try:
            reply = handle(request)
        except Exception as error:  # noqa: BLE001 - the parent records it and goes on
            reply = {"error": f"{type(error).__name__}: {str(error).strip()}"[:2000]}
        protocol.write(json.dumps(reply) + "\n")
    return 0


CHILDREN = {"--measure-child": measure_child, "--transformers-optimizer-child": transformers_optimizer_child}


# ---------------------------------------------------------------------------------------------------
# the parent: preparing variants
# ---------------------------------------------------------------------------------------------------


def _first_error_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1].strip()[:500]


def prepare_onnxslim(src: Path, dst: Path, folder: Path, timeout: float) -> dict:
    """onnxslim with its defaults, through the node-count benchmark's own child (peers.py)."""
    import run as node_benchmark

    result_path = folder / "result.json"
    process = node_benchmark.run_child([sys.executable, str(HERE / "peers.py"), "onnxslim", str(src), str(dst),
                                        str(result_path)], timeout, folder / "log.txt", cwd=folder)
    record = json.loads(result_path.read_text()) if result_path.exists() else {}
    return _prepared(process, record, folder, timeout)


def prepare_ort_transformers(src: Path, dst: Path, folder: Path, timeout: float, spec: TransformerSpec) -> dict:
    import run as node_benchmark

    result_path = folder / "result.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--transformers-optimizer-child", str(src), str(dst),
            spec.model_type, str(spec.num_heads), str(spec.hidden_size), str(result_path)]
    process = node_benchmark.run_child(argv, timeout, folder / "log.txt", cwd=folder)
    record = json.loads(result_path.read_text()) if result_path.exists() else {}
    record["options"] = asdict(spec)
    return _prepared(process, record, folder, timeout)


# The CLI flags tried in order: a checkout that does not know a flag yet gets the next, simpler line.
ONNXOPT_FLAG_CHOICES = [["-O3", "--target", "{target}"], ["--target", "{target}"], []]


def prepare_onnxopt(src: Path, dst: Path, folder: Path, timeout: float, cli: Path, target: str,
                    verify_inputs: Path, passes: str | None = None) -> dict:
    """``onnxopt run`` with verification on the corpus's input shapes (consistent past/sequence lengths):
    ``-O3`` (or the fewer flags the CLI knows), or the explicit pipeline ``passes``."""
    import run as node_benchmark

    notes = []
    choices = [["--passes", passes, "--target", "{target}"]] if passes else ONNXOPT_FLAG_CHOICES
    for flags in choices:
        flags = [f.format(target=target) for f in flags]
        argv = [str(cli), "run", str(src), "-o", str(dst), *flags, "--inputs", str(verify_inputs),
                "--report", str(folder / "report.json"), "-q"]
        log_path = folder / "log.txt"
        process = node_benchmark.run_child(argv, timeout, log_path, cwd=folder)
        if process["returncode"] == 2 and _is_usage_error(log_path):
            notes.append(f"`{' '.join(flags)}` not accepted ({_first_error_line(log_path)}); trying fewer flags")
            continue
        break
    record = {"ok": process["returncode"] == 0 and dst.exists(), "command": " ".join(argv[1:2] + flags),
              "flags": " ".join(flags), "notes": notes}
    report_path = folder / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        record["pipeline"] = report.get("pipeline")
        record["verification"] = verification_summary(report.get("verification"))
        record["census"] = report.get("census")
    if not record["ok"] and not process["timed_out"]:
        record["error"] = f"exit code {process['returncode']}: {_first_error_line(folder / 'log.txt')}"
    return _prepared(process, record, folder, timeout)


def verification_summary(verification: dict | None) -> str:
    if not verification:
        return "off"
    if verification.get("skipped"):
        return f"skipped: {verification['skipped']}"
    return "passed" if verification.get("ok") else "failed"


def _is_usage_error(log_path: Path) -> bool:
    text = log_path.read_text(errors="replace")
    return any(s in text for s in ("No such option", "Invalid value for '--target'", "Invalid value for '-O'"))


def _prepared(process: dict, record: dict, folder: Path, timeout: float) -> dict:
    record.setdefault("ok", False)
    record["wall_seconds"] = round(process["wall_seconds"], 2)
    if process["timed_out"]:
        record["error"] = f"timeout after {timeout:.0f} s"
    elif not record["ok"] and not record.get("error"):
        record["error"] = f"exit code {process['returncode']}: {_first_error_line(folder / 'log.txt')}"
    return record


def prepare_sources(model: dict, src: Path, folder: Path, args, verify_inputs: Path, progress, task) -> dict:
    """Runs each optimizer on the model in its own process; returns source -> record (with "path")."""
    base = base_name(model["name"])
    jobs = {"onnxslim": partial(prepare_onnxslim, src, timeout=args.timeout)}
    if base in TRANSFORMERS:
        jobs["ort-transformers"] = partial(prepare_ort_transformers, src, timeout=args.timeout, spec=TRANSFORMERS[base])
    for target in ("ort", "openvino"):
        jobs[f"onnxopt-{target}"] = partial(prepare_onnxopt, src, timeout=args.timeout, cli=args.onnxopt,
                                            target=target, verify_inputs=verify_inputs,
                                            passes=getattr(args, f"passes_{target}"))
    sources = {"original": {"ok": True, "path": str(src)}}
    for source, job in jobs.items():
        progress.update(task, description=f"{model['name']}: {source}")
        out_folder = folder / source
        shutil.rmtree(out_folder, ignore_errors=True)
        out_folder.mkdir(parents=True)
        destination = out_folder / "model.onnx"
        record = job(destination, out_folder)
        record["path"] = str(destination) if record["ok"] else None
        sources[source] = record
        progress.advance(task)
    return sources


# ---------------------------------------------------------------------------------------------------
# the parent: scenarios and inputs
# ---------------------------------------------------------------------------------------------------


def base_name(model_name: str) -> str:
    return model_name.removesuffix("_dynamic").removesuffix("_static")


def symbolic_dims(model_path: Path) -> dict[str, list]:
    """Each graph input's dimensions: an int, or the name of a symbolic dimension."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in initializers}


def scenarios_for(dims: dict[str, list]) -> list[Scenario]:
    """Sequence 128 for text models with a dynamic sequence; prefill and one-token decoding with a cache."""
    names = {d for shape in dims.values() for d in shape if isinstance(d, str)}
    if "sequence" not in names:
        return [Scenario("as exported")]
    if "past_sequence" not in names:
        return [Scenario(f"seq {SEQUENCE}", {"batch": 1, "sequence": SEQUENCE})]
    return [Scenario(f"prefill {SEQUENCE}", {"batch": 1, "sequence": SEQUENCE, "past_sequence": 0,
                                              "total_sequence": SEQUENCE}),
            Scenario(f"decode 1, past {PAST}", {"batch": 1, "sequence": 1, "past_sequence": PAST,
                                                 "total_sequence": PAST + 1})]


def scenario_specs(model: dict, dims: dict[str, list], scenario: Scenario) -> list[dict]:
    """The manifest's input specs with the scenario's sizes in place of the symbolic dimensions."""
    specs = []
    for spec in model["inputs"]:
        shape = [scenario.dims.get(d, fixed) if isinstance(d, str) else fixed
                 for d, fixed in zip(dims.get(spec["name"], []), spec["shape"])] or spec["shape"]
        specs.append({**spec, "shape": shape})
    return specs


def write_feeds(specs: list[dict], path: Path) -> dict[str, list[int]]:
    import numpy as np

    feeds = compare.make_feeds(specs)  # one seed: every variant gets the same arrays
    np.savez(path, **feeds)
    return {name: list(array.shape) for name, array in feeds.items()}


# ---------------------------------------------------------------------------------------------------
# the parent: measuring
# ---------------------------------------------------------------------------------------------------


def _busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq + getattr(times, "steal", 0.0)


class VariantChild:
    """A child process holding one variant's session; a crash or a hang marks the variant failed."""

    def __init__(self, variant: Variant, job: dict, folder: Path):
        self.variant = variant
        self.error: str | None = None
        job_path = folder / f"{variant.name}.job.json"
        job_path.write_text(json.dumps(job, indent=1))
        self.log_path = folder / f"{variant.name}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--measure-child",
                                             str(job_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, start_new_session=True, cwd=folder)
        self._buffer = b""

    def cpu_seconds(self) -> float:
        import psutil

        try:
            times = psutil.Process(self.process.pid).cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    def request(self, message: dict, timeout: float) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
            return json.loads(self._read_line(timeout))
        except (BrokenPipeError, EOFError, TimeoutError, ValueError) as error:
            self._kill()
            self.error = f"the child {'hung' if isinstance(error, TimeoutError) else 'died'} during " \
                         f"'{message['op']}' (exit code {self.process.poll()}): " \
                         f"{_first_error_line(self.log_path) if self.log_path.exists() else ''}"
            return {"error": self.error}

    def _read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise EOFError
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _kill(self) -> None:
        import run as node_benchmark

        node_benchmark._kill_tree(self.process)
        self.process.wait()

    def close(self) -> None:
        if self.error is None and self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"op": "quit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        self._kill()


def measure_once(child: VariantChild, scenario: str, args, warmup: int) -> dict:
    """One timed request, with how much CPU the rest of the machine used meanwhile."""
    busy, own, start = _busy_cpu_seconds(), child.cpu_seconds(), time.monotonic()
    load = os.getloadavg()[0]
    reply = child.request({"op": "measure", "scenario": scenario, "warmup": warmup,
                           "seconds": args.seconds / args.rounds, "min_runs": -(-args.min_runs // args.rounds),
                           "max_runs": args.max_runs}, args.timeout)
    wall = time.monotonic() - start
    others = max(0.0, (_busy_cpu_seconds() - busy) - (child.cpu_seconds() - own)) / wall if wall > 0 else 0.0
    return {**reply, "other_busy_cores": others, "load_average": load}


def warmup_runs(round_index: int, samples_so_far: list[float], args) -> int:
    """Untimed runs before a turn: the full warmup first; later one run to refill the caches another
    process evicted, except for models so slow that the caches hardly matter."""
    if round_index == 0 or not samples_so_far:
        return args.warmup
    return 1 if statistics.median(samples_so_far) < SLOW_RUN_MS else 0


def summarize_times(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "min_ms": ordered[0], "runs": len(ordered)}


def measure_model(model: dict, sources: dict, scenarios: list[Scenario], feeds: dict[str, Path], folder: Path,
                  args, progress, task) -> dict:
    """Starts one child per variant, takes the reference outputs, then times the variants in rounds."""
    variants: dict[str, dict] = {}
    for variant in VARIANTS:
        source = sources.get(variant.source)
        if source is None:
            continue
        variants[variant.name] = {"engine": variant.engine, "source": variant.source, "latency": {}, "load_seconds": {},
                                  "max_rel": {}, "errors": []}
        if not source.get("ok"):
            variants[variant.name]["errors"].append(f"{variant.source}: {source.get('error', 'failed')}")

    def job_for(variant: Variant) -> dict:
        return {"engine": variant.engine, "model": sources[variant.source]["path"],
                "ort_optimizations": variant.ort_optimizations,
                "scenarios": {s.name: str(feeds[s.name]) for s in scenarios}}

    outputs_dir = folder / "outputs"
    outputs_dir.mkdir(exist_ok=True)
    usable = [v for v in VARIANTS if v.name in variants and not variants[v.name]["errors"]]
    children = {}
    try:
        for variant in usable:
            children[variant.name] = VariantChild(variant, job_for(variant), folder)
        described = set()
        for name, child in children.items():
            if child.variant.source in described:  # the same file as a variant described already
                continue
            described.add(child.variant.source)
            progress.update(task, description=f"{model['name']}: reading {child.variant.source}'s graph")
            reply = child.request({"op": "describe"}, args.timeout)
            variants[name]["graph"] = {k: v for k, v in reply.items() if k != "error"}
        for threads in args.threads:
            live = {}
            for name, child in children.items():
                progress.update(task, description=f"{model['name']}: loading {name} ({threads} threads)")
                reply = child.request({"op": "load", "threads": threads}, args.timeout)
                if "error" in reply:
                    variants[name]["errors"].append(f"load with {threads} threads: {reply['error']}")
                    continue
                variants[name]["load_seconds"][str(threads)] = round(reply["seconds"], 3)
                live[name] = child
            if threads == args.threads[0]:
                save_outputs(live, scenarios, outputs_dir, variants, args)
            live.pop("reference", None)
            if "reference" in children:  # never timed: free its memory for the others
                children.pop("reference").close()
            timed = [n for n in live if VARIANT_BY_NAME[n].timed]
            samples = {(n, s.name): [] for n in timed for s in scenarios}
            turns = {(n, s.name): [] for n in timed for s in scenarios}  # each round's median, for paired ratios
            loads = {(n, s.name): [] for n in timed for s in scenarios}
            failed = set()  # (variant, scenario) whose measurement raised: not retried in later rounds
            for round_index in range(args.rounds):
                for scenario in scenarios:
                    shift = round_index % max(1, len(timed))
                    for name in timed[shift:] + timed[:shift]:  # rotate who goes first
                        if (name, scenario.name) in failed:
                            progress.advance(task)
                            continue
                        progress.update(task, description=f"{model['name']}: {scenario.name}, {threads} thr, "
                                                          f"round {round_index + 1}/{args.rounds}: {name}")
                        reply = measure_once(live[name], scenario.name, args,
                                             warmup_runs(round_index, samples[(name, scenario.name)], args))
                        progress.advance(task)
                        if "error" in reply:
                            variants[name]["errors"].append(f"{scenario.name}, {threads} threads: {reply['error']}")
                            failed.add((name, scenario.name))
                            continue
                        samples[(name, scenario.name)] += reply["times_ms"]
                        turns[(name, scenario.name)].append(statistics.median(reply["times_ms"]))
                        loads[(name, scenario.name)].append((reply["other_busy_cores"], reply["load_average"]))
            for (name, scenario_name), times in samples.items():
                if not times:
                    continue
                entry = summarize_times(times)
                entry["other_busy_cores"] = statistics.mean(o for o, _ in loads[(name, scenario_name)])
                entry["load_average"] = statistics.mean(a for _, a in loads[(name, scenario_name)])
                entry["samples_ms"] = [round(t, 4) for t in times]
                entry["round_medians_ms"] = [round(t, 4) for t in turns[(name, scenario_name)]]
                variants[name]["latency"].setdefault(str(threads), {})[scenario_name] = entry
    finally:
        for child in children.values():
            child.close()
    compare_outputs(variants, scenarios, outputs_dir)
    return variants


def save_outputs(live: dict[str, VariantChild], scenarios: list[Scenario], outputs_dir: Path, variants: dict,
                 args) -> None:
    for name, child in live.items():
        for scenario in scenarios:
            path = outputs_dir / f"{name}.{scenarios.index(scenario)}.npz"
            reply = child.request({"op": "outputs", "scenario": scenario.name, "path": str(path)}, args.timeout)
            if "error" in reply:
                variants[name]["errors"].append(f"outputs for {scenario.name}: {reply['error']}")


def compare_outputs(variants: dict, scenarios: list[Scenario], outputs_dir: Path) -> None:
    """Each variant's outputs against the reference's, per scenario (compare.py's measure)."""
    import numpy as np

    for index, scenario in enumerate(scenarios):
        reference_path = outputs_dir / f"reference.{index}.npz"
        if not reference_path.exists():
            continue
        with np.load(reference_path) as data:
            expected = {k: data[k] for k in data.files}
        for name, record in variants.items():
            path = outputs_dir / f"{name}.{index}.npz"
            if name == "reference" or not path.exists():
                continue
            with np.load(path) as data:
                got = {k: data[k] for k in data.files}
            result = compare.compare(expected, got)
            record["max_rel"][scenario.name] = result["max_rel"]
            if result.get("error"):
                record["errors"].append(f"outputs for {scenario.name}: {result['error']}")


def benchmark_model(model: dict, args, progress, task) -> dict:
    folder = WORK / "out" / model["name"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = args.corpus / model["path"]
    dims = symbolic_dims(src)
    scenarios = scenarios_for(dims)
    verify_inputs = folder / "verify_inputs.npz"
    write_feeds(model["inputs"], verify_inputs)
    feeds, shapes = {}, {}
    for index, scenario in enumerate(scenarios):
        feeds[scenario.name] = folder / f"scenario{index}.npz"
        shapes[scenario.name] = write_feeds(scenario_specs(model, dims, scenario), feeds[scenario.name])
    commit = onnxopt_commit(args.onnxopt)
    sources = prepare_sources(model, src, folder, args, verify_inputs, progress, task)
    variants = measure_model(model, sources, scenarios, feeds, folder, args, progress, task)
    record = {"model": model["name"], "command": args.shown, "transformer": asdict(TRANSFORMERS[base_name(model["name"])])
              if base_name(model["name"]) in TRANSFORMERS else None,
              "scenarios": [{"name": s.name, "input_shapes": shapes[s.name]} for s in scenarios],
              "threads": args.threads, "settings": measurement_settings(args), "onnxopt": commit,
              "sources": {k: {f: v for f, v in r.items() if f != "path"} for k, r in sources.items()},
              "variants": variants, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    shutil.rmtree(folder, ignore_errors=True)  # optimized models and outputs are large and reproducible
    return record


def measurement_settings(args) -> dict:
    return {"rounds": args.rounds, "seconds": args.seconds, "min_runs": args.min_runs, "warmup": args.warmup,
            "sequence": SEQUENCE, "past": PAST}


def steps_for(model: dict, args) -> int:
    """Progress steps for one model: one per optimizer run and one per timed request."""
    dims = symbolic_dims(args.corpus / model["path"])
    transformer = base_name(model["name"]) in TRANSFORMERS
    optimizers = 3 + transformer
    timed = len(TIMED) - (not transformer)
    return optimizers + len(args.threads) * args.rounds * len(scenarios_for(dims)) * timed


# ---------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------


def onnxopt_commit(cli: Path) -> dict:
    """The onnxopt the CLI imports: its folder, commit, and whether its code had uncommitted changes."""
    python = cli.parent / "python"
    # A wheel built from a folder (a `git archive` snapshot, see README) remembers it (PEP 610).
    script = ("import importlib.metadata as m, json, pathlib, onnxopt\n"
              "folder = pathlib.Path(onnxopt.__file__).resolve().parent.parent\n"
              "try:\n"
              "    url = json.loads(m.distribution('onnxopt').read_text('direct_url.json') or '{}').get('url', '')\n"
              "    folder = pathlib.Path(url[len('file://'):]) if url.startswith('file://') else folder\n"
              "except m.PackageNotFoundError:\n"
              "    pass\n"
              "print(folder)")
    found = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return {"cli": str(cli), "error": found.stderr.strip()[-300:]}
    folder = Path(found.stdout.strip())
    info = {"cli": str(cli), "source": str(folder)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, check=False)
    if commit.returncode == 0:
        info["commit"] = commit.stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "onnxopt", "passes"], cwd=folder,
                                            capture_output=True, text=True, check=False).stdout.strip())
    elif (folder / "COMMIT").exists():
        info["commit"], info["dirty"] = (folder / "COMMIT").read_text().strip(), False
    return info


def latency_of(record: dict, variant: str, threads: str, scenario: str, statistic: str) -> float | None:
    entry = record["variants"].get(variant, {}).get("latency", {}).get(threads, {}).get(scenario)
    return entry[statistic] if entry else None


def paired_ratio(record: dict, ours: str, theirs: str, threads: str, scenario: str) -> float | None:
    """The median over rounds of ours / theirs within the round: adjacent turns see about the same load."""
    ours_rounds = latency_of(record, ours, threads, scenario, "round_medians_ms")
    theirs_rounds = latency_of(record, theirs, threads, scenario, "round_medians_ms")
    if not ours_rounds or not theirs_rounds:
        return None
    return statistics.median(a / b for a, b in zip(ours_rounds, theirs_rounds))


def rounds_above(record: dict, ours: str, theirs: str, threads: str, scenario: str, limit: float
                 ) -> tuple[int, int] | None:
    """(rounds in which ours / theirs exceeded ``limit``, rounds compared)."""
    ours_rounds = latency_of(record, ours, threads, scenario, "round_medians_ms")
    theirs_rounds = latency_of(record, theirs, threads, scenario, "round_medians_ms")
    if not ours_rounds or not theirs_rounds:
        return None
    pairs = list(zip(ours_rounds, theirs_rounds))
    return sum(a / b > limit for a, b in pairs), len(pairs)


def sign_test_p(above: int, rounds: int) -> float:
    """P(at least ``above`` of ``rounds`` fair coin flips come up heads): the one-sided sign test."""
    return sum(math.comb(rounds, k) for k in range(above, rounds + 1)) / 2 ** rounds


def target_limit(title: str) -> float:
    return TARGET_TRANSFORMERS_RATIO if title == RATIOS[2][0] else TARGET_RATIO


def rows_of(records: list[dict]) -> list[dict]:
    """One row per (model, scenario, threads): the latencies; ratios of medians, of minimums, and paired."""
    rows = []
    for record in records:
        for scenario in record["scenarios"]:
            for threads in map(str, record["threads"]):
                row = {"model": record["model"], "scenario": scenario["name"], "threads": threads,
                       "transformer": record["transformer"] is not None}
                for suffix, statistic in (("", "median_ms"), ("_min", "min_ms")):
                    ms = {v.name: latency_of(record, v.name, threads, scenario["name"], statistic) for v in TIMED}
                    row["ms" + suffix] = ms
                    row["ratios" + suffix] = {title: ms[ours] / ms[theirs] for title, ours, theirs in RATIOS
                                              if ms[ours] and ms[theirs]}
                paired = {title: paired_ratio(record, ours, theirs, threads, scenario["name"])
                          for title, ours, theirs in RATIOS}
                row["ratios_paired"] = {title: value for title, value in paired.items() if value is not None}
                above = {title: rounds_above(record, ours, theirs, threads, scenario["name"], target_limit(title))
                         for title, ours, theirs in RATIOS}
                row["rounds_above_target"] = {title: value for title, value in above.items() if value is not None}
                rows.append(row)
    return rows


def ratio_medians(rows: list[dict], key: str) -> dict:
    """Per thread count (and over all rows): the median of each ratio column and how many rows it has."""
    threads = sorted({row["threads"] for row in rows}, key=int)
    medians = {}
    for t in threads + ["all"]:
        medians[t] = {}
        for title, _, _ in RATIOS:
            values = [r[key][title] for r in rows if title in r[key] and (t == "all" or r["threads"] == t)]
            medians[t][title] = {"median": statistics.median(values) if values else None, "rows": len(values)}
    return medians


def summarize(records: list[dict]) -> dict:
    rows = rows_of(records)
    medians, min_medians = ratio_medians(rows, "ratios"), ratio_medians(rows, "ratios_min")
    paired_medians = ratio_medians(rows, "ratios_paired")
    targets = []
    for title, limit, scope in [(RATIOS[2][0], TARGET_TRANSFORMERS_RATIO, "transformer"),
                                (RATIOS[0][0], TARGET_RATIO, "every"), (RATIOS[1][0], TARGET_RATIO, "every")]:
        scoped = [r for r in rows if scope == "every" or r["transformer"]]
        values = [r["ratios"].get(title) for r in scoped]
        met = [v for v in values if v is not None and v <= limit]
        clearly_missed = [f"{r['model']} ({r['scenario']}, {r['threads']}t: {above}/{rounds} rounds)"
                          for r in scoped for above, rounds in [r["rounds_above_target"].get(title, (0, 0))]
                          if rounds and sign_test_p(above, rounds) <= SIGN_TEST_P]
        targets.append({"target": f"{title} <= {limit}" + (" (transformer models)" if scope != "every" else
                                                            " (every model)"),
                        "met_on": len(met), "rows": len(values), "met": bool(values) and len(met) == len(values),
                        "clearly_missed": clearly_missed})
    numeric = []
    for record in records:
        for name in ("ort-onnxopt", "ov-onnxopt"):
            for scenario, rel in record["variants"].get(name, {}).get("max_rel", {}).items():
                baseline = record["variants"].get(name.split("-")[0] + "-original", {}).get("max_rel", {}).get(scenario)
                numeric.append({"model": record["model"], "variant": name, "scenario": scenario, "max_rel": rel,
                                "original_same_engine": baseline})
    worse = [n for n in numeric if n["max_rel"] > max(NUMERIC_TOLERANCE, 10 * (n["original_same_engine"] or 0))]
    loads = [e["other_busy_cores"] for record in records for v in record["variants"].values()
             for per_threads in v["latency"].values() for e in per_threads.values()]
    failures = [{"model": record["model"], "variant": name, "error": error}
                for record in records for name, v in record["variants"].items() for error in v["errors"]]
    return {"rows": rows, "median_ratios": medians, "median_min_ratios": min_medians,
            "median_paired_ratios": paired_medians, "targets": targets, "numerics": numeric,
            "numerics_beyond_tolerance": worse, "failures": failures,
            "other_busy_cores": {"median": statistics.median(loads) if loads else None,
                                 "max": max(loads) if loads else None}}


def _fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _sci(value) -> str:
    return "–" if value is None else f"{value:.1e}"


def _ms(record: dict, variant: str, threads: str, scenario: str) -> str:
    entry = record["variants"].get(variant, {}).get("latency", {}).get(threads, {}).get(scenario)
    if entry:
        return f"{entry['median_ms']:.1f} / {entry['p90_ms']:.1f}"
    if variant not in record["variants"]:
        return ""
    return "FAIL" if record["variants"][variant]["errors"] else "–"


def _header(payload: dict) -> list[str]:
    env, settings, records = payload["environment"], payload["settings"], payload["records"]
    commits = sorted({r["onnxopt"].get("commit", "?") + (" (uncommitted changes)" if r["onnxopt"].get("dirty") else "")
                      for r in records})
    flags = sorted({r["sources"].get(f"onnxopt-{t}", {}).get("flags", "") for r in records for t in ("ort", "openvino")})
    busy = payload["summary"]["other_busy_cores"]
    per_round = settings["seconds"] / settings["rounds"]
    return [
        "# Inference latency: onnxopt's output next to the original and the peers", "",
        f"Generated {payload['generated']} by "
        + " and ".join(f"`python benchmarks/latency.py {c}`" for c in payload.get("measured_by", [payload["args"]]))
        + (" (tables rewritten with `--report-only`)" if payload.get("report_only") else "")
        + f" on {env['cpu']} ({env['cores']} cores, {env['memory_gib']:.0f} GiB), Python {env['python']}.", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".", "",
        f"onnxopt: the CLI `{payload['onnxopt_cli']}` at commit {', '.join(commits)}; flags used: "
        + ", ".join(f"`{f}`" for f in flags if f) + ".", "",
        ("Method: batch 1; onnxruntime CPU (ORT_ENABLE_ALL, sequential executor, the given intra-op threads) and "
        "OpenVINO CPU (latency hint, one stream, f32 precision, the given threads). Each variant runs in its own "
        f"process; per thread count and input scenario the variants take turns in {settings['rounds']} rounds "
        f"(rotating order), each turn {settings['warmup']} warmup runs in the first round (1 or none later), then "
        f"timed runs for {per_round:.2f} s and at least {-(-settings['min_runs'] // settings['rounds'])}. Times are "
        "over all rounds, in ms. Inputs are random (seed 0) and identical for every variant; text models with "
        f"dynamic axes run at sequence {settings['sequence']}, the GPT-2 cache model also decodes 1 token after "
        f"{settings['past']} cached positions; static exports keep their exported shapes (sequence 16, past 4)."), "",
        (f"**Load**: while measuring, the rest of the machine kept a median of {_fmt(busy['median'])} cores busy "
        f"(max {_fmt(busy['max'])}) of {env['cores']}. Latencies are comparable only within one run, and with 2 "
        "threads on a shared 2-core machine they mostly measure the contention. Ratios *within rounds* compare "
        "turns taken one after the other, so load that changes over the run cancels out of them."), ""]


def _targets(summary: dict) -> list[str]:
    lines = ["## Targets (ratios of medians)", "",
             "*Clearly missed*: the rounds whose paired ratio misses the target are too many for chance (one-sided "
             f"sign test, p <= {SIGN_TEST_P:g}); the other misses are within what the rounds vary by.", "",
             "| target | met on | met | clearly missed on |", "|---|---|---|---|"]
    for target in summary["targets"]:
        missed = target.get("clearly_missed")
        shown = "–" if missed is None else (f"{len(missed)}/{target['rows']} rows" + (": " + ", ".join(missed)
                                                                                       if missed else ""))
        lines.append(f"| {target['target']} | {target['met_on']}/{target['rows']} rows | "
                     f"{'yes' if target['met'] else 'no'} | {shown} |")
    return lines + [""]


def _ratio_table(title: str, rows: list[dict], key: str, medians: dict) -> list[str]:
    lines = [title, "", "| model | scenario | threads | " + " | ".join(t for t, _, _ in RATIOS) + " |",
             "|---|---|---|" + "---|" * len(RATIOS)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['scenario']} | {row['threads']} | "
                     + " | ".join(_fmt(row[key].get(t)) for t, _, _ in RATIOS) + " |")
    for threads, columns in medians.items():
        name = "all" if threads == "all" else f"{threads} thread{'s' if threads != '1' else ''}"
        lines.append(f"| **median, {name}** | | | " + " | ".join(
            f"**{_fmt(columns[t]['median'])}** ({columns[t]['rows']})" for t, _, _ in RATIOS) + " |")
    return lines + [""]


def _latency_table(records: list[dict]) -> list[str]:
    lines = ["## Latency, ms (median / p90)", "",
             "| model | scenario | threads | " + " | ".join(v.label for v in TIMED) + " |",
             "|---|---|---|" + "---|" * len(TIMED)]
    for record in records:
        for scenario in record["scenarios"]:
            for threads in map(str, record["threads"]):
                lines.append(f"| {record['model']} | {scenario['name']} | {threads} | "
                             + " | ".join(_ms(record, v.name, threads, scenario["name"]) for v in TIMED) + " |")
    return lines + [""]


def _numerics_table(records: list[dict]) -> list[str]:
    lines = ["## Outputs", "",
             ("Max relative difference from the original run with ORT's optimizations disabled. The variants run with "
             "the engine's own optimizations on, so the `original` columns show what the engine alone changes. The "
             "light models' weights are constant fills, which makes their activations degenerate (huge, or equal "
             "across classes); differences there say little."), "",
             "| model | scenario | " + " | ".join(v.label for v in TIMED) + " |", "|---|---|" + "---|" * len(TIMED)]
    for record in records:
        for scenario in record["scenarios"]:
            cells = []
            for variant in TIMED:
                entry = record["variants"].get(variant.name)
                cells.append("" if entry is None else _sci(entry["max_rel"].get(scenario["name"])))
            lines.append(f"| {record['model']} | {scenario['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


GRAPH_SOURCES = ["original", "onnxslim", "ort-transformers", "onnxopt-ort", "onnxopt-openvino"]


def _graph_table(records: list[dict]) -> list[str]:
    lines = ["## Graphs", "", "Node count of each file (subgraphs included) and the contrib operators it uses.", "",
             "| model | " + " | ".join(GRAPH_SOURCES) + " |", "|---|" + "---|" * len(GRAPH_SOURCES)]
    for record in records:
        cells = []
        for source in GRAPH_SOURCES:
            graph = next((v["graph"] for v in record["variants"].values() if v["source"] == source and v.get("graph")),
                         None)
            if graph is None:
                cells.append("–" if source in record["sources"] else "")
                continue
            contrib = ", ".join(f"{op.split('.')[-1]} {n}" for op, n in sorted(graph["contrib_ops"].items()))
            cells.append(f"{graph['nodes']}" + (f" ({contrib})" if contrib else ""))
        lines.append(f"| {record['model']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _notes(summary: dict, records: list[dict]) -> list[str]:
    notes = [f"- {f['model']} / {f['variant']}: `{f['error'][:400]}`" for f in summary["failures"]]
    for record in records:
        for source, info in record["sources"].items():
            notes += [f"- {record['model']} / {source}: {note}" for note in info.get("notes", [])]
            verification = info.get("verification")
            if verification and verification != "passed":
                notes.append(f"- {record['model']} / {source}: onnxopt's verification: {str(verification)[:300]}")
            lost = (info.get("census") or {}).get("regressions")
            if lost:
                notes.append(f"- {record['model']} / {source}: onnxopt's fusion census: the engine fuses fewer "
                             f"{', '.join(lost)} after onnxopt")
    notes += [f"- {n['model']} / {n['variant']} ({n['scenario']}): outputs differ by {n['max_rel']:.1e} relative "
              f"(the original in the same engine: {_sci(n['original_same_engine'])})"
              for n in summary["numerics_beyond_tolerance"]]
    return ["## Failures and notes", ""] + (notes or ["None."])


def write_markdown(path: Path, payload: dict) -> None:
    summary, records = payload["summary"], payload["records"]
    lines = _header(payload) + _targets(summary)
    lines += _ratio_table("## Ratios of median latency (< 1: onnxopt's output is faster)", summary["rows"], "ratios",
                          summary["median_ratios"])
    lines += _ratio_table("## Ratios within each round (median over rounds; least sensitive to changing load)",
                          summary["rows"], "ratios_paired", summary["median_paired_ratios"])
    lines += _ratio_table("## Ratios of the fastest run", summary["rows"], "ratios_min", summary["median_min_ratios"])
    lines += _latency_table(records) + _numerics_table(records) + _graph_table(records) + _notes(summary, records)
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, summary: dict) -> None:
    """Heat maps of the ratios: of medians on top, within rounds below; a column of panels per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = summary["rows"]
    if not rows:
        return
    threads = sorted({r["threads"] for r in rows}, key=int)
    titles = [t for t, _, _ in RATIOS]
    labels = list(dict.fromkeys((r["model"], r["scenario"]) for r in rows))
    statistics_shown = [("ratios", "median latency"), ("ratios_paired", "within rounds")]
    fig, axes = plt.subplots(len(statistics_shown), len(threads), squeeze=False, sharey=True,
                             figsize=(3 + 3.6 * len(threads), 2 * (1.6 + 0.3 * len(labels))))
    ticks = [0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0]
    for row_axes, (key, statistic) in zip(axes, statistics_shown):
        for ax, t in zip(row_axes, threads):
            grid = np.full((len(labels), len(titles)), np.nan)
            for r in rows:
                if r["threads"] == t:
                    for j, title in enumerate(titles):
                        grid[labels.index((r["model"], r["scenario"])), j] = r[key].get(title, np.nan)
            image = ax.imshow(np.where(np.isfinite(grid), grid, 1.0), cmap="RdYlGn_r",
                              norm=LogNorm(vmin=0.5, vmax=2.0), aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                ax.text(j, i, f"{value:.2f}" if np.isfinite(value) else "–", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(titles)), [t.split(" / ")[1].replace(" ", "\n", 1) for t in titles], fontsize=7)
            ax.set_yticks(range(len(labels)), [f"{m} · {s}" for m, s in labels], fontsize=7)
            ax.set_title(f"{statistic}, {t} thread{'s' if t != '1' else ''}: onnxopt / ...", fontsize=9)
            bar = fig.colorbar(image, ax=ax, fraction=0.04)
            bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
            bar.ax.yaxis.set_minor_locator(NullLocator())
            bar.ax.set_yticklabels([f"{v:g}" for v in ticks], fontsize=7)
    fig.suptitle("latency of onnxopt's output / latency of the other variant (< 1, green: onnxopt faster)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the panels' own
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="median latency ratios (< 1: onnxopt faster)")
    for column in ["model", "scenario", "thr"] + [t for t, _, _ in RATIOS]:
        table.add_column(column, justify="left" if column in ("model", "scenario") else "right")
    for row in summary["rows"]:
        table.add_row(row["model"], row["scenario"], row["threads"], *(_fmt(row["ratios"].get(t)) for t, _, _ in RATIOS))
    for threads, medians in summary["median_ratios"].items():
        table.add_row(f"median ({threads})", "", "", *(_fmt(medians[t]["median"]) for t, _, _ in RATIOS))
    for threads, medians in summary["median_paired_ratios"].items():
        table.add_row(f"within rounds ({threads})", "", "", *(_fmt(medians[t]["median"]) for t, _, _ in RATIOS))
    console.print(table)
    for failure in summary["failures"]:
        console.print(f"[red]{failure['model']} / {failure['variant']}[/]: {failure['error'][:300]}")


def environment() -> dict:
    import run as node_benchmark

    env = node_benchmark.environment()
    for name in ("openvino", "onnxruntime", "psutil"):
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = "not installed"
    for key in ("onnxopt_source", "onnxopt_commit", "onnxopt_dirty"):
        env.pop(key, None)  # that is the benchmark venv's onnxopt; the CLI's is recorded per model
    env["packages"].pop("onnxopt", None)
    return env


def write_results(records: list[dict], args, shown_args: str) -> dict:
    args.results.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    # The runs that measured, which a --report-only rewrite names rather than itself.
    commands = sorted({r.get("command", "?") for r in records}) if args.report_only else [shown_args]
    payload = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": shown_args,
               "measured_by": commands, "report_only": args.report_only,
               "environment": environment(), "onnxopt_cli": str(args.onnxopt),
               "settings": records[0].get("settings", measurement_settings(args)),
               "summary": summary, "records": records}
    (args.results / "latency.json").write_text(json.dumps(payload, indent=1, default=float))
    write_markdown(args.results / "latency.md", payload)
    write_plot(args.results / "latency.png", summary)
    return payload


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"only the quick subset ({', '.join(QUICK)}), "
                                                             "with shorter measurements")
    parser.add_argument("--models", action="append", metavar="GLOB", help="only these models (repeatable)")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="turns each variant gets per thread count and scenario (default 10)")
    parser.add_argument("--seconds", type=float, help="timed seconds per variant, thread count and scenario, "
                                                      "over all rounds (default 3; 1.5 with --quick)")
    parser.add_argument("--min-runs", type=int, help="timed runs at least, over all rounds (default 10; 6 with --quick)")
    parser.add_argument("--max-runs", type=int, default=2000, help="timed runs at most per round")
    parser.add_argument("--warmup", type=int, default=2,
                        help=f"untimed runs before the first round (later rounds: 1, or 0 for runs over {SLOW_RUN_MS} ms)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per optimizer run or child request")
    parser.add_argument("--onnxopt", type=Path, default=DEFAULT_ONNXOPT if DEFAULT_ONNXOPT.exists()
                        else Path(shutil.which("onnxopt") or "onnxopt"), help="the onnxopt CLI (default: the "
                        "checkout's .venv/bin/onnxopt, which runs the working tree's code)")
    parser.add_argument("--passes-ort", metavar="LIST", help="run onnxopt for onnxruntime with this pipeline "
                        "(`--passes LIST --target ort`) instead of -O3, e.g. while -O3 lacks the target's passes")
    parser.add_argument("--passes-openvino", metavar="LIST", help="the same for OpenVINO")
    parser.add_argument("--resume", action="store_true", help="keep the stored records of models measured before")
    parser.add_argument("--report-only", action="store_true", help="only rewrite results from the stored records")
    parser.add_argument("--corpus", type=Path, default=corpus.CORPUS_DIR, help="corpus folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    args.seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 3.0)
    args.min_runs = args.min_runs if args.min_runs is not None else (6 if args.quick else 10)
    args.corpus, args.results = args.corpus.resolve(), args.results.resolve()
    return args


def main(argv=None) -> int:
    import run as node_benchmark
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    console = node_benchmark.console
    patterns = args.models or (QUICK if args.quick else None)
    shown_args = " ".join(argv if argv is not None else sys.argv[1:])
    args.shown = shown_args
    RECORDS.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        names = {m["name"] for m in node_benchmark.select(corpus.load_manifest(args.corpus), patterns)}
        records = [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]
        records = [r for r in records if r["model"] in names]
    else:
        manifest = node_benchmark.select(node_benchmark.ensure_corpus(args.corpus, patterns), patterns)
        records, todo = [], []
        for model in manifest:
            stored = RECORDS / f"{model['name']}.json"
            if args.resume and stored.exists():
                records.append(json.loads(stored.read_text()))
            else:
                todo.append(model)
        console.print(f"{len(manifest)} models, {len(todo)} to measure; threads {args.threads}; onnxopt CLI "
                      f"{args.onnxopt}")
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("starting", total=sum(steps_for(m, args) for m in todo))
            for model in todo:
                record = benchmark_model(model, args, progress, task)
                (RECORDS / f"{model['name']}.json").write_text(json.dumps(record, indent=1, default=float))
                records.append(record)
                ratios = [r for r in rows_of([record])]
                progress.console.print(f"{model['name']}: " + "; ".join(
                    f"{r['scenario']} x{r['threads']}: " + ", ".join(
                        f"{t.split(' / ')[1]} {v:.2f}" for t, v in r["ratios"].items()) for r in ratios))
        order = {m["name"]: i for i, m in enumerate(manifest)}
        records.sort(key=lambda r: order.get(r["model"], len(order)))
    if not records:
        console.print("no records to report")
        return 1
    payload = write_results(records, args, shown_args)
    print_summary(payload["summary"], console)
    console.print(f"wrote {args.results / 'latency.md'}, latency.json, latency.png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        sys.exit(CHILDREN[sys.argv[1]](*sys.argv[2:]))
    sys.exit(main())
