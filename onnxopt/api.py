"""The Python entry points: ``optimize`` for a post-export step, ``optimize_model`` for the full result."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from onnxopt import ir
from onnxopt.errors import OnnxoptError, UserError, VerificationError
from onnxopt.manager import PassManager, Report
from onnxopt.pass_infra import Pass, PassContext, Target
from onnxopt.registry import default_registry, parse_pipeline
from onnxopt.verify import reference_run, run_model, verify_models

__all__ = ["OptimizationResult", "optimize", "optimize_model"]


class OptimizationResult:
    """The optimized model and the run's report.

    Large weights reach the model on first access to ``model``; ``save`` writes them from the original
    straight to the file instead, so that a huge model is never held twice.
    """

    def __init__(self, model: onnx.ModelProto, report: Report,
                 weights: dict[str, onnx.TensorProto] | None = None) -> None:
        self._model = model
        self.report = report
        self._weights = weights or {}
        self.written: list[Path] = []  # the files ``optimize_model(output=...)`` wrote

    @property
    def model(self) -> onnx.ModelProto:
        if self._weights:
            ir.fill_weights(self._model, self._weights)
            self._weights = {}
        return self._model

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
        """Writes the model atomically (see ``ir.save_model``); returns the files written."""
        return ir.save_model(self._model, path, external_data, self._weights)


def _parse_target(target: str | Target) -> Target:
    try:
        return Target(target)
    except ValueError:
        choices = ", ".join(t.value for t in Target)
        raise UserError(f"unknown target '{target}' (choose one of: {choices})") from None


def _parse_verify(verify: bool | str) -> str:
    if verify in (True, "end", "final"):
        return "end"
    if verify in (False, None, "none", "off"):
        return "off"
    if verify == "each":
        return "each"
    raise UserError(f"verify must be True, False or 'each', not {verify!r}")


def _full_check_passes(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(ir.model_skeleton(model), full_check=True)
        return True
    except Exception:  # noqa: BLE001 - only asking whether the original passes
        return False


def optimize_model(
    model: str | os.PathLike | onnx.ModelProto,
    passes: str | Sequence[str | Pass | type[Pass]] | None = None,
    target: str | Target = Target.GENERIC,
    verify: bool | str = True,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    max_iterations: int = 10,
    plugins: Iterable[str | os.PathLike] = (),
    instruments: Sequence[object] = (),
    upgrade_opset: int | None = None,
    output: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> OptimizationResult:
    """Optimizes a model and returns it with the run's report.

    ``passes`` is a pipeline spec (``"fuse,fold,dce"``), a list of names or pass objects, or ``None`` for
    the default pipeline. With ``verify`` (the default) the result is compared with the original in
    onnxruntime and ``VerificationError`` is raised if any output differs beyond tolerance;
    ``verify="each"`` checks after every pass and names the pass that changed the outputs.
    ``upgrade_opset`` first converts the model to that default-domain opset with onnx's version
    converter (so that fusions into newer operators may apply); verification compares with the model
    as given. ``output`` writes the result there (``external_data`` as for ``OptimizationResult.save``;
    the files are listed in ``written``); verification then runs the written file before it is renamed
    into place, which spares serializing the model a second time, and a model that fails it is never
    written.
    """
    from onnxopt.passes import default_pipeline

    mode = _parse_verify(verify)
    registry = default_registry(plugins)
    target = _parse_target(target)
    pipeline = parse_pipeline(passes if passes is not None else default_pipeline(target), registry)
    ctx = PassContext(target=target, input_shapes=dict(input_shapes or {}))
    model = ir.model_source(model)
    original = ir.load_model(model)
    source_path = None if isinstance(model, onnx.ModelProto) else model
    manager = PassManager(pipeline, max_iterations=max_iterations, verify_each=mode == "each", instruments=instruments)
    with ThreadPoolExecutor(max_workers=1) as background:
        reference = None
        if mode != "off":
            if inputs is not None:
                reference = (inputs, _run_reference(original, inputs))
            elif mode == "each":
                reference = reference_run(original, ctx.input_shapes, path=source_path)
            else:
                # onnxruntime releases the GIL while it builds the session and runs the original, so that
                # work (about a third of the total on big models) overlaps the passes.
                reference = background.submit(reference_run, original, ctx.input_shapes, path=source_path)
        working = original if upgrade_opset is None else ir.upgrade_opset(original, upgrade_opset)
        weights: dict[str, onnx.TensorProto] = {}
        optimized, report = manager.run(working, ctx, reference if isinstance(reference, tuple) else None, weights)
        if isinstance(reference, Future):
            reference = reference.result()
    result = OptimizationResult(optimized, report, weights)
    _check_output(original, optimized)

    def verify(path: Path | None = None) -> None:
        report.verification = verify_models(original, optimized, inputs=reference[0], expected=reference[1],
                                            weights=weights, path=path)
        if not report.verification.ok:
            error = VerificationError(
                f"the optimized model computes different outputs: {report.verification.summary()}",
                report.verification,
            )
            error.report = report
            raise error

    if output is not None:
        result.written = ir.save_model(optimized, output, external_data, weights,
                                       check=verify if mode != "off" else None)
    elif mode != "off":
        verify()
    return result


def _run_reference(original: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | str:
    declared = {vi.name for vi in original.graph.input} - {t.name for t in original.graph.initializer}
    missing = sorted(declared - set(inputs))
    if missing:
        raise UserError(f"the given inputs lack {missing}")
    try:
        return run_model(original, inputs)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"the original model does not run on the given inputs: {str(error).splitlines()[0]}") from None


def _check_output(original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """Runs onnx.checker on the result: the full check when the original passes it."""
    optimized = ir.model_skeleton(optimized)
    if not ir.checkable(optimized):
        return
    try:
        onnx.checker.check_model(optimized, full_check=True)
        return
    except Exception as error:  # noqa: BLE001
        failure = error
    # Only the full check (which adds strict shape inference) may fail on models whose original fails it too.
    try:
        onnx.checker.check_model(optimized, full_check=False)
    except Exception as error:  # noqa: BLE001
        failure = error
    else:
        if not _full_check_passes(original):
            return
    raise OnnxoptError(f"the optimized model fails onnx.checker: {str(failure).strip().splitlines()[0]}") from None


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    passes: str | Sequence[str | Pass | type[Pass]] | None = None,
    target: str | Target = Target.GENERIC,
    verify: bool | str = True,
    **options,
) -> onnx.ModelProto:
    """Optimizes a model (a path, a ModelProto, or the ``ONNXProgram`` that ``torch.onnx.export`` returns)
    and returns the optimized ``onnx.ModelProto``.

    The input is never changed. See ``optimize_model`` for the options and the report.
    """
    return optimize_model(model, passes, target, verify, **options).model


def default_output_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` becomes ``model.opt.onnx`` beside it."""
    path = Path(model_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.opt.onnx")
