"""``fuse``: operator fusions and no-op removals that are exact for every target.

Each is a rule of ``onnxopt.pattern`` (its stats key in brackets):

* Transpose + Transpose -> one Transpose with the composed permutation, or nothing when they cancel
  [``transpose_transpose``]; a Transpose with the identity permutation is removed [``transpose_identity``].
* Pad + Conv -> Conv [``pad_conv``], when the Pad adds zeros (constant mode, value 0) on spatial axes
  only: the Conv's own ``pads`` (explicit or ``auto_pad=VALID``) add the same zeros. Pad + AveragePool ->
  AveragePool with ``count_include_pad=1`` [``pad_average_pool``] for zeros, and Pad + MaxPool -> MaxPool
  [``pad_max_pool``] for ``-inf``, which no maximum picks; both without ``ceil_mode`` and with pads smaller
  than the kernel, which onnxruntime requires (a window then always sees the input).
* No-ops at inference, replaced by their input: Dropout whose training mode is absent or the constant
  false (``is_test=1`` before opset 7) and whose mask is unused [``noop_dropout``]; Expand whose target
  shape is 1 or the input's known size on every axis without raising the rank [``noop_expand``]; Slice
  with step 1, start 0 and an end at or past each sliced axis' size [``noop_slice``]; Pad whose amounts
  are all 0, in any mode [``noop_pad``]; Where whose condition is the constant true (false) everywhere, by
  the operand it picks when the others do not broadcast it to a larger shape [``constant_where``].
* Slice of a Slice along other axes -> one Slice with both axes' bounds [``slice_slice``]: slicing one
  axis does not change another's size, so the two commute and compose exactly. An inner Slice that
  several such Slices read merges into each.
* Cast(Cast(x, wider), back to x's type) -> x [``noop_cast_pair``], when every value of x's type is
  exactly representable in the wider type (e.g. float16 -> float32, int8 -> float16, int32 -> float64,
  bool -> any number), so the round trip gives back each value.

The fusion library in ``passes/fusions`` adds, each module's docstring saying when its rules are exact:

* ``affine``: constants that scale or shift the output channels of a linear operator folded into its
  weight and bias: BatchNormalization and per-channel Mul/Add after Conv and ConvTranspose
  [``conv_batchnorm``, ``conv_mul``, ``conv_add``, ``conv_transpose_batchnorm``, ``conv_transpose_mul``,
  ``conv_transpose_add``], per-channel Mul/Add after BatchNormalization [``batchnorm_mul``,
  ``batchnorm_add``], per-column Mul/Add after Gemm [``gemm_mul``, ``gemm_add``], per-column Mul after
  a MatMul by a constant matrix [``matmul_mul``], MatMul + Add -> Gemm for 2-D inputs [``matmul_add_to_gemm``];
* ``normalization``: LayerNormalization (opset 17) and RMSNormalization (opset 23) from their decomposed
  forms, gamma and beta folded in [``layer_norm``, ``layer_norm_affine``, ``rms_norm``, ``norm_scale``,
  ``layer_norm_bias``];
* ``activations``: Gelu (opset 20, erf and tanh forms), HardSigmoid, HardSwish (opset 14) and Mish (opset
  18) and Swish (opset 24, not for onnxruntime) from element-wise chains [``gelu_erf``, ``gelu_tanh``,
  ``hard_sigmoid``, ``hard_swish``, ``mish``, ``swish``];
* ``reshapes``: Reshape/Flatten/Squeeze/Unsqueeze pairs as one Reshape, shape no-ops removed
  [``reshape_chain``, ``noop_reshape``, ``noop_concat``, ``noop_variadic``, ``noop_split``, ``noop_tile``,
  ``noop_identity``]; a Reshape pair around an element-wise region dropped by computing the region in
  the input's shape [``reshapes_around_elementwise``];
* ``transposes``: Transpose folded into Gemm/MatMul, moved through element-wise operators where it then
  cancels [``transpose_gemm``, ``transpose_matmul``, ``transpose_elementwise``, ``elementwise_transposes``];
* ``rotary``: RotaryEmbedding (opset 23) from Llama's ``x * cos + rotate_half(x) * sin`` on 4-D queries and
  keys, when cos and sin provably repeat one half, and partial rotation folded into its
  ``rotary_embedding_dim``; caches of batch 1 expanded to the input's batch, which onnxruntime requires
  (generic target and onnxruntime only) [``rotary_embedding``, ``rotary_embedding_partial``,
  ``rotary_cache_batch``];
* ``horizontal``: MatMuls (or Gemms) by constant weights on one input, with optional per-column biases,
  packed into one MatMul + Add + Split (generic target; ``ort_fuse`` packs attention
  projections its own way) [``parallel_matmuls_to_split``].

A rule whose operator the model's opset lacks does not run. For ``--target tensorrt`` (whose parser
could not be checked here) only LayerNormalization and HardSigmoid among the fused operators are
emitted; the others stay decomposed, a form TensorRT fuses itself. OpenVINO 2026.4 and onnxruntime 1.32
were checked to compile and run every fused operator emitted (float32 and float16); RotaryEmbedding is
not emitted for ``--target openvino``, which ran it slower than the decomposed form.

A fusion only fires when the intermediate value has no other reader and is not a graph output (Transpose
pairs excepted: a shared first Transpose stays, and the second reads its input directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir
from onnxopt.pass_infra import PassContext
from onnxopt.passes.fusions import activations, affine, horizontal, normalization, reshapes, rotary, transposes
from onnxopt.passes.fusions.common import broadcast_dims
from onnxopt.pattern import Match, MatchResult, RewritePass, RewriteRule


def _standard(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in ("", None, "ai.onnx")


def _infer_subgraph_shapes(graph: gs.Graph) -> None:
    """Gives values made inside subgraph bodies the shapes onnx shape inference finds for them.

    ``ir.infer_shapes`` fills in only the main graph, and MatMul+Add must know that ``A`` is 2-D. This
    is a second inference over the model, so it runs only when a subgraph holds a MatMul. Weights are
    stripped first (shapes rarely depend on them), as ``ir.infer_shapes`` does.
    """
    if not any(_standard(n, "MatMul") for sub in list(ir.all_graphs(graph))[1:] for n in sub.nodes):
        return
    exported = gs.export_onnx(graph, do_type_check=False)
    opsets = [onnx.helper.make_opsetid(d, ir.opset_version(graph, d)) for d in ir.imported_domains(graph)]
    model = onnx.helper.make_model(exported.graph, opset_imports=opsets)
    model.ir_version = max(graph.ir_version or 8, 8)
    model.functions.extend(exported.functions)
    pending = [model.graph]
    while pending:
        proto = pending.pop()
        for init in proto.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL and len(init.raw_data) > 1 << 16:
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                init.external_data.add(key="location", value="__stripped__")
        pending += [a.g for n in proto.node for a in n.attribute if a.HasField("g")]
        pending += [g for n in proto.node for a in n.attribute for g in a.graphs]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes only stop fusions
        return
    _copy_local_shapes(graph, inferred.graph, outermost=True)


def _copy_local_shapes(graph: gs.Graph, proto: onnx.GraphProto, outermost: bool) -> None:
    """Copies inferred shapes onto values produced inside (nested) subgraphs that have none yet."""
    if not outermost:
        infos = {vi.name: vi.type for vi in proto.value_info}
        for node in graph.nodes:
            for tensor in node.outputs:
                info = infos.get(tensor.name)
                if tensor.shape is None and info is not None and info.tensor_type.HasField("shape"):
                    tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in info.tensor_type.shape.dim]
    # Node names may be empty or repeated; a node's first output name is unique within its graph.
    protos = {n.output[0]: n for n in proto.node if n.output and n.output[0]}
    for node in graph.nodes:
        node_proto = protos.get(node.outputs[0].name) if node.outputs and node.outputs[0].name else None
        if node_proto is None:
            continue
        for attr in node_proto.attribute:
            sub = node.attrs.get(attr.name)
            if attr.HasField("g") and isinstance(sub, gs.Graph):
                _copy_local_shapes(sub, attr.g, outermost=False)


def _constant_padding(pad: gs.Node, rank: int) -> tuple[list[int], float] | None:
    """``(amounts, value)`` of a constant-mode Pad on all ``rank`` axes with known, non-negative amounts."""
    if pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return None
    if "pads" in pad.attrs:
        amounts, value = list(pad.attrs["pads"]), float(pad.attrs.get("value", 0.0))
    else:
        if len(pad.inputs) < 2 or (len(pad.inputs) > 3 and pad.inputs[3].name):
            return None
        amounts = ir.constant_value(pad.inputs[1])
        if amounts is None:
            return None
        amounts = [int(a) for a in amounts.reshape(-1)]
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2].name:
            constant = ir.constant_value(pad.inputs[2])
            if constant is None or constant.size != 1:
                return None
            value = float(constant.reshape(-1)[0])
    if len(amounts) != 2 * rank or any(a < 0 for a in amounts):
        return None
    return amounts, value


def _pad_amounts(pad: gs.Node, rank: int) -> list[int] | None:
    """The zero-padding amounts of a constant-mode Pad with value 0, or ``None``."""
    padding = _constant_padding(pad, rank)
    return padding[0] if padding is not None and padding[1] == 0.0 else None


def _perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return list(perm)
    shape = node.inputs[0].shape
    return list(reversed(range(len(shape)))) if shape is not None else None


# ---------------------------------------------------------------------------------------------------
# Rules


class PadConvToConv(RewriteRule):
    """Zero padding before a Conv becomes the Conv's own padding (the same zeros, summed per side)."""

    name = "pad_conv"

    def pattern(self, op, x, w, b):
        return op.Conv(op.Pad(x, _allow_other_inputs=True), w, op.optional(b))

    def check(self, m: Match) -> MatchResult:
        if m.attr("Conv", "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return m.fail("Conv pads by auto_pad")
        shape = m.shape("w")
        if shape is None:
            return m.fail("the rank of the Conv weight is unknown")
        rank = len(shape)
        amounts = _pad_amounts(m.node("Pad"), rank)
        if amounts is None:
            return m.fail("Pad is not a constant zero padding with known amounts")
        if amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
            return m.fail("Pad pads the batch or channel axis")
        if len(m.attr("Conv", "pads", [0] * (2 * (rank - 2)))) != 2 * (rank - 2):
            return m.fail("Conv pads do not match the weight's rank")
        return m.ok()

    def rewrite(self, op, m: Match):
        rank = len(m.shape("w"))
        spatial = rank - 2
        amounts = _pad_amounts(m.node("Pad"), rank)
        attrs = m.attrs("Conv")
        conv_pads = list(attrs.get("pads", [0] * (2 * spatial)))
        begins = [conv_pads[i] + amounts[2 + i] for i in range(spatial)]
        ends = [conv_pads[spatial + i] + amounts[rank + 2 + i] for i in range(spatial)]
        attrs["pads"] = begins + ends
        attrs.pop("auto_pad", None)  # VALID: no padding of its own, and pads may not be given beside it
        return op.Conv(m["x"], m["w"], m["b"], _name=m.node("Conv").name, **attrs)


class _PadPoolToPool(RewriteRule):
    """Constant padding before a pooling operator becomes the pooling's own ``pads``."""

    pool_op: ClassVar[str]
    pad_value: ClassVar[float]

    def pattern(self, op, x):
        return getattr(op, self.pool_op)(op.Pad(x, _allow_other_inputs=True))

    def padding(self, m: Match) -> list[int] | None:
        kernel = m.attr(self.pool_op, "kernel_shape", None)
        if kernel is None:
            return None
        padding = _constant_padding(m.node("Pad"), 2 + len(kernel))
        if padding is None or padding[1] != self.pad_value:
            return None
        return padding[0]

    def combined_pads(self, m: Match) -> list[int]:
        kernel = list(m.attr(self.pool_op, "kernel_shape"))
        spatial, amounts = len(kernel), self.padding(m)
        own = list(m.attr(self.pool_op, "pads", [0] * (2 * spatial)))
        return ([own[i] + amounts[2 + i] for i in range(spatial)]
                + [own[spatial + i] + amounts[spatial + 4 + i] for i in range(spatial)])

    def check(self, m: Match) -> MatchResult:
        pool = m.node(self.pool_op)
        if m.attr(self.pool_op, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return m.fail(f"{self.pool_op} pads by auto_pad")
        if m.attr(self.pool_op, "ceil_mode", 0):
            return m.fail("ceil_mode windows may start in the padding")
        if len(pool.outputs) > 1 and pool.outputs[1].outputs:
            return m.fail("MaxPool's indices would count positions of the unpadded input")
        amounts = self.padding(m)
        if amounts is None:
            return m.fail(f"Pad is not a constant padding by {self.pad_value} with known amounts")
        kernel = list(m.attr(self.pool_op, "kernel_shape"))
        rank = 2 + len(kernel)
        if amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
            return m.fail("Pad pads the batch or channel axis")
        pads = self.combined_pads(m)
        # onnxruntime rejects pooling pads as large as the kernel; a window would then see only padding.
        if any(pad >= size for pad, size in zip(pads, kernel + kernel)):
            return m.fail("the padding would reach the kernel's size")
        return m.ok()

    def pool_attrs(self, m: Match) -> dict:
        attrs = m.attrs(self.pool_op)
        attrs["pads"] = self.combined_pads(m)
        attrs.pop("auto_pad", None)
        return attrs

    def rewrite(self, op, m: Match):
        return getattr(op, self.pool_op)(m["x"], _name=m.node(self.pool_op).name, **self.pool_attrs(m))


class PadAveragePoolToAveragePool(_PadPoolToPool):
    """Zero padding before an AveragePool becomes its ``pads``, with the padded zeros counted in each average."""

    name = "pad_average_pool"
    pool_op = "AveragePool"
    pad_value = 0.0

    def check(self, m: Match) -> MatchResult:
        own = m.attr("AveragePool", "pads", None)
        if own and any(own) and not m.attr("AveragePool", "count_include_pad", 0):
            return m.fail("the AveragePool's own padding is not counted, the Pad's zeros are")
        return super().check(m)

    def pool_attrs(self, m: Match) -> dict:
        attrs = super().pool_attrs(m)
        attrs["count_include_pad"] = 1
        return attrs


class PadMaxPoolToMaxPool(_PadPoolToPool):
    """Padding by -inf before a MaxPool becomes its ``pads``, which no maximum picks either."""

    name = "pad_max_pool"
    pool_op = "MaxPool"
    pad_value = float("-inf")


class TransposeTransposeToTranspose(RewriteRule):
    """Replaces Transpose(Transpose(x)) with one Transpose of the composed permutation, or x if they cancel."""

    name = "transpose_transpose"
    # The inner Transpose may have other readers: it then stays, and this one reads x directly.
    allow_shared_intermediates = True

    def pattern(self, op, x):
        return op.Transpose(op.Transpose(x, _tag="inner"), _tag="outer")

    def check(self, m: Match) -> MatchResult:
        inner, outer = _perm(m.node("inner")), _perm(m.node("outer"))
        if inner is None or outer is None:
            return m.fail("a permutation is unknown (no perm and unknown rank)")
        if len(inner) != len(outer):
            return m.fail("the permutations have different lengths")
        return m.ok()

    def rewrite(self, op, m: Match):
        inner, outer = _perm(m.node("inner")), _perm(m.node("outer"))
        composed = [inner[axis] for axis in outer]
        if composed == list(range(len(composed))):
            return m["x"]
        return op.Transpose(m["x"], perm=composed, _name=m.node("outer").name)


class TransposeIdentityToNothing(RewriteRule):
    """Removes a Transpose with the identity permutation."""

    name = "transpose_identity"

    def pattern(self, op, x):
        return op.Transpose(x)

    def check(self, m: Match) -> MatchResult:
        perm = _perm(m.node("Transpose"))
        if perm is None or perm != list(range(len(perm))):
            return m.fail("the permutation is not the identity (or unknown)")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


# -- no-ops at inference


class NoopDropout(RewriteRule):
    """Removes a Dropout in inference mode (its mask output unused): it passes its input through."""

    name = "noop_dropout"

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True)

    def check(self, m: Match) -> MatchResult:
        dropout = m.node("Dropout")
        opset = m.opset() or 0
        if opset < 7 and not m.attr("Dropout", "is_test", 0):
            return m.fail("Dropout before opset 7 without is_test trains")
        if opset >= 12 and len(dropout.inputs) > 2 and dropout.inputs[2].name:
            training = ir.constant_value(dropout.inputs[2])
            if training is None or training.size != 1 or bool(training.reshape(-1)[0]):
                return m.fail("training_mode is not the constant false")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


class NoopExpand(RewriteRule):
    """Removes an Expand whose target shape broadcasts to the input's own shape."""

    name = "noop_expand"

    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def check(self, m: Match) -> MatchResult:
        target = m.value("shape")
        dims = m.shape("x")
        if target is None:
            return m.fail("the target shape is not constant")
        if dims is None:
            return m.fail("the input's shape is unknown")
        target = [int(d) for d in target.reshape(-1)]
        if len(target) > len(dims):
            return m.fail("Expand raises the rank")
        for size, dim in zip(reversed(target), reversed(dims)):
            if size != 1 and not (isinstance(dim, int) and dim == size):
                return m.fail(f"target size {size} may differ from the input's {dim}")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


class ConstantConditionWhere(RewriteRule):
    """Replaces Where(c, x, y) whose condition is the constant true (or false) everywhere by x (or y)."""

    name = "constant_where"

    def pattern(self, op, condition, x, y):
        return op.Where(condition, x, y)

    def chosen(self, m: Match) -> str | None:
        condition = m.value("condition")
        if condition is None or condition.size == 0:
            return None
        if condition.all():
            return "x"
        return "y" if not condition.any() else None

    def check(self, m: Match) -> MatchResult:
        chosen = self.chosen(m)
        if chosen is None:
            return m.fail("the condition is not one constant value everywhere")
        shapes = [list(m.value("condition").shape), m.shape("x"), m.shape("y")]
        if any(shape is None for shape in shapes):
            return m.fail("an operand's shape is unknown")
        if broadcast_dims(*shapes) != list(m.shape(chosen)):
            return m.fail("the other operands broadcast the chosen one to another shape")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m[self.chosen(m)]


_SLICE_END_ALL = 2**31 - 1  # exporters write INT_MAX or INT64_MAX for "to the end"


def _slice_params(m: Match, prefix: str = "") -> list[np.ndarray] | str:
    """starts, ends, axes and steps of a matched Slice (variables ``{prefix}starts``, ...) as int64 vectors,
    the defaults filled in, or why they are not all constant."""
    starts, ends = m.value(f"{prefix}starts"), m.value(f"{prefix}ends")
    if starts is None or ends is None:
        return "starts or ends are not constant"
    axes = m.value(f"{prefix}axes") if m[f"{prefix}axes"] is not None else np.arange(starts.size)
    steps = m.value(f"{prefix}steps") if m[f"{prefix}steps"] is not None else np.ones(starts.size, np.int64)
    if axes is None or steps is None:
        return "axes or steps are not constant"
    return [np.asarray(v, np.int64).reshape(-1) for v in (starts, ends, axes, steps)]


class NoopSlice(RewriteRule):
    """Removes a Slice that takes every element: start 0, step 1 and an end at or past each axis' size."""

    name = "noop_slice"
    min_opset = 10  # starts, ends, axes and steps are inputs from opset 10 on

    def pattern(self, op, x, starts, ends, axes, steps):
        return op.Slice(x, starts, ends, op.optional(axes), op.optional(steps))

    def check(self, m: Match) -> MatchResult:
        params = _slice_params(m)
        if isinstance(params, str):
            return m.fail(params)
        dims = m.shape("x")
        for start, end, axis, step in zip(*params):
            dim = None
            if dims is not None and -len(dims) <= axis < len(dims) and isinstance(dims[axis], int):
                dim = dims[axis]
            if step != 1:
                return m.fail(f"step {step} on axis {axis}")
            if start != 0 and not (dim is not None and start <= -dim):
                return m.fail(f"start {start} on axis {axis} skips elements")
            if end < _SLICE_END_ALL and not (dim is not None and end >= dim):
                return m.fail(f"end {end} on axis {axis} may cut elements")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


def _slice_axes(node: gs.Node, data: gs.Tensor, rank: int | None) -> set[int] | None:
    """The axes (non-negative) a standard Slice of ``data`` cuts with constant bounds, or ``None`` when ``node``
    is no such Slice."""
    if node.op != "Slice" or node.domain not in ("", None, "ai.onnx") or node.inputs[0] is not data \
            or any(t is data for t in node.inputs[1:]):
        return None
    inputs = node.inputs + [gs.Variable.empty()] * (5 - len(node.inputs))
    starts, ends = ir.constant_value(inputs[1]), ir.constant_value(inputs[2])
    if starts is None or ends is None or (inputs[4].name and ir.constant_value(inputs[4]) is None):
        return None
    if not inputs[3].name:
        return set(range(starts.size))
    axes = ir.constant_value(inputs[3])
    if axes is None or (rank is None and (axes < 0).any()):
        return None
    return {int(a) + (rank if a < 0 else 0) for a in axes.reshape(-1)}


class SliceSliceToSlice(RewriteRule):
    """Merges a Slice of a Slice along other axes into one Slice of both axes' bounds.

    An inner Slice read by several Slices, each along other axes (Swin's patch merging takes rows 0::2 once
    for two column slices), merges into each of them and then dies."""

    name = "slice_slice"
    min_opset = 10
    allow_shared_intermediates = True

    def pattern(self, op, x, starts, ends, axes, steps, outer_starts, outer_ends, outer_axes, outer_steps):
        inner = op.Slice(x, starts, ends, op.optional(axes), op.optional(steps), _tag="inner")
        return op.Slice(inner, outer_starts, outer_ends, op.optional(outer_axes), op.optional(outer_steps),
                        _tag="outer")

    def bounds(self, m: Match, prefix: str) -> list[np.ndarray] | str:
        """starts, ends, axes (non-negative) and steps of one Slice, or why not."""
        params = _slice_params(m, prefix)
        if isinstance(params, str):
            return params
        starts, ends, axes, steps = params
        if (axes < 0).any():
            shape = m.shape("x")
            if shape is None:
                return "a negative axis of an input of unknown rank"
            axes = np.where(axes < 0, axes + len(shape), axes)
        return [starts, ends, axes, steps]

    def check(self, m: Match) -> MatchResult:
        inner, outer = self.bounds(m, ""), self.bounds(m, "outer_")
        for part in (inner, outer):
            if isinstance(part, str):
                return m.fail(part)
        if set(inner[2].tolist()) & set(outer[2].tolist()):
            return m.fail("both Slices cut one axis")
        sliced = m.node("inner").outputs[0]
        if ir.is_graph_output(m.graph, sliced):
            return m.fail("the inner Slice's result is a graph output")
        shape = m.shape("x")
        for reader in sliced.outputs:
            if reader is m.node("outer"):
                continue
            axes = _slice_axes(reader, sliced, None if shape is None else len(shape))
            if axes is None or axes & set(inner[2].tolist()):
                return m.fail("something other than a Slice along other axes reads the inner Slice")
        return m.ok()

    def rewrite(self, op, m: Match):
        merged = [np.concatenate(pair) for pair in zip(self.bounds(m, ""), self.bounds(m, "outer_"))]
        names = ("starts", "ends", "axes", "steps")
        return op.Slice(m["x"], *(op.const(value, name) for value, name in zip(merged, names)),
                        _name=m.node("outer").name)


class NoopPad(RewriteRule):
    """Removes a Pad that adds nothing (all amounts 0), whatever its mode."""

    name = "noop_pad"

    def pattern(self, op, x):
        return op.Pad(x, _allow_other_inputs=True)

    def check(self, m: Match) -> MatchResult:
        pad = m.node("Pad")
        if "pads" in pad.attrs:
            amounts = np.asarray(pad.attrs["pads"])
        else:
            amounts = ir.constant_value(pad.inputs[1]) if len(pad.inputs) > 1 and pad.inputs[1].name else None
        if amounts is None:
            return m.fail("the pad amounts are not constant")
        if np.any(amounts != 0):
            return m.fail("Pad adds or removes elements")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


def _lossless(source: np.dtype, wider: np.dtype) -> bool:
    """Whether every value of ``source`` is exactly representable in ``wider``."""
    if source == wider:
        return True
    if source == np.bool_:
        return wider.kind in "biuf"
    if source.kind == "f":
        return wider.kind == "f" and wider.itemsize > source.itemsize
    if source.kind in "iu" and wider.kind == "f":
        mantissa = {2: 11, 4: 24, 8: 53}.get(wider.itemsize, 0)
        return source.itemsize * 8 - (1 if source.kind == "i" else 0) <= mantissa
    if source.kind in "iu" and wider.kind in "iu":
        return np.can_cast(source, wider, casting="safe")
    return False


class NoopCastPair(RewriteRule):
    """Removes Cast(Cast(x, to=wider), to=type of x) when the first Cast loses nothing."""

    name = "noop_cast_pair"

    def pattern(self, op, x):
        return op.Cast(op.Cast(x, _tag="widen"), _tag="back")

    def check(self, m: Match) -> MatchResult:
        source = m.dtype("x")
        widen, back = m.attr("widen", "to"), m.attr("back", "to")
        if source is None or widen is None or back is None:
            return m.fail("a type is unknown")
        try:
            wider = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(widen))
            final = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(back))
        except (KeyError, TypeError, ValueError):
            return m.fail("a Cast goes to a type numpy lacks")
        if final != source:
            return m.fail(f"the second Cast goes to {final}, not back to {source}")
        if not _lossless(source, wider) or widen == onnx.TensorProto.BFLOAT16:
            return m.fail(f"casting {source} to {wider} may lose values")
        return m.ok()

    def rewrite(self, op, m: Match):
        return m["x"]


RULES = ((PadConvToConv(), PadAveragePoolToAveragePool(), PadMaxPoolToMaxPool()) + affine.RULES
         + (TransposeTransposeToTranspose(), TransposeIdentityToNothing(), NoopDropout(), NoopExpand(), NoopSlice(),
            SliceSliceToSlice(),
            NoopPad(), NoopCastPair(), ConstantConditionWhere())
         + normalization.RULES + activations.RULES + reshapes.RULES + transposes.RULES + rotary.RULES
         + horizontal.RULES)


@dataclass(frozen=True)
class Fuse(RewritePass):
    """Fuses Conv/Gemm, norm and activation chains, collapses Reshape/Transpose chains; removes no-ops."""

    name: ClassVar[str] = "fuse"
    rules: ClassVar[tuple] = RULES

    def prepare(self, graph: gs.Graph, ctx: PassContext) -> None:
        ir.infer_shapes(graph)
        _infer_subgraph_shapes(graph)
