"""``fuse``: operator fusions and no-op removals that are exact for every target.

Each is a rule of ``onnxopt.pattern`` (its stats key in brackets):

* Conv + BatchNormalization -> Conv [``conv_batchnorm``]. In inference mode BatchNormalization computes
  ``y = (x - mean) * s + bias`` with ``s = scale / sqrt(var + epsilon)`` per channel, so for
  ``x = Conv(input, W, b)`` it equals ``Conv(input, W * s, (b - mean) * s + bias)`` with ``s`` scaling
  each output channel of ``W``. Computed in float64, then cast to the weight's dtype.
* Conv * s -> Conv [``conv_mul``] and Conv + s -> Conv [``conv_add``], for a finite constant ``s``
  with one value per output channel (1 on every other axis, not raising the rank): ``Conv(x, W, b) * s
  = Conv(x, W * s, b * s)`` (not when another node reads ``W``: that would store a second weight) and ``Conv(x, W, b) + s = Conv(x, W, b + s)``, since the Conv is linear in
  ``W`` and ``b`` per output channel.
* MatMul + Add -> Gemm [``matmul_add_to_gemm``], when ``A`` is known to be 2-D, ``B`` is a constant 2-D
  matrix and the added constant broadcasts to the ``[M, N]`` result one way (Gemm's ``C`` rule);
  float32/float64 only, and opset 7 or later (older Add and Gemm broadcast by other rules).
* Transpose + Transpose -> one Transpose with the composed permutation, or nothing when they cancel
  [``transpose_transpose``]; a Transpose with the identity permutation is removed [``transpose_identity``].
* Pad + Conv -> Conv [``pad_conv``], when the Pad adds zeros (constant mode, value 0) on spatial axes
  only: the Conv's own ``pads`` add the same zeros.
* No-ops at inference, replaced by their input: Dropout whose training mode is absent or the constant
  false (``is_test=1`` before opset 7) and whose mask is unused [``noop_dropout``]; Expand whose target
  shape is 1 or the input's known size on every axis without raising the rank [``noop_expand``]; Slice
  with step 1, start 0 and an end at or past each sliced axis' size [``noop_slice``]; Pad whose amounts
  are all 0, in any mode [``noop_pad``].
* Cast(Cast(x, wider), back to x's type) -> x [``noop_cast_pair``], when every value of x's type is
  exactly representable in the wider type (e.g. float16 -> float32, int8 -> float16, int32 -> float64,
  bool -> any number), so the round trip gives back each value.

The fusion library in ``passes/fusions`` adds, each module's docstring saying when its rules are exact:

* ``normalization``: LayerNormalization (opset 17) and RMSNormalization (opset 23) from their decomposed
  forms, gamma and beta folded in [``layer_norm``, ``layer_norm_affine``, ``rms_norm``, ``norm_scale``,
  ``layer_norm_bias``];
* ``activations``: Gelu (opset 20, erf and tanh forms), HardSigmoid, HardSwish (opset 14) and Mish (opset
  18) from element-wise chains [``gelu_erf``, ``gelu_tanh``, ``hard_sigmoid``, ``hard_swish``, ``mish``];
* ``reshapes``: Reshape/Flatten/Squeeze/Unsqueeze pairs as one Reshape, shape no-ops removed
  [``reshape_chain``, ``noop_reshape``, ``noop_concat``, ``noop_variadic``, ``noop_split``, ``noop_tile``,
  ``noop_identity``];
* ``transposes``: Transpose folded into Gemm/MatMul, moved through element-wise operators where it then
  cancels [``transpose_gemm``, ``transpose_matmul``, ``transpose_elementwise``, ``elementwise_transposes``].

A rule whose operator the model's opset lacks does not run. For ``--target tensorrt`` (whose parser
could not be checked here) only LayerNormalization and HardSigmoid among the fused operators are
emitted; the others stay decomposed, a form TensorRT fuses itself. OpenVINO 2026.4 and onnxruntime 1.32
were checked to compile and run every fused operator emitted (float32 and float16).

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
from onnxopt.passes.fusions import activations, normalization, reshapes, transposes
from onnxopt.pattern import Match, MatchResult, RewritePass, RewriteRule


def _standard(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in ("", None, "ai.onnx")


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, offset: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias that include an inference-mode BatchNormalization applied after the Conv."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    new_weight = weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
    base = bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])
    new_bias = (base - mean.astype(np.float64)) * factor + offset.astype(np.float64)
    return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)


def _broadcasts_to(shape: tuple, rows, cols: int) -> bool:
    if len(shape) > 2:
        return False
    target = (rows, cols)[2 - len(shape):]
    return all(d == 1 or (isinstance(t, int) and d == t) for d, t in zip(shape, target))


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


def _pad_amounts(pad: gs.Node, rank: int) -> list[int] | None:
    """The zero-padding amounts of a constant-mode Pad with value 0, or ``None``."""
    if pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return None
    if "pads" in pad.attrs:
        amounts, value = list(pad.attrs["pads"]), pad.attrs.get("value", 0.0)
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
    if value != 0.0 or len(amounts) != 2 * rank or any(a < 0 for a in amounts):
        return None
    return amounts


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
        if m.attr("Conv", "auto_pad", "NOTSET") != "NOTSET":
            return m.fail("Conv uses auto_pad")
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
        return op.Conv(m["x"], m["w"], m["b"], _name=m.node("Conv").name, **attrs)


class ConvBatchNormToConv(RewriteRule):
    """Replaces BatchNormalization(Conv(x, w, b)) in inference mode with Conv(x, w', b')."""

    name = "conv_batchnorm"

    def pattern(self, op, x, w, b, scale, offset, mean, var):
        return op.BatchNormalization(op.Conv(x, w, op.optional(b)), scale, offset, mean, var)

    def check(self, m: Match) -> MatchResult:
        if m.attr("BatchNormalization", "training_mode", 0) or m.attr("BatchNormalization", "spatial", 1) != 1:
            return m.fail("BatchNormalization is in training mode or not spatial")
        # Before opset 7, is_test=0 (the default) asks for batch statistics, i.e. training mode.
        if (m.opset() or 0) < 7 and not m.attr("BatchNormalization", "is_test", 0):
            return m.fail("BatchNormalization before opset 7 without is_test uses batch statistics")
        weight = m.value("w")
        if weight is None:
            return m.fail("Conv weight is not constant")
        if m["b"] is not None and m.value("b") is None:
            return m.fail("Conv bias is not constant")
        params = [m.value(n) for n in ("scale", "offset", "mean", "var")]
        if any(p is None for p in params):
            return m.fail("BatchNormalization parameters are not constant")
        channels = weight.shape[0]
        if weight.dtype.kind != "f":
            return m.fail(f"Conv weight is {weight.dtype}, not floating point")
        bias = m.value("b")
        if any(p.shape != (channels,) for p in params) or (bias is not None and bias.shape != (channels,)):
            return m.fail("parameters are not one value per output channel")
        return m.ok()

    def rewrite(self, op, m: Match):
        conv = m.node("Conv")
        params = [m.value(n) for n in ("scale", "offset", "mean", "var")]
        epsilon = float(m.attr("BatchNormalization", "epsilon", 1e-5))
        weight, bias = fold_batchnorm(m.value("w"), m.value("b"), *params, epsilon)
        return op.Conv(m["x"], op.const(weight, f"{m['w'].name}_bn"), op.const(bias, f"{conv.name or 'conv'}_bn_bias"),
                       _name=conv.name, **m.attrs("Conv"))


class MatMulAddToGemm(RewriteRule):
    """Replaces Add(MatMul(a, B), C) with Gemm(a, B, C) for a 2-D ``a`` and constant 2-D ``B``."""

    name = "matmul_add_to_gemm"
    # Before opset 7, Add broadcasts the legacy way (broadcast=1 with an axis, e.g. a bias per row)
    # and Gemm's C only broadcasts with broadcast=1: numpy broadcasting rules do not apply.
    min_opset = 7

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b), c)

    def check(self, m: Match) -> MatchResult:
        b_value, c_value = m.value("b"), m.value("c")
        if b_value is None or b_value.ndim != 2:
            return m.fail("B is not a constant matrix")
        if c_value is None:
            return m.fail("the addend is not constant")
        a_shape = m.shape("a")
        if a_shape is None or len(a_shape) != 2:
            return m.fail("A is not known to be 2-D")
        if b_value.dtype.name not in ("float32", "float64"):
            return m.fail(f"Gemm here only for float32/float64, not {b_value.dtype}")
        a_dtype = m.dtype("a")
        if c_value.dtype != b_value.dtype or (a_dtype is not None and a_dtype != b_value.dtype):
            return m.fail("operand dtypes differ")
        if not _broadcasts_to(c_value.shape, a_shape[0], b_value.shape[1]):
            return m.fail(f"the addend of shape {list(c_value.shape)} does not broadcast to [M, N] one way")
        return m.ok()

    def rewrite(self, op, m: Match):
        return op.Gemm(m["a"], m["b"], m["c"], _name=m.node("MatMul").name or m.node("Add").name)


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


def _per_channel(scale: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``scale`` as one value per channel if it broadcasts against a ``[N, C, ...]`` Conv output that way.

    The constant must not raise the rank (that would change the output's shape) and must be 1 on every
    axis but the channel axis, where it is 1 or ``C``.
    """
    if scale.ndim > rank:
        return None
    aligned = (1,) * (rank - scale.ndim) + scale.shape
    if any(size != 1 for axis, size in enumerate(aligned) if axis != 1) or aligned[1] not in (1, channels):
        return None
    return np.broadcast_to(scale.reshape(-1) if scale.size else scale, (channels,))


class _ConvAffineToConv(RewriteRule):
    """Shared check of Conv followed by a per-channel constant Mul or Add."""

    def check(self, m: Match) -> MatchResult:
        weight, constant = m.value("w"), m.value("s")
        if weight is None:
            return m.fail("Conv weight is not constant")
        if constant is None:
            return m.fail("the other operand is not constant")
        if m["b"] is not None and m.value("b") is None:
            return m.fail("Conv bias is not constant")
        if weight.dtype.kind != "f" or constant.dtype != weight.dtype:
            return m.fail(f"operands are {weight.dtype} and {constant.dtype}, not one floating-point type")
        if _per_channel(constant, weight.ndim, weight.shape[0]) is None:
            return m.fail(f"the constant of shape {list(constant.shape)} is not one value per output channel")
        if not np.all(np.isfinite(constant)):
            return m.fail("the constant is not finite")
        return m.ok()

    def folded(self, m: Match) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def rewrite(self, op, m: Match):
        conv = m.node("Conv")
        weight, bias = self.folded(m)
        inputs = [m["x"], op.const(weight, f"{m['w'].name}_{self.name}") if weight is not None else m["w"],
                  op.const(bias, f"{conv.name or 'conv'}_{self.name}_bias")]
        return op.Conv(*inputs, _name=conv.name, **m.attrs("Conv"))


class ConvMulToConv(_ConvAffineToConv):
    """Replaces Conv(x, w, b) * s, with ``s`` a constant per output channel, by Conv(x, w * s, b * s)."""

    name = "conv_mul"

    def pattern(self, op, x, w, b, s):
        return op.Mul(op.Conv(x, w, op.optional(b)), s)

    def check(self, m: Match) -> MatchResult:
        # Another reader keeps the old weight alive: folding would store a second, scaled copy.
        if len(m["w"].outputs) > 1:
            return m.fail("the Conv weight is shared with other nodes")
        return super().check(m)

    def folded(self, m: Match):
        weight = m.value("w")
        factor = _per_channel(m.value("s"), weight.ndim, weight.shape[0]).astype(np.float64)
        new_weight = weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = m.value("b")
        new_bias = (bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])) * factor
        return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)


class ConvAddToConv(_ConvAffineToConv):
    """Replaces Conv(x, w, b) + s, with ``s`` a constant per output channel, by Conv(x, w, b + s)."""

    name = "conv_add"

    def pattern(self, op, x, w, b, s):
        return op.Add(op.Conv(x, w, op.optional(b)), s)

    def folded(self, m: Match):
        weight = m.value("w")
        shift = _per_channel(m.value("s"), weight.ndim, weight.shape[0]).astype(np.float64)
        bias = m.value("b")
        new_bias = (bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])) + shift
        return None, new_bias.astype(weight.dtype)


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


_SLICE_END_ALL = 2**31 - 1  # exporters write INT_MAX or INT64_MAX for "to the end"


class NoopSlice(RewriteRule):
    """Removes a Slice that takes every element: start 0, step 1 and an end at or past each axis' size."""

    name = "noop_slice"
    min_opset = 10  # starts, ends, axes and steps are inputs from opset 10 on

    def pattern(self, op, x, starts, ends, axes, steps):
        return op.Slice(x, starts, ends, op.optional(axes), op.optional(steps))

    def check(self, m: Match) -> MatchResult:
        starts, ends = m.value("starts"), m.value("ends")
        if starts is None or ends is None:
            return m.fail("starts or ends are not constant")
        axes = m.value("axes") if m["axes"] is not None else np.arange(starts.size)
        steps = m.value("steps") if m["steps"] is not None else np.ones(starts.size, np.int64)
        if axes is None or steps is None:
            return m.fail("axes or steps are not constant")
        dims = m.shape("x")
        for start, end, axis, step in zip(starts.reshape(-1), ends.reshape(-1), axes.reshape(-1), steps.reshape(-1)):
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


RULES = (PadConvToConv(), ConvBatchNormToConv(), MatMulAddToGemm(), TransposeTransposeToTranspose(),
         TransposeIdentityToNothing(), ConvMulToConv(), ConvAddToConv(), NoopDropout(), NoopExpand(), NoopSlice(),
         NoopPad(), NoopCastPair()) + normalization.RULES + activations.RULES + reshapes.RULES + transposes.RULES


@dataclass(frozen=True)
class Fuse(RewritePass):
    """Fuses Conv/Gemm, norm and activation chains, collapses Reshape/Transpose chains; removes no-ops."""

    name: ClassVar[str] = "fuse"
    rules: ClassVar[tuple] = RULES

    def prepare(self, graph: gs.Graph, ctx: PassContext) -> None:
        ir.infer_shapes(graph)
        _infer_subgraph_shapes(graph)
