"""Finding the pass and the rewrites that changed a model's outputs.

``bisect`` reruns a pipeline pass by pass, comparing the outputs with the original's after each pass
(onnxruntime, optimizations off, the same inputs and tolerances as verification). At the first pass
that breaks them, it reruns that pass alone on the model as it was before it, switching rewrites off
through ``PassContext.site_filter``, and narrows the rewrites with delta debugging (ddmin) to a
smallest set that still breaks the outputs. The models before and after the pass, and the model with
only that smallest set applied, are saved for a bug report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxopt import ir
from onnxopt.errors import UserError
from onnxopt.manager import declare_input_shapes, fix_input_shapes
from onnxopt.pass_infra import Pass, PassContext, RewriteSite, Target, coerce_result
from onnxopt.registry import default_registry, parse_pipeline
from onnxopt.verify import Comparison, reference_run, run_model, verify_models

__all__ = ["BisectResult", "bisect", "ddmin"]


@dataclass
class BisectResult:
    """Where a pipeline first changed the outputs, or ``pass_name is None`` if it never did."""

    pass_name: str | None = None
    pass_spec: str | None = None
    iteration: int = 0
    passes_before: list[str] = field(default_factory=list)
    comparison: Comparison | None = None
    sites: list[RewriteSite] = field(default_factory=list)
    minimal_sites: list[RewriteSite] = field(default_factory=list)
    minimal_comparison: Comparison | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def rules(self) -> list[str]:
        return sorted({site.rule for site in self.minimal_sites})


def ddmin(items: Sequence, fails: Callable[[list], bool]) -> list:
    """A 1-minimal subset of ``items`` for which ``fails`` holds (Zeller's delta debugging).

    ``fails(items)`` must hold. Removing any single element of the result makes ``fails`` false.
    """
    current = list(items)
    granularity = 2
    while len(current) >= 2:
        size = max(1, len(current) // granularity)
        chunks = [current[i:i + size] for i in range(0, len(current), size)]
        reduced = False
        for chunk in chunks:
            if fails(chunk):
                current, granularity, reduced = chunk, 2, True
                break
        if not reduced:
            for index in range(len(chunks)):
                complement = [item for j, chunk in enumerate(chunks) if j != index for item in chunk]
                if complement and fails(complement):
                    current, granularity, reduced = complement, max(granularity - 1, 2), True
                    break
        if not reduced:
            if granularity >= len(current):
                break
            granularity = min(len(current), granularity * 2)
    return current


def _export(graph, template: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    model = ir.export_model(graph, template)
    declare_input_shapes(model, shapes)
    return model


def bisect(
    model: str | os.PathLike | onnx.ModelProto,
    passes: str | Sequence[str | Pass | type[Pass]],
    *,
    target: str | Target = Target.GENERIC,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    max_iterations: int = 10,
    plugins: Iterable[str | os.PathLike] = (),
    output_dir: str | os.PathLike | None = None,
    max_checks: int = 200,
) -> BisectResult:
    """Finds the first pass of ``passes`` that changes the outputs and the rewrites responsible."""
    shapes = dict(input_shapes or {})
    original = ir.load_model(model)
    pipeline = parse_pipeline(passes, default_registry(plugins))
    if inputs is None:
        inputs, expected = reference_run(original, shapes)
    else:
        expected = run_model(original, inputs)
    if isinstance(expected, str):
        raise UserError(f"cannot bisect: {expected}")
    ctx = PassContext(target=Target(target), original=original, input_shapes=shapes)
    graph = ir.import_model(original)
    fix_input_shapes(graph, shapes)
    ir.toposort(graph)
    ran: list[str] = []
    for iteration in range(1, max_iterations + 1):
        changed = False
        for pass_ in pipeline:
            before = _export(graph, original, shapes)
            result = coerce_result(pass_.name, pass_.run(graph, ctx))
            changed |= result.modified
            if not result.modified:
                ran.append(pass_.spec())
                continue
            after = _export(graph, original, shapes)
            comparison = verify_models(original, after, inputs=inputs, expected=expected)
            if not comparison.ok:
                found = BisectResult(pass_.name, pass_.spec(), iteration, list(ran), comparison)
                _narrow(found, pass_, before, original, ctx, shapes, inputs, expected, max_checks)
                if output_dir is not None:
                    _save(found, Path(output_dir), before, after, pass_, original, ctx, shapes)
                return found
            ran.append(pass_.spec())
        if not changed:
            break
    return BisectResult(passes_before=ran)


def _apply(pass_: Pass, before: onnx.ModelProto, template: onnx.ModelProto, ctx: PassContext,
           shapes: dict[str, list[int]], site_filter) -> tuple[onnx.ModelProto, list[RewriteSite]]:
    graph = ir.import_model(before)
    local = PassContext(target=ctx.target, original=template, input_shapes=shapes, site_filter=site_filter)
    pass_.run(graph, local)
    return _export(graph, template, shapes), local.sites


def _narrow(found: BisectResult, pass_: Pass, before: onnx.ModelProto, template: onnx.ModelProto,
            ctx: PassContext, shapes, inputs, expected, max_checks: int) -> None:
    _, sites = _apply(pass_, before, template, ctx, shapes, None)
    found.sites = sites
    if not sites:
        return
    checks = 0

    def fails(subset: list[RewriteSite]) -> bool:
        nonlocal checks
        if checks >= max_checks:
            return False
        checks += 1
        chosen = set(subset)
        model, _ = _apply(pass_, before, template, ctx, shapes, lambda site: site in chosen)
        return not verify_models(template, model, inputs=inputs, expected=expected).ok

    if not fails(sites):
        found.minimal_sites = sites
        return
    found.minimal_sites = ddmin(sites, fails)
    minimal, _ = _apply(pass_, before, template, ctx, shapes, lambda site: site in set(found.minimal_sites))
    found.minimal_comparison = verify_models(template, minimal, inputs=inputs, expected=expected)


def _save(found: BisectResult, folder: Path, before: onnx.ModelProto, after: onnx.ModelProto, pass_: Pass,
          template: onnx.ModelProto, ctx: PassContext, shapes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"before": folder / "before.onnx", "after": folder / "after.onnx"}
    ir.save_model(before, files["before"])
    ir.save_model(after, files["after"])
    if found.minimal_sites and found.minimal_sites != found.sites:
        chosen = set(found.minimal_sites)
        minimal, _ = _apply(pass_, before, template, ctx, shapes, lambda site: site in chosen)
        files["minimal"] = folder / "minimal.onnx"
        ir.save_model(minimal, files["minimal"])
    found.files = {name: str(path) for name, path in files.items()}
