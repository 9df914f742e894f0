"""Shrinks a failing fuzz case by hand-style steps hypothesis cannot take on the graph itself.

Hypothesis shrinks the choices that built a graph; this works on the model: it drops graph outputs,
removes nodes no output needs, and cuts nodes off by turning their outputs into graph inputs fed with
the values they had, as long as the same pipeline still fails in the same way. Usage::

    .venv/bin/python tests/fuzz/minimize.py FAILING.onnx FAILING.npz PIPELINE [KIND]

(``ONNXOPT_FUZZ_SAVE`` writes those files.) The smallest model is written beside the input as
``*.min.onnx`` and printed.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.printer

sys.path.insert(0, str(Path(__file__).parent))

from graphs import FuzzCase
from test_differential import PIPELINES, check_pipeline, run_all, session


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by the nodes of ``graph``, subgraphs included (captured outer values count)."""
    names = set()
    for node in graph.node:
        names |= set(node.input)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                names |= graph_reads(attribute.g) | {o.name for o in attribute.g.output}
    return names


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drops nodes, initializers and inputs that no graph output depends on."""
    model = _copy(model)
    graph = model.graph
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in live for name in node.output):
            kept.append(node)
            live |= set(node.input)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    live |= graph_reads(attribute.g) | {o.name for o in attribute.g.output}
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [i for i in graph.input if i.name in live]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def values_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every main-graph value's contents on ``feeds``."""
    probe = _copy(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    names = [o.name for o in probe.graph.output]
    return dict(zip(names, session(probe).run(None, feeds)))


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types onnx shape inference gives the main graph's values (symbolic dimensions kept)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no types: cut values get their concrete shapes
        return {}
    return {vi.name: vi.type for vi in inferred.graph.value_info}


def bypass(model: onnx.ModelProto, index: int) -> onnx.ModelProto | None:
    """Removes node ``index``, whose readers read its first input instead (a Relu chain shrinks)."""
    model = _copy(model)
    node = model.graph.node[index]
    if len(node.output) != 1 or not node.input or not node.input[0]:
        return None
    old, new = node.output[0], node.input[0]
    if old in {o.name for o in model.graph.output}:
        return None
    del model.graph.node[index]
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        for reader in graph.node:
            for i, name in enumerate(reader.input):
                if name == old:
                    reader.input[i] = new
            pending += [a.g for a in reader.attribute if a.HasField("g")]
    return model


def cut(
    model: onnx.ModelProto, feeds: dict, index: int, values: dict, as_constant: bool
) -> tuple[onnx.ModelProto, dict] | None:
    """Removes node ``index``; its outputs become graph inputs fed with the values they had (or constants)."""
    types = {} if as_constant else inferred_types(model)
    model = _copy(model)
    node = model.graph.node[index]
    if node.op_type == "Constant" or any(name not in values for name in node.output if name):
        return None
    feeds = dict(feeds)
    for name in node.output:
        if not name:
            continue
        array = values[name]
        if as_constant:
            model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        else:
            info = onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
            )
            if name in types and types[name].tensor_type.HasField("shape"):
                info.type.CopyFrom(types[name])  # symbolic dimensions stay symbolic
            model.graph.input.append(info)
            feeds[name] = array
    del model.graph.node[index]
    return model, feeds


def minimize(model: onnx.ModelProto, feeds: dict, fails: Callable[[onnx.ModelProto, dict], bool]):
    assert fails(model, feeds), "the case does not fail to begin with"
    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(model.graph.output))):
            if len(model.graph.output) == 1:
                break
            smaller = _copy(model)
            del smaller.graph.output[i]
            smaller = prune(smaller)
            if fails(smaller, _live_feeds(smaller, feeds)):
                model, feeds, changed = smaller, _live_feeds(smaller, feeds), True
        pruned = prune(model)
        if len(pruned.graph.node) < len(model.graph.node) and fails(pruned, _live_feeds(pruned, feeds)):
            model, feeds, changed = pruned, _live_feeds(pruned, feeds), True
        for index in range(len(model.graph.node)):
            smaller = bypass(model, index)
            if smaller is not None:
                smaller = prune(smaller)
                if fails(smaller, _live_feeds(smaller, feeds)):
                    model, feeds, changed = smaller, _live_feeds(smaller, feeds), True
                    break
        if changed:
            continue
        values = values_of(model, feeds)
        for index, as_constant in itertools.product(range(len(model.graph.node)), (False, True)):
            attempt = cut(model, feeds, index, values, as_constant)
            if attempt is None:
                continue
            smaller, smaller_feeds = attempt
            smaller = prune(smaller)
            smaller_feeds = _live_feeds(smaller, smaller_feeds)
            if fails(smaller, smaller_feeds):
                model, feeds, changed = smaller, smaller_feeds, True
                break
    return model, feeds


def _live_feeds(model: onnx.ModelProto, feeds: dict) -> dict:
    names = {i.name for i in model.graph.input}
    return {k: v for k, v in feeds.items() if k in names}


def failure_of(model: onnx.ModelProto, feeds: dict, label: str):
    try:
        onnx.checker.check_model(model, full_check=True)
        expected = run_all(model, [feeds])
    except Exception:  # noqa: BLE001 - a cut that made the model invalid does not count
        return None
    return check_pipeline(FuzzCase(model, [feeds], None), label, PIPELINES.get(label, label), expected)


def main(argv: list[str]) -> None:
    path, feeds_path, label = Path(argv[0]), argv[1], argv[2]
    kind = argv[3] if len(argv) > 3 else None
    model = onnx.load(path)
    feeds = dict(np.load(feeds_path))

    def fails(candidate, candidate_feeds) -> bool:
        failure = failure_of(candidate, candidate_feeds, label)
        return failure is not None and (kind is None or failure.kind == kind)

    model, feeds = minimize(model, feeds, fails)
    out = path.with_suffix(".min.onnx")
    onnx.save(model, out)
    np.savez(path.with_suffix(".min.npz"), **feeds)
    print(onnx.printer.to_text(model))
    print({k: v.tolist() for k, v in feeds.items()})
    print(failure_of(model, feeds, label))


if __name__ == "__main__":
    main(sys.argv[1:])
