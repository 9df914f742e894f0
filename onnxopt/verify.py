"""Numeric verification: run the original and the optimized model in onnxruntime and compare.

Both models run with onnxruntime's graph optimizations disabled, so that the comparison judges our
passes and not onnxruntime's. Inputs are generated from the model's declared inputs:

* floating-point inputs: uniform in [-1, 1);
* integer inputs that are used as indices (Gather, GatherElements, GatherND, ScatterElements, OneHot,
  through Cast/Reshape/Squeeze/Unsqueeze/Identity): uniform in [0, n) where n is the size of the indexed
  dimension; other integer inputs: uniform in [0, 4); booleans: random;
* dynamic dimensions: ``DEFAULT_DYNAMIC_DIM`` (2); if the original model cannot run with that, 1; if
  not with that either, each named dimension in turn takes the sizes in ``SEARCHED_SIZES`` while the
  others stay 2 (a decoder's mask spans past + new tokens: ``total_sequence`` must be 4 when both are 2),
  then the sizes in ``LONG_SIZES`` (audio: wav2vec2's convolutions need 400 samples), and last every
  dynamic dimension together takes the sizes in ``JOINT_SIZES`` (an image of dynamic height and width
  through a stack of strided convolutions).
  ``--input-shape name:1x3x224x224`` fixes an input's shape and ``--inputs FILE.npz`` gives real inputs.

Tolerance is by dtype: an element passes when ``|got - want| <= atol * scale + rtol * |want|``, where
``scale`` is the root-mean-square of the expected output (at least 1), so that accumulated rounding in
large outputs is judged relative to their magnitude. Integer, boolean and string outputs must be equal.
NaNs must appear in the same places.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt import ir
from onnxopt.errors import InputSpecError

DEFAULT_DYNAMIC_DIM = 2
SEARCHED_SIZES = (1, 3, 4, 5, 6, 8)
LONG_SIZES = (16, 64, 256, 1024, 4096, 16384)
JOINT_SIZES = (16, 32, 64, 128)  # every dimension at once: 256 would give a text model 65k tokens
MAX_SEARCHED_SYMBOLS = 8
DEFAULT_SEED = 0

TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}
FLOAT8_TOLERANCE = (1.3e-1, 6e-2)

_INDEX_OPERANDS = {"Gather": (1, 0), "GatherElements": (1, 0), "GatherND": (1, None), "ScatterElements": (1, 0),
                   "OneHot": (0, None)}
_TRANSPARENT = {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Expand"}

RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclass
class OutputComparison:
    name: str
    dtype: str
    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    problem: str = ""


@dataclass
class Comparison:
    """The result of running two models on the same inputs."""

    ok: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    skipped: str = ""
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.skipped:
            return f"verification skipped: {self.skipped}"
        bad = [o for o in self.outputs if not o.ok]
        if not bad:
            worst = max((o.max_abs_diff for o in self.outputs), default=0.0)
            return f"verified: {len(self.outputs)} outputs match (largest abs diff {worst:.3g})"
        parts = [f"'{o.name}' {o.problem or f'max abs {o.max_abs_diff:.3g}, max rel {o.max_rel_diff:.3g}'}"
                 for o in bad]
        return "outputs differ: " + "; ".join(parts)


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """Parses ``name:1x3x224x224`` (several may be given; a name may contain ':')."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputSpecError(f"--input-shape '{spec}' must read NAME:DIMS, e.g. input:1x3x224x224")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")] if dims.strip() else []
        except ValueError:
            raise InputSpecError(f"--input-shape '{spec}': dimensions must be integers separated by 'x'") from None
        if any(d < 0 for d in shapes[name]):
            raise InputSpecError(f"--input-shape '{spec}': dimensions must not be negative")
    return shapes


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise InputSpecError(f"cannot read inputs from {path}: {error}") from None


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs used as indices, the size of the dimension they index."""
    graph = ir.import_model(model)
    ir.infer_shapes(graph)
    inputs = {t.name: t for t in graph.inputs}
    bounds: dict[str, int] = {}

    def sources(tensor: gs.Tensor, depth: int = 0):
        if tensor.name in inputs:
            yield tensor.name
        elif depth < 8 and len(tensor.inputs) == 1 and tensor.inputs[0].op in _TRANSPARENT:
            yield from sources(tensor.inputs[0].inputs[0], depth + 1)

    for node in ir.all_nodes(graph):
        if node.op not in _INDEX_OPERANDS or len(node.inputs) <= _INDEX_OPERANDS[node.op][0]:
            continue
        index_slot, data_slot = _INDEX_OPERANDS[node.op]
        if node.op == "OneHot":
            depth_value = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
            size = int(np.asarray(depth_value).reshape(-1)[0]) if depth_value is not None else None
        else:
            data = node.inputs[0]
            shape = data.shape
            axis = node.attrs.get("axis", 0) if data_slot is not None else 0
            size = None
            if shape is not None and len(shape) > 0:
                dim = shape[axis if axis >= 0 else axis + len(shape)] if -len(shape) <= axis < len(shape) else None
                size = dim if isinstance(dim, int) and dim > 0 else None
        if size is None:
            continue
        for name in sources(node.inputs[index_slot]):
            bounds[name] = min(bounds.get(name, size), size)
    return bounds


def _elem_dtype(elem_type: int):
    if elem_type == onnx.TensorProto.STRING:
        return np.dtype(object)
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def make_inputs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    dynamic_dim: int = DEFAULT_DYNAMIC_DIM,
    seed: int = DEFAULT_SEED,
    symbol_sizes: dict[str, int] | None = None,
    index_bounds: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, following the rules in this module's docstring.

    ``symbol_sizes`` sizes named dynamic dimensions (others get ``dynamic_dim``); ``index_bounds`` is
    ``_index_bounds(model)`` when the caller already has it.
    """
    symbol_sizes = symbol_sizes or {}
    input_shapes = input_shapes or {}
    declared = _real_inputs(model)
    unknown = set(input_shapes) - {vi.name for vi in declared}
    if unknown:
        names = ", ".join(vi.name for vi in declared)
        raise InputSpecError(f"--input-shape names unknown input(s) {sorted(unknown)}; the model's inputs are: {names}")
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model) if index_bounds is None else index_bounds
    feeds: dict[str, np.ndarray] = {}
    for vi in declared:
        if not vi.type.HasField("tensor_type"):
            raise InputSpecError(f"input '{vi.name}' is not a tensor; give inputs with --inputs")
        tensor_type = vi.type.tensor_type
        if vi.name in input_shapes:
            shape = list(input_shapes[vi.name])
            if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(shape):
                raise InputSpecError(
                    f"--input-shape for '{vi.name}' has rank {len(shape)}, the model declares rank "
                    f"{len(tensor_type.shape.dim)}"
                )
        else:
            shape = [d.dim_value if d.HasField("dim_value") else symbol_sizes.get(d.dim_param, dynamic_dim)
                     for d in tensor_type.shape.dim]
        dtype = _elem_dtype(tensor_type.elem_type)
        if dtype == np.dtype(object):
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(str).astype(object)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(size=shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            high = bounds.get(vi.name, 4)
            feeds[vi.name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        else:
            feeds[vi.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    return feeds


def plain_session_options() -> ort.SessionOptions:
    """Options for a session that judges a model as written: graph optimizations off, errors only through
    exceptions, and worker threads that sleep between parallel sections.

    Spinning workers would take the cores from the work beside them: the original runs in a background
    thread while the passes run (measured on 2 busy cores, Whisper's encoder and ResNet-50 verified 15-19%
    faster in wall time, 18-21% less CPU time, without spinning).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Fatal only: a kernel failure is reported through the exception we turn into a message; onnxruntime's
    # own error log would add lines to stderr, which the CLI keeps to one line per error.
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session(model: onnx.ModelProto, workdir: str | None = None, weights: dict[str, onnx.TensorProto] | None = None,
            path: str | os.PathLike | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimizations disabled; large models go through a file.

    ``weights`` fills the stubs ``ir.export_model`` left in ``model``. ``path`` names a file holding
    exactly ``model``, which onnxruntime then reads itself instead of getting the model serialized.
    """
    options = plain_session_options()
    if path is not None:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if ir.model_weight_bytes(model) + ir.stubbed_bytes(weights or {}) < ir.PROTOBUF_LIMIT_BYTES // 2:
        return ort.InferenceSession(ir.model_bytes(model, weights), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        model_path = Path(folder) / "model.onnx"
        ir.save_model(model, model_path, external_data=True, weights=weights)
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
              weights: dict[str, onnx.TensorProto] | None = None,
              path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    sess = session(model, weights=weights, path=path)
    names = [o.name for o in sess.get_outputs()]
    return _owned(names, sess.run(names, feeds))


def tolerance_for(dtype: np.dtype) -> tuple[float, float] | None:
    """(rtol, atol) for a floating dtype, ``None`` for types that must match exactly."""
    name = np.dtype(dtype).name
    if name in TOLERANCES:
        return TOLERANCES[name]
    if name.startswith("float8"):
        return FLOAT8_TOLERANCE
    return None


def compare_outputs(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[OutputComparison]:
    results = []
    for name, want in expected.items():
        want = np.asarray(want)
        have = np.asarray(got.get(name)) if name in got else None
        dtype = want.dtype.name
        if have is None:
            results.append(OutputComparison(name, dtype, False, np.inf, np.inf, 0, 0, "is missing"))
            continue
        if have.dtype != want.dtype or have.shape != want.shape:
            results.append(OutputComparison(
                name, dtype, False, np.inf, np.inf, 0, 0,
                f"has dtype/shape {have.dtype}{list(have.shape)} instead of {want.dtype}{list(want.shape)}"))
            continue
        tolerance = tolerance_for(want.dtype)
        if tolerance is None:
            equal = np.array_equal(want, have)
            diff = 0.0 if equal else (float(np.max(np.abs(want.astype(np.float64) - have.astype(np.float64))))
                                       if want.dtype != object and want.size else np.inf)
            results.append(OutputComparison(name, dtype, equal, diff, diff, 0, 0, "" if equal else "is not equal"))
            continue
        rtol, atol = tolerance
        want64, have64 = want.astype(np.float64), have.astype(np.float64)
        nan_want, nan_have = np.isnan(want64), np.isnan(have64)
        finite = np.isfinite(want64) & np.isfinite(have64)
        same_special = np.array_equal(nan_want, nan_have) and np.array_equal(want64[~finite & ~nan_want],
                                                                            have64[~finite & ~nan_have])
        diff = np.abs(want64[finite] - have64[finite])
        scale = max(1.0, float(np.sqrt(np.mean(np.square(want64[finite]))))) if diff.size else 1.0
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(want64[finite]), 1e-30)).max()) if diff.size else 0.0
        ok = same_special and bool(np.all(diff <= atol * scale + rtol * np.abs(want64[finite])))
        problem = "" if ok else ("has NaN/Inf in other places" if not same_special else "")
        results.append(OutputComparison(name, dtype, ok, max_abs, max_rel, rtol, atol * scale, problem))
    return results


def verify_models(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    expected: dict[str, np.ndarray] | None = None,
    weights: dict[str, onnx.TensorProto] | None = None,
    path: str | os.PathLike | None = None,
) -> Comparison:
    """Runs both models on the same inputs and compares every output.

    ``expected`` lets callers that verify many times reuse the original's outputs; pass ``inputs`` too.
    ``weights`` fills the stubs ``ir.export_model`` left in ``optimized``; ``path`` names a file that
    holds exactly ``optimized``, which onnxruntime then reads instead of a serialized copy.
    """
    random_ops = sorted({n.op_type for n in _all_proto_nodes(original.graph) if n.op_type in RANDOM_OPS})
    if random_ops:
        return Comparison(ok=True, skipped=f"the model draws random numbers ({', '.join(random_ops)})")
    if isinstance(expected, str):
        return Comparison(ok=True, skipped=expected)
    if inputs is None:
        inputs, expected = reference_run(original, input_shapes)
    elif expected is None:
        expected = run_model(original, inputs)
    if isinstance(expected, str):
        return Comparison(ok=True, skipped=expected)
    try:
        got = run_model(optimized, inputs, weights, path)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises many types; all mean the model is broken
        return Comparison(ok=False, outputs=[OutputComparison("*", "", False, np.inf, np.inf, 0, 0,
                                                              f"optimized model fails in onnxruntime: {error}")])
    outputs = compare_outputs(expected, got)
    shapes = {name: list(value.shape) for name, value in inputs.items()}
    return Comparison(ok=all(o.ok for o in outputs), outputs=outputs, input_shapes=shapes)


def reference_run(
    original: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
    path: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | str]:
    """Generates inputs the original model accepts and its outputs; a reason string if it cannot run.

    ``path`` names the file ``original`` was loaded from, if any (see ``session``).
    """
    try:
        sess = session(original, path=path)
    except Exception as error:  # noqa: BLE001
        return {}, f"onnxruntime cannot load the original model ({_short(error)})"
    names = [o.name for o in sess.get_outputs()]
    bounds = _index_bounds(original)
    first_error: Exception | None = None
    for dynamic_dim, sizes in _input_size_trials(original, input_shapes or {}):
        feeds = make_inputs(original, input_shapes, dynamic_dim=dynamic_dim, symbol_sizes=sizes, index_bounds=bounds)
        try:
            return feeds, _owned(names, sess.run(names, feeds))
        except Exception as error:  # noqa: BLE001
            first_error = first_error or error
    return {}, (f"the original model does not run on generated inputs ({_short(first_error)}); "
                "give --input-shape or --inputs")


def _owned(names: list[str], outputs: list) -> dict[str, object]:
    """The outputs by name, copied: onnxruntime's arrays hold its session's whole memory arena (all the
    activations of the run, 340 MiB for a Whisper encoder) until the last of them is gone."""
    return {name: np.array(output) if isinstance(output, np.ndarray) else output
            for name, output in zip(names, outputs)}


def _input_size_trials(model: onnx.ModelProto, input_shapes: dict[str, list[int]]):
    """(size of every dynamic dimension, sizes of named ones) to try in turn (see the module docstring)."""
    yield DEFAULT_DYNAMIC_DIM, {}
    yield 1, {}
    symbols = []
    for vi in _real_inputs(model):
        if vi.name in input_shapes or not vi.type.HasField("tensor_type"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param not in symbols:
                symbols.append(dim.dim_param)
    for sizes in (SEARCHED_SIZES, LONG_SIZES):
        for symbol in symbols[:MAX_SEARCHED_SYMBOLS]:
            for size in sizes:
                yield DEFAULT_DYNAMIC_DIM, {symbol: size}
    for size in JOINT_SIZES:
        yield size, {}


def _short(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _all_proto_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_proto_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_proto_nodes(sub)
