"""The fusion census: which fused operators a runtime's own optimizer ends up with, before and after onnxopt.

An engine such as onnxruntime rewrites every model it loads (``ORT_ENABLE_ALL``: Gemm and
LayerNormalization recovery, ``com.microsoft`` fusions such as SkipLayerNormalization, FusedMatMul,
Gelu, Attention). A graph optimizer helps when the engine's fusions still fire on its output, or
better, when it hands the engine fused operators the engine would not have found; it hurts when one of
its rewrites hides a pattern the engine knew. The census answers that: it lets the engine optimize the
original and the optimized model and counts, per operator type, the fused operators in each result.

An operator counts as *fused* when only a fusion (the engine's or onnxopt's) can have made it:

* any operator outside the standard ONNX domains (``com.microsoft``, ``com.microsoft.nchwc``, ...):
  contrib and internal operators are what engines fuse into;
* the standard operators that stand for several simpler ones and that optimizers recover from their
  decomposition (``FUSED_STANDARD_OPS``: Gemm, LayerNormalization, Gelu, Attention, ...). Softmax or
  Relu, though onnx defines them as functions too, are what exporters write directly, so they are not.

For OpenVINO the census reads the compiled model's runtime graph (``compiled.get_runtime_model()``),
whose node types are the CPU plugin's (FullyConnected, MVN, ScaledDotProductAttention, Subgraph, ...);
there every type that is not the name of an ONNX operator counts as fused, but for graph ends,
constants, layout or precision conversions, single operators under other names (Convolution, Eltwise)
and nodes that compute on shapes only (counted under the domain ``SHAPE_ONLY``): shape arithmetic the
plugin fused into a Subgraph is gone once onnxopt folds it, which loses no fusion of the model's compute.

A fused type that occurs fewer times after onnxopt than without it is a *regression*, unless a larger
fusion that gained nodes can have taken them in (``ABSORBERS``): an attention operator takes in the
FusedMatMul of ``Q·Kᵀ`` and, packed, the Gemms of its projections; SkipLayerNormalization a
LayerNormalization; BiasGelu or FastGelu a Gelu and the Gemm that added the bias. Such a drop is marked
*absorbed* when the gains can account for it (at most so many nodes per gained node). That is a count,
not a proof, so the table shows every fused type side by side.

onnxruntime's NCHWc transformer (``com.microsoft.nchwc``) rewrites Conv, pooling and the BatchNormalization,
Add and activations it can fold into a Conv in a blocked layout; its ``ReorderInput``/``ReorderOutput``
convert between layouts and are no fusion. A drop of one of its types is *fewer to convert*, no loss,
when the engine's graph of the optimized model holds no more operators of that type left in the standard
layout than the original's: onnxopt folded away what the engine would have converted (DenseNet's
BatchNormalization, Mul and Add before each Relu become one BatchNormalization), and every Conv that is
left is still converted.

A drop is *declined* where onnxopt wrote the pattern in a form the engine does not fuse, on purpose,
because the fused kernel is the slower one (``DECLINED``): onnxruntime's CPU SkipLayerNormalization, whose
Add onnxopt writes as Sum, and BiasGelu, whose Add stays beside a ``com.microsoft.Gelu`` (see ``ort_fuse``;
an Add of zeros, which the engine fuses into BiasGelu in the original, is simply gone). It is declined
when the unfused operators it stands for gained at least as many nodes as it lost.

Usage::

    from onnxopt.census import fusion_census
    census = fusion_census("model.onnx", optimized_model, target="ort")
    rich.print(census)            # a table: fused op type, original, ours, change
    census.to_dict()              # the same as JSON-able data; census.regressions lists the drops
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from onnxopt import ir

__all__ = ["ABSORBERS", "DECLINED", "FUSED_STANDARD_OPS", "NCHWC_DOMAIN", "SHAPE_ONLY", "TARGETS", "Census",
           "CensusRow", "RuntimeGraph", "fusion_census", "is_fused", "runtime_graph"]

TARGETS = ("ort", "openvino")

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

# Standard operators that stand for a composition of simpler ones and that optimizers produce by fusion.
FUSED_STANDARD_OPS = frozenset({
    "Gemm",  # MatMul + Add
    "LayerNormalization", "RMSNormalization", "GroupNormalization", "MeanVarianceNormalization",
    "Gelu", "HardSwish", "HardSigmoid", "Mish", "Swish", "SwiGLU",
    "Attention", "RotaryEmbedding",
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
})

_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                  "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention")
# A fused type -> the fused types one of its nodes can take in, with how many nodes of each.
ABSORBERS: dict[str, dict[str, int]] = {
    **{op: {"FusedMatMul": 2, "Gemm": 4, "FusedGemm": 4, "MultiHeadAttention": 1} for op in _ATTENTION_OPS},
    "SkipLayerNormalization": {"LayerNormalization": 1},
    "SkipSimplifiedLayerNormalization": {"SimplifiedLayerNormalization": 1, "RMSNormalization": 1},
    "BiasGelu": {"Gelu": 1, "Gemm": 1, "FusedGemm": 1},
    "FastGelu": {"Gelu": 1, "Gemm": 1, "FusedGemm": 1},
    "GemmFastGelu": {"Gemm": 1, "FastGelu": 1, "Gelu": 1},
}

# A fused type onnxopt keeps out on purpose -> the operators each of its nodes stays as, and why.
DECLINED: dict[str, tuple[tuple[str, ...], str]] = {
    "SkipLayerNormalization": (("Sum", "LayerNormalization"),
                               "its CPU kernel is the slower"),
    "BiasGelu": (("Gelu",), "Gelu beside its Add is the faster on CPU; a bias of zeros is gone"),
}

# Runtime-graph node types of OpenVINO's CPU plugin that are no fusion: graph ends, constants, layout
# and precision conversions, and single ONNX operators under the plugin's own names.
_OPENVINO_PLAIN = frozenset({"Input", "Output", "Const", "Reorder", "Convert", "Convolution", "Deconvolution",
                             "Pooling", "Eltwise", "Concatenation", "Broadcast", "Reduce", "ShapeOf",
                             "StridedSlice", "Select", "Interpolate"})

# The domain under which the OpenVINO census counts nodes that compute on shapes only (their inputs come
# from ShapeOf and constants): a Subgraph of shape arithmetic that folding removed is no lost fusion.
SHAPE_ONLY = "shape-only"

NCHWC_DOMAIN = "com.microsoft.nchwc"
_NCHWC_LAYOUT_CONVERSIONS = frozenset({"ReorderInput", "ReorderOutput"})

ModelSource = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class RuntimeGraph:
    """What an engine made of one model: node counts per (domain, operator type), or why it failed."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def nodes(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class CensusRow:
    """One fused operator type: how often the engine's graph holds it without and with onnxopt."""

    domain: str
    op_type: str
    original: int | None
    ours: int | None
    absorbed_by: tuple[str, ...] = ()  # gained fused types that can account for a drop of this one
    declined: str | None = None  # why onnxopt kept this fusion out, where the unfused operators account for the drop
    fewer_to_convert: bool = False  # a layout type's drop with no more of the operator left unconverted

    @property
    def label(self) -> str:
        return self.op_type if self.domain in _STANDARD_DOMAINS else f"{self.domain}.{self.op_type}"

    @property
    def change(self) -> int | None:
        if self.original is None or self.ours is None:
            return None
        return self.ours - self.original

    @property
    def absorbed(self) -> bool:
        """Whether the drop of this type can be the work of larger fusions that gained nodes."""
        return self.change is not None and self.change < 0 and bool(self.absorbed_by)

    @property
    def regression(self) -> bool:
        return (self.change is not None and self.change < 0 and not self.absorbed_by and not self.declined
                and not self.fewer_to_convert)

    def to_dict(self) -> dict:
        return {"domain": self.domain, "op_type": self.op_type, "original": self.original, "ours": self.ours,
                "change": self.change, "regression": self.regression, "absorbed_by": list(self.absorbed_by),
                "declined": self.declined, "fewer_to_convert": self.fewer_to_convert}


@dataclass(frozen=True)
class Census:
    """Fused operators in the engine's graphs of the original and of the optimized model."""

    target: str
    original: RuntimeGraph
    ours: RuntimeGraph
    rows: tuple[CensusRow, ...]

    @classmethod
    def compare(cls, original: RuntimeGraph, ours: RuntimeGraph, target: str = "ort") -> Census:
        """The census of two engine graphs already counted (``runtime_graph``)."""
        return cls(target, original, ours, _rows(original, ours, target))

    @property
    def regressions(self) -> list[CensusRow]:
        """Fused types the engine found fewer of after onnxopt (see the module docstring for caveats)."""
        return [row for row in self.rows if row.regression]

    def fused_total(self, side: str) -> int | None:
        """How many fused nodes the engine's graph of ``side`` ("original" or "ours") holds."""
        graph: RuntimeGraph = getattr(self, side)
        if not graph.ok:
            return None
        return sum(getattr(row, side) or 0 for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "original": {"nodes": self.original.nodes if self.original.ok else None, "error": self.original.error,
                         "fused": self.fused_total("original")},
            "ours": {"nodes": self.ours.nodes if self.ours.ok else None, "error": self.ours.error,
                     "fused": self.fused_total("ours")},
            "rows": [row.to_dict() for row in self.rows],
            "regressions": [row.label for row in self.regressions],
        }

    def table(self):
        """The census as a ``rich`` table; regressions are marked and coloured."""
        from rich.table import Table

        table = Table(title=f"fused operators after {_ENGINE_NAMES[self.target]}'s own optimization")
        table.add_column("fused op type")
        table.add_column("original", justify="right")
        table.add_column("ours", justify="right")
        table.add_column("change", justify="right")
        for row in self.rows:
            change = "" if row.change is None else f"{row.change:+d}" if row.change else "0"
            if row.regression:
                change, style = f"{change} (regression)", "red"
            elif row.absorbed:
                into = ", ".join(label.rsplit(".", 1)[-1] for label in row.absorbed_by)
                change, style = f"{change} (into {into})", "dim"
            elif row.declined and (row.change or 0) < 0:
                change, style = f"{change} (declined: {row.declined})", "dim"
            elif row.fewer_to_convert and (row.change or 0) < 0:
                change, style = f"{change} (fewer to convert)", "dim"
            else:
                style = "green" if (row.change or 0) > 0 else None
            table.add_row(row.label, _cell(row.original), _cell(row.ours), change, style=style)
        table.add_row("all fused nodes", _cell(self.fused_total("original")), _cell(self.fused_total("ours")),
                      _difference(self.fused_total("original"), self.fused_total("ours")), end_section=True)
        table.add_row("all nodes", _cell(self.original.nodes if self.original.ok else None),
                      _cell(self.ours.nodes if self.ours.ok else None),
                      _difference(self.original.nodes if self.original.ok else None,
                                  self.ours.nodes if self.ours.ok else None))
        for side, graph in (("original", self.original), ("ours", self.ours)):
            if not graph.ok:
                table.add_row(f"{side}: not loaded", "", "", "", style="yellow")
                table.caption = f"{table.caption + '; ' if table.caption else ''}{side}: {graph.error}"
        return table

    def __rich__(self):
        return self.table()


_ENGINE_NAMES = {"ort": "onnxruntime", "openvino": "OpenVINO"}


def _cell(count: int | None) -> str:
    return "-" if count is None else str(count)


def _difference(before: int | None, after: int | None) -> str:
    return "" if before is None or after is None else f"{after - before:+d}"


def fusion_census(original: ModelSource, optimized: ModelSource, target: str = "ort") -> Census:
    """Lets ``target``'s optimizer compile both models and compares the fused operators it ends up with.

    ``original`` and ``optimized`` are ModelProtos or paths (models with external data included; a
    ModelProto over protobuf's limit is saved to a temporary folder with external data). A model the
    engine cannot load is reported in its side's ``error``, never raised.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown census target '{target}' (targets: {', '.join(TARGETS)})")
    return Census.compare(runtime_graph(original, target), runtime_graph(optimized, target), target)


def runtime_graph(model: ModelSource, target: str = "ort") -> RuntimeGraph:
    """The node counts of ``target``'s optimized graph of ``model``, or the reason it could not be made."""
    if target not in TARGETS:
        raise ValueError(f"unknown census target '{target}' (targets: {', '.join(TARGETS)})")
    with tempfile.TemporaryDirectory(prefix="onnxopt-census-") as scratch:
        try:
            path = _as_path(model, Path(scratch))
            counts = _ort_counts(path, Path(scratch)) if target == "ort" else _openvino_counts(path)
        except Exception as error:  # noqa: BLE001 - any engine failure is the census' answer, not a crash
            return RuntimeGraph(error=_one_line(error))
    return RuntimeGraph(counts=dict(counts))


def _as_path(model: ModelSource, scratch: Path) -> Path:
    if isinstance(model, onnx.ModelProto):
        path = scratch / "model.onnx"
        ir.save_model(model, path)
        return path
    return Path(model)


def _ort_counts(path: Path, scratch: Path) -> Counter:
    import onnxruntime as ort

    optimized = scratch / "ort_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    # Weights go to a side file, so that models over 2 GiB can be written and the graph read without them.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{optimized.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the NCHWc warning about serializing a hardware-specific graph
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized), load_external_data=False)
    return Counter((node.domain or "", node.op_type) for node in _all_nodes(graph.graph))


def _openvino_counts(path: Path) -> Counter:
    try:
        import openvino
    except ImportError:
        raise RuntimeError("openvino is not installed (pip install 'onnxopt[openvino]')") from None
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": "1"})
    counts: Counter = Counter()
    reads_data: dict[str, bool] = {}  # op name -> whether its result depends on the inputs' values
    for op in compiled.get_runtime_model().get_ordered_ops():
        layer_type = op.get_rt_info()["layerType"].astype(str)
        if layer_type in ("ShapeOf", "Const"):
            data = False
        else:
            data = layer_type == "Input" or any(
                reads_data.get(port.get_source_output().get_node().get_name(), True) for port in op.inputs())
        reads_data[op.get_name()] = data
        counts[("" if data else SHAPE_ONLY, layer_type)] += 1
    return counts


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(body)


def is_fused(domain: str, op_type: str, target: str = "ort") -> bool:
    """Whether a node of the engine's graph can only come from a fusion (see the module docstring)."""
    if target == "openvino":
        return domain != SHAPE_ONLY and op_type not in _OPENVINO_PLAIN and not onnx.defs.has(op_type)
    if domain == NCHWC_DOMAIN and op_type in _NCHWC_LAYOUT_CONVERSIONS:
        return False
    return domain not in _STANDARD_DOMAINS or op_type in FUSED_STANDARD_OPS


def _rows(before: RuntimeGraph, after: RuntimeGraph, target: str) -> tuple[CensusRow, ...]:
    keys = {key for key in (*before.counts, *after.counts) if is_fused(*key, target)}

    def count(graph: RuntimeGraph, key: tuple[str, str]) -> int | None:
        return graph.counts.get(key, 0) if graph.ok else None

    rows = [CensusRow(*key, count(before, key), count(after, key)) for key in keys]
    rows = [_with_absorbers(row, rows) for row in rows]
    rows = [_with_declined(row, before, after) for row in rows]
    rows = [_with_fewer_to_convert(row, before, after) for row in rows]
    # Standard operators first, then each domain's, alphabetically: the order a reader scans a table in.
    return tuple(sorted(rows, key=lambda row: (row.domain not in _STANDARD_DOMAINS, row.domain, row.op_type)))


def _with_absorbers(row: CensusRow, rows: list[CensusRow]) -> CensusRow:
    """The row, with the gained fused types that can take in its drop (all of them or none)."""
    if row.change is None or row.change >= 0:
        return row
    capacity, absorbers = 0, []
    for other in rows:
        per_node = ABSORBERS.get(other.op_type, {}).get(row.op_type, 0)
        if per_node and (other.change or 0) > 0:
            capacity += per_node * other.change
            absorbers.append(other.label)
    if capacity < -row.change:
        return row
    return CensusRow(row.domain, row.op_type, row.original, row.ours, tuple(absorbers))


def _with_declined(row: CensusRow, before: RuntimeGraph, after: RuntimeGraph) -> CensusRow:
    """The row, marked declined where its drop is matched by gains of every operator it stays as."""
    if row.change is None or row.change >= 0 or row.absorbed_by or row.op_type not in DECLINED:
        return row
    unfused, reason = DECLINED[row.op_type]

    def gained(op_type: str) -> int:
        return sum(n for (_, op), n in after.counts.items() if op == op_type) - \
            sum(n for (_, op), n in before.counts.items() if op == op_type)

    if any(gained(op_type) < -row.change for op_type in unfused):
        return row
    return replace(row, declined=reason)


def _with_fewer_to_convert(row: CensusRow, before: RuntimeGraph, after: RuntimeGraph) -> CensusRow:
    """The row, marked where a layout type dropped while no more of its operator stayed in the standard layout."""
    if row.domain != NCHWC_DOMAIN or row.change is None or row.change >= 0 or row.absorbed_by or row.declined:
        return row
    standard = [(domain, row.op_type) for domain in _STANDARD_DOMAINS]
    left_unconverted = sum(after.counts.get(key, 0) - before.counts.get(key, 0) for key in standard)
    return row if left_unconverted > 0 else replace(row, fewer_to_convert=True)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
