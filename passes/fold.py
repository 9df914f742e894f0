"""``fold``: constant folding.

A node whose inputs are all constant computes the same value on every run, so it is evaluated once and
its outputs become initializers. Evaluation uses onnxruntime (graph optimizations disabled) on one model
holding every foldable node at once, so each operator keeps its exact ONNX semantics; if that batch
fails, nodes are evaluated one by one and the ones onnxruntime cannot run are left alone.

Never folded: operators outside the standard domain, random operators, nodes with subgraphs, sequence and
optional operators, and QuantizeLinear/DequantizeLinear (folding them would turn a quantized model's
int8 weights back into floats).

Shapes: with onnx shape inference, ``Shape`` and ``Size`` of tensors with static dimensions, and the
shape arithmetic after them, fold even when other dimensions are dynamic (see ``fold_shapes``); a
Reshape whose target is computed from its own input's shape gets a constant target that copies the
input's dynamic dimensions, ``allowzero=1`` included (see ``_reshape_with_copied_dims``). A named
dynamic dimension is read from the graph input that declares it (``read_shapes_from_inputs``), so that
``cse`` merges what every layer computes from its own activations' shape. An
``If`` whose condition is constant is replaced by the branch it takes. Folding runs inside subgraph
bodies too, where values captured from enclosing graphs count as constants when they are.

Size guard: a node whose result is over ``max_expansion`` times larger than its inputs (and over
``small_bytes``) stays a node (a ConstantOfShape, Expand or Tile that would write a huge tensor). Then
folding may not grow the constants of the model by more than ``max_growth`` bytes in total: over the
original model's, across every run of the pass.
Growth counts the bytes of new initializers minus the bytes of constants that lose their last reader and
of folded ``Constant`` nodes (whose values only move from an attribute to an initializer).
While the budget is exceeded, the node whose output grows the model most stays a node (for example a
ConstantOfShape that would write a huge tensor, or a Transpose of a weight that another node still reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt import ir
from onnxopt.pass_infra import Pass, PassContext, PassResult
from onnxopt.verify import plain_session_options

NEVER_FOLDED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
    "OptionalHasElement",
}


def _held_bytes(node: gs.Node, values: dict[str, np.ndarray]) -> int:
    """Bytes of constant data a node holds in its attributes (a ``Constant``'s value), gone once it folds."""
    if node.op != "Constant":
        return 0
    return sum(values[t.name].nbytes for t in node.outputs if t.name in values)


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the constants of ``graph`` and its subgraphs, ``Constant`` nodes' values included (as
    ``ir.model_weight_bytes`` counts them in a model)."""
    held = sum(ir.tensor_nbytes(node.attrs["value"]) for sub in ir.all_graphs(graph) for node in sub.nodes
               if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant))
    return ir.graph_stats(graph).bytes + held


def _inferred_nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of a constant, or of a value whose inferred shape is static and dtype known; else ``None``."""
    if isinstance(tensor, gs.Constant):
        return ir.tensor_nbytes(tensor)
    shape = tensor.shape
    if shape is None or tensor.dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    try:
        itemsize = np.dtype(tensor.dtype).itemsize
    except TypeError:
        return None
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _may_fold(node: gs.Node) -> bool:
    return (node.domain in ("", None, "ai.onnx") and node.op not in NEVER_FOLDED
            and not any(True for _ in ir.subgraphs(node)))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), plain_session_options(), providers=["CPUExecutionProvider"])


def _evaluation_model(graph: gs.Graph, nodes: list[gs.Node],
                      feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """A model computing every output of ``nodes``; constant inputs are initializers or ``feeds``."""
    outputs = [t.name for node in nodes for t in node.outputs if t.name]
    produced = set(outputs)
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for tensor in node.inputs:
            if not tensor.name or tensor.name in produced or tensor.name in initializers:
                continue
            if tensor.name in feeds:
                initializers[tensor.name] = onnx.numpy_helper.from_array(feeds[tensor.name], tensor.name)
            elif isinstance(tensor, gs.Constant):
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(tensor)
    exported = [OnnxExporter.export_node(node) for node in nodes]
    model_graph = onnx.helper.make_graph(
        exported, "fold", [], [onnx.ValueInfoProto(name=name) for name in outputs], list(initializers.values())
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in _opsets(graph).items()]
    model = onnx.helper.make_model(model_graph, opset_imports=opsets)
    model.ir_version = max(graph.ir_version or 0, 8)
    return model, outputs


def _opsets(graph: gs.Graph) -> dict[str, int]:
    opsets = {"": graph.opset}
    for opset in graph.import_domains or []:
        if opset.domain in ("", "ai.onnx"):
            opsets[""] = opset.version
    return opsets


def _usable(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufcOU"


def _run_onnxruntime(model: onnx.ModelProto, names: list[str]) -> list:
    return _session(model).run(names, {})


def _run_reference(model: onnx.ModelProto, names: list[str]) -> list:
    with np.errstate(all="ignore"):
        return ReferenceEvaluator(model).run(names, {})


def _evaluate_with(run, graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """Every output of ``nodes`` that ``run`` computes: the whole batch at once, else node by node."""
    try:
        model, names = _evaluation_model(graph, nodes, {})
        values = dict(zip(names, run(model, names)))
        if all(_usable(v) for v in values.values()):
            return values
    except Exception:  # noqa: BLE001 - fall back to node-by-node evaluation below
        pass
    values = {}
    for node in nodes:
        needed = [t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if any(name not in values for name in needed):
            continue
        try:
            model, names = _evaluation_model(graph, [node], {name: values[name] for name in needed})
            results = dict(zip(names, run(model, names)))
        except Exception:  # noqa: BLE001 - a node this evaluator cannot run is judged by the other one
            continue
        if all(_usable(v) for v in results.values()):
            values.update(results)
    return values


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        rtol = 1e-3 if a.dtype.itemsize <= 2 else 1e-5
        scale = float(np.max(np.abs(a[np.isfinite(a)]), initial=1.0))
        return bool(np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True))
    return bool(np.array_equal(a, b))


def evaluate(graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    """Values of the outputs of ``nodes`` (topologically ordered) that can be trusted.

    onnxruntime and onnx's reference evaluator both compute every value. Where both succeed they must
    agree, or the value is not folded: each has operators where it departs from the ONNX specification
    (onnxruntime's align-corners Resize, for example), and two independent implementations rarely
    depart in the same way. The reference value is kept: it is computed closer to the specification
    (onnxruntime's float32 DFT and half-precision Attention are less exact). Where only one can run an
    operator, its value is used.
    """
    by_runtime = _evaluate_with(_run_onnxruntime, graph, nodes)
    by_reference = _evaluate_with(_run_reference, graph, nodes)
    values: dict[str, np.ndarray] = {}
    for name in by_runtime.keys() | by_reference.keys():
        runtime, reference = by_runtime.get(name), by_reference.get(name)
        if runtime is not None and reference is not None:
            if _agree(runtime, reference):
                values[name] = reference
        else:
            values[name] = runtime if runtime is not None else reference
    return values


_INT_ARITHMETIC = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
                   "Div": lambda a, b: a // b if a >= 0 and b > 0 else None}


# Shape vectors have a few elements; a larger constant is a weight or a table, which shape arithmetic never
# reads, and reading it would copy it out of its TensorProto for nothing.
MAX_PARTIAL_ELEMENTS = 1024


@dataclass(frozen=True)
class PartialValue:
    """A small integer or boolean tensor (rank 0 or 1) some of whose elements are known, as shapes often are.

    A ``str`` element is a dimension: a symbol of inferred shapes, never negative.

    The dtype is carried along rather than read from inferred types, which are missing where shape
    inference failed.
    """

    elements: tuple[int | str | None, ...]
    scalar: bool = False
    dtype: np.dtype = np.dtype(np.int64)

    @property
    def known(self) -> bool:
        """All elements are numbers (a ``str`` element is a symbolic dimension, ``None`` unknown)."""
        return all(isinstance(e, int) for e in self.elements)


def _in_range(elements: tuple[int | None, ...], dtype: np.dtype) -> tuple[int | None, ...]:
    """Elements a ``dtype`` tensor can hold; others become unknown.

    Integer Cast and arithmetic wrap around in onnxruntime where Python integers do not, and numpy
    refuses to store an out-of-range value: an element that does not fit is left to the runtime.
    """
    info = np.iinfo(dtype)
    return tuple(e if not isinstance(e, int) or info.min <= e <= info.max else None for e in elements)


def _as_partial(tensor: gs.Tensor, partials: dict[int, PartialValue]) -> PartialValue | None:
    if id(tensor) in partials:
        return partials[id(tensor)]
    value = ir.constant_value(tensor, max_size=MAX_PARTIAL_ELEMENTS)
    if value is None or value.dtype.kind not in "iu" or value.ndim > 1:
        return None
    return PartialValue(tuple(int(v) for v in value.reshape(-1)), scalar=value.ndim == 0, dtype=value.dtype)


def _shape_of(node: gs.Node, shape: list | None = None) -> PartialValue | None:
    """What Shape ``node`` gives: of its input's inferred shape, or of ``shape`` where given."""
    shape = node.inputs[0].shape if shape is None else shape
    if shape is None:
        return None
    dims = [d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d) else None for d in shape]
    rank = len(dims)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return PartialValue(tuple(dims[start:end]))


def _element_pairs(a: PartialValue, b: PartialValue) -> list[tuple] | None:
    """The element pairs an element-wise operator meets: equal lengths, or one side of one element broadcast."""
    if len(a.elements) != len(b.elements) and 1 not in (len(a.elements), len(b.elements)):
        return None
    count = max(len(a.elements), len(b.elements))
    return [(a.elements[0 if len(a.elements) == 1 else i], b.elements[0 if len(b.elements) == 1 else i])
            for i in range(count)]


def _equal(a: PartialValue, b: PartialValue) -> PartialValue | None:
    """Equal of two partial values, element by element where it is decided.

    Numbers compare as numbers, a symbol equals itself, and a dimension never equals a negative number:
    TorchScript's Expand guards compare shapes built from ``Shape`` with -1.
    """
    pairs = _element_pairs(a, b)
    if pairs is None:
        return None
    result = []
    for x, y in pairs:
        if isinstance(x, int) and isinstance(y, int):
            result.append(int(x == y))
        elif isinstance(x, str) and x == y:
            result.append(1)
        elif (isinstance(x, str) and isinstance(y, int) and y < 0) or (isinstance(y, str) and isinstance(x, int)
                                                                       and x < 0):
            result.append(0)
        else:
            result.append(None)
    return PartialValue(tuple(result), scalar=a.scalar and b.scalar, dtype=np.dtype(np.bool_))


def _extremum(op: str, a: PartialValue, b: PartialValue) -> PartialValue | None:
    """Max or Min of two partial values, element by element where it is decided.

    Numbers as numbers; a symbol against itself is itself (tf2onnx takes the Max of two operands' equal
    batch dimensions for Einsum); a dimension, never negative, against a number <= 0 is the dimension for
    Max and the number for Min.
    """
    pairs = _element_pairs(a, b)
    if pairs is None:
        return None
    pick = max if op == "Max" else min
    result: list[int | str | None] = []
    for x, y in pairs:
        if isinstance(x, int) and isinstance(y, int):
            result.append(pick(x, y))
        elif isinstance(x, str) and x == y:
            result.append(x)
        elif isinstance(x, str) and isinstance(y, int) and y <= 0:
            result.append(x if op == "Max" else y)
        elif isinstance(y, str) and isinstance(x, int) and x <= 0:
            result.append(y if op == "Max" else x)
        else:
            result.append(None)
    return PartialValue(tuple(result), scalar=a.scalar and b.scalar, dtype=a.dtype)


def _unsqueeze_axis_count(node: gs.Node) -> int | None:
    """How many axes an Unsqueeze inserts (an attribute before opset 13, a constant input since); None if unknown."""
    if "axes" in node.attrs:
        return len(node.attrs["axes"])
    axes = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    return None if axes is None else int(axes.size)


def _propagate(node: gs.Node, partials: dict[int, PartialValue]) -> PartialValue | None:
    """The partially known value of ``node``'s first output, for the shape-arithmetic operators."""
    op = node.op
    if op == "Shape":
        return _shape_of(node)
    inputs = [_as_partial(t, partials) if t.name else None for t in node.inputs]
    if op == "Size":
        shape = node.inputs[0].shape
        if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
            return PartialValue((int(np.prod(shape, dtype=np.int64)),), scalar=True)
        return None
    if not inputs or inputs[0] is None:
        return None
    first = inputs[0]
    if op == "Identity":
        return first
    if op == "Cast":
        target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
        if target.kind not in "iu":
            return None
        return PartialValue(_in_range(first.elements, target), first.scalar, target)
    if op == "Gather" and node.attrs.get("axis", 0) in (0, -1) and not first.scalar and inputs[1] is not None \
            and id(node.inputs[1]) not in partials:
        indices = ir.constant_value(node.inputs[1])
        size = len(first.elements)
        if indices.ndim > 1 or any(not -size <= int(i) < size for i in indices.reshape(-1)):
            return None
        picked = tuple(first.elements[int(i)] for i in indices.reshape(-1))
        return PartialValue(picked, scalar=indices.ndim == 0, dtype=first.dtype)
    if op == "Slice" and not first.scalar and len(node.inputs) >= 3:
        params = [ir.constant_value(t) if t.name else None for t in node.inputs[1:5]]
        # A parameter input that is given but not constant (axes or steps fed at run time) is unknown,
        # not its default.
        given = [bool(t.name) for t in node.inputs[1:5]]
        if any(g and p is None for g, p in zip(given, params)) or any(p is not None and p.size != 1 for p in params):
            return None
        axes = params[2] if len(params) > 2 and params[2] is not None else np.array([0])
        steps = params[3] if len(params) > 3 and params[3] is not None else np.array([1])
        start, end, step = (int(p.reshape(-1)[0]) for p in (params[0], params[1], steps))
        if int(axes.reshape(-1)[0]) not in (0, -1) or step == 0:
            return None
        size = len(first.elements)
        if step < 0 and not (-size <= start < size and end < size):
            # Python's slice agrees with ONNX and onnxruntime for positive steps. For negative steps the
            # specification clamps an out-of-range start to the last element (Python: before the first),
            # and onnxruntime reads an end of INT64_MAX as "through the first element" (the specification
            # clamps it to the last): only bounds that need no clamping mean the same everywhere.
            return None
        return PartialValue(tuple(first.elements[start:end:step]), dtype=first.dtype)
    if op == "Concat" and node.attrs.get("axis") in (0, -1):
        if any(p is None or p.scalar for p in inputs):
            return None
        return PartialValue(tuple(e for p in inputs for e in p.elements), dtype=first.dtype)
    if op == "Unsqueeze" and first.scalar and _unsqueeze_axis_count(node) == 1:
        return PartialValue(first.elements, dtype=first.dtype)
    if op == "Squeeze" and not first.scalar and len(first.elements) == 1:
        return PartialValue(first.elements, scalar=True, dtype=first.dtype)
    if op == "Equal" and len(inputs) == 2 and inputs[1] is not None:
        return _equal(first, inputs[1])
    if op in ("Max", "Min") and len(inputs) == 2 and inputs[1] is not None and first.dtype.kind in "iu":
        return _extremum(op, first, inputs[1])
    if op in _INT_ARITHMETIC and len(inputs) == 2 and inputs[1] is not None and first.dtype.kind in "iu":
        a, b = first, inputs[1]
        pairs = _element_pairs(a, b)
        if pairs is None:
            return None
        result = tuple(_INT_ARITHMETIC[op](x, y) if isinstance(x, int) and isinstance(y, int) else None
                       for x, y in pairs)
        return PartialValue(_in_range(result, a.dtype), scalar=a.scalar and b.scalar, dtype=a.dtype)
    return None


def _resolved_elements(target: PartialValue, data_shape: list) -> list[int | None]:
    """The target's elements as a constant shape can hold them, ``None`` where it cannot.

    Known numbers stay; an element known to equal the input's dimension at its own position (the same
    symbol in inferred shapes) becomes 0, a copy under ``allowzero=0``.
    """
    resolved: list[int | None] = []
    for axis, element in enumerate(target.elements):
        if isinstance(element, int):
            resolved.append(element)
        elif isinstance(element, str) and axis < len(data_shape) and data_shape[axis] == element:
            resolved.append(0)
        else:
            resolved.append(None)
    return resolved


def _size_beside_copies(resolved: list[int | None], free: int, data_shape: list) -> int | None:
    """The size a -1 at ``free`` stands for beside copies, from the dimensions that are not copied.

    The copies equal the input's dimensions at their positions and cancel out of the element count:
    the -1 is the product of the input's other dimensions over that of the shape's other elements, when
    all are known positive numbers. It does not depend on the copied sizes, zero included, which is also
    what onnxruntime infers for a -1 beside a 0 with ``allowzero=1`` (an empty input; the specification
    calls that shape invalid).
    """
    copied = {axis for axis, element in enumerate(resolved) if element == 0}
    input_rest = [d for axis, d in enumerate(data_shape) if axis not in copied]
    shape_rest = [e for axis, e in enumerate(resolved) if axis not in copied and axis != free]
    if not all(isinstance(d, int) and d > 0 for d in input_rest) or not all(e > 0 for e in shape_rest):
        return None
    count, known = int(np.prod(input_rest, dtype=np.int64)), int(np.prod(shape_rest, dtype=np.int64))
    return count // known if count % known == 0 else None


def _free_element(resolved: list[int | None], free: int, data_shape: list, allowzero: int) -> int | None:
    """What the constant shape holds at ``free``, its one element that is -1 or unknown; ``None`` if nothing exact.

    Without copies the other elements are known positive numbers, and -1 is the unknown's value for any
    input, an empty one included. With copies, a copied size may be 0 at run time: an unknown element's
    value is then not determined by the size (the original's explicit value could be anything), but a -1
    is its size beside the copies when that is static. Otherwise a -1 beside copies stays -1 under
    ``allowzero=0`` (the same shape as before), and under ``allowzero=1`` the Reshape is left alone:
    onnxruntime infers -1 beside a zero-sized dimension there, and fails to beside a copied 0.
    """
    others = [e for axis, e in enumerate(resolved) if axis != free]
    if 0 not in others:
        return -1 if all(e > 0 for e in others) else None
    if resolved[free] is None:
        return None
    size = _size_beside_copies(resolved, free, data_shape)
    if size is not None:
        return size
    return None if allowzero else -1


def _reshape_with_copied_dims(graph: gs.Graph, node: gs.Node, target: PartialValue) -> int:
    """Gives a Reshape a constant shape when its dynamic elements are dimensions of its own input.

    With ``allowzero=0``, a 0 in Reshape's shape copies the input's dimension at that position, so an
    element known to equal that dimension (the same symbol in inferred shapes, as in
    ``Reshape(x, Concat(Shape(x)[:2], [12, 64]))``) can be 0. One element that is -1 or unknown is
    written as ``_free_element`` says. Returns 1 if the shape became constant.

    With ``allowzero=1`` (the dynamo exporter's), a 0 in the shape is a dimension of size zero, so the
    copies are written with ``allowzero`` cleared. That is exact when the shape has no literal 0, which
    would become a copy: then every 0 of the new shape is a copy, and a copy equals the element it
    replaces whatever its size, zero included. A shape with a literal 0 is left alone.
    """
    data_shape = node.inputs[0].shape
    allowzero = node.attrs.get("allowzero", 0)
    if target.scalar or data_shape is None or (allowzero and 0 in target.elements):
        return 0
    resolved = _resolved_elements(target, data_shape)
    if any(element == 0 and axis >= len(data_shape) for axis, element in enumerate(resolved)):
        return 0  # a copy of a dimension the input lacks: the original fails
    free = [axis for axis, element in enumerate(resolved) if element is None or element == -1]
    if len(free) > 1:
        return 0
    if free:
        resolved[free[0]] = _free_element(resolved, free[0], data_shape, allowzero)
        if resolved[free[0]] is None:
            return 0
    node.inputs[1] = ir.make_constant(graph, np.array(resolved, dtype=np.int64), f"{node.name or 'reshape'}_shape")
    if allowzero and 0 in resolved:
        node.attrs["allowzero"] = 0
    return 1


def fold_shapes(graph: gs.Graph, in_subgraph: bool = False) -> int:
    """Replaces shape computations whose result inferred shapes determine by constants; returns how many.

    ``Shape`` of a tensor with some static dimensions gives a partially known value; Gather, Slice,
    Concat, Cast, Squeeze/Unsqueeze, integer arithmetic, Max/Min and Equal carry the known elements along (a
    dimension, even a dynamic one, is never equal to a negative number), and a value
    whose elements are all known becomes a constant (so ``Gather(Shape(x), 1)`` folds when dimension 1 of
    ``x`` is static, even if dimension 0 is dynamic). In a subgraph (``in_subgraph``), the producers of
    the subgraph's outputs stay: an output must be computed by a node of its own graph.
    """
    partials: dict[int, PartialValue] = {}
    replaced = 0
    for node in list(graph.nodes):
        if node.domain not in ("", None, "ai.onnx") or len(node.outputs) != 1 or not node.inputs:
            continue
        if node.op == "Reshape" and len(node.inputs) == 2 and id(node.inputs[1]) in partials:
            replaced += _reshape_with_copied_dims(graph, node, partials[id(node.inputs[1])])
            continue
        output = node.outputs[0]
        try:
            partial = _propagate(node, partials)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        if partial is None:
            continue
        if not partial.known or (in_subgraph and ir.is_graph_output(graph, output)):
            partials[id(output)] = partial
            continue
        if node.op == "Identity":
            continue
        values = np.array(partial.elements, dtype=partial.dtype)
        values = values.reshape(()) if partial.scalar else values
        ir.replace_with_constant(graph, output, values)
        ir.remove_nodes(graph, [node])
        replaced += 1
    return replaced


def _dimension_before(view: gs.Node, axis: int) -> int | None:
    """The axis of ``view``'s input that is axis ``axis`` of its output, for a Transpose by a constant
    permutation or a Reshape whose constant target copies that dimension (0 without ``allowzero``)."""
    data = view.inputs[0]
    if view.op == "Transpose" and "perm" in view.attrs:
        perm = [int(p) for p in view.attrs["perm"]]
        return perm[axis] if axis < len(perm) else None
    if view.op == "Reshape" and len(view.inputs) == 2 and not view.attrs.get("allowzero", 0):
        target = ir.constant_value(view.inputs[1])
        if target is None or target.ndim != 1 or axis >= target.size or data.shape is None:
            return None
        return axis if int(target[axis]) == 0 and axis < len(data.shape) else None
    return None


def read_shapes_before_views(graph: gs.Graph) -> int:
    """Reads dimensions from a Transpose's or a copying Reshape's input instead of their output.

    ``Gather(Shape(Transpose(y, perm)), i)`` is ``Gather(Shape(y), perm[i])``, and through a Reshape whose
    target copies dimension ``i`` (a 0), dimension ``i`` of ``y``. When every reader of a ``Shape`` is a
    Gather of constant indices that map so, the Shape reads ``y``: the view may then die, and a value
    read only by its own attention pattern and by such a Shape (T5's first layer, which sizes the
    position bias from the key heads) no longer has another reader. Returns how many Shapes moved.
    """
    moved = 0
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if node.op != "Shape" or node.domain not in ("", None, "ai.onnx") or "start" in node.attrs \
                    or "end" in node.attrs or len(node.inputs[0].inputs) != 1:
                continue
            view = node.inputs[0].inputs[0]
            if view.op not in ("Transpose", "Reshape") or view.domain not in ("", None, "ai.onnx"):
                continue
            readers = node.outputs[0].outputs
            if not readers or ir.is_graph_output(graph, node.outputs[0]) or node.inputs[0].shape is None:
                continue
            rank = len(node.inputs[0].shape)
            mapped = []
            for reader in readers:
                indices = ir.constant_value(reader.inputs[1]) if reader.op == "Gather" and len(reader.inputs) == 2 \
                    else None
                if indices is None or reader.attrs.get("axis", 0) != 0 or indices.ndim > 1 \
                        or indices.dtype.kind not in "iu" or any(not -rank <= int(i) < rank for i in indices.flat):
                    break
                axes = [_dimension_before(view, int(i) % rank) for i in indices.flat]
                if None in axes:
                    break
                mapped.append((reader, np.array(axes, dtype=indices.dtype).reshape(indices.shape)))
            else:
                node.inputs[0] = view.inputs[0]
                data = view.inputs[0].shape
                node.outputs[0].shape = None if data is None else [len(data)]
                for reader, axes in mapped:
                    reader.inputs[1] = ir.make_constant(graph, axes, f"{reader.name or 'gather'}_indices")
                moved += 1
                changed = True
    return moved


def _input_dims(graph: gs.Graph) -> dict[tuple, tuple[gs.Tensor, int]]:
    """For each run of named dimensions of the graph's inputs, the first input (and axis) that holds it.

    Inputs no node reads are left out: a caller may feed anything there, the model never looks at it.
    """
    runs: dict[tuple, tuple[gs.Tensor, int]] = {}
    for tensor in graph.inputs:
        if not tensor.outputs:
            continue
        shape = tensor.shape or []
        for start in range(len(shape)):
            for end in range(start + 1, len(shape) + 1):
                if not isinstance(shape[end - 1], str) or not shape[end - 1]:
                    break
                runs.setdefault(tuple(shape[start:end]), (tensor, start))
    return runs


def read_shapes_from_inputs(graph: gs.Graph) -> int:
    """Reads named dynamic dimensions from the graph input that declares them.

    Inputs that share a ``dim_param`` have equal dimensions by the ONNX specification, and inference
    carries the names on without merging two names on a guess (see ``onnxopt.shapes``), so a dimension
    it names ``sequence`` is the ``sequence`` of the first input that declares it. Values computed from
    a graph output are left alone: an output keeps the symbols the exporter declared for it.

    ``Shape(x, start, end)`` whose selected dimensions such an input declares in a row (``[batch,
    sequence]`` of ``input_ids``) reads that input instead, and so does a ``Gather`` of constant indices
    from a ``Shape`` (through a full ``Shape`` of the input, which any opset has). Every layer of a
    transformer then reads its sizes from the same input, ``cse`` merges the per-layer shape arithmetic
    into one, and values read only to size something may die. Returns how many reads moved.
    """
    runs = _input_dims(graph)
    if not runs:
        return 0
    declared = _computed_from_outputs(graph)
    return _move_ranged_shapes(graph, runs, declared) + _move_gathered_dims(graph, runs, declared)


def _computed_from_outputs(graph: gs.Graph) -> set[int]:
    """Ids of the graph's outputs and of every value computed from one (a cache's ``present_key`` read
    by attention): inference keeps an output's declared symbols, which the exporter chose, and onnx's
    carries them on."""
    found = {id(t) for t in graph.outputs}
    for node in graph.nodes:  # in topological order
        if any(id(t) in found for t in node.inputs):
            found.update(id(t) for t in node.outputs)
    return found


def _dims_read(shape_node: gs.Node, declared: set[int]) -> PartialValue | None:
    """What a Shape node reads, unless its input is computed from a graph output."""
    return None if id(shape_node.inputs[0]) in declared else _shape_of(shape_node)


def _move_ranged_shapes(graph: gs.Graph, runs: dict[tuple, tuple[gs.Tensor, int]], declared: set[int]) -> int:
    ranged = (ir.opset_version(graph) or 0) >= 15  # Shape's start and end
    moved = 0
    for node in graph.nodes:
        if node.op != "Shape" or node.domain not in ("", None, "ai.onnx"):
            continue
        partial = _dims_read(node, declared)
        found = None if partial is None else runs.get(tuple(partial.elements))
        if found is None or found[0] is node.inputs[0]:
            continue
        source, start = found
        whole = start == 0 and len(partial.elements) == len(source.shape)
        if not (whole or ranged):
            continue
        node.inputs[0] = source
        node.attrs.pop("start", None)
        node.attrs.pop("end", None)
        if not whole:
            node.attrs["start"], node.attrs["end"] = start, start + len(partial.elements)
        moved += 1
    return moved


def _move_gathered_dims(graph: gs.Graph, runs: dict[tuple, tuple[gs.Tensor, int]], declared: set[int]) -> int:
    full_shapes: dict[int, gs.Tensor] = {
        id(node.inputs[0]): node.outputs[0] for node in graph.nodes
        if node.op == "Shape" and node.domain in ("", None, "ai.onnx") and not node.attrs}
    moved = 0
    for node in list(graph.nodes):
        if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
            continue
        producer = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
        indices = ir.constant_value(node.inputs[1])
        if producer is None or producer.op != "Shape" or producer.domain not in ("", None, "ai.onnx") \
                or indices is None or indices.dtype.kind not in "iu" or indices.ndim > 1:
            continue
        partial = _dims_read(producer, declared)
        rank = 0 if partial is None else len(partial.elements)
        if not rank or any(not -rank <= int(i) < rank for i in indices.flat):
            continue
        found = [runs.get((partial.elements[int(i) % rank],)) for i in indices.flat]
        if not found or None in found or len({id(source) for source, _ in found}) != 1:
            continue
        source = found[0][0]
        axes = np.array([axis for _, axis in found], dtype=indices.dtype).reshape(indices.shape)
        if producer.inputs[0] is source and not producer.attrs and np.array_equal(axes % rank, indices % rank):
            continue
        if id(source) not in full_shapes:
            shape = gs.Variable(ir.unique_name(graph, f"{source.name}_shape"), dtype=np.int64,
                                shape=[len(source.shape)])
            graph.nodes.insert(0, gs.Node("Shape", name=shape.name, inputs=[source], outputs=[shape]))
            full_shapes[id(source)] = shape
        node.inputs[0] = full_shapes[id(source)]
        node.inputs[1] = ir.make_constant(graph, axes, f"{node.name or 'gather'}_indices")
        moved += 1
    if moved:
        ir.toposort(graph)  # a Shape of the input that was there already may come after its new readers
    return moved


def _tensors_outside(root: gs.Graph, branch: gs.Graph) -> list[gs.Tensor]:
    """Every tensor of ``root`` and its subgraphs, except those only seen inside ``branch``."""
    tensors: list[gs.Tensor] = []

    def visit(graph: gs.Graph) -> None:
        if graph is branch:
            return
        tensors.extend(graph.inputs)
        tensors.extend(graph.outputs)
        for node in graph.nodes:
            tensors.extend(node.inputs)
            tensors.extend(node.outputs)
            for sub in ir.subgraphs(node):
                visit(sub)

    visit(root)
    return tensors


def _rename_clashes(branch: gs.Graph, root: gs.Graph) -> None:
    """Renames what a branch defines (node outputs, its own constants) where the name is used elsewhere.

    Inlined, the branch's values join the enclosing graph, where another value (of the enclosing graph,
    or of a sibling branch inlined before) may bear the same name.
    """
    outside = _tensors_outside(root, branch)
    outside_ids = {id(t) for t in outside}
    taken = {t.name for t in outside if t.name}
    owned: dict[int, gs.Tensor] = {}
    for node in branch.nodes:
        owned.update((id(t), t) for t in node.outputs if t.name)
    for sub in ir.all_graphs(branch):
        for node in sub.nodes:
            owned.update((id(t), t) for t in node.inputs if isinstance(t, gs.Constant))
    owned.update((id(t), t) for t in branch.outputs if isinstance(t, gs.Constant))
    for tensor in owned.values():
        if id(tensor) not in outside_ids and tensor.name in taken:
            tensor.name = ir.unique_name(root, tensor.name)


def inline_constant_ifs(graph: gs.Graph, root: gs.Graph) -> int:
    """Replaces every ``If`` of ``graph`` whose condition is constant by the nodes of the branch it takes.

    Constant Ifs that an inlined branch brings into ``graph`` are inlined too. The branch graphs of an
    inlined If share their nodes with ``graph`` afterwards: walk subgraphs again rather than reusing a
    list of them made before.
    """
    inlined = 0
    pending = True
    while pending:
        pending = False
        for node in list(graph.nodes):
            if node.op != "If" or node.domain not in ("", None, "ai.onnx") or not node.outputs:
                continue
            condition = ir.constant_value(node.inputs[0])
            if condition is None or condition.size != 1:
                continue
            branch = node.attrs["then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"]
            _rename_clashes(branch, root)
            outputs, results = list(node.outputs), list(branch.outputs)
            position = next(i for i, n in enumerate(graph.nodes) if n is node)
            ir.remove_nodes(graph, [node])
            graph.nodes[position:position] = list(branch.nodes)
            carrier: dict[int, gs.Tensor] = {}
            for output, result in zip(outputs, results):
                # A branch may return one value as several outputs: once the first output took over its
                # producer, the value is read from that output.
                ir.replace_all_uses(graph, output, carrier.get(id(result), result))
                if id(result) not in carrier:
                    carrier[id(result)] = output if output.inputs else result
            inlined += 1
            pending = True
    if inlined:
        ir.toposort(graph)
    return inlined


def _inline_everywhere(graph: gs.Graph, root: gs.Graph) -> int:
    """Inlines constant Ifs in ``graph``, then in the subgraphs that are left."""
    inlined = inline_constant_ifs(graph, root)
    for node in graph.nodes:
        for sub in ir.subgraphs(node):
            inlined += _inline_everywhere(sub, root)
    return inlined


@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Evaluates nodes whose inputs are constant or whose shapes are known, and inlines constant Ifs."""

    name: ClassVar[str] = "fold"
    max_growth: int = 1 << 20
    max_expansion: int = 16
    small_bytes: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "shapes_folded": 0, "ifs_inlined": 0, "kept_by_size_guard": 0,
                 "shapes_read_before_views": 0, "shapes_read_from_inputs": 0}
        stats["ifs_inlined"] += _inline_everywhere(graph, graph)
        ir.infer_shapes(graph)
        budget = self._growth_budget(graph, ctx)
        for sub in list(ir.all_graphs(graph)):
            stats["shapes_read_before_views"] += read_shapes_before_views(sub)
            if sub is graph:
                stats["shapes_read_from_inputs"] += read_shapes_from_inputs(sub)
            stats["shapes_folded"] += fold_shapes(sub, in_subgraph=sub is not graph)
            folded, kept, growth = self._fold_constants(sub, sub is not graph, budget)
            budget -= max(growth, 0)
            stats["folded"] += folded
            stats["kept_by_size_guard"] += len(kept)
            for node in kept:
                ctx.log.info("fold: kept %s '%s' as a node (size guard)", node.op, node.name)
        modified = any(stats[key] for key in ("folded", "shapes_folded", "ifs_inlined", "shapes_read_before_views",
                                              "shapes_read_from_inputs"))
        return PassResult(modified=modified, stats=stats)

    def _growth_budget(self, graph: gs.Graph, ctx: PassContext) -> int:
        """Bytes the constants may still grow by: ``max_growth`` over the original model's, across every run
        of the pass (each iteration of the pipeline would otherwise spend a fresh budget)."""
        if ctx.original is None:
            return self.max_growth
        grown = _constant_bytes(graph) - ir.model_weight_bytes(ctx.original)
        return max(self.max_growth - max(grown, 0), 0)

    def _fold_constants(self, graph: gs.Graph, in_subgraph: bool, budget: int) -> tuple[int, list[gs.Node], int]:
        """Folds what it can of ``graph``; returns how many nodes went, the nodes kept, and the growth."""
        ir.purge_detached(graph)
        constant_names: set[str] = set()
        candidates: list[gs.Node] = []
        unevaluated: list[gs.Node] = []
        for node in graph.nodes:
            if not _may_fold(node):
                continue
            if all(not t.name or isinstance(t, gs.Constant) or t.name in constant_names for t in node.inputs):
                if self._surely_expands(node):
                    unevaluated.append(node)
                    continue
                candidates.append(node)
                constant_names |= {t.name for t in node.outputs if t.name}
        if not candidates:
            return 0, unevaluated, 0
        values = evaluate(graph, candidates)
        folded: list[gs.Node] = []
        folded_names: set[str] = set()
        for node in candidates:
            inputs_known = all(not t.name or isinstance(t, gs.Constant) or t.name in folded_names for t in node.inputs)
            if inputs_known and all(not t.name or t.name in values for t in node.outputs):
                folded.append(node)
                folded_names |= {t.name for t in node.outputs if t.name}
        kept_ids, growth = self._apply_size_guard(graph, folded, values, budget)
        removed = [n for n in folded if id(n) not in kept_ids]
        kept = [n for n in folded if id(n) in kept_ids]
        if in_subgraph:
            # A subgraph output must stay produced by a node of the subgraph: keep those producers.
            removed = [n for n in removed if not any(ir.is_graph_output(graph, t) for t in n.outputs)]
        removed_ids = {id(n) for n in removed}
        for node in removed:
            for tensor in node.outputs:
                if tensor.name and (ir.is_graph_output(graph, tensor)
                                    or any(id(c) not in removed_ids for c in tensor.outputs)):
                    ir.replace_with_constant(graph, tensor, values[tensor.name])
        ir.remove_nodes(graph, removed)
        return len(removed), unevaluated + kept, growth

    def _surely_expands(self, node: gs.Node) -> bool:
        """Whether the inferred shapes already show that the size guard would keep ``node``.

        Such a node is not evaluated at all: a ConstantOfShape of a large weight would be computed twice
        (onnxruntime and the reference evaluator) and compared, hundreds of megabytes, only to stay.
        Its readers then stay too, as they would if its value were there and kept.
        """
        if node.op == "Constant":
            return False
        produced = [_inferred_nbytes(t) for t in node.outputs if t.name]
        read = [_inferred_nbytes(t) for t in node.inputs if t.name]
        if not produced or None in produced or None in read:
            return False
        return sum(produced) > self.small_bytes and sum(produced) > self.max_expansion * max(sum(read), 1)

    def _expands(self, node: gs.Node, values: dict[str, np.ndarray]) -> bool:
        """Whether folding ``node`` writes a constant far larger than the constants it reads."""
        produced = sum(values[t.name].nbytes for t in node.outputs if t.name)
        read = sum(values[t.name].nbytes if t.name in values else ir.tensor_nbytes(t) for t in node.inputs if t.name)
        # A Constant node reads nothing but already holds its value: turning it into an initializer writes
        # nothing new, however large the value.
        read += _held_bytes(node, values)
        return produced > self.small_bytes and produced > self.max_expansion * max(read, 1)

    def _apply_size_guard(self, graph: gs.Graph, folded: list[gs.Node], values: dict[str, np.ndarray],
                          budget: int) -> tuple[set[int], int]:
        """Ids of folded nodes that stay nodes so that folding does not blow the model up, and the growth of
        the rest.

        A node whose output is more than ``max_expansion`` times larger than its inputs (and larger than
        ``small_bytes``) stays; then, while the constants would grow by more than ``budget`` bytes, the
        node that grows them most stays.
        """
        kept: set[int] = {id(n) for n in folded if self._expands(n, values)}
        while True:
            active = {id(n) for n in folded if id(n) not in kept}
            needed = [
                t for n in folded if id(n) in active for t in n.outputs
                if t.name and (ir.is_graph_output(graph, t) or any(id(c) not in active for c in t.outputs))
            ]
            # A constant is freed when every reader is folded: count reads from folded nodes once,
            # rather than scanning each constant's readers per node (quadratic for shared constants).
            reads: dict[int, int] = {}
            constants: dict[int, gs.Constant] = {}
            for node in folded:
                if id(node) not in active:
                    continue
                for tensor in node.inputs:
                    if isinstance(tensor, gs.Constant):
                        reads[id(tensor)] = reads.get(id(tensor), 0) + 1
                        constants[id(tensor)] = tensor
            freed = {key: tensor for key, tensor in constants.items()
                     if reads[key] == len(tensor.outputs) and not ir.is_graph_output(graph, tensor)}
            # Folded Constant nodes leave the model with their values, which come back as initializers.
            held = sum(_held_bytes(n, values) for n in folded if id(n) in active)
            growth = (sum(values[t.name].nbytes for t in needed) - sum(ir.tensor_nbytes(c) for c in freed.values())
                      - held)
            if growth <= budget or not needed:
                return kept, growth

            def local_growth(tensor: gs.Tensor) -> int:
                producer = tensor.inputs[0]
                inputs = [i for i in producer.inputs if isinstance(i, gs.Constant) and id(i) in freed]
                released = sum(ir.tensor_nbytes(i) for i in inputs) + _held_bytes(producer, values)
                return values[tensor.name].nbytes - released

            worst = max(needed, key=local_growth)
            kept.add(id(worst.inputs[0]))
