"""ONNX operator conformance cases as an oracle for onnxopt's folding and its default pipeline.

``onnx.backend.test.case.node.collect_testcases()`` gives each operator test as a one-node (or
function-expanded) model with inputs and expected outputs. Two ways to run a case:

* ``as constants``: the case inputs become initializers, the pipeline runs, and every graph output that
  became a constant must equal the expected output (outputs still computed by nodes are "left alone").
* ``as inputs``: the pipeline runs on the model as it is; the optimized model must compute the expected
  outputs in onnxruntime (cases onnxruntime cannot run are counted as skipped).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

import onnxopt


@dataclass
class Tally:
    folded: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items()}


def cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases() if c.kind == "node"]


def _tensor_inputs(case) -> list[tuple[onnx.ValueInfoProto, np.ndarray]] | None:
    inputs, _ = case.data_sets[0]
    declared = list(case.model.graph.input)
    if len(inputs) != len(declared):
        return None
    pairs = []
    for vi, data in zip(declared, inputs):
        if not vi.type.HasField("tensor_type") or not isinstance(data, np.ndarray):
            return None
        pairs.append((vi, data))
    return pairs


def close(expected, actual, rtol: float, atol: float) -> bool:
    if isinstance(expected, list) or isinstance(actual, list):
        return (isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual)
                and all(close(e, a, rtol, atol) for e, a in zip(expected, actual)))
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return False
    if expected.dtype == object or actual.dtype == object:
        return expected.tolist() == actual.tolist()
    if expected.dtype != actual.dtype:
        return False
    if expected.dtype.kind in "biu" or expected.dtype == np.bool_:
        return np.array_equal(expected, actual)
    return np.allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)


def as_constants_model(case) -> onnx.ModelProto | None:
    pairs = _tensor_inputs(case)
    if pairs is None:
        return None
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    del model.graph.input[:]
    for vi, data in pairs:
        model.graph.initializer.append(numpy_helper.from_array(data, vi.name))
    return model


def run_as_constants(case, passes: str, tally: Tally) -> None:
    model = as_constants_model(case)
    if model is None:
        tally.skipped.append(case.name)
        return
    _, expected = case.data_sets[0]
    try:
        optimized = onnxopt.optimize(model, passes=passes, verify=False)
    except onnxopt.UserError as error:
        tally.skipped.append(f"{case.name}: {error}")
        return
    constants = {t.name: t for t in optimized.graph.initializer}
    node_outputs = {o for n in optimized.graph.node for o in n.output}
    all_folded = True
    for out, want in zip(optimized.graph.output, expected):
        if out.name in node_outputs or out.name not in constants:
            all_folded = False
            continue
        got = numpy_helper.to_array(constants[out.name])
        if not close(want, got, case.rtol, case.atol):
            tally.wrong.append(f"{case.name}: output {out.name} differs")
            return
    (tally.folded if all_folded else tally.left_alone).append(case.name)


def run_as_inputs(case, passes: str, tally: Tally) -> None:
    """The optimized model must compute what the original computes in onnxruntime.

    Where onnxruntime itself matches the expected outputs, the optimized model must match them too;
    where it departs from them (its DFT, align-corners Resize, ...), the optimized model must match
    onnxruntime's original result. Cases onnxruntime cannot run are skipped. ``folded`` counts matches.
    """
    import onnxruntime as ort

    pairs = _tensor_inputs(case)
    if pairs is None:
        tally.skipped.append(case.name)
        return
    _, expected = case.data_sets[0]
    feeds = {vi.name: data for vi, data in pairs}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    names = [o.name for o in case.model.graph.output]
    try:
        session = ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        reference = session.run(names, feeds)
    except Exception:  # noqa: BLE001 - onnxruntime cannot run this case: nothing to compare
        tally.skipped.append(case.name)
        return
    if all(close(w, r, case.rtol, case.atol) for w, r in zip(expected, reference)):
        reference = expected
    try:
        optimized = onnxopt.optimize(case.model, passes=passes, verify=False)
    except onnxopt.UserError as error:
        tally.skipped.append(f"{case.name}: {error}")
        return
    session = ort.InferenceSession(optimized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(names, feeds)
    if all(close(w, h, case.rtol, case.atol) for w, h in zip(reference, got)):
        tally.folded.append(case.name)
    else:
        tally.wrong.append(case.name)
