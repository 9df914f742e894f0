"""The ``onnxopt`` command line: a thin layer over the public API that owns the terminal.

Exit codes: 0 success, 1 the optimized model failed verification or a pass failed internally (nothing
is written), 2 bad input (one line on stderr, no traceback, nothing written), 130 interrupted.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
from pathlib import Path

import click
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt import ir
from onnxopt.api import default_output_path, optimize_model
from onnxopt.bisect import BisectResult, bisect
from onnxopt.census import TARGETS, fusion_census, is_fused, runtime_graph
from onnxopt.errors import OnnxoptError, UserError, VerificationError
from onnxopt.manager import PassRecord, Report
from onnxopt.pass_infra import Pass, Target
from onnxopt.passes import PRESETS, default_pipeline
from onnxopt.registry import default_registry
from onnxopt.verify import load_inputs, parse_input_shapes

# Markup is off by default: file names, tensor names and dims like "float[batch, 3]" are user text that
# rich would otherwise parse as style tags (dropping them, or raising on "[/]"). Where we style, we escape.
out = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    sys.exit(code)


def friendly_errors(command):
    """Turns onnxopt's errors into one line and an exit code; other exceptions are internal errors."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return command(*args, **kwargs)
        except UserError as error:
            _fail(str(error), 2)
        except VerificationError as error:
            report = getattr(error, "report", None)
            if report is not None:
                _print_report(report)
                _write_report(kwargs.get("report_path"), report)
            if getattr(error, "bisect", None) is not None:
                _print_bisect(error.bisect)
            _fail(f"{error} (nothing was written)", 1)
        except OnnxoptError as error:
            if debug:
                raise
            _fail(f"{error} (the input is untouched; nothing was written)", 1)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as error:  # noqa: BLE001 - anything else is our bug: say so without a traceback
            if debug:
                raise
            _fail(f"internal error: {type(error).__name__}: {error} (rerun with --debug for a traceback; "
                  "the input is untouched)", 1)

    return wrapper


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _signed(value: int, bytes_: bool = False) -> str:
    if value == 0:
        return "0"
    text = _human_bytes(abs(value)) if bytes_ else str(abs(value))
    return ("+" if value > 0 else "-") + text


def _print_report(report: Report) -> None:
    table = Table(title="onnxopt: what each pass did", title_justify="left")
    for column, justify in (("pass", "left"), ("runs", "right"), ("time", "right"), ("nodes", "right"),
                            ("initializers", "right"), ("bytes", "right"), ("details", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report.per_pass():
        details = "\n".join(f"{k}={v}" for k, v in row["stats"].items() if v)
        table.add_row(row["pass"], str(row["runs"]), f"{row['seconds'] * 1000:.1f} ms", _signed(row["nodes"]),
                      _signed(row["initializers"]), _signed(row["bytes"], True), details)
    before, after = report.before, report.after
    table.add_section()
    table.add_row(
        "total", str(report.iterations) + " it", f"{report.seconds * 1000:.1f} ms",
        f"{before.get('nodes', 0)} → {after.get('nodes', 0)}",
        f"{before.get('initializers', 0)} → {after.get('initializers', 0)}",
        f"{_human_bytes(before.get('bytes', 0))} → {_human_bytes(after.get('bytes', 0))}",
        "" if report.converged else "stopped at --max-iterations before a fixed point",
    )
    out.print(table)
    if report.verification is not None:
        verification = report.verification
        if verification.skipped:
            out.print(f"[yellow]verification skipped:[/] {escape(verification.skipped)}", markup=True)
        elif verification.ok:
            out.print(f"[green]verified[/] in onnxruntime: {escape(verification.summary()[len('verified: '):])}",
                      markup=True)
        else:
            diff = Table(title="outputs that differ", title_justify="left")
            for column in ("output", "dtype", "max abs diff", "max rel diff", "atol", "rtol", "problem"):
                diff.add_column(column)
            for o in verification.outputs:
                if not o.ok:
                    diff.add_row(o.name, o.dtype, f"{o.max_abs_diff:.3g}", f"{o.max_rel_diff:.3g}", f"{o.atol:.3g}",
                                 f"{o.rtol:.3g}", o.problem)
            out.print(diff)


def _write_report(path: str | None, report: Report) -> None:
    if path:
        Path(path).write_text(json.dumps(report.to_dict(), indent=2))


class ProgressInstrument:
    """Shows the pass being run on stderr while the pipeline works."""

    def __init__(self, status) -> None:
        self.status = status

    def before_pass(self, pass_: Pass, iteration: int) -> None:
        self.status.update(f"iteration {iteration}: running [bold]{escape(pass_.spec())}[/]")

    def after_pass(self, record: PassRecord) -> None:
        pass


class OneLineErrorsGroup(click.Group):
    """Click's own usage errors (unknown option, bad --target, missing MODEL) follow the CLI's contract too:
    one line on stderr and exit code 2, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # bare `onnxopt`: the help text is the answer
                error.show()
                sys.exit(error.exit_code)
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            _fail(error.format_message() + hint, error.exit_code)
        except click.ClickException as error:
            _fail(error.format_message(), error.exit_code)
        except click.Abort:
            _fail("interrupted; nothing was written", 130)
        # In non-standalone mode click returns the exit code of --help/--version, or the command's value.
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def main() -> None:
    """onnxopt: optimize ONNX models, verified in onnxruntime."""


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--passes", "passes", default=None,
              help="Comma-separated pipeline, e.g. 'fuse,fold,dce' or 'fold{max_growth=4MiB},dce'. "
                   "Default: -O2 for the generic target, -O3 for an engine target, repeated to a fixed point.")
@click.option("-O", "level", type=click.Choice(sorted(p[1:] for p in PRESETS)), default=None,
              help="Preset pipeline instead of --passes: -O0 none, -O1 fold,dce, -O2 fold,cse,fuse,attention,dce, "
                   "-O3 adds ort_fuse (the target's fused operators).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output path (default: MODEL.opt.onnx beside the input).")
@click.option("--target", type=click.Choice([t.value for t in Target]), default="generic", show_default=True,
              help="Engine the output is for; 'generic' keeps only standard ONNX operators.")
@click.option("--verify", "verify_mode", type=click.Choice(["end", "each"]), default="end", show_default=True,
              help="Compare outputs with the original at the end, or after each pass.")
@click.option("--no-verify", is_flag=True, help="Skip the numeric comparison with the original.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Shape for an input with dynamic dimensions, e.g. input:1x3x224x224 (repeatable).")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help="An .npz file of real inputs for verification.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the run's report as JSON.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="A Python file defining extra passes (repeatable).")
@click.option("--max-iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="Repeat the pipeline at most this many times.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in MODEL.data (default: as the input did, or when over 2 GiB).")
@click.option("--census/--no-census", default=None,
              help="Count the fused operators the target engine makes of the original and of the output, and "
                   "flag fusions the output lost (default: on for --target ort and openvino).")
@click.option("--upgrade-opset", type=click.IntRange(1), metavar="N",
              help="First convert the model to default-domain opset N with onnx's version converter, so that "
                   "fusions into newer operators (Gelu, Attention, ...) can apply.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
@friendly_errors
def run_command(model, passes, level, output, target, verify_mode, no_verify, input_shapes, inputs_path, report_path,
                plugins, max_iterations, external_data, census, upgrade_opset, quiet, debug):
    """Optimize MODEL and write the result.

    \b
    Example:
      onnxopt run model.onnx --passes fuse,fold,dce -o model.small.onnx --report report.json
      onnxopt run model.onnx -O1 --input-shape input:1x3x224x224
    """
    if level is not None:
        if passes is not None:
            raise UserError("give either --passes or -O, not both")
        passes = PRESETS[f"O{level}"]
    if census is None:
        census = target in TARGETS
    elif census and target not in TARGETS:
        raise UserError(f"--census needs --target {' or '.join(TARGETS)}")
    loaded = ir.read_model(model)
    shapes = parse_input_shapes(input_shapes)
    inputs = load_inputs(inputs_path) if inputs_path else None
    output = output or default_output_path(model)
    # Refused before the work, not after: a bad --report path used to fail once the output was written.
    ir.check_output_path(output)
    if report_path:
        ir.check_output_path(report_path, "report")
    instruments = []
    status = None
    if not quiet:
        status = err.status("optimizing", spinner="dots")
        status.start()
        instruments.append(ProgressInstrument(status))
    try:
        result = optimize_model(
            loaded.model, passes, target, False if no_verify else verify_mode, input_shapes=shapes, inputs=inputs,
            max_iterations=max_iterations, plugins=plugins, instruments=instruments, upgrade_opset=upgrade_opset,
            output=output, external_data=loaded.external_data if external_data is None else external_data,
        )
    except VerificationError as error:
        if status is not None:
            status.update("outputs differ: finding the pass and rewrites responsible")
        start = loaded.model if upgrade_opset is None else ir.upgrade_opset(loaded.model, upgrade_opset)
        error.bisect = bisect(start, passes if passes is not None else default_pipeline(target), target=target,
                       input_shapes=shapes, inputs=inputs, max_iterations=max_iterations, plugins=plugins,
                       output_dir=_bisect_folder(output))
        raise
    finally:
        if status is not None:
            status.stop()
    result.report.input_path, result.report.output_path = str(model), str(output)
    written = result.written
    taken = None
    if census:
        if status is not None:
            status.update(f"fusion census: letting {target} optimize the original and the output")
            status.start()
        try:
            taken = fusion_census(model, output, target)
        finally:
            if status is not None:
                status.stop()
        result.report.census = taken.to_dict()
    if not quiet:
        _print_report(result.report)
        if taken is not None:
            out.print(taken)
        out.print(f"wrote {', '.join(str(p) for p in written)}")
    if taken is not None and taken.regressions:
        err.print(f"[yellow]warning:[/] {escape(target)} fuses fewer of these after onnxopt: "
                  f"{escape(', '.join(row.label for row in taken.regressions))}", markup=True)
    _write_report(report_path, result.report)


def _bisect_folder(output: Path) -> Path:
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.bisect")


def _print_bisect(found: BisectResult) -> None:
    if found.pass_name is None:
        out.print("no single pass changed the outputs when run pass by pass "
                  f"(passes run: {', '.join(found.passes_before) or 'none'})")
        return
    out.print(f"first pass that changes the outputs: {found.pass_spec} (iteration {found.iteration}; "
              f"passes before it: {', '.join(found.passes_before) or 'none'})")
    out.print(f"  {found.comparison.summary()}")
    if not found.sites:
        out.print("  the pass reports no rewrite sites (it does not call ctx.allow), so it cannot be narrowed")
    else:
        table = Table(title=f"fewest rewrites that still change the outputs: {len(found.minimal_sites)} of "
                            f"{len(found.sites)}", title_justify="left", min_width=60)
        table.add_column("rule")
        table.add_column("site")
        for site in found.minimal_sites:
            table.add_row(site.rule, site.site)
        out.print(table)
    for name, path in found.files.items():
        out.print(f"  saved {name}: {path}")


@main.group("debug")
def debug_group() -> None:
    """Tools for finding what went wrong."""


@debug_group.command("bisect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--passes", "passes", default=None, help="The pipeline to bisect (default: what run runs for --target).")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=None,
              help="Folder for before/after/minimal models (default: MODEL.bisect beside the model).")
@click.option("--target", type=click.Choice([t.value for t in Target]), default="generic", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Shape for an input with dynamic dimensions (repeatable).")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help="An .npz file of real inputs.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="A Python file defining extra passes (repeatable).")
@click.option("--max-iterations", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
@friendly_errors
def bisect_command(model, passes, output_dir, target, input_shapes, inputs_path, plugins, max_iterations, debug):
    """Find the first pass that changes MODEL's outputs, and the fewest rewrites that do.

    Exits 0 when no pass changes the outputs, 1 when one does (the culprit is printed and the models
    before and after it are saved).

    \b
    Example:
      onnxopt debug bisect model.onnx --passes fold,cse,fuse,dce --plugin my_rules.py
    """
    loaded = ir.read_model(model)
    with err.status("bisecting", spinner="dots"):
        found = bisect(loaded.model, passes if passes is not None else default_pipeline(target), target=target,
                       input_shapes=parse_input_shapes(input_shapes),
                       inputs=load_inputs(inputs_path) if inputs_path else None, max_iterations=max_iterations,
                       plugins=plugins, output_dir=output_dir or _bisect_folder(model))
    _print_bisect(found)
    if found.pass_name is not None:
        sys.exit(1)


@main.command("passes")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="Also list the passes of this plugin file.")
@friendly_errors
def passes_command(plugins):
    """List every pass with its description, options and origin.

    \b
    Example:
      onnxopt passes --plugin my_rules.py
    """
    registry = default_registry(plugins)
    table = Table(title="passes", title_justify="left")
    for column in ("name", "description", "options", "origin"):
        table.add_column(column, overflow="fold")  # fold, not "…": a plugin's origin is a path worth reading
    for name in registry.names():
        pass_class = registry.get(name)
        options = ", ".join(f"{f.name}={f.default}" for f in pass_class.option_fields())
        table.add_row(name, pass_class.description(), options, registry.origin(name))
    out.print(table)


def _dims(type_proto: onnx.TypeProto) -> str:
    if not type_proto.HasField("tensor_type"):
        return type_proto.WhichOneof("value") or "?"
    tensor_type = type_proto.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower() if tensor_type.elem_type else "?"
    if not tensor_type.HasField("shape"):
        return f"{dtype}[?]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return f"{dtype}[{', '.join(dims)}]"


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--target", type=click.Choice(TARGETS), default=None,
              help="Also count the fused operators this engine makes of MODEL when it loads it.")
@friendly_errors
def inspect_command(model, as_json, target):
    """Summarize MODEL: operators, inputs and outputs, opsets and size.

    \b
    Example:
      onnxopt inspect model.onnx
      onnxopt inspect model.onnx --target ort
    """
    loaded = ir.read_model(model)
    proto = loaded.model
    graph = ir.import_model(proto)
    histogram = collections.Counter(
        f"{n.domain}::{n.op}" if n.domain not in ("", None, "ai.onnx") else n.op for n in ir.all_nodes(graph))
    stats = ir.graph_stats(graph)
    initializers = {t.name for t in proto.graph.initializer}
    summary = {
        "path": str(model),
        "file_bytes": model.stat().st_size,
        "external_data": loaded.external_data,
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "opsets": {op.domain or "ai.onnx": op.version for op in proto.opset_import},
        "nodes": stats.nodes,
        "initializers": stats.initializers,
        "weight_bytes": stats.bytes,
        "inputs": {vi.name: _dims(vi.type) for vi in proto.graph.input if vi.name not in initializers},
        "outputs": {vi.name: _dims(vi.type) for vi in proto.graph.output},
        "operators": dict(histogram.most_common()),
    }
    if target is not None:
        engine = runtime_graph(model, target)
        if not engine.ok:
            raise UserError(f"{target} cannot load {model}: {engine.error}")
        fused = collections.Counter({(f"{d}::{op}" if d not in ("", "ai.onnx") else op): n
                                     for (d, op), n in engine.counts.items() if is_fused(d, op, target)})
        summary["engine"] = {"target": target, "nodes": engine.nodes, "fused": dict(fused.most_common())}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    out.print(f"[bold]{escape(str(model))}[/]  IR {proto.ir_version}, producer '{escape(summary['producer'])}', "
              f"opsets {escape(', '.join(f'{k} {v}' for k, v in summary['opsets'].items()))}", markup=True)
    out.print(f"{stats.nodes} nodes, {stats.initializers} initializers, weights {_human_bytes(stats.bytes)}, "
              f"file {_human_bytes(summary['file_bytes'])}{' + external data' if loaded.external_data else ''}")
    io = Table(title="inputs and outputs", title_justify="left")
    io.add_column("kind")
    io.add_column("name")
    io.add_column("type")
    for name, text in summary["inputs"].items():
        io.add_row("input", name, text)
    for name, text in summary["outputs"].items():
        io.add_row("output", name, text)
    out.print(io)
    ops = Table(title="operators", title_justify="left")
    ops.add_column("operator")
    ops.add_column("count", justify="right")
    for op, count in histogram.most_common():
        ops.add_row(op, str(count))
    out.print(ops)
    if target is not None:
        engine = summary["engine"]
        fused_table = Table(title=f"fused operators in {target}'s optimized graph ({engine['nodes']} nodes)",
                            title_justify="left")
        fused_table.add_column("fused operator")
        fused_table.add_column("count", justify="right")
        for op, count in engine["fused"].items():
            fused_table.add_row(op, str(count))
        out.print(fused_table if engine["fused"] else f"{target} fuses nothing in this model")


if __name__ == "__main__":
    main()
