"""Hypothesis strategies for random, valid ONNX models (opsets 18 to 21), used to fuzz onnxopt differentially.

A model is built node by node. For every value the builder knows its dtype and its concrete shape (the
shape it has on the inputs the case comes with), so each node is chosen to be valid by construction:
operands broadcast, Conv kernels fit, Reshape targets hold the same number of elements, Split sizes add
up. Graph inputs may declare some of those dimensions symbolic, so that the optimizer sees dynamic
shapes while the case still runs on fixed ones.

Two more facts are tracked per value so that any difference between the original and an optimized
model is a bug and not rounding:

* ``bound``: an upper bound of ``|x|``. Operators that grow values (Exp, Mul, MatMul, Pow) squash their
  operand first (Tanh or Clip) when the bound gets large, and Log, Sqrt, Div and Pow only see operands
  made positive (``Abs(x) + c``, ``Exp``, ``Sigmoid + c``), so no output is dominated by overflow;
* ``stable``: computed from inputs and stored constants by correctly rounded operators only (Add, Mul,
  Div, Sqrt, data movement, Max, Relu, ...). Operators whose results an optimizer may legitimately
  round differently (Exp evaluated by numpy while folding, Conv with BatchNormalization folded into it,
  Gemm instead of MatMul+Add) give unstable values, and discontinuous operators (comparisons, float to
  integer casts, MaxPool indices) only read stable ones: otherwise a last-bit difference could flip a
  comparison and the fuzzer would report a difference that is no bug.

The graphs mix the things the built-in passes look for: constants (initializers and Constant nodes,
some duplicated) and shape arithmetic for ``fold``, repeated nodes for ``cse``, Conv+BatchNormalization,
MatMul+Add and Transpose pairs for ``fuse``, values nobody reads for ``dce``, and If nodes whose
branches read outer values, with constant or input-dependent conditions.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.printer
from hypothesis import assume
from hypothesis import strategies as st
from onnx import helper, numpy_helper

OPSETS = {18: 8, 19: 9, 21: 10}  # opset -> IR version; the operators drawn mean the same in each
MAX_ELEMENTS = 256
MAX_RANK = 5
LARGE = 1e3  # values whose bound exceeds this are squashed before operators that grow them

F32, F16, F64 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)
I64, I32, BOOL = np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.bool_)
FLOATS = (F32, F16, F64)
INTS = (I64, I32)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def elem_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@dataclass
class Value:
    """A value of the graph being built, with what is known about it on the case's inputs."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    bound: float = 1.0
    stable: bool = True
    data: np.ndarray | None = None  # the contents, where known (constants, shape arithmetic)
    kind: str = "node"  # "input", "const" or "node"
    readers: int = 0

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS


@dataclass
class Scope:
    """The nodes and values of one graph body; values of enclosing scopes are visible too."""

    parent: Scope | None = None
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    depth: int = 0
    # Branch bodies may name their values from a counter of their own: sibling branches (the then and
    # else of one If, or branches of different Ifs) then reuse names, as exported models often do.
    local_names: itertools.count | None = None

    def visible(self) -> list[Value]:
        outer = self.parent.visible() if self.parent else []
        return outer + self.values


@dataclass
class FuzzCase:
    """A generated model, the inputs it runs on, and the operators it uses."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    ops: Counter
    layouts: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        shapes = {name: list(array.shape) for name, array in self.feeds[0].items()}
        return f"FuzzCase(input shapes {shapes}):\n{onnx.printer.to_text(self.model)}"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a falsifying example
        printer.text(repr(self))


class Skip(Exception):
    """The operator drawn does not fit the values at hand; the builder draws another."""


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def pool_output(
    size: int,
    kernel: int,
    stride: int,
    pad_begin: int,
    pad_end: int,
    dilation: int,
    ceil_mode: bool,
    drop_late_window: bool = True,
) -> int:
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and drop_late_window and (out - 1) * stride >= size + pad_begin:
        out -= 1  # a window that would start in the end padding is dropped (onnx's shape inference forgets)
    return out


class Builder:
    """Draws one model; every ``op_*`` method appends a valid node (or a few) to the current scope."""

    def __init__(self, draw: Callable):
        self.draw = draw
        self.names = itertools.count()
        self.root = Scope()
        self.scope = self.root
        self.inputs: list[tuple[Value, onnx.ValueInfoProto]] = []
        self.ops: Counter = Counter()
        self.overridden: set[str] = set()
        self.fixed: dict[str, np.ndarray] = {}  # inputs whose value the graph depends on being this
        self.inference_disagrees = False
        self.opset = self.choice(sorted(OPSETS))
        self.node_names = self.choice(["unique", "unique", "none"])  # onnxruntime refuses repeated node names
        self.batch = self.integer(1, 3)
        self.rng = np.random.default_rng(self.integer(0, 1 << 16))

    # -- drawing -----------------------------------------------------------------------------------------

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def chance(self, p: float) -> bool:
        """True with probability ``p``; shrinks to False."""
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)

    def choice(self, items):
        items = list(items)
        if not items:
            raise Skip
        return self.draw(st.sampled_from(items))

    def recent(self, values: list[Value]) -> Value:
        """One of ``values``, the later ones (deeper in the graph) more likely."""
        if not values:
            raise Skip
        index = self.integer(0, len(values) - 1)
        return values[len(values) - 1 - index]

    def fresh(self, prefix: str) -> str:
        if self.scope.local_names is not None and prefix not in ("in", "default"):
            return f"b{self.scope.depth}_{next(self.scope.local_names)}"
        return f"{prefix}_{next(self.names)}"

    def subset(self, items, min_size: int = 1) -> list:
        items = list(items)
        chosen = [item for item in items if self.chance(0.5)]
        if len(chosen) < min_size and items:
            chosen = [self.choice(items)]
        return chosen

    # -- values ------------------------------------------------------------------------------------------

    def register(self, value: Value) -> Value:
        self.scope.values.append(value)
        return value

    def random_shape(self, min_rank: int = 0, max_rank: int = 4, max_elements: int = 64) -> tuple[int, ...]:
        rank = self.integer(min_rank, max_rank)
        shape = []
        for _ in range(rank):
            limit = max(1, min(5, max_elements // max(1, int(np.prod(shape, dtype=np.int64)))))
            shape.append(self.integer(1, limit))
        if shape and self.chance(0.3):
            shape[0] = self.batch
        return tuple(shape)

    def new_input(self, dtype: np.dtype, shape: tuple[int, ...]) -> Value:
        """A graph input; some dimensions are declared symbolic (the case still feeds these sizes)."""
        name = self.fresh("in")
        dims: list[int | str] = []
        for axis, size in enumerate(shape):
            if self.chance(0.3):
                dims.append("batch" if axis == 0 and size == self.batch and self.chance(0.5) else f"{name}_d{axis}")
            else:
                dims.append(size)
        bound = 5.0 if dtype in FLOATS else (1.0 if dtype == BOOL else 4.0)
        value = Value(name, np.dtype(dtype), tuple(shape), bound=bound, kind="input")
        self.inputs.append((value, helper.make_tensor_value_info(name, elem_type(dtype), dims)))
        self.root.values.append(value)
        return value

    def random_array(self, shape, dtype: np.dtype, scale: float = 1.0) -> np.ndarray:
        dtype = np.dtype(dtype)
        if dtype in FLOATS:
            # Few significant digits, so that constants are exact in float16 too.
            array = np.round(self.rng.uniform(-1, 1, shape) * 64) / 64 * scale
        elif dtype == BOOL:
            array = self.rng.random(shape) < 0.5
        else:
            array = self.rng.integers(-3, 4, shape)
        return np.asarray(array).astype(dtype)

    def const(self, array, name: str | None = None, stable: bool = True) -> Value:
        """A constant: an initializer or a Constant node (in any of its attribute spellings)."""
        array = np.asarray(array)
        name = name or self.fresh("c")
        how = self.choice(["initializer", "node", "node"] if self.scope.depth == 0 else ["node", "node", "initializer"])
        if how == "initializer":
            self.scope.initializers.append(numpy_helper.from_array(array, name))
        else:
            # The name of the tensor inside the attribute means nothing: exporters leave it empty, repeat the
            # output's name, or write another one.
            attrs = {"value": numpy_helper.from_array(array, self.choice([name + "_value", "", name]))}
            if array.dtype == F32 and array.ndim == 0 and self.chance(0.3):
                attrs = {"value_float": float(array)}
            elif array.dtype == I64 and array.ndim == 1 and array.size and self.chance(0.3):
                attrs = {"value_ints": [int(v) for v in array]}
            elif array.dtype == I64 and array.ndim == 0 and self.chance(0.3):
                attrs = {"value_int": int(array)}
            self.add_node("Constant", [], [name], **attrs)
        bound = float(np.max(np.abs(array.astype(np.float64)), initial=0.0)) if array.dtype != BOOL else 1.0
        return self.register(
            Value(name, array.dtype, tuple(array.shape), bound=bound, stable=stable, data=array, kind="const")
        )

    def param(self, array) -> Value:
        """An operator's parameter (axes, pads, starts, a shape...): mostly a constant, sometimes a graph
        input the case always feeds with this value, so that the optimizer cannot know it."""
        array = np.asarray(array)
        if not self.chance(0.1):
            return self.const(array)
        name = self.fresh("in")
        value = Value(
            name,
            array.dtype,
            tuple(array.shape),
            bound=1.0 if array.dtype == BOOL else float(np.max(np.abs(array.astype(np.float64)), initial=0.0)),
            data=array,
            kind="input",
        )
        self.inputs.append((value, helper.make_tensor_value_info(name, elem_type(array.dtype), list(array.shape))))
        self.fixed[name] = array
        self.root.values.append(value)
        return value

    def random_const(self, shape, dtype: np.dtype, scale: float = 1.0) -> Value:
        """A random constant; sometimes a copy of an earlier constant's contents (cse merges those)."""
        same = [
            v
            for v in self.scope.visible()
            if v.kind == "const" and v.dtype == dtype and v.shape == tuple(shape) and v.data is not None
        ]
        if same and self.chance(0.25):
            return self.const(self.recent(same).data.copy())
        if np.dtype(dtype) in FLOATS and self.scope.depth == 0 and self.chance(0.05):
            return self.overridable(self.random_array(shape, dtype, scale))
        return self.const(self.random_array(shape, dtype, scale))

    def overridable(self, array: np.ndarray) -> Value:
        """An initializer that is also a graph input: a default the caller may replace, so no constant.

        The case's first input set leaves the default, the second one feeds other values.
        """
        name = self.fresh("default")
        self.root.initializers.append(numpy_helper.from_array(array, name))
        value = Value(name, array.dtype, tuple(array.shape), bound=1.0, kind="input")
        self.inputs.append((value, helper.make_tensor_value_info(name, elem_type(array.dtype), list(array.shape))))
        self.overridden.add(name)
        return self.register(value)

    def add_node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        name = self.fresh(op.lower())
        if self.node_names == "none" or name.endswith("7"):
            name = ""
        node = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.scope.nodes.append(node)
        self.ops[op] += 1
        return node

    def emit(self, op: str, inputs: list[Value | None], outputs: list[dict], **attrs) -> list[Value]:
        """Appends a node; each entry of ``outputs`` gives the Value fields of one output (or None: unused)."""
        names = []
        values = []
        for spec in outputs:
            if spec is None:
                names.append("")
                continue
            spec = dict(spec)
            spec.setdefault("stable", all(v.stable for v in inputs if v is not None))
            value = Value(
                self.fresh(op.lower() + "_out"), np.dtype(spec.pop("dtype")), tuple(spec.pop("shape")), **spec
            )
            names.append(value.name)
            values.append(value)
        while names and names[-1] == "":
            names.pop()
        for v in inputs:
            if v is not None:
                v.readers += 1
        self.add_node(op, [v.name if v is not None else "" for v in inputs], names, **attrs)
        for value in values:
            self.register(value)
        return values

    def unary(self, op: str, x: Value, stable: bool | None = None, bound: float | None = None, **attrs) -> Value:
        spec = {"dtype": x.dtype, "shape": x.shape, "bound": x.bound if bound is None else bound}
        if stable is not None:
            spec["stable"] = stable and x.stable
        return self.emit(op, [x], [spec], **attrs)[0]

    # -- picking operands ----------------------------------------------------------------------------------

    def pick(
        self,
        accept: Callable[[Value], bool],
        create: Callable[[], Value],
        p_create: float = 0.2,
        empty_ok: bool = False,
    ) -> Value:
        """A visible value ``accept`` takes (later ones more likely), or sometimes a new one from ``create``.

        Tensors with no elements (a Slice that takes nothing, Shape of a scalar) only go where
        ``empty_ok`` says the operator handles them.
        """
        candidates = [v for v in self.scope.visible() if (v.size > 0 or empty_ok) and accept(v)]
        if candidates and not self.chance(p_create):
            return self.recent(candidates)
        return create()

    def new_float_input_or_const(self, dtype: np.dtype, shape: tuple[int, ...]) -> Value:
        if self.scope.depth == 0 and self.chance(0.5):
            return self.new_input(dtype, shape)
        return self.random_const(shape, dtype)

    def pick_float(
        self,
        min_rank: int = 0,
        max_rank: int = MAX_RANK,
        dtypes=(F32, F16, F64),
        accept: Callable[[Value], bool] = lambda v: True,
        empty_ok: bool = False,
    ) -> Value:
        def create() -> Value:
            shape = self.random_shape(min_rank, min(max_rank, 4))
            return self.new_input(F32 if F32 in dtypes else dtypes[0], shape)

        return self.pick(
            lambda v: v.dtype in dtypes and min_rank <= v.rank <= max_rank and accept(v), create, empty_ok=empty_ok
        )

    def pick_int(self, accept: Callable[[Value], bool] = lambda v: True, stable_only: bool = False) -> Value:
        def create() -> Value:
            if self.chance(0.5):
                return (
                    self.new_float_input_or_const(self.choice(INTS), self.random_shape())
                    if self.scope.depth == 0
                    else self.random_const(self.random_shape(), I64)
                )
            source = self.pick_float(accept=lambda v: v.stable and v.bound < 1e6)
            return self.cast(source, self.choice(INTS))

        return self.pick(lambda v: v.dtype in INTS and accept(v) and v.bound < 1e6, create)

    def pick_bool(self, accept: Callable[[Value], bool] = lambda v: True) -> Value:
        def create() -> Value:
            if self.scope.depth == 0 and self.chance(0.3):
                return self.new_input(BOOL, self.random_shape())
            return self.op_compare()

        return self.pick(lambda v: v.dtype == BOOL and accept(v), create)

    def compatible_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A shape that broadcasts with ``shape`` without growing it much."""
        keep = self.integer(0, len(shape))
        suffix = [d if self.chance(0.7) else 1 for d in shape[len(shape) - keep :]]
        if len(shape) < MAX_RANK and self.chance(0.15):
            suffix = [self.integer(1, 2)] + ([1] * (len(shape) - keep)) + suffix
        return tuple(suffix)

    def partner(self, x: Value, dtype: np.dtype | None = None, p_create: float = 0.3) -> Value:
        """A value of ``x``'s dtype whose shape broadcasts with ``x``'s to a small result."""
        dtype = dtype or x.dtype

        def fits(v: Value) -> bool:
            out = broadcast(x.shape, v.shape) if v.dtype == dtype else None
            return out is not None and len(out) <= MAX_RANK and int(np.prod(out, dtype=np.int64)) <= MAX_ELEMENTS

        def create() -> Value:
            shape = self.compatible_shape(x.shape)
            if dtype in FLOATS:
                return self.new_float_input_or_const(dtype, shape)
            if dtype == BOOL:
                return self.const(self.random_array(shape, BOOL))
            return self.random_const(shape, dtype)

        return self.pick(fits, create, p_create)

    # -- value conditioning ----------------------------------------------------------------------------------

    def squash(self, x: Value, limit: float = 4.0) -> Value:
        """``x`` mapped into [-limit, limit] (Tanh or Clip), when its bound is larger than that."""
        if x.bound <= limit:
            return x
        if self.chance(0.5):
            return self.unary("Tanh", x, stable=False, bound=1.0)
        low, high = self.const(np.array(-limit, x.dtype)), self.const(np.array(limit, x.dtype))
        return self.emit("Clip", [x, low, high], [{"dtype": x.dtype, "shape": x.shape, "bound": limit}])[0]

    def positive(self, x: Value, keep_shape: bool = False) -> tuple[Value, float]:
        """A value computed from ``x`` that is positive everywhere, and a lower bound of it."""
        how = self.choice(["abs_plus", "exp", "sigmoid_plus"])
        if how == "exp":
            x = self.squash(x, 3.0)
            return self.unary("Exp", x, stable=False, bound=math.exp(x.bound)), math.exp(-x.bound)
        offset = self.choice([0.5, 1.0, 0.25])
        if how == "abs_plus":
            inner = self.unary("Abs", x)
        else:
            inner = self.unary("Sigmoid", x, stable=False, bound=1.0)
        scalar = keep_shape or self.chance(0.7)
        c = self.const(
            np.array(offset, x.dtype) if scalar else np.full(self.compatible_shape(x.shape), offset, x.dtype)
        )
        out_shape = broadcast(inner.shape, c.shape)
        return self.emit("Add", [inner, c], [{"dtype": x.dtype, "shape": out_shape, "bound": inner.bound + offset}])[
            0
        ], offset

    def cast(self, x: Value, to: np.dtype) -> Value:
        to = np.dtype(to)
        if to in INTS and x.is_float:
            bound = float(np.floor(x.bound))
        elif to == BOOL:
            bound = 1.0
        else:
            bound = x.bound
        return self.emit("Cast", [x], [{"dtype": to, "shape": x.shape, "bound": bound}], to=elem_type(to))[0]

    def shape_tensor(self, target: tuple[int, ...], special: dict[int, int] | None = None) -> Value:
        """An int64 1-D value holding ``target``: a constant, or assembled from Shape of visible values.

        ``special`` maps positions to the entry to write there instead (-1 or 0 for Reshape).
        """
        entries = [special.get(i, d) if special else d for i, d in enumerate(target)]
        if not entries or self.chance(0.5):
            return self.param(np.array(entries, dtype=np.int64))
        pieces: list[Value] = []
        for i, dim in enumerate(entries):
            sources = [
                v
                for v in self.scope.visible()
                if dim in v.shape and v.kind != "const" and not (special and i in special)
            ]
            if sources and self.chance(0.7):
                source = self.recent(sources)
                shape = self.shape_of(source)
                index = source.shape.index(dim)
                index = index - source.rank if self.chance(0.3) else index
                piece = self.emit(
                    "Gather",
                    [shape, self.param(np.array([index], np.int64))],
                    [{"dtype": I64, "shape": (1,), "bound": dim, "data": np.array([dim], np.int64)}],
                    axis=0,
                )[0]
            else:
                piece = self.param(np.array([dim], np.int64))
            pieces.append(piece)
        if len(pieces) == 1:
            return pieces[0]
        data = np.array(entries, np.int64)
        return self.emit(
            "Concat",
            pieces,
            [{"dtype": I64, "shape": (len(entries),), "bound": float(np.abs(data).max()), "data": data}],
            axis=0,
        )[0]

    def shape_of(self, x: Value) -> Value:
        existing = [v for v in self.scope.visible() if getattr(v, "shape_source", None) is x]
        if existing and self.chance(0.5):
            return existing[-1]
        data = np.array(x.shape, np.int64)
        value = self.emit(
            "Shape",
            [x],
            [{"dtype": I64, "shape": (x.rank,), "bound": float(max(x.shape, default=0)), "data": data, "stable": True}],
        )[0]
        value.shape_source = x
        return value

    # ======================================================================================================
    # Operators. Each returns the main value it made (or raises Skip).

    def op_unary(self) -> Value:
        x = self.pick_float(empty_ok=True)
        op = self.choice(
            [
                "Relu",
                "Abs",
                "Neg",
                "Sigmoid",
                "Tanh",
                "Erf",
                "LeakyRelu",
                "Identity",
                "Floor",
                "Ceil",
                "Reciprocal",
                "Sign",
                "Softplus",
            ]
        )
        if op == "Erf" and x.dtype == F64:
            x = self.cast(x, F32)
        if op in ("Relu", "Abs", "Neg", "Identity"):
            return self.unary(op, x)
        if op in ("Sigmoid", "Tanh", "Erf"):
            return self.unary(op, x, stable=False, bound=1.0)
        if op == "LeakyRelu":
            alpha = self.choice([0.01, 0.1, 0.5, 2.0])
            return self.unary(op, x, stable=alpha == 0.5, bound=x.bound * max(1.0, alpha), alpha=alpha)
        if op in ("Floor", "Ceil", "Sign"):
            # Discontinuous: only on values every optimizer computes bit for bit alike.
            if not x.stable:
                raise Skip
            return self.unary(op, x, bound=x.bound + 1)
        if op == "Reciprocal":
            p, low = self.positive(x)
            return self.unary(op, p, stable=False, bound=1.0 / low)
        x = self.squash(x, 20.0)
        return self.unary(op, x, stable=False, bound=x.bound + 1)

    def op_exp_log_sqrt(self) -> Value:
        x = self.pick_float()
        op = self.choice(["Exp", "Log", "Sqrt"])
        if op == "Exp":
            x = self.squash(x, 4.0)
            return self.unary("Exp", x, stable=False, bound=math.exp(x.bound))
        if op == "Log":
            p, low = self.positive(x)
            return self.unary("Log", p, stable=False, bound=max(abs(math.log(low)), math.log(p.bound + 1)))
        base = self.choice(["abs", "relu", "positive"])
        nonneg = self.positive(x)[0] if base == "positive" else self.unary(base.capitalize(), x)
        return self.unary("Sqrt", nonneg, stable=nonneg.stable, bound=math.sqrt(nonneg.bound))

    def op_clip(self) -> Value:
        x = self.pick_float()
        low, high = sorted(self.choice([(-1.0, 1.0), (0.0, 6.0), (-0.5, 2.0), (0.25, 0.25), (-3.0, 0.0)]))
        which = self.choice(["both", "min", "max", "none"])
        inputs: list[Value | None] = [x]
        bound = x.bound
        if which in ("both", "min"):
            inputs.append(self.param(np.array(low, x.dtype)))
        elif which == "max":
            inputs.append(None)
        if which in ("both", "max"):
            inputs.append(self.param(np.array(high, x.dtype)))
            bound = min(bound, max(abs(low), abs(high))) if which == "both" else bound
        return self.emit("Clip", inputs, [{"dtype": x.dtype, "shape": x.shape, "bound": bound}])[0]

    def op_softmax(self) -> Value:
        x = self.pick_float(min_rank=1)
        op = self.choice(["Softmax", "LogSoftmax"])
        axis = self.integer(-x.rank, x.rank - 1)
        bound = 1.0 if op == "Softmax" else 2 * x.bound + math.log(x.size) + 1
        return self.unary(op, x, stable=False, bound=bound, axis=axis)

    def op_masked_softmax(self) -> Value:
        """Softmax over values masked with -inf (as attention does), or Clip with infinite bounds."""
        x = self.pick_float(min_rank=1, dtypes=(F32, F16))
        if self.chance(0.3):
            low = self.const(np.array(-np.inf if self.chance(0.5) else -1.0, x.dtype))
            high = self.const(np.array(np.inf, x.dtype))
            return self.emit("Clip", [x, low, high], [{"dtype": x.dtype, "shape": x.shape, "bound": x.bound}])[0]
        axis = self.integer(-x.rank, x.rank - 1)
        mask_shape = self.compatible_shape(x.shape)
        mask = np.asarray(self.rng.random(mask_shape) < 0.5)
        out = broadcast(x.shape, mask_shape)
        if not np.broadcast_to(mask, out).any(axis=axis).all():
            mask[...] = True  # a row of -inf only would give NaN
        keep = self.const(mask)
        minus_inf = self.const(np.array(-np.inf, x.dtype))
        masked = self.emit("Where", [keep, x, minus_inf], [{"dtype": x.dtype, "shape": out, "bound": math.inf}])[0]
        return self.emit(
            "Softmax", [masked], [{"dtype": x.dtype, "shape": out, "bound": 1.0, "stable": False}], axis=axis
        )[0]

    def op_binary(self) -> Value:
        x = self.pick_float()
        op = self.choice(["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"])
        y = self.partner(x)
        if op in ("Add", "Sub"):
            if x.bound + y.bound > LARGE:
                x, y = self.squash(x), self.squash(y)
            bound = x.bound + y.bound
        elif op == "Mul":
            if x.bound * y.bound > LARGE:
                x, y = self.squash(x), self.squash(y)
            bound = x.bound * y.bound
        elif op == "Div":
            y, low = self.positive(y)
            if self.chance(0.3):
                y = self.unary("Neg", y)
            x = self.squash(x, 50.0)
            bound = x.bound / low
        elif op == "Pow":
            x, low = self.positive(self.squash(x, 2.0))
            if self.chance(0.5):
                exponent = self.choice([2.0, 0.5, 3.0, -1.0, 1.5, 0.0])
                dtype = self.choice([x.dtype, x.dtype, I64]) if float(exponent).is_integer() else x.dtype
                y = self.param(np.array(exponent, dtype))
            else:
                y = self.squash(y, 1.0)
            e = max(1.0, y.bound)
            bound = max(x.bound, 1.0) ** e * max(1.0, 1.0 / low) ** e
            out = broadcast(x.shape, y.shape)
            return self.emit("Pow", [x, y], [{"dtype": x.dtype, "shape": out, "bound": bound, "stable": False}])[0]
        else:
            operands = [x, y] + ([self.partner(x)] if self.chance(0.3) else [])
            operands = operands[:1] if self.chance(0.1) else operands
            out = broadcast(*[v.shape for v in operands])
            if out is None or int(np.prod(out)) > MAX_ELEMENTS:
                raise Skip
            return self.emit(op, operands, [{"dtype": x.dtype, "shape": out, "bound": max(v.bound for v in operands)}])[
                0
            ]
        out = broadcast(x.shape, y.shape)
        inputs = [x, y] if self.chance(0.8) or op in ("Sub", "Div") else [y, x]
        return self.emit(op, inputs, [{"dtype": x.dtype, "shape": out, "bound": bound}])[0]

    def op_int_binary(self) -> Value:
        x = self.pick_int()
        op = self.choice(["Add", "Sub", "Mul", "Max", "Min"])
        y = self.partner(x)
        if y.bound >= 1e6:
            raise Skip
        out = broadcast(x.shape, y.shape)
        bound = x.bound * y.bound if op == "Mul" else x.bound + y.bound
        data = None
        if x.data is not None and y.data is not None:
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum}[op]
            data = fn(x.data, y.data).astype(x.dtype)
        return self.emit(op, [x, y], [{"dtype": x.dtype, "shape": out, "bound": bound, "data": data}])[0]

    def op_compare(self) -> Value:
        if self.chance(0.4):
            x = self.pick_int()
        else:
            x = self.pick_float(accept=lambda v: v.stable)
            if not x.stable:
                raise Skip
        op = self.choice(["Less", "Greater", "Equal", "LessOrEqual", "GreaterOrEqual"])
        y = self.partner(x) if self.chance(0.7) else x
        if not y.stable:
            raise Skip
        out = broadcast(x.shape, y.shape)
        return self.emit(op, [x, y], [{"dtype": BOOL, "shape": out, "bound": 1.0, "stable": True}])[0]

    def op_logic(self) -> Value:
        x = self.pick_bool()
        op = self.choice(["Not", "And", "Or", "Xor"])
        if op == "Not":
            return self.unary("Not", x)
        y = self.partner(x)
        return self.emit(op, [x, y], [{"dtype": BOOL, "shape": broadcast(x.shape, y.shape), "bound": 1.0}])[0]

    def op_where(self) -> Value:
        cond = self.pick_bool()
        x = self.partner(cond, dtype=self.choice([F32, F32, F16, I64])) if self.chance(0.5) else None
        if x is None:
            x = self.pick(
                lambda v: v.dtype != BOOL and broadcast(v.shape, cond.shape) is not None,
                lambda: self.random_const(self.compatible_shape(cond.shape), F32),
            )
        y = self.partner(x)
        out = broadcast(cond.shape, x.shape, y.shape)
        if out is None or int(np.prod(out)) > MAX_ELEMENTS:
            raise Skip
        return self.emit("Where", [cond, x, y], [{"dtype": x.dtype, "shape": out, "bound": max(x.bound, y.bound)}])[0]

    def op_cast(self) -> Value:
        x = self.pick(lambda v: True, lambda: self.pick_float(), empty_ok=True)
        if x.dtype in FLOATS:
            targets = [F32, F16, F64] + ([I64, I32, BOOL] if x.stable and x.bound < 1e6 else [])
        elif x.dtype == BOOL:
            targets = [F32, F16, I64, I32]
        else:
            targets = [F32, F16, I64, I32, BOOL]
        to = self.choice([t for t in targets if t != x.dtype] or targets)
        if to == F16 and x.bound > 6e4:
            x = self.squash(x)
        return self.cast(x, to)

    def op_cast_pair(self) -> Value:
        """Cast to another type and back: a lossless round trip (fuse removes it) or a lossy one (it must not)."""
        x = self.pick(lambda v: v.dtype in (F32, F16, I32, I64, BOOL), lambda: self.pick_float())
        if x.dtype in FLOATS:
            middles = [F64, F32, F16] + ([I32, I64] if x.stable and x.bound < 1e6 else [])
        elif x.dtype == BOOL:
            middles = [F32, F16, I64]
        else:
            middles = [I64, I32, F32, F64, F16]
        middle = self.choice([m for m in middles if m != x.dtype])
        if middle == F16 and x.bound > 6e4:
            raise Skip
        return self.cast(self.cast(x, middle), x.dtype)

    def op_matmul(self) -> Value:
        a = self.pick_float(min_rank=1, max_rank=4, dtypes=(F32, F16))
        a = self.squash(a, 10.0)
        k = a.shape[-1]
        n = self.integer(1, 5)
        kind = self.choice(["matrix", "vector", "batched"])
        if kind == "vector" or (kind == "batched" and a.rank < 2):
            b_shape: tuple[int, ...] = (k,)
        elif kind == "batched":
            b_shape = tuple(d if self.chance(0.5) else 1 for d in a.shape[:-2]) + (k, n)
        else:
            b_shape = (k, n)
        if a.rank == 1 and len(b_shape) == 1:
            out: tuple[int, ...] = ()
        elif len(b_shape) == 1:
            out = a.shape[:-1]
        elif a.rank == 1:
            out = b_shape[:-2] + (n,)
        else:
            out = broadcast(a.shape[:-2], b_shape[:-2]) + (a.shape[-2], n)
        if int(np.prod(out)) > MAX_ELEMENTS:
            raise Skip
        b = self.random_const(b_shape, a.dtype) if self.chance(0.7) else self.new_float_input_or_const(a.dtype, b_shape)
        b = self.squash(b, 10.0)
        return self.emit(
            "MatMul", [a, b], [{"dtype": a.dtype, "shape": out, "bound": a.bound * b.bound * k, "stable": False}]
        )[0]

    def matrix(self, dtypes=(F32,)) -> Value:
        """A 2-D float value: an existing one, or a Flatten of one."""

        def create() -> Value:
            x = self.pick_float(min_rank=1, dtypes=dtypes)
            if x.rank == 2:
                return x
            axis = self.integer(0, x.rank)
            rows = int(np.prod(x.shape[:axis], dtype=np.int64))
            return self.emit(
                "Flatten",
                [x],
                [{"dtype": x.dtype, "shape": (rows, x.size // max(rows, 1)), "bound": x.bound}],
                axis=axis,
            )[0]

        return self.pick(lambda v: v.rank == 2 and v.dtype in dtypes, create, p_create=0.3)

    def op_gemm(self) -> Value:
        a = self.squash(self.matrix(dtypes=(F32, F16)), 10.0)
        trans_a, trans_b = self.chance(0.3), self.chance(0.3)
        m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
        n = self.integer(1, 5)
        b_shape = (n, k) if trans_b else (k, n)
        b = self.random_const(b_shape, a.dtype) if self.chance(0.7) else self.new_float_input_or_const(a.dtype, b_shape)
        b = self.squash(b, 10.0)
        inputs = [a, b]
        attrs = {}
        if trans_a:
            attrs["transA"] = 1
        if trans_b:
            attrs["transB"] = 1
        alpha = self.choice([1.0, 0.5, 2.0, -1.0])
        if alpha != 1.0:
            attrs["alpha"] = alpha
        bound = abs(alpha) * a.bound * b.bound * k
        if self.chance(0.7):
            c_shape = self.choice([(), (n,), (1, n), (m, 1), (m, n)])
            c = (
                self.random_const(c_shape, a.dtype)
                if self.chance(0.8)
                else self.new_float_input_or_const(a.dtype, c_shape)
            )
            beta = self.choice([1.0, 1.0, 0.5, -2.0])
            if beta != 1.0:
                attrs["beta"] = beta
            inputs.append(c)
            bound += abs(beta) * c.bound
        return self.emit(
            "Gemm", inputs, [{"dtype": a.dtype, "shape": (m, n), "bound": bound, "stable": False}], **attrs
        )[0]

    def op_matmul_add(self) -> Value:
        """MatMul by a constant matrix, then Add of a constant: the pattern fuse turns into Gemm."""
        a = self.squash(self.matrix() if self.chance(0.8) else self.pick_float(min_rank=1, dtypes=(F32,)), 10.0)
        k, n = a.shape[-1], self.integer(1, 5)
        w = self.random_const((k, n), a.dtype)
        m = a.shape[-2] if a.rank >= 2 else None
        out = a.shape[:-1] + (n,)
        mm = self.emit("MatMul", [a, w], [{"dtype": a.dtype, "shape": out, "bound": a.bound * k, "stable": False}])[0]
        shapes = [(n,), (1, n), ()] + ([(m, n), (m, 1)] if m is not None else [])
        bias = self.random_const(self.choice(shapes), a.dtype)
        total = broadcast(out, bias.shape)
        inputs = [mm, bias] if self.chance(0.7) else [bias, mm]
        return self.emit("Add", inputs, [{"dtype": a.dtype, "shape": total, "bound": mm.bound + 1, "stable": False}])[0]

    def image(self, dtypes=(F32,), min_spatial: int = 1) -> Value:
        """A float value of rank 3 or 4 read as [N, C, spatial...], with few channels."""

        def create() -> Value:
            rank = self.choice([4, 3])
            shape = (self.batch, self.integer(1, 4)) + tuple(
                self.integer(max(min_spatial, 1), 5) for _ in range(rank - 2)
            )
            return (
                self.new_input(dtypes[0], shape)
                if self.scope.depth == 0 or self.chance(0.3)
                else self.random_const(shape, dtypes[0])
            )

        return self.pick(
            lambda v: (
                v.dtype in dtypes
                and v.rank in (3, 4)
                and v.shape[1] <= 8
                and v.size <= MAX_ELEMENTS
                and min(v.shape[2:]) >= min_spatial
            ),
            create,
            p_create=0.3,
        )

    def conv_attrs(self, spatial: tuple[int, ...], channels: int) -> tuple[dict, tuple[int, ...], tuple[int, ...], int]:
        group = self.choice([g for g in (1, 2, 3, 4) if channels % g == 0])
        kernel = tuple(self.integer(1, min(3, s + 2)) for s in spatial)
        strides = tuple(self.integer(1, 2) for _ in spatial)
        auto_pad = self.choice(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
        # onnxruntime rejects dilations with SAME_UPPER/SAME_LOWER.
        dilations = tuple(
            self.integer(1, 2) if auto_pad in ("NOTSET", "VALID") and self.chance(0.3) else 1 for _ in spatial
        )
        attrs: dict = {}
        if auto_pad == "NOTSET":
            pads_begin = [self.integer(0, k - 1) for k in kernel]
            pads_end = [self.integer(0, k - 1) for k in kernel]
            out = tuple(
                pool_output(s, k, st_, pb, pe, d, False)
                for s, k, st_, pb, pe, d in zip(spatial, kernel, strides, pads_begin, pads_end, dilations)
            )
            if any(p for p in pads_begin + pads_end) or self.chance(0.3):
                attrs["pads"] = pads_begin + pads_end
        else:
            attrs["auto_pad"] = auto_pad
            if auto_pad == "VALID":
                out = tuple(
                    pool_output(s, k, st_, 0, 0, d, False) for s, k, st_, d in zip(spatial, kernel, strides, dilations)
                )
            else:
                out = tuple(-(-s // st_) for s, st_ in zip(spatial, strides))
        if any(o < 1 for o in out):
            raise Skip
        if any(s != 1 for s in strides) or self.chance(0.3):
            attrs["strides"] = list(strides)
        if any(d != 1 for d in dilations):
            attrs["dilations"] = list(dilations)
        if group != 1 or self.chance(0.2):
            attrs["group"] = group
        if self.chance(0.5):
            attrs["kernel_shape"] = list(kernel)
        return attrs, kernel, out, group

    def op_conv(self, with_batchnorm: bool | None = None, x: Value | None = None) -> Value:
        x = self.squash(x or self.image(dtypes=(F32, F16)), 10.0)
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        attrs, kernel, out_spatial, group = self.conv_attrs(spatial, c)
        m = group * self.integer(1, 3)
        w_shape = (m, c // group) + kernel
        w = (
            self.random_const(w_shape, x.dtype)
            if self.chance(0.85)
            else self.new_float_input_or_const(x.dtype, w_shape)
        )
        w = self.squash(w, 2.0)
        inputs = [x, w]
        bound = x.bound * w.bound * int(np.prod(w_shape[1:]))
        if self.chance(0.6):
            inputs.append(self.random_const((m,), x.dtype))
            bound += 1
        out_shape = (n, m) + out_spatial
        if int(np.prod(out_shape)) > MAX_ELEMENTS:
            raise Skip
        y = self.emit(
            "Conv", inputs, [{"dtype": x.dtype, "shape": out_shape, "bound": bound, "stable": False}], **attrs
        )[0]
        if with_batchnorm if with_batchnorm is not None else self.chance(0.2):
            return self.batchnorm(y)
        if self.chance(0.3):
            return self.channel_affine(y)
        return y

    def channel_affine(self, y: Value) -> Value:
        """Mul or Add of a constant with one value per channel (or one in all): fuse folds it into a Conv or
        BatchNormalization."""
        m, rank = y.shape[1], y.rank
        shape = self.choice([(m,) + (1,) * (rank - 2), (1, m) + (1,) * (rank - 2), (), (1,), (m, 1, 1, 1)[:rank]])
        op = self.choice(["Mul", "Add"])
        c = self.random_const(shape, y.dtype)
        out = broadcast(y.shape, shape)
        if out is None:
            raise Skip
        inputs = [y, c] if self.chance(0.7) else [c, y]
        return self.emit(op, inputs, [{"dtype": y.dtype, "shape": out, "bound": y.bound * 2 + 1, "stable": False}])[0]

    def op_pad(self, before_conv: bool = False) -> Value:
        """Pad in constant (zero or not), reflect or edge mode, sometimes with nothing to add."""
        x = self.image() if before_conv else self.any_value(min_rank=1, max_size=64)
        rank = x.rank
        mode = "constant" if before_conv else self.choice(["constant", "constant", "reflect", "edge"])
        axes = list(range(2, rank)) if before_conv else self.subset(range(rank))
        pads_begin, pads_end = [], []
        for axis in axes:
            d = x.shape[axis]
            limit = d - 1 if mode == "reflect" else 2
            low = -(d - 1) if mode == "constant" and self.chance(0.2) else 0
            nothing = self.chance(0.3)
            pads_begin.append(0 if nothing else self.integer(max(low, -limit), limit))
            pads_end.append(0 if nothing else self.integer(max(low, -limit), limit))
        shape = list(x.shape)
        for axis, a, b in zip(axes, pads_begin, pads_end):
            shape[axis] += a + b
        if min(shape) < 1 or int(np.prod(shape)) > MAX_ELEMENTS:
            raise Skip
        if before_conv and self.chance(0.5):
            axes, pads_begin, pads_end = list(range(rank)), [0, 0] + pads_begin, [0, 0] + pads_end
        explicit_axes = axes != list(range(rank)) or self.chance(0.2)
        inputs: list[Value | None] = [x, self.param(np.array(pads_begin + pads_end, np.int64))]
        if mode == "constant" and x.dtype != BOOL and (self.chance(0.4) or explicit_axes):
            fill = 0 if before_conv or self.chance(0.5) else 1.5 if x.dtype in FLOATS else 2
            inputs.append(self.param(np.array(fill, x.dtype)) if not (fill == 0 and self.chance(0.3)) else None)
        if explicit_axes:
            if len(inputs) == 2:
                inputs.append(None)
            inputs.append(self.param(np.array([a - rank if self.chance(0.3) else a for a in axes], np.int64)))
        attrs = {"mode": mode} if mode != "constant" or self.chance(0.3) else {}
        y = self.emit("Pad", inputs, [{"dtype": x.dtype, "shape": tuple(shape), "bound": max(x.bound, 1.5)}], **attrs)[
            0
        ]
        return y

    def op_pad_conv(self) -> Value:
        """Pad with zeros on the spatial axes, then Conv: fuse moves the padding into the Conv."""
        return self.op_conv(x=self.op_pad(before_conv=True))

    def op_conv_batchnorm(self) -> Value:
        return self.op_conv(with_batchnorm=True)

    def op_conv_transpose(self) -> Value:
        x = self.squash(self.image(dtypes=(F32,)), 10.0)
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        group = self.choice([g for g in (1, 2) if c % g == 0])
        m = group * self.integer(1, 2)
        kernel = tuple(self.integer(1, 3) for _ in spatial)
        strides = tuple(self.integer(1, 2) for _ in spatial)
        dilations = tuple(self.integer(1, 2) if self.chance(0.2) else 1 for _ in spatial)
        output_padding = tuple(self.integer(0, s - 1) if self.chance(0.3) else 0 for s in strides)
        pads_begin = [self.integer(0, k - 1) for k in kernel]
        pads_end = [self.integer(0, k - 1) for k in kernel]
        auto_pad = self.choice(["NOTSET"] * 4 + ["SAME_UPPER", "SAME_LOWER", "VALID"])
        if auto_pad != "NOTSET":
            pads_begin = pads_end = [0] * len(spatial)
        full = tuple(
            st_ * (s - 1) + op + (k - 1) * d + 1 - pb - pe
            for s, st_, op, k, d, pb, pe in zip(
                spatial, strides, output_padding, kernel, dilations, pads_begin, pads_end
            )
        )
        # With SAME the output is the input times the stride, the padding whatever makes it so.
        out_spatial = tuple(s * st_ for s, st_ in zip(spatial, strides)) if auto_pad.startswith("SAME") else full
        out_shape = (n, m) + out_spatial
        if (
            min(out_spatial) < 1
            or int(np.prod(out_shape)) > MAX_ELEMENTS
            or any(f < o for f, o in zip(full, out_spatial))
        ):
            raise Skip
        if auto_pad.startswith("SAME") and any(output_padding):
            self.inference_disagrees = True  # onnx's shape inference adds output_padding to the size
        attrs: dict = {"kernel_shape": list(kernel)} if self.chance(0.5) else {}
        if auto_pad != "NOTSET":
            attrs["auto_pad"] = auto_pad
        if any(s != 1 for s in strides):
            attrs["strides"] = list(strides)
        if any(d != 1 for d in dilations):
            attrs["dilations"] = list(dilations)
        if any(output_padding):
            attrs["output_padding"] = list(output_padding)
        if any(pads_begin + pads_end):
            attrs["pads"] = pads_begin + pads_end
        if group != 1:
            attrs["group"] = group
        w_shape = (c, m // group) + kernel
        w = self.random_const(w_shape, x.dtype)
        inputs = [x, w] + ([self.random_const((m,), x.dtype)] if self.chance(0.5) else [])
        bound = x.bound * int(np.prod(w_shape)) + 1
        return self.emit(
            "ConvTranspose", inputs, [{"dtype": x.dtype, "shape": out_shape, "bound": bound, "stable": False}], **attrs
        )[0]

    def op_pad_pool(self) -> Value:
        """Pad by zeros before an AveragePool, or by -inf before a MaxPool: fuse moves the padding into the pool."""
        op = self.choice(["MaxPool", "AveragePool"])
        x = self.image(dtypes=(F32,))
        rank = x.rank
        begins = [self.integer(0, 2) for _ in range(rank - 2)]
        ends = [self.integer(0, 2) for _ in range(rank - 2)]
        shape = x.shape[:2] + tuple(d + a + b for d, a, b in zip(x.shape[2:], begins, ends))
        if int(np.prod(shape)) > MAX_ELEMENTS:
            raise Skip
        pads = self.param(np.array([0, 0] + begins + [0, 0] + ends, np.int64))
        fill = self.param(np.array(-np.inf if op == "MaxPool" else 0.0, np.float32))
        padded = self.emit("Pad", [x, pads, fill], [{"dtype": x.dtype, "shape": shape, "bound": x.bound,
                                                     "stable": False}])[0]
        return self.op_pool(x=padded, op=op)

    def op_pool(self, x: Value | None = None, op: str | None = None) -> Value:
        op = op or self.choice(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
        x = x or self.image(dtypes=(F32, F16))
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        if op.startswith("Global"):
            return self.emit(
                op,
                [x],
                [
                    {
                        "dtype": x.dtype,
                        "shape": (n, c) + (1,) * len(spatial),
                        "bound": x.bound,
                        "stable": x.stable and op == "GlobalMaxPool",
                    }
                ],
            )[0]
        kernel = tuple(self.integer(1, min(3, s)) for s in spatial)
        strides = tuple(self.integer(1, 2) for _ in spatial)
        dilations = tuple(self.integer(1, 2) if op == "MaxPool" and self.chance(0.2) else 1 for _ in spatial)
        pads_begin = [self.integer(0, k - 1) if self.chance(0.4) else 0 for k in kernel]
        pads_end = [self.integer(0, k - 1) if self.chance(0.4) else 0 for k in kernel]
        ceil_mode = self.chance(0.2)
        auto_pad = self.choice(["NOTSET"] * 4 + ["SAME_UPPER", "SAME_LOWER", "VALID"])
        if auto_pad != "NOTSET":
            pads_begin = pads_end = [0] * len(spatial)
            dilations = (1,) * len(spatial)
            ceil_mode = ceil_mode and auto_pad == "VALID"  # onnxruntime refuses SAME_LOWER with ceil_mode
        windows = list(zip(spatial, kernel, strides, pads_begin, pads_end, dilations))
        if auto_pad.startswith("SAME"):
            out = tuple(-(-s // st_) for s, st_ in zip(spatial, strides))
            if any((o - 1) * st_ + k - s < 0 for o, st_, k, s in zip(out, strides, kernel, spatial)):
                raise Skip  # onnxruntime refuses the negative padding SAME would need
        else:
            out = tuple(pool_output(*w, ceil_mode) for w in windows)
        if min(out) < 1:
            raise Skip
        if ceil_mode and (
            auto_pad != "NOTSET" or out != tuple(pool_output(*w, ceil_mode, drop_late_window=False) for w in windows)
        ):
            # onnx's shape inference disagrees with the runtime here (it keeps a window that would start
            # in the padding, and ignores auto_pad's formulas under ceil_mode): declaring shapes after
            # this would make onnx.checker reject a model onnxruntime runs.
            self.inference_disagrees = True
        attrs: dict = {"kernel_shape": list(kernel)}
        if auto_pad != "NOTSET":
            attrs["auto_pad"] = auto_pad
        if any(s != 1 for s in strides) or self.chance(0.2):
            attrs["strides"] = list(strides)
        if any(pads_begin + pads_end):
            attrs["pads"] = pads_begin + pads_end
        if any(d != 1 for d in dilations):
            attrs["dilations"] = list(dilations)
        if ceil_mode:
            attrs["ceil_mode"] = 1
        out_shape = (n, c) + out
        if op == "AveragePool":
            if any(pads_begin + pads_end) and self.chance(0.5):
                attrs["count_include_pad"] = 1
            return self.emit(
                op, [x], [{"dtype": x.dtype, "shape": out_shape, "bound": x.bound, "stable": False}], **attrs
            )[0]
        outputs = [{"dtype": x.dtype, "shape": out_shape, "bound": x.bound}]
        if x.stable and x.dtype == F32 and self.chance(0.3):
            outputs.append({"dtype": I64, "shape": out_shape, "bound": float(x.size)})
        return self.emit(op, [x], outputs, **attrs)[0]

    def batchnorm(self, x: Value) -> Value:
        c = x.shape[1]
        params_as_inputs = self.scope.depth == 0 and self.chance(0.1)
        scale = self.random_const((c,), x.dtype)
        bias = self.random_const((c,), x.dtype)
        mean = self.random_const((c,), x.dtype)
        if params_as_inputs:
            var = self.positive(self.new_input(x.dtype, (c,)), keep_shape=True)[0]
        else:
            var = self.const((self.rng.uniform(0.5, 2.0, c) * 64).round().astype(x.dtype) / np.array(64, x.dtype))
        epsilon = self.choice([1e-5, 1e-3, 0.1])
        attrs = {"epsilon": epsilon} if epsilon != 1e-5 else {}
        if self.chance(0.2):
            attrs["momentum"] = 0.8
        bound = (x.bound + mean.bound) / math.sqrt(0.5) * scale.bound + bias.bound
        return self.emit(
            "BatchNormalization",
            [x, scale, bias, mean, var],
            [{"dtype": x.dtype, "shape": x.shape, "bound": bound, "stable": False}],
            **attrs,
        )[0]

    def op_normalization(self) -> Value:
        op = self.choice(["BatchNormalization", "LayerNormalization", "InstanceNormalization"])
        if op == "BatchNormalization":
            x = self.pick_float(min_rank=2, dtypes=(F32,), accept=lambda v: v.shape[1] <= 16)
            y = self.batchnorm(x)
            # Caffe's Scale layer after the normalization: fuse folds it into the scale and bias.
            for _ in range(self.integer(0, 2) if self.chance(0.4) else 0):
                y = self.channel_affine(y)
            return y
        epsilon = self.choice([1e-3, 1e-2, 0.1])
        if op == "InstanceNormalization":
            x = self.image(dtypes=(F32,))
            c = x.shape[1]
            inputs = [x, self.random_const((c,), x.dtype), self.random_const((c,), x.dtype)]
            bound = 1 / math.sqrt(epsilon) * inputs[1].bound + inputs[2].bound
            return self.emit(
                op, inputs, [{"dtype": x.dtype, "shape": x.shape, "bound": bound, "stable": False}], epsilon=epsilon
            )[0]
        x = self.pick_float(min_rank=1, dtypes=(F32,))
        axis = self.integer(-x.rank, x.rank - 1)
        norm_shape = x.shape[axis:]
        scale_shape = norm_shape if self.chance(0.8) else norm_shape[1:]
        inputs = [x, self.random_const(scale_shape, x.dtype)]
        if self.chance(0.6):
            inputs.append(self.random_const(norm_shape, x.dtype))
        bound = 1 / math.sqrt(epsilon) * inputs[1].bound + 1
        attrs = {"epsilon": epsilon}
        if axis != -1 or self.chance(0.3):
            attrs["axis"] = axis
        return self.emit(op, inputs, [{"dtype": x.dtype, "shape": x.shape, "bound": bound, "stable": False}], **attrs)[
            0
        ]

    def any_value(self, min_rank: int = 0, max_size: int = MAX_ELEMENTS, empty_ok: bool = False) -> Value:
        return self.pick(
            lambda v: v.rank >= min_rank and v.size <= max_size and v.dtype != F64,
            lambda: self.pick_float(min_rank=min_rank),
            empty_ok=empty_ok,
        )

    def op_reshape(self) -> Value:
        x = self.any_value()
        total = x.size
        rank = self.integer(0 if total == 1 else 1, 4)
        dims = []
        remaining = total
        for _ in range(max(rank - 1, 0)):
            d = self.choice([d for d in range(1, remaining + 1) if remaining % d == 0][:6])
            dims.append(d)
            remaining //= d
        if rank:
            dims.append(remaining)
        target = tuple(dims)
        special: dict[int, int] = {}
        if target and self.chance(0.5):
            special[self.integer(0, len(target) - 1)] = -1
        for i, d in enumerate(target):
            if i not in special and i < x.rank and x.shape[i] == d and self.chance(0.3):
                special[i] = 0
        shape = self.shape_tensor(target, special)
        return self.emit(
            "Reshape",
            [x, shape],
            [
                {
                    "dtype": x.dtype,
                    "shape": target,
                    "bound": x.bound,
                    "data": None if x.data is None else x.data.reshape(target),
                }
            ],
        )[0]

    def permutation(self, rank: int) -> list[int]:
        return list(self.draw(st.permutations(list(range(rank)))))

    def op_transpose(self) -> Value:
        x = self.any_value(min_rank=1)
        perm = self.permutation(x.rank)
        attrs = {"perm": perm} if perm != list(reversed(range(x.rank))) or self.chance(0.5) else {}
        y = self.emit(
            "Transpose", [x], [{"dtype": x.dtype, "shape": tuple(x.shape[p] for p in perm), "bound": x.bound}], **attrs
        )[0]
        if self.chance(0.5):
            # A second Transpose right after: inverse (the pair cancels) or another permutation (they compose).
            second = list(np.argsort(perm)) if self.chance(0.6) else self.permutation(x.rank)
            second = [int(p) for p in second]
            y = self.emit(
                "Transpose",
                [y],
                [{"dtype": y.dtype, "shape": tuple(y.shape[p] for p in second), "bound": y.bound}],
                perm=second,
            )[0]
        return y

    def op_flatten(self) -> Value:
        x = self.any_value()
        axis = self.integer(-x.rank, x.rank)
        positive_axis = axis + x.rank if axis < 0 else axis
        rows = int(np.prod(x.shape[:positive_axis], dtype=np.int64))
        attrs = {"axis": axis} if axis != 1 or self.chance(0.3) else {}
        if x.rank == 0 and not attrs:
            attrs = {"axis": 0}
        return self.emit(
            "Flatten", [x], [{"dtype": x.dtype, "shape": (rows, x.size // rows), "bound": x.bound}], **attrs
        )[0]

    def op_squeeze_unsqueeze(self) -> Value:
        x = self.any_value()
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        if ones and self.chance(0.5):
            axes = self.subset(ones)
            if self.chance(0.2) and len(axes) == len(ones):
                inputs = [x]
            else:
                inputs = [x, self.param(np.array([a - x.rank if self.chance(0.3) else a for a in axes], np.int64))]
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
            return self.emit("Squeeze", inputs, [{"dtype": x.dtype, "shape": shape, "bound": x.bound}])[0]
        if x.rank >= MAX_RANK:
            raise Skip
        count = self.integer(1, min(2, MAX_RANK - x.rank))
        out_rank = x.rank + count
        axes = sorted(self.draw(st.lists(st.integers(0, out_rank - 1), min_size=count, max_size=count, unique=True)))
        shape = list(x.shape)
        for a in axes:
            shape.insert(a, 1)
        written = [a - out_rank if self.chance(0.3) else a for a in axes]
        data = None if x.data is None else x.data.reshape(shape)
        return self.emit(
            "Unsqueeze",
            [x, self.param(np.array(written, np.int64))],
            [{"dtype": x.dtype, "shape": tuple(shape), "bound": x.bound, "data": data}],
        )[0]

    def op_expand(self) -> Value:
        x = self.any_value(max_size=32)
        extra = self.integer(0, min(2, MAX_RANK - x.rank))
        target = [self.integer(1, 3) for _ in range(extra)]
        for d in x.shape:
            target.append(self.integer(1, 3) if d == 1 and self.chance(0.6) else (1 if self.chance(0.2) else d))
        if self.chance(0.2):
            target = list(x.shape)  # to its own shape: a no-op
        out = broadcast(x.shape, tuple(target))
        if out is None or int(np.prod(out)) > MAX_ELEMENTS:
            raise Skip
        shape = self.shape_tensor(tuple(target))
        if target and self.chance(0.3):
            # TorchScript's guard for -1 in an Expand target: Where(Equal(shape, -1), 1, shape).
            size = len(target)
            guard = self.emit("Equal", [shape, self.param(np.full(size, -1, np.int64))],
                              [{"dtype": BOOL, "shape": (size,), "bound": 1.0}])[0]
            shape = self.emit("Where", [guard, self.param(np.ones(size, np.int64)), shape],
                              [{"dtype": I64, "shape": (size,), "bound": float(max(target)),
                                "data": np.array(target, np.int64)}])[0]
        return self.emit("Expand", [x, shape], [{"dtype": x.dtype, "shape": out, "bound": x.bound}])[0]

    def op_tile(self) -> Value:
        x = self.any_value(min_rank=1, max_size=32)
        repeats = [self.integer(1, 3) if self.chance(0.5) else 1 for _ in x.shape]
        out = tuple(d * r for d, r in zip(x.shape, repeats))
        if int(np.prod(out)) > MAX_ELEMENTS:
            raise Skip
        return self.emit(
            "Tile", [x, self.shape_tensor(tuple(repeats))], [{"dtype": x.dtype, "shape": out, "bound": x.bound}]
        )[0]

    def op_reduce(self) -> Value:
        op = self.choice(
            [
                "ReduceSum",
                "ReduceMean",
                "ReduceMax",
                "ReduceMin",
                "ReduceProd",
                "ReduceL2",
                "ReduceSumSquare",
                "ReduceLogSumExp",
            ]
        )
        if op in ("ReduceSum", "ReduceMax", "ReduceMin") and self.chance(0.2):
            x = self.pick_int(accept=lambda v: v.bound < 1e3)
        else:
            x = self.pick_float(dtypes=(F32, F16) if op in ("ReduceSum", "ReduceMean", "ReduceMax") else (F32,))
        if op in ("ReduceProd", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp"):
            x = self.squash(x, 2.0 if op == "ReduceProd" else 10.0)
        keepdims = self.chance(0.6)
        inputs = [x]
        attrs: dict = {}
        if x.rank and self.chance(0.8):
            axes = self.subset(range(x.rank))
            inputs.append(self.param(np.array([a - x.rank if self.chance(0.3) else a for a in axes], np.int64)))
        elif self.chance(0.3):
            # Empty axes with noop_with_empty_axes=1: the operator is the identity.
            inputs.append(self.param(np.zeros((0,), np.int64)))
            attrs["noop_with_empty_axes"] = 1
            axes = []
        else:
            axes = list(range(x.rank))
        if keepdims:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            attrs["keepdims"] = 0
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        bound = {
            "ReduceSum": x.bound * count,
            "ReduceProd": max(x.bound, 1.0) ** count,
            "ReduceSumSquare": x.bound**2 * count,
            "ReduceL2": x.bound * math.sqrt(count),
            "ReduceLogSumExp": x.bound + math.log(max(count, 1)),
        }.get(op, x.bound)
        stable = x.stable and (op in ("ReduceMax", "ReduceMin") or x.dtype in INTS or count == 1)
        return self.emit(op, inputs, [{"dtype": x.dtype, "shape": shape, "bound": bound, "stable": stable}], **attrs)[0]

    def op_concat(self) -> Value:
        x = self.any_value(min_rank=1, max_size=64, empty_ok=True)
        axis = self.integer(0, x.rank - 1)
        parts = [x]
        for _ in range(self.integer(1, 3)):

            def fits(v: Value) -> bool:
                return (
                    v.dtype == x.dtype
                    and v.rank == x.rank
                    and all(a == b for i, (a, b) in enumerate(zip(v.shape, x.shape)) if i != axis)
                )

            def create() -> Value:
                shape = list(x.shape)
                shape[axis] = self.integer(1, 3) if self.chance(0.9) else 0
                if x.dtype in FLOATS:
                    return self.new_float_input_or_const(x.dtype, tuple(shape))
                return self.random_const(tuple(shape), x.dtype)

            parts.append(self.pick(fits, create, p_create=0.4, empty_ok=True))
        shape = list(x.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        if int(np.prod(shape)) > MAX_ELEMENTS:
            raise Skip
        written_axis = axis - x.rank if self.chance(0.3) else axis
        data = np.concatenate([p.data for p in parts], axis) if all(p.data is not None for p in parts) else None
        return self.emit(
            "Concat",
            parts,
            [{"dtype": x.dtype, "shape": tuple(shape), "bound": max(p.bound for p in parts), "data": data}],
            axis=written_axis,
        )[0]

    def op_split(self) -> Value:
        x = self.any_value(min_rank=1)
        axes = [i for i, d in enumerate(x.shape) if d >= 2]
        axis = self.choice(axes)
        size = x.shape[axis]
        attrs: dict = {"axis": axis - x.rank if self.chance(0.3) else axis} if axis != 0 or self.chance(0.3) else {}
        inputs = [x]
        if self.chance(0.5):
            cuts = sorted(self.subset(range(1, size), min_size=1))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [size])]
            inputs.append(self.param(np.array(sizes, np.int64)))
        else:
            count = self.choice([k for k in range(2, size + 1) if -(-size // k) * (k - 1) < size])
            chunk = -(-size // count)
            sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
            attrs["num_outputs"] = count
        outputs = []
        for s in sizes:
            shape = list(x.shape)
            shape[axis] = s
            outputs.append({"dtype": x.dtype, "shape": tuple(shape), "bound": x.bound})
        values = self.emit("Split", inputs, outputs, **attrs)
        return self.choice(values)

    def op_slice(self) -> Value:
        x = self.any_value(min_rank=1)
        axes = self.subset(range(x.rank))
        axes = list(self.draw(st.permutations(axes)))
        starts, ends, steps, shape = [], [], [], list(x.shape)
        data = x.data
        for axis in axes:
            d = x.shape[axis]
            step = self.choice([1, 1, 2, -1, -2])
            start = self.integer(-d, d - 1)
            if step == 1 and self.chance(0.3):
                start, end = 0, self.choice([d, d + 1, INT64_MAX])  # the whole axis
            elif step > 0:
                end = self.choice([self.integer(-d, d + 1), INT64_MAX])
            else:
                end = self.choice([self.integer(-d - 1, d - 1), INT64_MIN])
            length = len(range(*slice(start, max(min(end, 1 << 20), -(1 << 20)), step).indices(d)))
            if length < 1 and self.chance(0.8):
                raise Skip  # else the result is empty
            starts.append(start)
            ends.append(end)
            steps.append(step)
            shape[axis] = length
            if data is not None:
                index = [slice(None)] * x.rank
                index[axis] = slice(start, max(min(end, 1 << 20), -(1 << 20)), step)
                data = data[tuple(index)]
        inputs = [x, self.param(np.array(starts, np.int64)), self.param(np.array(ends, np.int64))]
        default_axes = axes == list(range(len(axes)))
        if not default_axes or self.chance(0.5) or any(s != 1 for s in steps):
            inputs.append(self.param(np.array([a - x.rank if self.chance(0.3) else a for a in axes], np.int64)))
        if any(s != 1 for s in steps) or (len(inputs) == 4 and self.chance(0.3)):
            inputs.append(self.param(np.array(steps, np.int64)))
        return self.emit("Slice", inputs, [{"dtype": x.dtype, "shape": tuple(shape), "bound": x.bound, "data": data}])[
            0
        ]

    def op_gather(self) -> Value:
        x = self.any_value(min_rank=1)
        axis = self.integer(0, x.rank - 1)
        d = x.shape[axis]
        index_shape = self.choice([(), (1,), (2,), (self.integer(1, 3), 2)])
        indices = self.rng.integers(-d, d, index_shape).astype(np.int64)
        out = x.shape[:axis] + tuple(index_shape) + x.shape[axis + 1 :]
        if int(np.prod(out)) > MAX_ELEMENTS or len(out) > MAX_RANK:
            raise Skip
        data = None if x.data is None else np.take(x.data, indices, axis=axis)
        attrs = {"axis": axis - x.rank if self.chance(0.3) else axis} if axis or self.chance(0.3) else {}
        return self.emit(
            "Gather",
            [x, self.param(indices)],
            [{"dtype": x.dtype, "shape": out, "bound": x.bound, "data": data}],
            **attrs,
        )[0]

    def op_shape_arithmetic(self) -> Value:
        """Shape, Size, Gather/Slice/Concat of shapes, ConstantOfShape, Range."""
        what = self.choice(["shape_gather", "size", "constant_of_shape", "range", "shape_concat", "shape_slice"])
        x = self.any_value()
        if what == "size":
            return self.emit(
                "Size",
                [x],
                [
                    {
                        "dtype": I64,
                        "shape": (),
                        "bound": float(x.size),
                        "stable": True,
                        "data": np.array(x.size, np.int64),
                    }
                ],
            )[0]
        if what == "shape_slice" and x.rank >= 1:
            start, end = sorted([self.integer(-x.rank, x.rank), self.integer(-x.rank, x.rank)])
            dims = x.shape[slice(start, end)]
            if not dims:
                raise Skip
            attrs = {"start": start} if start else {}
            if end != x.rank:
                attrs["end"] = end
            return self.emit(
                "Shape",
                [x],
                [
                    {
                        "dtype": I64,
                        "shape": (len(dims),),
                        "bound": float(max(dims)),
                        "stable": True,
                        "data": np.array(dims, np.int64),
                    }
                ],
                **attrs,
            )[0]
        if what == "shape_concat":
            y = self.any_value()
            a, b = self.shape_of(x), self.shape_of(y)
            data = np.concatenate([a.data, b.data])
            if data.size == 0:
                raise Skip
            return self.emit(
                "Concat",
                [a, b],
                [{"dtype": I64, "shape": data.shape, "bound": float(data.max()), "data": data}],
                axis=0,
            )[0]
        if what == "constant_of_shape" and self.chance(0.05):
            return self.big_constant()
        if what == "constant_of_shape":
            target = tuple(self.integer(1, 4) for _ in range(self.integer(0, 3)))
            shape = self.shape_tensor(target)
            dtype = self.choice([F32, I64, F16, BOOL])
            fill = np.array([1.5 if dtype in FLOATS else 1], dtype) if dtype != BOOL else np.array([True])
            attrs = {"value": numpy_helper.from_array(fill, "fill")} if self.chance(0.8) or dtype != F32 else {}
            if not attrs:
                fill = np.array([0.0], F32)
            return self.emit(
                "ConstantOfShape",
                [shape],
                [
                    {
                        "dtype": dtype,
                        "shape": target,
                        "bound": 1.5,
                        "stable": True,
                        "data": np.full(target, fill[0], dtype),
                    }
                ],
                **attrs,
            )[0]
        if what == "range":
            if x.rank == 0:
                raise Skip
            axis = self.integer(0, x.rank - 1)
            dim = x.shape[axis]
            limit = self.emit(
                "Gather",
                [self.shape_of(x), self.param(np.array(axis, np.int64))],
                [{"dtype": I64, "shape": (), "bound": float(dim), "data": np.array(dim, np.int64)}],
                axis=0,
            )[0]
            start = self.param(np.array(self.integer(-2, dim - 1), np.int64))
            delta = self.param(np.array(self.choice([1, 1, 2]), np.int64))
            length = len(range(int(start.data), dim, int(delta.data)))
            data = np.arange(int(start.data), dim, int(delta.data), dtype=np.int64)
            value = self.emit(
                "Range",
                [start, limit, delta],
                [{"dtype": I64, "shape": (length,), "bound": float(max(abs(start.data), dim)), "data": data}],
            )[0]
            if self.chance(0.5):
                return self.cast(value, F32)
            return value
        if x.rank == 0:
            raise Skip
        shape = self.shape_of(x)
        index = self.choice(
            [
                np.array(self.integer(-x.rank, x.rank - 1), np.int64),
                np.array([self.integer(-x.rank, x.rank - 1)], np.int64),
            ]
        )
        data = np.take(shape.data, index)
        return self.emit(
            "Gather",
            [shape, self.param(index)],
            [{"dtype": I64, "shape": data.shape, "bound": float(np.max(data)), "data": data}],
            axis=0,
        )[0]

    def big_constant(self) -> Value:
        """A ConstantOfShape or Expand far larger than its inputs (fold's size guard keeps it a node), reduced."""
        target = (self.choice([128, 160]), self.choice([128, 160]))
        if self.chance(0.5):
            big = self.emit(
                "ConstantOfShape",
                [self.const(np.array(target, np.int64))],
                [{"dtype": F32, "shape": target, "bound": 0.5}],
                value=numpy_helper.from_array(np.array([0.5], np.float32), "fill"),
            )[0]
        else:
            small = self.random_const((1, target[1]), F32)
            big = self.emit(
                "Expand",
                [small, self.const(np.array(target, np.int64))],
                [{"dtype": F32, "shape": target, "bound": small.bound}],
            )[0]
        return self.emit(
            "ReduceMean", [big], [{"dtype": F32, "shape": (), "bound": big.bound, "stable": False}], keepdims=0
        )[0]

    def op_index(self) -> Value:
        """ArgMax/ArgMin and TopK (discontinuous: stable operands only), GatherElements, NonZero of a constant."""
        what = self.choice(["argmax", "topk", "gather_elements", "nonzero"])
        if what == "nonzero":
            mask = np.asarray(self.rng.random(self.random_shape(1, 3)) < 0.5)
            source = self.const(mask if self.chance(0.5) else mask.astype(np.float32))
            count = int(np.count_nonzero(mask))
            return self.emit(
                "NonZero",
                [source],
                [
                    {
                        "dtype": I64,
                        "shape": (mask.ndim, count),
                        "bound": 5.0,
                        "data": np.array(np.nonzero(mask), np.int64),
                    }
                ],
            )[0]
        if what == "gather_elements":
            x = self.any_value(min_rank=1)
            axis = self.integer(-x.rank, x.rank - 1)
            shape = tuple(self.integer(1, d) for d in x.shape)
            indices = self.rng.integers(-x.shape[axis], x.shape[axis], shape).astype(np.int64)
            return self.emit(
                "GatherElements",
                [x, self.param(indices)],
                [{"dtype": x.dtype, "shape": shape, "bound": x.bound}],
                axis=axis,
            )[0]
        x = self.pick(
            lambda v: v.rank >= 1 and v.stable and v.dtype in (F32, I64, I32), lambda: self.pick_float(min_rank=1)
        )
        if not x.stable:
            raise Skip
        axis = self.integer(-x.rank, x.rank - 1)
        if what == "argmax":
            keepdims = self.chance(0.5)
            shape = (
                tuple(1 if i == axis % x.rank else d for i, d in enumerate(x.shape))
                if keepdims
                else tuple(d for i, d in enumerate(x.shape) if i != axis % x.rank)
            )
            attrs = {"axis": axis, "keepdims": int(keepdims)}
            if self.chance(0.3):
                attrs["select_last_index"] = 1
            return self.emit(
                self.choice(["ArgMax", "ArgMin"]),
                [x],
                [{"dtype": I64, "shape": shape, "bound": float(max(x.shape))}],
                **attrs,
            )[0]
        k = self.integer(1, x.shape[axis])
        shape = tuple(k if i == axis % x.rank else d for i, d in enumerate(x.shape))
        attrs = {"axis": axis} if axis != -1 else {}
        if self.chance(0.3):
            attrs["largest"] = 0
        values, _ = self.emit(
            "TopK",
            [x, self.param(np.array([k], np.int64))],
            [
                {"dtype": x.dtype, "shape": shape, "bound": x.bound},
                {"dtype": I64, "shape": shape, "bound": float(x.shape[axis])},
            ],
            **attrs,
        )
        return values

    def op_misc(self) -> Value:
        """Mod, CumSum, Einsum, DepthToSpace/SpaceToDepth and Trilu."""
        what = self.choice(["mod", "cumsum", "einsum", "depth_to_space", "trilu"])
        if what == "mod":
            x = self.pick_int()
            divisor = self.const(np.array(self.choice([2, 3, 5]), x.dtype))
            return self.emit("Mod", [x, divisor], [{"dtype": x.dtype, "shape": x.shape, "bound": 5.0}])[0]
        if what == "cumsum":
            x = self.pick_float(min_rank=1, dtypes=(F32,))
            axis = self.integer(-x.rank, x.rank - 1)
            attrs = {k: 1 for k in ("exclusive", "reverse") if self.chance(0.3)}
            return self.emit(
                "CumSum",
                [x, self.param(np.array(axis, np.int64))],
                [{"dtype": x.dtype, "shape": x.shape, "bound": x.bound * x.shape[axis], "stable": False}],
                **attrs,
            )[0]
        if what == "einsum":
            a = self.squash(self.matrix(), 10.0)
            if self.chance(0.5):
                return self.emit(
                    "Einsum", [a], [{"dtype": a.dtype, "shape": a.shape[::-1], "bound": a.bound}], equation="ij->ji"
                )[0]
            n = self.integer(1, 4)
            b = self.random_const((a.shape[1], n), a.dtype)
            return self.emit(
                "Einsum",
                [a, b],
                [{"dtype": a.dtype, "shape": (a.shape[0], n), "bound": a.bound * a.shape[1], "stable": False}],
                equation="ij,jk->ik",
            )[0]
        if what == "trilu":
            x = self.pick_float(min_rank=2)
            inputs = [x] + ([self.param(np.array(self.integer(-2, 2), np.int64))] if self.chance(0.5) else [])
            return self.emit(
                "Trilu", inputs, [{"dtype": x.dtype, "shape": x.shape, "bound": x.bound}], upper=int(self.chance(0.5))
            )[0]
        x = self.image(dtypes=(F32,))
        if x.rank != 4:
            raise Skip
        n, c, h, w = x.shape
        if self.chance(0.5) and c % 4 == 0:
            mode = self.choice(["DCR", "CRD"])
            return self.emit(
                "DepthToSpace",
                [x],
                [{"dtype": x.dtype, "shape": (n, c // 4, h * 2, w * 2), "bound": x.bound}],
                blocksize=2,
                mode=mode,
            )[0]
        if h % 2 or w % 2:
            raise Skip
        return self.emit(
            "SpaceToDepth",
            [x],
            [{"dtype": x.dtype, "shape": (n, c * 4, h // 2, w // 2), "bound": x.bound}],
            blocksize=2,
        )[0]

    def op_dropout(self) -> Value:
        x = self.pick_float(dtypes=(F32, F16))
        inputs: list[Value | None] = [x]
        if self.chance(0.5):
            inputs.append(self.param(np.array(self.choice([0.5, 0.1, 0.0]), np.float32)))
            if self.chance(0.5):
                inputs.append(self.param(np.array(False)))
        outputs = [{"dtype": x.dtype, "shape": x.shape, "bound": x.bound}]
        if self.chance(0.3):
            outputs.append({"dtype": BOOL, "shape": x.shape, "bound": 1.0, "stable": True})
        return self.emit("Dropout", inputs, outputs, **({"seed": 7} if self.chance(0.2) else {}))[0]

    def op_duplicate(self) -> Value:
        """A copy of an earlier node of this scope (same operator, inputs and attributes): cse merges them."""
        candidates = [n for n in self.scope.nodes if n.op_type not in ("If", "Constant") and n.output]
        node = self.choice(candidates[-8:])
        by_name = {v.name: v for v in self.scope.visible()}
        originals = [by_name.get(name) for name in node.output]
        names = []
        made = []
        for original in originals:
            if original is None:
                names.append("")
                continue
            copy = Value(
                self.fresh(node.op_type.lower() + "_dup"),
                original.dtype,
                original.shape,
                original.bound,
                original.stable,
                original.data,
            )
            names.append(copy.name)
            made.append(copy)
        duplicate = helper.make_node(node.op_type, list(node.input), names, name=self.fresh("dup"))
        duplicate.attribute.extend(node.attribute)
        self.scope.nodes.append(duplicate)
        self.ops[node.op_type] += 1
        for value in made:
            self.register(value)
        if not made:
            raise Skip
        return made[0]

    def op_if(self) -> Value:
        """An If whose branches compute from outer values; the condition is constant or depends on inputs."""
        if self.scope.depth >= 2:
            raise Skip
        kind = (
            self.choice(["constant", "input", "computed"])
            if self.scope.depth == 0
            else self.choice(["constant", "computed"])
        )
        if kind == "constant":
            cond = self.const(np.array(self.chance(0.5)).reshape(self.choice([(), (1,)])))
        elif kind == "input":
            cond = self.new_input(BOOL, self.choice([(), (1,)]))
        else:
            x = self.pick_float(accept=lambda v: v.stable, dtypes=(F32,))
            if not x.stable:
                raise Skip
            reduced = self.emit("ReduceMax", [x], [{"dtype": x.dtype, "shape": (), "bound": x.bound}], keepdims=0)[0]
            threshold = self.const(np.array(self.choice([0.0, 0.5, -0.5]), np.float32))
            cond = self.emit("Greater", [reduced, threshold], [{"dtype": BOOL, "shape": (), "bound": 1.0}])[0]
        local_names = self.chance(0.4)
        # With a constant condition the branches may give values of different shapes: the If's output has
        # the shape of the branch taken (with an input-dependent one, later operators could not fit both).
        any_shape = kind == "constant" and self.chance(0.3)
        then_graph, outputs = self.branch("then", None, local_names)
        else_graph, outputs_else = self.branch("else", outputs, local_names, any_shape)
        taken = outputs if kind == "constant" and bool(cond.data.reshape(-1)[0]) else outputs_else
        specs = [
            {"dtype": t.dtype, "shape": t.shape, "bound": max(a.bound, b.bound), "stable": a.stable and b.stable}
            for t, a, b in zip(taken, outputs, outputs_else)
        ]
        values = self.emit("If", [cond], specs, then_branch=then_graph, else_branch=else_graph)
        return values[0]

    def branch(
        self, label: str, like: list[Value] | None, local_names: bool, any_shape: bool = False
    ) -> tuple[onnx.GraphProto, list[Value]]:
        """A branch body: a few operators over outer values, then outputs (shaped ``like`` the other branch's)."""
        outer = self.scope
        self.scope = Scope(parent=outer, depth=outer.depth + 1, local_names=itertools.count() if local_names else None)
        try:
            self.steps(self.integer(1, 4))
            produced = {name for node in self.scope.nodes for name in node.output}
            made = [v for v in self.scope.values if v.name in produced]
            if like is None:
                results = (
                    [self.recent(made) for _ in range(self.integer(1, 2))]
                    if made
                    else [self.unary("Identity", self.pick_float())]
                )
            else:
                results = [self.branch_result(want, made, any_shape) for want in like]
            # A branch output must be a distinct value made in the branch.
            seen: set[str] = set()
            for i, v in enumerate(results):
                if v.name in seen or v.name not in {n for node in self.scope.nodes for n in node.output}:
                    results[i] = self.unary("Identity", v)
                seen.add(results[i].name)
            graph = helper.make_graph(
                self.scope.nodes,
                self.fresh(label),
                [],
                [self.output_info(v, allow_unknown=True) for v in results],
                self.scope.initializers,
            )
            return graph, results
        finally:
            self.scope = outer

    def branch_result(self, want: Value, made: list[Value], any_shape: bool = False) -> Value:
        """A value of ``want``'s dtype (and shape) for the else branch: one it made, or one derived here."""
        same = [v for v in made if v.dtype == want.dtype and (any_shape or v.shape == want.shape)]
        if same and self.chance(0.8):
            return self.recent(same)
        visible = [v for v in self.scope.visible() if v.dtype == want.dtype and v.shape == want.shape]
        if visible:
            op = self.choice(["Identity", "Neg", "Abs"] if want.dtype in FLOATS else ["Identity"])
            return self.unary(op, self.recent(visible))
        return self.constant_node(want)

    def constant_node(self, like: Value) -> Value:
        array = self.random_array(like.shape, like.dtype)
        name = self.fresh("k")
        self.add_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))
        return self.register(Value(name, like.dtype, like.shape, bound=max(like.bound, 1.0), data=array, kind="const"))

    def output_info(self, v: Value, allow_unknown: bool = False) -> onnx.ValueInfoProto:
        how = self.choice(["concrete", "rank"] + (["none"] if allow_unknown else []))
        if how == "none":
            return helper.make_tensor_value_info(v.name, elem_type(v.dtype), None)
        concrete = how == "concrete" and not self.has_symbolic_inputs() and not self.inference_disagrees
        dims = list(v.shape) if concrete else [None] * v.rank
        return helper.make_tensor_value_info(v.name, elem_type(v.dtype), dims)

    def has_symbolic_inputs(self) -> bool:
        return any(d.HasField("dim_param") for _, info in self.inputs for d in info.type.tensor_type.shape.dim)

    # ======================================================================================================

    GENERATORS = (
        "op_unary",
        "op_binary",
        "op_exp_log_sqrt",
        "op_clip",
        "op_matmul",
        "op_matmul_add",
        "op_conv",
        "op_conv_batchnorm",
        "op_transpose",
        "op_reshape",
        "op_reduce",
        "op_concat",
        "op_slice",
        "op_gather",
        "op_cast",
        "op_compare",
        "op_where",
        "op_logic",
        "op_int_binary",
        "op_softmax",
        "op_gemm",
        "op_pool",
        "op_normalization",
        "op_flatten",
        "op_squeeze_unsqueeze",
        "op_expand",
        "op_tile",
        "op_split",
        "op_shape_arithmetic",
        "op_conv_transpose",
        "op_dropout",
        "op_duplicate",
        "op_if",
        "op_pad",
        "op_pad_conv",
        "op_pad_pool",
        "op_cast_pair",
        "op_masked_softmax",
        "op_index",
        "op_misc",
    )

    def steps(self, count: int) -> None:
        for _ in range(count):
            for _attempt in range(4):
                generator = getattr(self, self.choice(self.GENERATORS))
                try:
                    generator()
                    break
                except Skip:
                    # What was made before the Skip stays: it is valid, and unused values are dce's business.
                    continue

    def build(self) -> FuzzCase:
        for _ in range(self.integer(1, 2)):
            self.new_input(F32, self.random_shape(1, 4))
        self.steps(self.integer(1, 12))
        candidates = [v for v in self.root.values if v.kind == "node"]
        if not candidates:
            candidates = [self.unary("Identity", self.pick_float())]
        leaves = [v for v in candidates if v.readers == 0]
        outputs = [v for v in leaves if self.chance(0.6)]
        outputs += [v for v in candidates if v.readers and self.chance(0.05)]
        if not outputs:
            outputs = [candidates[-1]]
        if self.chance(0.03):
            outputs.append(self.inputs[0][0])
        constants = [v for v in self.root.values if v.kind == "const"]
        if constants and self.chance(0.05):
            outputs.append(self.recent(constants))  # a constant (initializer or Constant node) as an output
        outputs = list({v.name: v for v in outputs}.values())
        if self.chance(0.02):
            # No node at all: the output is the input.
            self.root.nodes, self.root.initializers, self.inputs = [], [], self.inputs[:1]
            self.root.values = [self.inputs[0][0]]
            outputs = [self.inputs[0][0]]
        inputs = [info for _, info in self.inputs]
        graph = helper.make_graph(
            self.root.nodes, "fuzz", inputs, [self.output_info(v) for v in outputs], self.root.initializers
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="onnxopt-fuzz"
        )
        model.ir_version = OPSETS[self.opset]
        if self.chance(0.25) and not self.inference_disagrees:
            # As exporters write them: value_info for intermediate values, subgraphs included.
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        if self.inference_disagrees:
            # Where onnx's shape inference gets a size wrong, operators after it (a MatMul with a constant,
            # say) may look invalid to onnx.checker, though onnxruntime runs them: such graphs are dropped.
            try:
                onnx.checker.check_model(model, full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
                assume(False)
        feeds = [self.feeds(seed) for seed in (0, 1)]
        layouts = {v.name: (v.dtype, v.shape) for v in self.root.values if v.kind == "node"}
        return FuzzCase(model, feeds, self.ops, layouts)

    def feeds(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {}
        for value, _ in self.inputs:
            if value.name in self.fixed:
                feeds[value.name] = self.fixed[value.name].copy()
                continue
            if value.name in self.overridden:
                if seed == 0:
                    continue  # the default
                array = rng.uniform(-1, 1, value.shape)
            elif value.dtype in FLOATS:
                array = rng.standard_normal(value.shape).clip(-5, 5)
            elif value.dtype == BOOL:
                array = rng.random(value.shape) < 0.5
            else:
                array = rng.integers(-4, 5, value.shape)
            feeds[value.name] = np.asarray(array).astype(value.dtype)
        return feeds


@st.composite
def onnx_cases(draw) -> FuzzCase:
    """A random valid model (opset 18 to 21) with the inputs to run it on (two sets)."""
    return Builder(draw).build()
