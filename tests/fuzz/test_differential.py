"""Differential fuzzing: every built-in pass and every preset keeps random valid models equivalent.

For each generated model (see ``graphs.py``), each pass alone and each preset must run without error,
give a model that passes ``onnx.checker`` (full check), and compute in onnxruntime (graph optimizations
disabled) the same outputs as the original on the same inputs, within a tolerance by dtype. And every
shape ``onnxopt.shapes.infer_shapes`` gives a value of the model must be the shape onnxruntime computes
(``check_shape_inference``): passes act on those shapes, so a wrong one is a bug before any pass trips on it.

CI runs a fixed, derandomized set of examples. For long runs::

    ONNXOPT_FUZZ_EXAMPLES=3000 ONNXOPT_FUZZ_SEED=1 ONNXOPT_FUZZ_SAVE=/tmp/fuzz \
        nohup .venv/bin/python -m pytest -q tests/fuzz/test_differential.py -k "differential and not tolerance" &

``ONNXOPT_FUZZ_SEED`` switches derandomization off and seeds the run, so that runs with different seeds
try different graphs. Each (pipeline, kind of failure) raises its own exception class, so hypothesis
shrinks and reports every distinct bug of a run rather than only the first. ``ONNXOPT_FUZZ_SAVE``
writes every failing model with its inputs and the failure (and a ``progress`` file); ``minimize.py``
shrinks such a model further, on the graph itself.

A failure that matches a bug already recorded in ``test_regressions.py`` (``KNOWN_BUGS`` below) does
not fail this test: its regression test tracks it, and this one keeps looking for new ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import FuzzCase, onnx_cases
from hypothesis import HealthCheck, assume, given, seed, settings

import onnxopt
from onnxopt import ir, shapes
from onnxopt.passes import BUILTIN_PASSES, PRESETS

EXAMPLES = int(os.environ.get("ONNXOPT_FUZZ_EXAMPLES", "60"))
SEED = os.environ.get("ONNXOPT_FUZZ_SEED")
SAVE_DIR = os.environ.get("ONNXOPT_FUZZ_SAVE")  # failing models (and their inputs) are written here


def pipelines() -> dict[str, str]:
    """Label -> pipeline spec: each built-in pass alone, then each non-empty preset (duplicates once)."""
    result = {p.name: p.name for p in BUILTIN_PASSES}
    seen: dict[tuple[str, ...], str] = {}
    for name, passes in PRESETS.items():
        if not passes:
            continue
        key = tuple(passes)
        if key in seen:
            label = seen.pop(key)
            del result[label]
            name = f"{label}/{name}"
        seen[key] = name
        result[name] = ",".join(passes)
    return result


PIPELINES = pipelines()


# ---------------------------------------------------------------------------------------------------------
# Running and comparing


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_all(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = session(model)
    return [sess.run(None, f) for f in feeds]


TOLERANCE = {np.dtype(np.float64): (1e-4, 1e-5), np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float16): (1e-2, 1e-2)}


def difference(name: str, want: np.ndarray, got: np.ndarray) -> str | None:
    """Why ``got`` is not ``want`` within tolerance; None when it is."""
    if want.dtype != got.dtype or want.shape != got.shape:
        return f"output {name}: expected {want.dtype}{list(want.shape)}, got {got.dtype}{list(got.shape)}"
    if want.dtype not in TOLERANCE:
        if np.array_equal(want, got):
            return None
        bad = np.argwhere(want != got)
        first = tuple(bad[0])
        return f"output {name}: {len(bad)} elements differ, first at {list(first)}: {want[first]} vs {got[first]}"
    rtol, atol = TOLERANCE[want.dtype]
    w, g = want.astype(np.float64).reshape(-1), got.astype(np.float64).reshape(-1)
    if not np.array_equal(np.isnan(w), np.isnan(g)):
        return f"output {name}: NaN in different places"
    infinite = np.isinf(w) | np.isinf(g)
    if not np.array_equal(w[infinite], g[infinite]):
        return f"output {name}: infinities differ"
    finite = np.isfinite(w) & np.isfinite(g)
    scale = max(1.0, float(np.max(np.abs(w[finite]), initial=0.0)))
    with np.errstate(invalid="ignore"):  # inf - inf where both are infinite: judged above
        excess = np.abs(g - w) - (atol * scale + rtol * np.abs(w))
    excess[~finite] = 0
    if np.all(excess <= 0):
        return None
    worst = int(np.argmax(excess))
    return (
        f"output {name}: max |diff| {np.max(np.abs(g - w)[finite]):.3g} (scale {scale:.3g}); "
        f"at flat index {worst}: expected {w[worst]!r}, got {g[worst]!r}"
    )


# ---------------------------------------------------------------------------------------------------------
# Failures


@dataclass
class Failure:
    pipeline: str
    kind: str  # "crash", "invalid", "rejected" (onnxruntime refuses the result), "mismatch" or "unsound" (a shape)
    detail: str
    error: BaseException | None = None


@dataclass
class KnownBug:
    """A bug with a regression test (xfail) in ``test_regressions.py``; ``matches`` recognizes it."""

    test: str
    matches: Callable[[FuzzCase, Failure], bool]


KNOWN_BUGS: list[KnownBug] = []

_failure_types: dict[tuple[str, str], type] = {}


def failure_type(pipeline: str, kind: str) -> type:
    """One exception class per (pipeline, kind): hypothesis tells distinct bugs apart by class."""
    key = (pipeline, kind)
    if key not in _failure_types:
        label = "".join(c if c.isalnum() else "_" for c in f"{kind}_in_{pipeline}")
        _failure_types[key] = type(label, (AssertionError,), {})
    return _failure_types[key]


def check_pipeline(case: FuzzCase, label: str, spec: str, expected: list[list[np.ndarray]]) -> Failure | None:
    try:
        optimized = onnxopt.optimize(case.model, passes=spec, verify=False)
    except Exception as error:  # noqa: BLE001 - every exception is a finding, UserError included
        return Failure(label, "crash", f"{type(error).__name__}: {error}", error)
    try:
        onnx.checker.check_model(optimized, full_check=True)
    except Exception as error:  # noqa: BLE001
        return Failure(label, "invalid", f"onnx.checker: {str(error).strip().splitlines()[0]}", error)
    want_names = [o.name for o in case.model.graph.output]
    got_names = [o.name for o in optimized.graph.output]
    if want_names != got_names:
        return Failure(label, "invalid", f"outputs {want_names} became {got_names}")
    try:
        results = run_all(optimized, case.feeds)
    except Exception as error:  # noqa: BLE001
        return Failure(label, "rejected", f"onnxruntime: {str(error).strip().splitlines()[0]}", error)
    for index, (want, got) in enumerate(zip(expected, results)):
        for name, w, g in zip(want_names, want, got):
            problem = difference(name, w, g)
            if problem:
                return Failure(label, "mismatch", f"inputs #{index}: {problem}")
    return None


SHAPE_INFERENCE = "infer_shapes"  # the label of the shape-inference check among the pipelines


def claimed_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """What ``infer_shapes`` says of the values the main graph's nodes compute (graph outputs aside: they keep
    their declared types), and of the graph inputs as declared; only values with a shape."""
    graph = ir.import_model(model)
    shapes.infer_shapes(graph)
    outputs = {t.name for t in graph.outputs}
    claimed = {t.name: t.shape for t in graph.inputs if t.shape is not None}
    for node in graph.nodes:
        claimed.update((t.name, t.shape) for t in node.outputs if t.shape is not None and t.name not in outputs)
    return claimed


def violated_claim(claimed: dict[str, list], computed: dict[str, np.ndarray]) -> str | None:
    """Where a shape claim is not what was computed: a rank, a static size, or a symbol with two sizes."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, shape in claimed.items():
        if not isinstance(computed.get(name), np.ndarray):
            continue
        actual = computed[name].shape
        if len(shape) != len(actual):
            return f"{name}: inferred {shape}, computed {list(actual)}"
        for claim, size in zip(shape, actual):
            if isinstance(claim, int) and claim != size:
                return f"{name}: inferred {shape}, computed {list(actual)}"
            if isinstance(claim, str):
                seen, where = sizes.setdefault(claim, (size, name))
                if seen != size:
                    return f"symbol {claim} is {seen} in {where} but {size} in {name} (inferred {shape})"
    return None


def check_shape_inference(case: FuzzCase) -> Failure | None:
    """Every shape ``infer_shapes`` claims holds for what onnxruntime computes on the case's inputs.

    Passes act on these claims (``fold`` folds ``Shape`` of a static dimension): a wrong one is a
    miscompile waiting for a graph that exploits it, so it is a finding by itself.
    """
    try:
        claimed = claimed_shapes(case.model)
    except Exception as error:  # noqa: BLE001 - every exception is a finding
        return Failure(SHAPE_INFERENCE, "crash", f"{type(error).__name__}: {error}", error)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(case.model)
    declared = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in claimed if name not in declared)
    names = [o.name for o in exposed.graph.output]
    try:
        results = run_all(exposed, case.feeds)
    except Exception:  # noqa: BLE001 - a model onnxruntime will not run with more outputs cannot be checked
        return None
    for index, (feeds, values) in enumerate(zip(case.feeds, results)):
        problem = violated_claim(claimed, {**feeds, **dict(zip(names, values))})
        if problem:
            return Failure(SHAPE_INFERENCE, "unsound", f"inputs #{index}: {problem}")
    return None


def known_bug(case: FuzzCase, failure: Failure) -> KnownBug | None:
    return next((bug for bug in KNOWN_BUGS if bug.matches(case, failure)), None)


def check_case(case: FuzzCase) -> list[Failure]:
    """Failures of every pipeline on ``case`` that no known bug explains."""
    onnx.checker.check_model(case.model, full_check=True)  # a failure here is a bug of the generator
    try:
        expected = run_all(case.model, case.feeds)
    except Exception:  # noqa: BLE001 - graphs onnxruntime rejects are not interesting
        assume(False)
    found = [check_shape_inference(case)]
    found += [check_pipeline(case, label, spec, expected) for label, spec in PIPELINES.items()]
    return [failure for failure in found if failure is not None and known_bug(case, failure) is None]


def save_failure(case: FuzzCase, failure: Failure) -> None:
    """Writes the model, its inputs and what went wrong under ``SAVE_DIR``, named by failure and content."""
    import hashlib
    from pathlib import Path

    folder = Path(SAVE_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    data = case.model.SerializeToString()
    stem = folder / f"{failure.kind}-{failure.pipeline.replace('/', '_')}-{hashlib.sha1(data).hexdigest()[:10]}"
    stem.with_suffix(".onnx").write_bytes(data)
    np.savez(stem.with_suffix(".npz"), **case.feeds[0])
    stem.with_suffix(".txt").write_text(f"{failure.pipeline}: {failure.kind}: {failure.detail}\n\n{case!r}\n")


_examples_run = [0]


def note_progress(case: FuzzCase) -> None:
    """Long runs: how many examples ran so far, in ``SAVE_DIR/progress``."""
    from pathlib import Path

    _examples_run[0] += 1
    if _examples_run[0] % 25 == 0:
        Path(SAVE_DIR).mkdir(parents=True, exist_ok=True)
        (Path(SAVE_DIR) / "progress").write_text(f"{_examples_run[0]} examples checked\n")


def fuzz_settings(test):
    test = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )(test)
    return seed(int(SEED))(test) if SEED is not None else test


@fuzz_settings
@given(onnx_cases())
def test_differential(case: FuzzCase):
    failures = check_case(case)
    if SAVE_DIR:
        note_progress(case)
    if failures:
        first = failures[0]
        if SAVE_DIR:
            save_failure(case, first)
        others = "".join(f"\n  also {f.pipeline}: {f.kind}: {f.detail}" for f in failures[1:])
        raise failure_type(first.pipeline, first.kind)(
            f"{first.pipeline}: {first.kind}: {first.detail}{others}"
        ) from first.error


def test_known_bugs_have_regression_tests():
    import test_regressions

    for bug in KNOWN_BUGS:
        assert callable(getattr(test_regressions, bug.test, None)), bug.test


def test_pipelines_cover_every_pass_and_preset():
    covered = {name for spec in PIPELINES.values() for name in spec.split(",")}
    assert covered == {p.name for p in BUILTIN_PASSES}
    assert set(PIPELINES) >= {p.name for p in BUILTIN_PASSES}
    assert {label for label in PIPELINES if label.startswith("O")}


@pytest.mark.parametrize(
    ("want", "got", "ok"),
    [
        (np.array([1.0, np.nan], np.float32), np.array([1.00001, np.nan], np.float32), True),
        (np.array([1.0, np.nan], np.float32), np.array([np.nan, 1.0], np.float32), False),
        (np.array([1000.0, 0.0], np.float32), np.array([1000.0, 0.009], np.float32), True),  # atol scales with 1000
        (np.array([1.0, 0.0], np.float32), np.array([1.0, 0.001], np.float32), False),
        (np.array([1.0], np.float16), np.array([1.009], np.float16), True),
        (np.array([3], np.int64), np.array([4], np.int64), False),
        (np.array([np.inf], np.float32), np.array([-np.inf], np.float32), False),
        (np.array([1.0], np.float32), np.array([1.0], np.float64), False),
    ],
)
def test_difference_tolerance(want, got, ok):
    assert (difference("y", want, got) is None) is ok
