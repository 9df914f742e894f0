"""Shape and dtype inference for the in-memory graph.

Passes that read shapes (``fold``'s shape folding, fusions that need ranks) call ``infer_shapes`` first.
Two engines run, and each value of one is checked against the other:

- onnxruntime's symbolic shape inference keeps dimension symbols consistent across the graph (the batch
  of a MatMul's output is the batch of its input, a Concat of caches has ``past_sequence + sequence``
  rows), which is what lets ``fold`` turn the dynamic Reshapes of a transformer into constant ones. But it
  is no implementation of the specification: it guesses operator parameters it cannot see (Squeeze axes,
  Slice axes and steps, Split sizes fed at run time), assumes that dynamic dimensions are never 1 and
  long enough for every Slice, and gets some operators wrong (Split with ``num_outputs`` into uneven
  chunks, Slice ends it does not clamp, strided SAME padding beside a dynamic dimension).
- onnx's own inference (with data propagation) follows the specification, but invents a fresh symbol
  (``unk__N``) wherever it loses track, so equal dynamic dimensions rarely share a name.

A node's symbolic result is trusted unless one of its inputs is not, it is one of the cases above
(``_symbolic_guess``), or it contradicts onnx's: a rank or a static dimension that differs, a static
dimension where onnx has a named symbol, or a symbol onnx proves to be two different numbers. A trusted
value takes onnx's static dimensions and the symbolic engine's for the rest (its symbols included); an
untrusted one takes onnx's result alone.

Both engines depart from the specification for pools with ``ceil_mode`` (the specification drops a last
window that would start in the end padding) and for ConvTranspose with SAME padding and
``output_padding``: there the size is computed here, and a value that disagrees with it, with everything
computed from it, is left without a shape. So is every value of a pool, ConvTranspose or Slice whose size
onnxruntime computes otherwise than the specification (a dilated pool with SAME padding, a Slice with a
negative step to INT64_MAX): a shape that holds for one runtime and not for another is no shape to fold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir

log = logging.getLogger("onnxopt")

__all__ = ["TensorType", "infer_shapes", "inferred_types"]

Dim = int | str | None
Shape = tuple[Dim, ...] | None


@dataclass(frozen=True)
class TensorType:
    """What inference says of a tensor: its element type (an ``onnx.TensorProto`` number, 0 when unknown)
    and its shape (``None`` when even the rank is unknown; a dimension is a number, a symbol or ``None``)."""

    elem_type: int
    shape: Shape


def infer_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None) -> None:
    """Fills in dtypes and shapes of the main graph's intermediate tensors.

    Inference runs on a copy of the graph without large weights (shapes rarely depend on them), so it
    stays cheap on huge models; an unchanged graph is not inferred twice. Graph inputs and outputs keep
    their declared types; every other value a node computes gets what inference says, "unknown" included
    (a shape from an earlier run may be one no longer trusted, or use symbols that now mean something
    else). If onnx's inference fails, the graph stays as it was.
    """
    ir.purge_detached(graph)
    ir._detach_constant_protos(graph)
    types = inferred_types(_light_model(graph, template))
    if types is None:
        return
    protected = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    for name, tensor in graph.tensors().items():
        if id(tensor) in protected or not isinstance(tensor, gs.Variable) or name not in types:
            continue
        inferred = types[name]
        if inferred.elem_type:
            tensor.dtype = (
                inferred.elem_type
                if inferred.elem_type in ir._NON_NUMPY
                else onnx.helper.tensor_dtype_to_np_dtype(inferred.elem_type)
            )
        tensor.shape = None if inferred.shape is None else list(inferred.shape)


def _light_model(graph: gs.Graph, template: onnx.ModelProto | None) -> onnx.ModelProto:
    """The graph as a model without large weights and without value_info inference can recompute.

    Large weights become graph inputs of the same type: both engines still know their shapes, and neither
    copies or reads their data. The value_info of values computed by standard operators is dropped, so
    that onnx's inference checks the symbolic engine independently rather than repeating what an earlier
    run wrote; that of custom operators' outputs stays (onnx cannot infer them).
    """
    light = onnx.ModelProto()
    light.ir_version = max(graph.ir_version or 8, 8) if template is None else max(template.ir_version, 4)
    light.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in ir._graph_opsets(graph).items())
    with ir._weights_stubbed(graph):
        exported = gs.export_onnx(graph, do_type_check=False)
    light.graph.CopyFrom(exported.graph)
    light.functions.extend(exported.functions)
    small = []
    for init in light.graph.initializer:
        if (ir._declared_nbytes(init) or 0) > ir.STUB_THRESHOLD_BYTES:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            small.append(init)
    del light.graph.initializer[:]
    light.graph.initializer.extend(small)
    computed = {name for node in light.graph.node if _is_standard(node) for name in node.output}
    kept = [vi for vi in light.graph.value_info if vi.name not in computed]
    del light.graph.value_info[:]
    light.graph.value_info.extend(kept)
    return light


_CACHE_SIZE = 4
_cache: OrderedDict[bytes, dict[str, TensorType] | None] = OrderedDict()


def inferred_types(model: onnx.ModelProto) -> dict[str, TensorType] | None:
    """The reconciled types of the values computed by ``model``'s main graph, by name; ``None`` if onnx's
    inference fails. The last few results are remembered by the model's content: an optimizer runs
    inference before each pass, often on a graph the previous pass did not change."""
    key = hashlib.sha256(model.SerializeToString(deterministic=True)).digest()
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    # With every input static, onnx's inference alone knows each size it can know; the symbolic engine
    # (and its sympy import, a second or more) would only add symbols for data-dependent sizes, which no
    # pass folds. Nor has it anything to add where onnx's inference gives every value a size that is a
    # number or a symbol of the graph inputs (not one of the ``unk__`` names it makes up), nor where no
    # node reads a size (Shape, Size): what the symbols would tell is then only that two made-up sizes
    # are equal, for which rules that need it stay conservative.
    reference = _onnx_inference(model)
    needs_symbols = (reference is not None and not _inputs_static(model.graph) and _reads_sizes(model.graph)
                     and not _sizes_from_inputs(model.graph, reference))
    types = _reconcile(model.graph, _symbolic_inference(model) if needs_symbols else None, reference)
    _cache[key] = types
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return types


def _sizes_from_inputs(graph: onnx.GraphProto, types: dict[str, TensorType]) -> bool:
    """Whether every value the graph's nodes compute has a known rank, each dimension a number or a symbol
    declared by a graph input or output (outputs keep their declared types)."""
    symbols = {d.dim_param for vi in (*graph.input, *graph.output) if vi.type.HasField("tensor_type")
               for d in vi.type.tensor_type.shape.dim if d.dim_param}
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            found = types.get(name)
            if found is None or found.shape is None:
                return False
            if any(not isinstance(d, int) and d not in symbols for d in found.shape):
                return False
    return True


def _reads_sizes(graph: onnx.GraphProto) -> bool:
    """Whether a node of the graph, or of a subgraph, turns a tensor's size into data (Shape, Size)."""
    for node in graph.node:
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            return True
        for attr in node.attribute:
            if any(_reads_sizes(sub) for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs)):
                return True
    return False


def _inputs_static(graph: onnx.GraphProto) -> bool:
    """Whether every graph input is a tensor whose dimensions are all numbers."""
    for vi in graph.input:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return False
        if any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# The engines


@dataclass(frozen=True)
class SymbolicResult:
    types: dict[str, TensorType]
    values: dict[str, object]  # the contents the engine computed (constants, shape arithmetic), by name


@cache
def _symbolic_shape_inference_class() -> type | None:
    """onnxruntime's ``SymbolicShapeInference``, loaded from its file.

    Importing ``onnxruntime.tools.symbolic_shape_infer`` first runs ``onnxruntime/tools/__init__.py``,
    which imports torch whenever torch is installed (seconds and hundreds of MiB, for a helper of
    PyTorch export); the module itself needs only onnx, numpy and sympy.
    """
    name = "onnxruntime.tools.symbolic_shape_infer"
    try:
        package = importlib.util.find_spec("onnxruntime")
        path = Path(package.origin).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # Without auto_merge the engine warns of every broadcast of two symbols it will not merge, on
        # stderr through logging's last resort: expected here (it then stops and onnx's inference goes on).
        logging.getLogger(name).setLevel(logging.ERROR)
        return module.SymbolicShapeInference
    except Exception as error:  # noqa: BLE001 - without the engine, onnx's inference serves alone
        log.debug("onnxruntime's symbolic shape inference is unavailable: %s", error)
        return None


def _symbolic_inference(model: onnx.ModelProto) -> SymbolicResult | None:
    """onnxruntime's symbolic inference, as far as it gets.

    These are the steps of ``SymbolicShapeInference.infer_shapes``, which on an incomplete run also writes
    a debug model into the current directory. Symbols are never merged on a guess (``auto_merge=False``);
    where a merge would be needed the engine stops, and the values it inferred before stopping are kept.
    """
    engine_class = _symbolic_shape_inference_class()
    if engine_class is None:
        return None
    try:
        engine = _bounded_engine(engine_class)(2**31 - 1, False, False, 0)
        engine._preprocess(model)
        # Slice bounds near the int64 limits overflow in its numpy arithmetic: such results are wrong,
        # and onnx's inference, which contradicts them, takes over.
        with np.errstate(over="ignore"):
            while engine.run_:
                engine._infer_impl()
        return SymbolicResult(_types(engine.out_mp_.graph.value_info), dict(engine.sympy_data_))
    except Exception as error:  # noqa: BLE001 - inference is best effort by contract
        log.debug("symbolic shape inference failed: %s", error)
        return None


# A dimension the symbolic engine writes longer than this becomes a fresh symbol. Sizes of deep CNNs with
# dynamic height and width nest a floor per stride (torchvision's Faster R-CNN: 700 characters by its
# region proposals), and sympy's simplification of such sizes took 10 s per Slice there (500 s for the
# model); transformers' sizes are under 60 characters.
MAX_SYMBOLIC_DIM_CHARS = 100


@cache
def _bounded_engine(engine_class: type) -> type:
    """The symbolic engine, knowing that ``d`` broadcast with ``Min(c, d)`` (a whole number ``c >= 1``) is ``d``,
    and naming a dimension whose expression grows past ``MAX_SYMBOLIC_DIM_CHARS`` with a fresh symbol (unknown,
    as onnx's inference leaves it) so that no later node's sympy work grows with it.

    Exporters slice position tables to the sequence length, which gives ``Min(32, S)``; the engine cannot
    broadcast that with ``S`` and stops, leaving every later shape unknown. In any run that does not fail
    the sizes are equal or one is 1, and ``Min(c, d) = 1`` implies ``d = 1`` unless ``c = 1``, when
    ``Min(c, d)`` is 1 for every ``d``: the result is always ``d``.
    """

    class BoundedEngine(engine_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for op_type, infer in list(self.dispatcher_.items()):
                self.dispatcher_[op_type] = self._bounded(infer)

        def _bounded(self, infer):
            def bounded_infer(node):
                infer(node)
                self._rename_long_dims(node)
            return bounded_infer

        def _rename_long_dims(self, node):
            for index, name in enumerate(node.output):
                value_info = self.known_vi_.get(name) if name else None
                if value_info is None or not value_info.type.HasField("tensor_type"):
                    continue
                for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
                    if len(dim.dim_param) > MAX_SYMBOLIC_DIM_CHARS:
                        dim.dim_param = str(self._new_symbolic_dim_from_output(node, index, axis))

        def _onnx_infer_single_node(self, node):
            # The engine leaves element-wise broadcasts to onnx's inference, which knows no Min(c, d).
            super()._onnx_infer_single_node(node)
            if node.op_type in _BROADCASTING and _is_standard(node) and len(node.output) == 1 and node.output[0]:
                self._fill_broadcast_dims(node)
            self._rename_long_dims(node)

        def _fill_broadcast_dims(self, node):
            value_info = self.known_vi_.get(node.output[0])
            if value_info is None or not value_info.type.tensor_type.HasField("shape"):
                return
            inferred = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in value_info.type.tensor_type.shape.dim]
            unknown = [d is None or self._is_none_dim(d) for d in inferred]
            shapes = [self._try_get_shape(node, i) for i in range(len(node.input)) if node.input[i]]
            if not any(unknown) or not shapes or any(shape is None for shape in shapes):
                return
            broadcast = shapes[0]
            for shape in shapes[1:]:
                broadcast = self._broadcast_shapes(broadcast, shape)
            if len(broadcast) != len(inferred):
                return
            filled = [b if missing and b is not None else d for d, b, missing in zip(inferred, broadcast, unknown)]
            value_info.CopyFrom(onnx.helper.make_tensor_value_info(
                value_info.name, value_info.type.tensor_type.elem_type, filled))

        def _broadcast_shapes(self, shape1, shape2):
            rank = max(len(shape1), len(shape2))
            padded1 = [1] * (rank - len(shape1)) + list(shape1)
            padded2 = [1] * (rank - len(shape2)) + list(shape2)
            for axis, (dim1, dim2) in enumerate(zip(padded1, padded2)):
                if _is_bounded_copy(dim2, dim1):
                    padded2[axis] = dim1
                elif _is_bounded_copy(dim1, dim2):
                    padded1[axis] = dim2
            return super()._broadcast_shapes(padded1, padded2)

    return BoundedEngine


# Operators whose output shape is the multidirectional broadcast of all their inputs' shapes.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Sum", "Max", "Min", "Mean", "And", "Or", "Xor",
                 "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "BitShift", "BitwiseAnd", "BitwiseOr",
                 "BitwiseXor"}


def _is_bounded_copy(dim, other) -> bool:
    """Whether the symbolic dimension ``dim`` is ``Min(c, other)`` for a whole number ``c >= 1``."""
    if not isinstance(dim, str) or not isinstance(other, str) or not other:
        return False
    match = re.fullmatch(r"Min\((\d+), (.+)\)|Min\((.+), (\d+)\)", dim)
    if match is None:
        return False
    bound, inner = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
    return inner == other and int(bound) >= 1


def _onnx_inference(model: onnx.ModelProto) -> dict[str, TensorType] | None:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 - inference is best effort by contract
        log.debug("shape inference failed: %s", error)
        return None
    return _types([*inferred.graph.value_info, *inferred.graph.output])


def _types(value_infos) -> dict[str, TensorType]:
    types = {}
    for vi in value_infos:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = _tensor_type(vi.type.tensor_type)
    return types


def _tensor_type(tensor_type: onnx.TypeProto.Tensor) -> TensorType:
    if not tensor_type.HasField("shape"):
        return TensorType(tensor_type.elem_type, None)
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    return TensorType(tensor_type.elem_type, shape)


# ---------------------------------------------------------------------------------------------------------
# Reconciling the engines


def _reconcile(
    graph: onnx.GraphProto, symbolic: SymbolicResult | None, reference: dict[str, TensorType] | None
) -> dict[str, TensorType] | None:
    """The type of every value the main graph's nodes compute, walking the nodes in order (see the module
    docstring for the rules)."""
    if reference is None:
        return None
    walk = _Walk(graph, symbolic or SymbolicResult({}, {}), reference)
    for node in graph.node:
        walk.visit(node)
    return {name: walk.types[name] for name in walk.computed if name in walk.types}


class _Walk:
    """The state of ``_reconcile``: what is decided so far, and which values are untrusted or unknown."""

    def __init__(self, graph: onnx.GraphProto, symbolic: SymbolicResult, reference: dict[str, TensorType]):
        self.symbolic, self.reference = symbolic, reference
        self.types: dict[str, TensorType] = {}  # graph inputs, weights and what is decided so far
        self.computed: list[str] = []
        self.initializers = {init.name: init for init in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and _is_standard(n)}
        for vi in graph.input:
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = _tensor_type(vi.type.tensor_type)
        for init in graph.initializer:
            self.types[init.name] = TensorType(init.data_type, tuple(init.dims))
        # Symbols of the graph inputs stand for any size: never a number.
        self.free_symbols = {d for t in self.types.values() for d in (t.shape or ()) if isinstance(d, str)}
        self.bindings: dict[str, int] = {}  # symbolic engine's symbol -> the number onnx proves it is
        self.untrusted: set[str] = set()
        self.unknown: set[str] = set()  # both engines may be wrong: no shape

    def visit(self, node: onnx.NodeProto) -> None:
        outputs = [name for name in node.output if name]
        self.computed.extend(outputs)
        read = set(_reads(node))
        if read & self.unknown:
            self._leave_unknown(outputs)
            return
        reason = "an input is untrusted" if read & self.untrusted else _symbolic_guess(node, self)
        reason = reason or self._contradiction(outputs)
        if reason:
            log.debug("shape inference: %s '%s': onnx's result only (%s)", node.op_type, node.name, reason)
            self.untrusted.update(outputs)
        for name in outputs:
            # Every computed value gets a type, if only "unknown": one it held from an earlier run may use
            # symbols that now mean something else.
            self.types[name] = self._merge(name, trusted=not reason) or TensorType(0, None)
        departure = _runtime_departure(node, self)
        if departure:
            log.debug("shape inference: %s '%s': no shape (%s)", node.op_type, node.name, departure)
            self._leave_unknown(outputs)

    def shape(self, name: str) -> Shape:
        return self.types[name].shape if name in self.types else None

    def known_value(self, name: str) -> bool:
        """Whether the value's content is known before running (a constant, or shape arithmetic)."""
        return name in self.initializers or name in self.symbolic.values

    def integers(self, name: str) -> list[int] | None:
        """The elements of a small integer value known before running; None if not known."""
        if name in self.initializers:
            array = onnx.numpy_helper.to_array(self.initializers[name])
        elif name in self.constant_nodes:
            array = _constant_node_value(self.constant_nodes[name])
        else:
            array = self.symbolic.values.get(name)
        try:
            return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]
        except (TypeError, ValueError):  # symbols
            return None

    def _leave_unknown(self, outputs: list[str]) -> None:
        self.unknown.update(outputs)
        for name in outputs:
            found = self.reference.get(name) or self.symbolic.types.get(name)
            self.types[name] = TensorType(found.elem_type if found else 0, None)

    def _merge(self, name: str, trusted: bool) -> TensorType | None:
        symbolic, reference = self.symbolic.types.get(name), self.reference.get(name)
        if not trusted:
            # No shape rather than none said: the value may hold one from before that is no more trusted.
            return reference or TensorType(symbolic.elem_type if symbolic else 0, None)
        if symbolic is None:
            return reference
        if reference is None:
            return symbolic
        elem_type = reference.elem_type or symbolic.elem_type
        if symbolic.shape is None or reference.shape is None:
            return TensorType(elem_type, symbolic.shape if reference.shape is None else reference.shape)
        dims = tuple(r if isinstance(r, int) or s is None else s for s, r in zip(symbolic.shape, reference.shape))
        return TensorType(elem_type, dims)

    def _named(self, dim: Dim) -> bool:
        """Whether onnx's symbol is one of the graph's rather than one it made up (``unk__N``) for a size
        it does not know."""
        return isinstance(dim, str) and (dim in self.free_symbols or not dim.startswith("unk__"))

    def _contradiction(self, outputs: list[str]) -> str | None:
        """Why the symbolic engine's result for these outputs cannot be right, if onnx's shows it."""
        for name in outputs:
            symbolic, reference = self.symbolic.types.get(name), self.reference.get(name)
            if symbolic is None or symbolic.shape is None:
                continue
            if any(isinstance(s, int) and s < 0 for s in symbolic.shape):
                return f"negative size for {name}"
            if reference is None or reference.shape is None:
                continue
            if len(symbolic.shape) != len(reference.shape):
                return f"rank of {name}: {len(symbolic.shape)}, onnx {len(reference.shape)}"
            for s, r in zip(symbolic.shape, reference.shape):
                if isinstance(s, int) and (isinstance(r, int) or self._named(r)) and s != r:
                    return f"{name}: {list(symbolic.shape)}, onnx {list(reference.shape)}"
                proven = isinstance(s, str) and isinstance(r, int)
                if proven and (s in self.free_symbols or self.bindings.setdefault(s, r) != r):
                    return f"{name}: symbol {s} is {r} for onnx"
        return None


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every value a node reads, those its subgraphs read from enclosing scopes included."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
            for inner in sub.node:
                yield from _reads(inner)


def _constant_node_value(node: onnx.NodeProto):
    value = onnx.helper.get_attribute_value(node.attribute[0]) if node.attribute else None
    if isinstance(value, onnx.SparseTensorProto):
        return None
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _attributes(node: onnx.NodeProto) -> dict:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}


def _static(shape: Shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


# ---------------------------------------------------------------------------------------------------------
# Where the symbolic engine guesses

# Inputs whose values (not only shapes) decide the output's shape.
_SHAPE_PARAMETERS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Slice": (1, 2, 3, 4),
    "Split": (1,),
    "SplitToSequence": (1,),
    "Pad": (1, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "OneHot": (1,),
    "CenterCropPad": (1,),
    "Col2Im": (1, 2),
    "MaxUnpool": (2,),
    "STFT": (1, 3),
    "DFT": (1, 2),
    "MelWeightMatrix": (0, 1),
    "HannWindow": (0,),
    "HammingWindow": (0,),
    "BlackmanWindow": (0,),
    "AffineGrid": (1,),
    "Compress": (1,),
    "NonZero": (0,),
    "Unique": (0,),
    "NonMaxSuppression": (0, 1, 2, 3, 4),
    **{
        op: (1,)
        for op in (
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        )
    },
}
_SAME_PADDING = {"SAME_UPPER", "SAME_LOWER"}
_WINDOWED = {"Conv", "ConvInteger", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "QLinearConv"}
_POOLS = {"MaxPool", "AveragePool", "LpPool"}


def _symbolic_guess(node: onnx.NodeProto, walk: _Walk) -> str | None:
    """Why the symbolic engine's result for ``node`` may be a guess, even where onnx cannot tell."""
    if not _is_standard(node):
        return None
    op = node.op_type
    for index in _SHAPE_PARAMETERS.get(op, ()):
        if index < len(node.input) and node.input[index] and not walk.known_value(node.input[index]):
            return f"input {index} is not known before running"
    if op not in _WINDOWED and op not in ("Squeeze", "Split", "Slice"):
        return None
    attributes = _attributes(node)
    data = walk.shape(node.input[0]) if node.input and node.input[0] else None
    if op == "Squeeze" and len(node.input) < 2 and "axes" not in attributes and not _static(data):
        return "Squeeze without axes of a dynamic dimension, which may be 1"
    if op == "Split" and "num_outputs" in attributes and not _split_axis_static(data, attributes.get("axis", 0)):
        return "Split into num_outputs chunks of a dynamic size, the last one smaller"
    if op == "Slice" and _static_from_dynamic(walk.symbolic.types.get(node.output[0]), data):
        return "Slice of a dynamic dimension to a static size, which a short input does not have"
    spatial_dynamic = data is not None and not _static(data[2:])
    if op in _WINDOWED and spatial_dynamic:
        if attributes.get("auto_pad") in _SAME_PADDING and any(s > 1 for s in attributes.get("strides", ())):
            return "strided SAME padding of a dynamic dimension"
        if op in _POOLS and attributes.get("ceil_mode"):
            return "ceil_mode pool of a dynamic dimension"
    return None


def _split_axis_static(data: Shape, axis: int) -> bool:
    """Whether the dimension a Split divides is a number (the other dimensions pass through unchanged)."""
    if data is None or not -len(data) <= axis < len(data):
        return False
    return isinstance(data[axis], int)


def _static_from_dynamic(result: TensorType | None, data: Shape) -> bool:
    """Whether ``result`` has a static dimension where ``data`` has a dynamic one, at the same position."""
    if result is None or result.shape is None or data is None or len(result.shape) != len(data):
        return False
    return any(isinstance(r, int) and not isinstance(d, int) for r, d in zip(result.shape, data))


# ---------------------------------------------------------------------------------------------------------
# Where the engines, onnxruntime and the specification part ways


@dataclass(frozen=True)
class _Window:
    """The sliding-window attributes of a pool or ConvTranspose, one entry per spatial axis."""

    kernel: list[int | None]
    strides: list[int]
    dilations: list[int]
    begins: list[int]
    ends: list[int]
    auto_pad: str
    output_padding: list[int]

    @staticmethod
    def of(attributes: dict, rank: int, weight: Shape = None) -> _Window:
        kernel = attributes.get("kernel_shape") or (list(weight[2:]) if weight is not None else [None] * rank)
        pads = list(attributes.get("pads", [0] * (2 * rank)))
        return _Window(
            kernel=[k if isinstance(k, int) else None for k in kernel],
            strides=list(attributes.get("strides", [1] * rank)),
            dilations=list(attributes.get("dilations", [1] * rank)),
            begins=pads[:rank],
            ends=pads[rank:],
            auto_pad=attributes.get("auto_pad", "NOTSET"),
            output_padding=list(attributes.get("output_padding", [0] * rank)),
        )

    def extent(self, axis: int) -> int | None:
        kernel = self.kernel[axis]
        return None if kernel is None else (kernel - 1) * self.dilations[axis] + 1


def _runtime_departure(node: onnx.NodeProto, walk: _Walk) -> str | None:
    """Why no shape decided for ``node``'s outputs can be trusted, where both engines get an operator wrong
    or onnxruntime computes otherwise than the specification; ``None`` if the shape can be trusted."""
    if not _is_standard(node) or not node.output:
        return None
    if node.op_type == "Slice":
        return _slice_departure(node, walk)
    if node.op_type in ("ConvTranspose", *_POOLS):
        return _window_departure(node, walk)
    return None


_INT_MAXIMA = {np.iinfo(np.int32).max, np.iinfo(np.int64).max}


def _slice_departure(node: onnx.NodeProto, walk: _Walk) -> str | None:
    """onnxruntime reads an end of INT32_MAX or INT64_MAX with a negative step as "through the first
    element", where the specification clamps it to the last element."""
    if len(node.input) < 3:
        return None  # before opset 10: no steps
    steps = walk.integers(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if steps is not None and all(step > 0 for step in steps):
        return None
    ends = walk.integers(node.input[2])
    if steps is None or ends is None:
        return "a Slice with a step that may be negative, and ends that may be INT_MAX"
    if any(end in _INT_MAXIMA and step < 0 for end, step in zip(ends, steps)):
        return "a Slice with a negative step to INT_MAX, which onnxruntime reads as through the first element"
    return None


def _window_departure(node: onnx.NodeProto, walk: _Walk) -> str | None:
    """Why the shape decided for a pool's or ConvTranspose's output cannot be trusted; ``None`` if it can.

    Neither engine drops the last window of a ``ceil_mode`` pool when it would start in the end padding,
    and both add ``output_padding`` to a ConvTranspose with SAME padding, where the specification and
    onnxruntime agree on other sizes: those are checked. Where onnxruntime itself departs from the
    specification (``_implementations_disagree``), no size can be trusted.
    """
    data, result = walk.shape(node.input[0]), walk.shape(node.output[0])
    if data is None or len(data) < 3:
        return None
    weight = walk.shape(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
    attributes = _attributes(node)
    window = _Window.of(attributes, len(data) - 2, weight)
    disagreement = _implementations_disagree(node.op_type, attributes, window)
    if disagreement or result is None or len(result) != len(data):
        return disagreement
    if node.op_type == "ConvTranspose":
        expected = _conv_transpose_sizes(data[2:], window, attributes.get("output_shape"))
    elif attributes.get("ceil_mode"):
        expected = _ceil_pool_sizes(data[2:], window)
    else:
        return None
    for want, got in zip(expected, result[2:]):
        if want is not None and isinstance(got, int) and got != want:
            return f"{node.output[0]}: {list(result)}, but the size is {want} where it says {got}"
    return None


def _implementations_disagree(op: str, attributes: dict, window: _Window) -> str | None:
    """Why onnxruntime's output size departs from the specification's for some input sizes, if it does."""
    same = window.auto_pad in _SAME_PADDING
    if op in _POOLS and same and any(d > 1 for d in window.dilations):
        return "onnxruntime pads a dilated pool for SAME as if its window were not dilated"
    if op in _POOLS and attributes.get("ceil_mode") and window.auto_pad == "VALID":
        return "with ceil_mode and VALID padding onnxruntime counts windows as without padding, not as specified"
    if op == "ConvTranspose" and same and "output_shape" not in attributes:
        for axis, stride in enumerate(window.strides):
            extent = window.extent(axis)
            if extent is None or window.output_padding[axis] + extent < stride:
                return "onnxruntime does not pad a ConvTranspose with SAME padding out to input size times stride"
    return None


def _ceil_pool_sizes(sizes: tuple[Dim, ...], window: _Window) -> list[int | None]:
    """Output sizes of a pool with ``ceil_mode=1`` (None where the input size is not static).

    Windows are counted rounding up, but a last window that would start in the end padding is dropped
    (the specification, onnxruntime and the reference implementation agree); with SAME padding there
    are ceil(size / stride).
    """
    result: list[int | None] = []
    for axis, size in enumerate(sizes):
        stride = window.strides[axis]
        if not isinstance(size, int):
            result.append(None)
        elif window.auto_pad in _SAME_PADDING:
            result.append(math.ceil(size / stride))
        else:
            begin = window.begins[axis]
            count = math.ceil((size + begin + window.ends[axis] - window.extent(axis)) / stride) + 1
            result.append(count - 1 if (count - 1) * stride >= size + begin else count)
    return result


def _conv_transpose_sizes(sizes: tuple[Dim, ...], window: _Window, output_shape: list | None) -> list[int | None]:
    """Output sizes of a ConvTranspose (None where unknown): ``output_shape`` if given; with SAME padding
    the input size times the stride, ``output_padding`` only moving the padding; otherwise
    ``stride * (size - 1) + output_padding + extent - pads``."""
    if output_shape is not None:
        return list(output_shape)[-len(sizes) :]
    result: list[int | None] = []
    for axis, size in enumerate(sizes):
        stride, extent = window.strides[axis], window.extent(axis)
        if not isinstance(size, int) or extent is None:
            result.append(None)
        elif window.auto_pad in _SAME_PADDING:
            result.append(size * stride)
        else:
            pads = window.begins[axis] + window.ends[axis] if window.auto_pad == "NOTSET" else 0
            result.append(stride * (size - 1) + window.output_padding[axis] + extent - pads)
    return result
