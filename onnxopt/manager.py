"""The pass manager: runs a pipeline to a fixed point, checks contracts, verifies and reports.

``PassManager(passes).run(model, ctx)`` imports the model into a graph, runs each pass in order and
repeats the pipeline until no pass reports a change (at most ``max_iterations`` times). After every
pass it checks the graph invariants of ``onnxopt.contracts`` and, with ``verify="each"``, compares the
model's outputs with the original's; a failure names the pass. Observers (``instruments``) are told
before and after every pass, which is how the CLI shows progress.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx

from onnxopt import ir
from onnxopt.contracts import IOSignature, check_graph
from onnxopt.errors import ContractViolation, InputSpecError, PassFailedError, UserError, VerificationError
from onnxopt.pass_infra import Pass, PassContext, coerce_result
from onnxopt.verify import Comparison, reference_run, verify_models

__all__ = ["Instrument", "PassManager", "PassRecord", "Report"]


@dataclass
class PassRecord:
    """What one run of one pass did, measured by the manager."""

    iteration: int
    name: str
    spec: str
    seconds: float
    modified: bool
    stats: dict
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    bytes_before: int
    bytes_after: int


@dataclass
class Report:
    """Everything a run did; ``to_dict`` is the ``--report`` JSON."""

    pipeline: list[str]
    target: str
    records: list[PassRecord] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    seconds: float = 0.0
    verification: Comparison | None = None
    input_path: str | None = None
    output_path: str | None = None
    census: dict | None = None  # onnxopt.census.Census.to_dict() where the run took one

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verification"] = self.verification.to_dict() if self.verification else None
        return _jsonable(data)

    def per_pass(self) -> list[dict]:
        """Records summed over iterations, one row per pass in pipeline order."""
        rows: dict[str, dict] = {}
        for record in self.records:
            row = rows.setdefault(record.spec, {"pass": record.spec, "runs": 0, "seconds": 0.0, "nodes": 0,
                                                "initializers": 0, "bytes": 0, "stats": {}})
            row["runs"] += 1
            row["seconds"] += record.seconds
            row["nodes"] += record.nodes_after - record.nodes_before
            row["initializers"] += record.initializers_after - record.initializers_before
            row["bytes"] += record.bytes_after - record.bytes_before
            for key, value in record.stats.items():
                if isinstance(value, (int, float)):
                    row["stats"][key] = row["stats"].get(key, 0) + value
        return list(rows.values())


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else str(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


class Instrument(Protocol):
    """Observes a run; every method is optional."""

    def before_pass(self, pass_: Pass, iteration: int) -> None: ...

    def after_pass(self, record: PassRecord) -> None: ...


def fix_input_shapes(graph, shapes: dict[str, list[int]]) -> None:
    """Gives graph inputs the static shapes the user chose, so that passes can fold with them.

    The optimized model then declares those shapes: it was simplified for them and may compute
    something else for other shapes.
    """
    inputs = {t.name: t for t in graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputSpecError(f"--input-shape names unknown input '{name}'; the model's inputs are: "
                                 f"{', '.join(inputs)}")
        declared = inputs[name].shape
        if declared is not None and len(declared) != len(dims):
            raise InputSpecError(f"--input-shape for '{name}' has rank {len(dims)}, the model declares rank "
                                 f"{len(declared)}")
        for axis, (old, new) in enumerate(zip(declared or [], dims)):
            if isinstance(old, int) and old >= 0 and old != new:
                raise InputSpecError(f"--input-shape for '{name}' sets dimension {axis} to {new}, but the model "
                                     f"declares it as {old}")
        inputs[name].shape = list(dims)


def declare_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    for value_info in model.graph.input:
        if value_info.name in shapes:
            dims = value_info.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value_info.name]:
                dims.add().dim_value = size


def _stats_dict(stats: ir.GraphStats) -> dict:
    return {"nodes": stats.nodes, "initializers": stats.initializers, "bytes": stats.bytes}


class PassManager:
    """Runs passes in order, repeated to a fixed point, with contract checks after each pass."""

    def __init__(
        self,
        passes: Sequence[Pass],
        fixed_point: bool = True,
        max_iterations: int = 10,
        check_contracts: bool = True,
        verify_each: bool = False,
        instruments: Sequence[object] = (),
    ) -> None:
        if max_iterations < 1:
            raise UserError("max_iterations must be at least 1")
        self.passes = list(passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations if fixed_point else 1
        self.check_contracts = check_contracts
        self.verify_each = verify_each
        self.instruments = list(instruments)

    def _notify(self, method: str, *args) -> None:
        for instrument in self.instruments:
            callback = getattr(instrument, method, None)
            if callback is not None:
                callback(*args)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None,
            reference: tuple[dict, dict] | None = None,
            weights: dict[str, onnx.TensorProto] | None = None) -> tuple[onnx.ModelProto, Report]:
        """Optimizes ``model`` (left unchanged) and returns the new model with the run's report.

        ``reference`` is (inputs, expected outputs) for ``verify_each``; it is computed when not given.
        Given a ``weights`` dict, large weights of the result stay stubs (see ``ir.export_model``).
        """
        ctx = ctx or PassContext()
        ctx.original = model
        started = time.perf_counter()
        graph = ir.import_model(model)
        fix_input_shapes(graph, ctx.input_shapes)
        signature = IOSignature.of(graph)
        ir.toposort(graph)
        report = Report(pipeline=[p.spec() for p in self.passes], target=ctx.target.value)
        report.before = _stats_dict(ir.graph_stats(graph))
        if self.verify_each and reference is None:
            reference = reference_run(model, ctx.input_shapes)
        ran: list[str] = []
        report.converged = False
        changes = 0
        # A pass that changed nothing need not run again until another pass changes the graph.
        unchanged_since: dict[int, int] = {}
        for iteration in range(1, self.max_iterations + 1):
            changed = False
            for index, pass_ in enumerate(self.passes):
                if unchanged_since.get(index) == changes:
                    continue
                record = self._run_pass(pass_, graph, ctx, iteration, ran, signature)
                report.records.append(record)
                changed |= record.modified
                if record.modified:
                    changes += 1
                else:
                    unchanged_since[index] = changes
                if self.verify_each and record.modified and not isinstance(reference[1], str):
                    try:
                        self._verify_step(graph, model, ctx, pass_, reference)
                    except VerificationError as error:
                        # Give the failure the report so far, so that the CLI can show what differs.
                        report.iterations = iteration
                        report.after = _stats_dict(ir.graph_stats(graph))
                        report.seconds = time.perf_counter() - started
                        report.verification = error.comparison
                        error.report = report
                        raise
            report.iterations = iteration
            if not changed:
                report.converged = True
                break
        if not self.fixed_point:
            report.converged = True
        optimized = self._export(graph, model, ctx, weights)
        ir.restore_attribute_tensor_names(model)
        report.after = _stats_dict(ir.graph_stats(graph))
        report.seconds = time.perf_counter() - started
        return optimized, report

    @staticmethod
    def _export(graph, model: onnx.ModelProto, ctx: PassContext,
                weights: dict[str, onnx.TensorProto] | None = None) -> onnx.ModelProto:
        exported = ir.export_model(graph, model, weights)
        declare_input_shapes(exported, ctx.input_shapes)
        return exported

    def _run_pass(self, pass_: Pass, graph, ctx: PassContext, iteration: int, ran: list[str],
                  signature: IOSignature) -> PassRecord:
        self._notify("before_pass", pass_, iteration)
        before = ir.graph_stats(graph)
        start = time.perf_counter()
        try:
            result = coerce_result(pass_.name, pass_.run(graph, ctx))
        except Exception as error:  # noqa: BLE001 - any failure inside a pass is reported with its name
            # Even a UserError raised inside a pass (say, a cycle the pass itself created) is the pass's fault.
            raise PassFailedError(pass_.name, error, list(ran)) from error
        seconds = time.perf_counter() - start
        ran.append(pass_.name)
        if self.check_contracts:
            ir.purge_detached(graph)
            problems = check_graph(graph, signature)
            if problems:
                raise ContractViolation(pass_.name, problems)
        after = ir.graph_stats(graph)
        record = PassRecord(
            iteration=iteration, name=pass_.name, spec=pass_.spec(), seconds=seconds, modified=result.modified,
            stats=dict(result.stats), nodes_before=before.nodes, nodes_after=after.nodes,
            initializers_before=before.initializers, initializers_after=after.initializers,
            bytes_before=before.bytes, bytes_after=after.bytes,
        )
        self._notify("after_pass", record)
        return record

    @staticmethod
    def _verify_step(graph, model: onnx.ModelProto, ctx: PassContext, pass_: Pass,
                     reference: tuple[dict, dict]) -> None:
        inputs, expected = reference
        comparison = verify_models(model, PassManager._export(graph, model, ctx), inputs=inputs, expected=expected)
        if not comparison.ok:
            raise VerificationError(f"pass '{pass_.name}' changed the model's outputs: {comparison.summary()}",
                                    comparison, pass_.name)
