"""The in-memory graph: loading, saving and the helpers every pass uses.

onnx-graphsurgeon's ``gs.Graph`` is the graph passes see. This module is the public toolkit over it:
reading and writing model files safely (external data, atomic writes, clear errors), converting between
``onnx.ModelProto`` and ``gs.Graph`` without losing model-level fields, and the small graph queries and
edits that passes share (constant values, consumers, replacing uses across subgraph scopes, sorting,
walking nested graphs). Built-in passes use nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from onnxopt.errors import ModelLoadError, UserError

log = logging.getLogger("onnxopt")
from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.severity = G_LOGGER.ERROR

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
STUB_THRESHOLD_BYTES = 1 << 16

__all__ = [
    "Graph",
    "GraphStats",
    "ModelLoadError",
    "all_graphs",
    "all_nodes",
    "check_output_path",
    "checkable",
    "constant_array",
    "constant_value",
    "export_model",
    "fill_weights",
    "graph_stats",
    "import_model",
    "infer_shapes",
    "is_constant",
    "is_graph_output",
    "is_local",
    "load_model",
    "make_constant",
    "model_skeleton",
    "model_source",
    "outer_scope_names",
    "purge_detached",
    "remove_nodes",
    "replace_all_uses",
    "replace_with_constant",
    "subgraphs",
    "save_model",
    "tensor_nbytes",
    "toposort",
    "unlink",
    "upgrade_opset",
]

Graph = gs.Graph


# ---------------------------------------------------------------------------------------------------
# Loading and saving


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_graph_tensors(sub)


def _iter_model_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _declared_nbytes(tensor: TensorProto) -> int | None:
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ModelLoadError(f"tensor '{tensor.name}' declares a negative dimension {dim}")
        count *= dim
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is None and hasattr(TensorProto, "FLOAT4E2M1") and tensor.data_type == TensorProto.FLOAT4E2M1:
        bits = 4
    return (count * bits + 7) // 8 if bits else count * itemsize


def _check_tensor_sizes(model: onnx.ModelProto, base_dir: Path | None) -> None:
    """Refuses tensors whose declared size disagrees with their data, and unsafe external-data paths."""
    for tensor in _iter_model_tensors(model):
        declared = _declared_nbytes(tensor)
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info.get("location")
            if not location:
                raise ModelLoadError(f"tensor '{tensor.name}' is stored externally but names no location")
            if base_dir is None:
                raise ModelLoadError(
                    f"tensor '{tensor.name}' is stored in external file '{location}'; load the model from its path"
                )
            if os.path.isabs(location) or location.startswith(("/", "\\")):
                raise ModelLoadError(
                    f"tensor '{tensor.name}': external data location '{location}' is an absolute path; refusing it"
                )
            resolved = (base_dir / location).resolve()
            if base_dir.resolve() not in resolved.parents:
                raise ModelLoadError(
                    f"tensor '{tensor.name}': external data location '{location}' points outside the model's "
                    "folder; refusing it"
                )
            if not resolved.is_file():
                raise ModelLoadError(f"tensor '{tensor.name}': external data file '{location}' is missing")
            try:
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else None
            except ValueError:
                raise ModelLoadError(f"tensor '{tensor.name}': external data offset/length is not a number")
            file_size = resolved.stat().st_size
            available = file_size - offset
            needed = length if length is not None else declared
            if offset < 0 or (needed is not None and needed > available):
                raise ModelLoadError(
                    f"tensor '{tensor.name}': external data needs {needed} bytes at offset {offset} but "
                    f"'{location}' has {file_size} bytes"
                )
            if declared is not None and length is not None and length != declared:
                raise ModelLoadError(
                    f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({declared} bytes) but its "
                    f"external data has {length} bytes"
                )
        elif declared is not None and tensor.HasField("raw_data") and len(tensor.raw_data) != declared:
            raise ModelLoadError(
                f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({declared} bytes) but holds "
                f"{len(tensor.raw_data)} bytes"
            )


def _domain_key(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _check_opsets(model: onnx.ModelProto) -> None:
    known = onnx.defs.onnx_opset_version()
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        # Converters write some imports twice (skl2onnx the default domain, at the same version): harmless
        # then, but two versions of one domain leave the operators' meaning open.
        seen = versions.setdefault(_domain_key(opset.domain), opset.version)
        if seen != opset.version:
            raise ModelLoadError(f"model imports opset domain '{opset.domain or 'ai.onnx'}' twice, at versions "
                                 f"{seen} and {opset.version}")
        if opset.domain in ("", "ai.onnx") and opset.version > known:
            raise ModelLoadError(
                f"model uses ONNX opset {opset.version}, newer than the installed onnx "
                f"{onnx.__version__} knows (up to {known}); upgrade onnx"
            )
        if opset.domain in ("", "ai.onnx") and opset.version < 1:
            raise ModelLoadError(f"model declares invalid ONNX opset {opset.version}")
    # A model of ai.onnx.ml operators alone (onnxmltools' XGBoost) needs no default-domain import.
    if not any(opset.domain in ("", "ai.onnx") for opset in model.opset_import) and any(
            node.domain in ("", "ai.onnx") for node in model.graph.node):
        raise ModelLoadError("model uses ONNX operators but imports no ONNX opset")


_TEXT_FIELDS: dict = {}


def _text_fields(descriptor) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """(string fields, message fields) of a message type, each with whether it is repeated; cached."""
    fields = _TEXT_FIELDS.get(descriptor)
    if fields is None:
        strings, messages = [], []
        for field in descriptor.fields:
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.type == field.TYPE_STRING:
                strings.append((field.name, repeated))
            elif field.type == field.TYPE_MESSAGE:
                messages.append((field.name, repeated))
        fields = _TEXT_FIELDS[descriptor] = (strings, messages)
    return fields


def _invalid_text_field(message, path: str = "") -> str | None:
    """The path of the first string field that is not valid UTF-8, else ``None``.

    protobuf parses such fields without complaint (upb hands them out as bytes), and they fail much later
    in the checker, graphsurgeon or onnxruntime with a UnicodeDecodeError. Bytes fields (weights) are
    never read here, so this costs no copy of the model's data.
    """
    strings, messages = _text_fields(message.DESCRIPTOR)
    for name, repeated in strings:
        value = getattr(message, name)
        if not (all(isinstance(v, str) for v in value) if repeated else isinstance(value, str)):
            return f"{path}{name}"
    for name, repeated in messages:
        if not repeated:
            if message.HasField(name):
                found = _invalid_text_field(getattr(message, name), f"{path}{name}.")
                if found is not None:
                    return found
            continue
        for index, child in enumerate(getattr(message, name)):
            found = _invalid_text_field(child, f"{path}{name}[{index}].")
            if found is not None:
                return found
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line
    return type(error).__name__


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The whole message on one line: the checker splits sentences over lines ("...of node:\nname: ...")."""
    lines = [line.strip() for line in str(error).splitlines()]
    text = " ".join(" ".join(line for line in lines if line and not line.startswith("==>")).split())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model(model: onnx.ModelProto, full: bool = False) -> None:
    """Runs ``onnx.checker`` on the model's skeleton and raises ``ModelLoadError`` on failure.

    The checker serializes what it checks; on the skeleton (``model_skeleton``) that costs no weight
    bytes, works past protobuf's 2 GiB limit and needs no external data files.
    """
    skeleton = model_skeleton(model)
    if not checkable(skeleton):
        # Weights in node attributes inside subgraphs; read_model has checked their sizes and files.
        log.info("onnx.checker skipped: the model keeps large or external tensors inside subgraphs")
        return
    try:
        onnx.checker.check_model(skeleton, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelLoadError(f"invalid ONNX model: {_one_line(error)}") from None


def checkable(skeleton: onnx.ModelProto) -> bool:
    """Whether onnx.checker can take the skeleton: no weights left inside subgraphs that are external,
    stubs without data, or over 1 GiB in all."""
    if model_weight_bytes(skeleton) >= PROTOBUF_LIMIT_BYTES // 2:
        return False
    return not any(
        t.data_location == TensorProto.EXTERNAL or (not _has_data(t) and (_declared_nbytes(t) or 0) > 0)
        for t in _iter_model_tensors(skeleton)
    )


def _has_data(tensor: TensorProto) -> bool:
    return any(tensor.HasField("raw_data") if field == "raw_data" else len(getattr(tensor, field)) > 0
               for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                             "string_data"))


def model_skeleton(model: onnx.ModelProto, threshold: int = STUB_THRESHOLD_BYTES) -> onnx.ModelProto:
    """A copy of the model whose large or external initializers are graph inputs of the same type and shape.

    The graph's structure, types and shapes stay as they were, so the skeleton is what onnx.checker
    and shape inference need, without copying weights.
    """
    def heavy(tensor: TensorProto) -> bool:
        return tensor.data_location == TensorProto.EXTERNAL or (_declared_nbytes(tensor) or 0) > threshold

    skeleton = onnx.ModelProto()
    _copy_shell(model, skeleton)
    graph = skeleton.graph
    _copy_fields(model.graph, graph, skip=("initializer", "node"))
    listed = {vi.name for vi in graph.input}

    def as_input(name: str, tensor: TensorProto) -> None:
        if name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
            listed.add(name)

    for tensor in model.graph.initializer:
        if heavy(tensor):
            as_input(tensor.name, tensor)
        else:
            graph.initializer.append(tensor)
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and heavy(value):
            as_input(node.output[0], value)
        else:
            graph.node.append(node)
    return skeleton


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    """Copies every set field of a protobuf message but the skipped ones."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and how it was stored."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool


def model_source(source):
    """``source`` as given (a path or a ``ModelProto``), or the ``ModelProto`` of an exporter's program:
    ``torch.onnx.export(..., dynamo=True)`` returns an ``ONNXProgram``, whose ``model_proto`` is the model."""
    proto = getattr(source, "model_proto", None)
    return proto if isinstance(proto, onnx.ModelProto) else source


def load_model(source: str | os.PathLike | onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    """Loads a model from a path (with its external data) or returns a given ``ModelProto`` (or an
    ``ONNXProgram``'s, see ``model_source``), validated.

    Raises ``ModelLoadError`` with a one-line message for anything that is not a usable ONNX model.
    """
    return read_model(source, check).model


def read_model(source: str | os.PathLike | onnx.ModelProto, check: bool = True) -> LoadedModel:
    """Like ``load_model``, also telling where the model came from and whether it used external data."""
    source = model_source(source)
    if isinstance(source, onnx.ModelProto):
        model, base_dir = source, None
    else:
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"no such file: {path}")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not an ONNX model file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path} is empty")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError, TypeError, IndexError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{path} is not an ONNX model (cannot parse protobuf: {_first_line(error)})") from None
        except OSError as error:
            raise ModelLoadError(f"cannot read {path}: {error.strerror or error}") from None
        base_dir = path.resolve().parent
    if model.ir_version <= 0 or not model.HasField("graph"):
        name = "the given ModelProto" if base_dir is None else str(source)
        raise ModelLoadError(f"{name} is not an ONNX model (no IR version or graph)")
    bad_text = _invalid_text_field(model)
    if bad_text is not None:
        name = "the given ModelProto" if base_dir is None else str(source)
        raise ModelLoadError(f"{name} is not a valid ONNX model: text field '{bad_text}' is not valid UTF-8")
    _check_opsets(model)
    _check_tensor_sizes(model, base_dir)
    external = base_dir is not None and any(t.data_location == TensorProto.EXTERNAL for t in _iter_model_tensors(model))
    if check:
        check_model(model)
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load external data of {source}: {_first_line(error)}") from None
    return LoadedModel(model, None if base_dir is None else Path(source), external)


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model converted to ``version`` of the default opset by onnx's version converter.

    The converter runs on the skeleton (large weights as typed graph inputs), so it neither copies nor
    serializes weights; the weights are put back by name afterwards. A model already at ``version`` is
    returned as it is; a lower version, or one the installed onnx does not know, is refused.
    """
    current = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    known = onnx.defs.onnx_opset_version()
    if current is None:
        raise UserError("the model imports no default-domain opset to upgrade")
    if version > known:
        raise UserError(f"cannot upgrade to opset {version}: the installed onnx knows opsets up to {known}")
    if version < current:
        raise UserError(f"the model already uses opset {current}; --upgrade-opset only goes up (asked for {version})")
    if version == current:
        return model
    skeleton = model_skeleton(model)
    # onnx's converter bumps only the first import of the default domain; a second one, which some
    # converters write, would take the result back to the old version when exported.
    unique = {_domain_key(op.domain): op for op in reversed(skeleton.opset_import)}
    kept = [op for op in skeleton.opset_import if unique.get(_domain_key(op.domain)) is op]
    del skeleton.opset_import[:]
    skeleton.opset_import.extend(kept)
    weights = {t.name: t for t in model.graph.initializer}
    held_back = weights.keys() - {t.name for t in skeleton.graph.initializer}
    moved = held_back - {vi.name for vi in model.graph.input}
    try:
        converted = onnx.version_converter.convert_version(skeleton, version)
    except Exception as error:  # noqa: BLE001 - the converter raises RuntimeError and friends without types
        raise UserError(f"onnx's version converter cannot take the model from opset {current} to {version}: "
                        f"{_first_line(error)}") from None
    still_inputs = [vi for vi in converted.graph.input if vi.name not in moved]
    del converted.graph.input[:]
    converted.graph.input.extend(still_inputs)
    converted.graph.initializer.extend(weights[name] for name in sorted(held_back))
    return converted


def stubbed_bytes(weights: dict[str, TensorProto]) -> int:
    """Bytes of the weights ``export_model`` left out of a model as stubs, as declared."""
    return sum(_declared_nbytes(w) or 0 for w in weights.values())


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by tensors of the model (initializers and tensor attributes), as declared."""
    return sum(_declared_nbytes(t) or len(t.raw_data) for t in _iter_model_tensors(model))


class _DataWriter:
    """Appends tensor bytes to an external data file, 4 KiB aligned, and stubs tensors that point there."""

    def __init__(self, data_file, location: str, weights: dict[str, TensorProto]) -> None:
        self.file = data_file
        self.location = location
        self.weights = weights
        self.offset = 0
        self.count = 0

    def stub(self, tensor: TensorProto) -> TensorProto:
        """A copy of ``tensor`` without data, its bytes (or its source's, for a stub) written to the file."""
        tensor = _weight_source(tensor, self.weights) or tensor
        raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        padding = (-self.offset) % 4096
        self.file.write(b"\0" * padding)
        self.offset += padding
        self.file.write(raw)
        stub = TensorProto(name=tensor.name, data_type=tensor.data_type, doc_string=tensor.doc_string)
        stub.dims.extend(tensor.dims)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(raw)))):
            stub.external_data.add(key=key, value=value)
        stub.data_location = TensorProto.EXTERNAL
        self.offset += len(raw)
        self.count += 1
        return stub


def _movable(tensor: TensorProto) -> bool:
    return (tensor.data_location != TensorProto.EXTERNAL
            and tensor.data_type not in (TensorProto.STRING, TensorProto.UNDEFINED)
            and (_declared_nbytes(tensor) or 0) >= EXTERNAL_DATA_THRESHOLD_BYTES)


def _copy_tensor(tensor: TensorProto, target: TensorProto, writer: _DataWriter) -> None:
    target.CopyFrom(writer.stub(tensor) if _movable(tensor) else tensor)


def _holds_tensors(node: onnx.NodeProto) -> bool:
    return any(attr.HasField("t") or attr.tensors or attr.HasField("g") or attr.graphs for attr in node.attribute)


def _copy_graph(graph: onnx.GraphProto, target: onnx.GraphProto, writer: _DataWriter) -> None:
    """Copies a graph, writing its large tensors (subgraphs included) through ``writer`` instead."""
    _copy_fields(graph, target, skip=("node", "initializer"))
    for tensor in graph.initializer:
        _copy_tensor(tensor, target.initializer.add(), writer)
    for node in graph.node:
        copy = target.node.add()
        if not _holds_tensors(node):
            copy.CopyFrom(node)
            continue
        copy.input.extend(node.input)
        copy.output.extend(node.output)
        copy.name, copy.op_type, copy.domain, copy.doc_string = node.name, node.op_type, node.domain, node.doc_string
        if node.HasField("overload"):
            copy.overload = node.overload
        copy.metadata_props.extend(node.metadata_props)
        for attr in node.attribute:
            if not (attr.HasField("t") or attr.tensors or attr.HasField("g") or attr.graphs):
                copy.attribute.add().CopyFrom(attr)
                continue
            new = copy.attribute.add(name=attr.name, type=attr.type, doc_string=attr.doc_string)
            if attr.ref_attr_name:
                new.ref_attr_name = attr.ref_attr_name
            if attr.HasField("t"):
                _copy_tensor(attr.t, new.t, writer)
            for tensor in attr.tensors:
                _copy_tensor(tensor, new.tensors.add(), writer)
            if attr.HasField("g"):
                _copy_graph(attr.g, new.g, writer)
            for sub in attr.graphs:
                _copy_graph(sub, new.graphs.add(), writer)


def _with_external_data(model: onnx.ModelProto, data_path: Path,
                        weights: dict[str, TensorProto]) -> tuple[onnx.ModelProto, int]:
    """A copy of the model whose large tensors live in ``data_path``; the number of tensors moved.

    The model given is not touched, and its weights are never held twice: each one is written to the
    file and only a stub goes into the copy.
    """
    light = onnx.ModelProto()
    _copy_shell(model, light)
    with open(data_path, "wb") as data_file:
        writer = _DataWriter(data_file, data_path.name, weights)
        _copy_graph(model.graph, light.graph, writer)
    return light, writer.count


_MODEL_GRAPH_TAG = bytes([onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number << 3 | 2])
_GRAPH_INITIALIZER_TAG = bytes([onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def serialized_chunks(model: onnx.ModelProto, weights: dict[str, TensorProto]) -> Iterator[bytes]:
    """The bytes of ``model`` with the stubs ``export_model`` left filled from ``weights``, piece by piece.

    Filling a copy of the model and serializing it would hold every weight three times (source, copy,
    bytes); here the model without its main graph's weights is serialized once, and each weight is
    serialized on its own as one more initializer of the same graph field, whose length is computed
    first. The result is one ordinary ModelProto (the filled initializers come last in their list).
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    streamed, kept = [], []
    for tensor in light.graph.initializer:
        source = _weight_source(tensor, weights)
        (kept if source is None else streamed).append(tensor if source is None else source)
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    fill_weights(light, weights)  # stubs elsewhere (subgraphs, Constant values) are few and filled in place
    graph = light.graph.SerializeToString()
    light.ClearField("graph")
    sizes = [tensor.ByteSize() for tensor in streamed]
    graph_size = len(graph) + sum(len(_GRAPH_INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)
    yield light.SerializeToString()
    yield _MODEL_GRAPH_TAG + _varint(graph_size)
    yield graph
    for tensor, size in zip(streamed, sizes):
        yield _GRAPH_INITIALIZER_TAG + _varint(size)
        yield tensor.SerializeToString()


def model_bytes(model: onnx.ModelProto, weights: dict[str, TensorProto] | None = None) -> bytes:
    """The serialized model, with the stubs ``export_model`` left filled from ``weights``."""
    return b"".join(serialized_chunks(model, weights)) if weights else model.SerializeToString()


def check_output_path(path: str | os.PathLike, what: str = "output") -> None:
    """Raises ``UserError`` unless a file can be written at ``path`` (its folder exists, it is no folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file name")
    directory = path.resolve().parent
    if not directory.is_dir():
        raise UserError(f"{what} folder {directory} does not exist")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               weights: dict[str, TensorProto] | None = None,
               check: Callable[[Path], None] | None = None) -> list[Path]:
    """Writes a model atomically; returns the files written.

    Files are written into a temporary folder beside ``path`` and renamed into place only when complete,
    so an interrupted or failed save never leaves a partial file. ``check``, if given, is called with the
    complete staged file (its data file beside it) before anything is renamed; if it raises, nothing is
    written. Weights go to ``<name>.data`` when
    ``external_data`` is true, or when it is ``None`` and the model would exceed protobuf's 2 GiB limit.
    ``weights`` holds the data of stubs ``export_model`` left in the model. The given ``ModelProto`` is
    left as it was.
    """
    path = Path(path)
    # Checked before anything is written: os.replace onto a folder would fail after the data file moved.
    check_output_path(path)
    directory = path.resolve().parent
    weights = weights or {}
    if external_data is None:
        external_data = model_weight_bytes(model) + stubbed_bytes(weights) > PROTOBUF_LIMIT_BYTES // 2
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory))
    written: list[Path] = []
    try:
        staged_model = staging / path.name
        data_file = staging / f"{path.name}.data"
        moved = 0
        to_write = model
        if external_data:
            to_write, moved = _with_external_data(model, data_file, weights)
        streamed = bool(weights) and not external_data
        with open(staged_model, "wb") as model_file:
            model_file.writelines(serialized_chunks(to_write, weights) if streamed else [to_write.SerializeToString()])
        if data_file.exists() and not moved:
            data_file.unlink()  # no tensor was large enough to move: don't leave an empty, unreferenced file
        if check is not None:
            check(staged_model)
        if data_file.exists():
            target = path.with_name(data_file.name)
            os.replace(data_file, target)
            written.append(target)
        os.replace(staged_model, path)
        written.append(path)
        return written
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


# ---------------------------------------------------------------------------------------------------
# ModelProto <-> gs.Graph


def _has_optional(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "optional_type":
        return True
    if kind == "sequence_type":
        return _has_optional(type_proto.sequence_type.elem_type)
    if kind == "map_type":
        return _has_optional(type_proto.map_type.value_type)
    return False


def _defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    return names | {out for node in graph.node for out in node.output if out}


def _check_representable(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Refuses what onnx-graphsurgeon would silently lose or change.

    Optional types and type-valued attributes are dropped by its importer, sparse ``Constant`` values
    are lost on export, and a subgraph value that reuses a name of an enclosing graph is bound to the
    outer value (changing what the model computes).
    """
    for value_info in (*graph.input, *graph.output, *graph.value_info):
        if _has_optional(value_info.type):
            raise UserError(f"onnxopt cannot rewrite models with optional-typed values yet ('{value_info.name}')")
    defined = _defined_names(graph)
    shadowed = sorted(defined & outer)
    if shadowed:
        raise UserError(f"onnxopt cannot rewrite models whose subgraph '{graph.name}' reuses the name "
                        f"'{shadowed[0]}' of an enclosing graph yet")
    scope = frozenset(outer | defined)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
                raise UserError(f"onnxopt cannot rewrite models with type-valued attributes yet "
                                f"(node '{node.name or node.op_type}', attribute '{attr.name}')")
            if attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise UserError(f"onnxopt cannot rewrite models with sparse tensor attributes yet "
                                f"(node '{node.name or node.op_type}', attribute '{attr.name}')")
            if attr.HasField("g"):
                _check_representable(attr.g, scope)
            for sub in attr.graphs:
                _check_representable(sub, scope)


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Builds the in-memory graph of a model. Weights are not copied: constants read the model's tensors.

    Raises ``UserError`` for models whose features the graph cannot represent without loss.
    """
    _check_representable(model.graph)
    graph = gs.import_onnx(model)
    _detach_constant_protos(graph)
    graph.ir_version = model.ir_version
    if model.ir_version >= 4:
        _keep_overridable_initializers(graph, model)
    return graph


def _detach_constant_protos(graph: gs.Graph) -> None:
    """Gives a constant a private copy of its TensorProto where exporting it would change the original.

    graphsurgeon exports a lazily loaded constant by writing the constant's name into the TensorProto it
    was imported from, which belongs to the caller's model: a Constant node's unnamed value tensor, or an
    initializer a pass renamed, would change the input model (also when a pass fails, and while a run is
    in progress). Those protos (small in practice) are copied; ``export_model`` checks again for renames.
    """
    graphs = list(all_graphs(graph))
    for function in graph.functions or []:
        graphs.extend(all_graphs(function))
    constants: list[gs.Constant] = []
    for sub in graphs:
        constants.extend(t for t in sub.tensors().values() if isinstance(t, gs.Constant))
        for node in sub.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    constants.append(value)
                elif isinstance(value, (list, tuple)):
                    constants.extend(v for v in value if isinstance(v, gs.Constant))
    for constant in constants:
        lazy = constant._values
        proto = getattr(lazy, "tensor", None)
        if isinstance(proto, TensorProto) and (not proto.HasField("name") or proto.name != constant.name):
            private = TensorProto()
            private.CopyFrom(proto)
            lazy.tensor = private


_DEFAULTS_ATTR = "onnxopt_input_defaults"


def _keep_overridable_initializers(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Initializers that are also graph inputs are defaults a caller may override: keep them inputs.

    graphsurgeon turns them into constants and drops the input, which would let passes fold a value the
    caller can change. They become variables again, and ``export_model`` writes their defaults back.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    overridable = [vi.name for vi in model.graph.input if vi.name in initializers]
    if not overridable:
        return
    tensors = graph.tensors()
    variables = {}
    for name in overridable:
        constant = tensors.get(name)
        variable = gs.Variable(name, dtype=constant.dtype if constant is not None else None,
                               shape=list(constant.shape) if constant is not None else None)
        variables[name] = variable
        if constant is not None:
            for consumer in list(constant.outputs):
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is constant:
                        consumer.inputs[index] = variable
            for index, output in enumerate(graph.outputs):
                if output is constant:
                    graph.outputs[index] = variable
    by_name = {t.name: t for t in graph.inputs}
    by_name.update(variables)
    graph.inputs = [by_name[vi.name] for vi in model.graph.input if vi.name in by_name]
    setattr(graph, _DEFAULTS_ATTR, {name: initializers[name] for name in overridable})


def _subgraph_constants(graph: gs.Graph) -> dict[str, set[int]]:
    """Maps each constant name in ``graph`` and its subgraphs to the ids of the objects that bear it."""
    owners: dict[str, set[int]] = {}
    for sub in all_graphs(graph):
        for tensor in sub.tensors().values():
            if isinstance(tensor, gs.Constant):
                owners.setdefault(tensor.name, set()).add(id(tensor))
    return owners


def _hoist_captured_constants(graph_proto: onnx.GraphProto, owners: dict[str, set[int]]) -> None:
    """Moves constants that gs exported into subgraphs back to the main graph, once.

    graphsurgeon writes an outer-scope constant into every subgraph that reads it, duplicating weights;
    a name borne by one tensor object is the same value everywhere, so it belongs once at the top.
    """
    top_names = {t.name for t in graph_proto.initializer}
    # A name some graph computes or takes as input must stay local: sibling branches are separate
    # scopes, and a hoisted constant would clash with the other branch's value of that name.
    computed = _computed_names(graph_proto)

    def visit(sub: onnx.GraphProto) -> None:
        keep = []
        for init in sub.initializer:
            if len(owners.get(init.name, ())) == 1 and init.name not in computed:
                if init.name not in top_names:
                    graph_proto.initializer.append(init)
                    top_names.add(init.name)
            else:
                keep.append(init)
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)
        for node in sub.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for inner in attr.graphs:
                    visit(inner)

    for node in graph_proto.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                visit(attr.g)
            for inner in attr.graphs:
                visit(inner)


def _computed_names(graph_proto: onnx.GraphProto) -> set[str]:
    """Names of node outputs and graph inputs in ``graph_proto`` and every graph nested in it."""
    names = {vi.name for vi in graph_proto.input}
    for node in graph_proto.node:
        names.update(node.output)
        for attr in node.attribute:
            for inner in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _computed_names(inner)
    return names


def used_domains(graph: gs.Graph) -> set[str]:
    """The operator domains used by nodes of the graph, its subgraphs and its local functions."""
    domains = {node.domain or "" for node in all_nodes(graph)}
    for function in graph.functions:
        domains |= {node.domain or "" for node in function.nodes}
        domains.add(function.domain or "")
    return domains


@contextlib.contextmanager
def _weights_stubbed(graph: gs.Graph) -> Iterator[dict[str, TensorProto]]:
    """Makes large weights export as name, dims and type only; yields their real TensorProtos by name.

    graphsurgeon's exporter copies every weight into the new model, and building the final model copies
    it again; exporting stubs and copying each weight once afterwards makes that one copy.
    """
    swapped: list[tuple[gs.Constant, object]] = []
    for sub in all_graphs(graph):
        for tensor in sub.tensors().values():
            if isinstance(tensor, gs.Constant):
                _hold_as_proto(tensor)
            lazy = getattr(tensor, "_values", None) if isinstance(tensor, gs.Constant) else None
            proto = getattr(lazy, "tensor", None)
            if (isinstance(lazy, gs.ir.tensor.LazyValues) and isinstance(proto, TensorProto)
                    and proto.name == tensor.name and lazy.nbytes > STUB_THRESHOLD_BYTES):
                stub = TensorProto(name=proto.name, data_type=proto.data_type)
                stub.dims.extend(proto.dims)
                tensor._values = gs.ir.tensor.LazyValues(stub)
                swapped.append((tensor, lazy))
    try:
        yield {tensor.name: lazy.tensor for tensor, lazy in swapped}
    finally:
        for tensor, lazy in swapped:
            tensor._values = lazy


def _hold_as_proto(constant: gs.Constant) -> None:
    """Makes a large constant a pass computed as a numpy array hold a TensorProto instead, once.

    Such a constant (a fused or packed weight) would otherwise be converted by graphsurgeon's exporter on
    every export, and shape inference exports the graph before each pass; as a TensorProto it is stubbed
    like the weights that were loaded.
    """
    data = constant._values
    if isinstance(data, np.ndarray) and data.nbytes > STUB_THRESHOLD_BYTES and data.dtype.name in _NUMPY_EXPORTABLE:
        constant._values = gs.ir.tensor.LazyValues(numpy_helper.from_array(data, constant.name))


def export_model(graph: gs.Graph, template: onnx.ModelProto,
                 weights: dict[str, TensorProto] | None = None) -> onnx.ModelProto:
    """Builds a ModelProto from the graph, keeping the template's model-level fields.

    IR version, producer, domain, model version, doc string, metadata and the version of each imported
    opset come from ``template``; opset imports for domains no node uses any more are dropped (the
    default domain is always kept). Given a ``weights`` dict, large weights stay stubs (name, type and
    shape, no data) and the dict receives their source tensors: ``fill_weights`` puts them in, and
    ``save_model`` writes them straight to the file, so huge models are never held twice.
    """
    purge_detached(graph)
    owners = _subgraph_constants(graph)
    _detach_constant_protos(graph)
    with _weights_stubbed(graph) as sources:
        exported = gs.export_onnx(graph, do_type_check=False)
    _hoist_captured_constants(exported.graph, owners)
    model = onnx.ModelProto()
    _copy_shell(template, model)
    model.graph.CopyFrom(exported.graph)
    exported.ClearField("graph")
    if weights is None:
        fill_weights(model, sources)
    else:
        weights.update(sources)
    del model.functions[:]
    model.functions.extend(exported.functions)
    needed = used_domains(graph) | {""}
    versions = {op.domain: op.version for op in template.opset_import}
    versions.update({op.domain: op.version for op in exported.opset_import if op.domain not in versions})
    del model.opset_import[:]
    for domain, version in versions.items():
        if domain in needed or (domain == "ai.onnx" and "" in needed):
            model.opset_import.add(domain=domain, version=version)
    defaults = vars(graph).get(_DEFAULTS_ATTR, {})
    present = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(d for name, d in defaults.items() if name not in present)
    _keep_declared_io_types(model.graph, template.graph)
    if hasattr(model.graph, "metadata_props") and not model.graph.metadata_props:
        # graphsurgeon drops graph-level metadata (IR 10); it describes the graph as a whole, so it stays.
        model.graph.metadata_props.extend(template.graph.metadata_props)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _weight_source(tensor: TensorProto, weights: dict[str, TensorProto]) -> TensorProto | None:
    """The tensor ``weights`` holds for a stub left by ``export_model``, if ``tensor`` is one."""
    source = weights.get(tensor.name)
    if (source is None or tensor.raw_data or tensor.data_location == TensorProto.EXTERNAL
            or list(tensor.dims) != list(source.dims) or tensor.data_type != source.data_type):
        return None
    return source


def fill_weights(model: onnx.ModelProto, weights: dict[str, TensorProto]) -> None:
    """Copies the weights ``export_model`` left as stubs into the model."""
    if not weights:
        return
    for tensor in _iter_graph_tensors(model.graph):
        source = _weight_source(tensor, weights)
        if source is not None:
            tensor.CopyFrom(source)


def _keep_declared_io_types(graph: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Graph inputs and outputs keep the exact types (symbolic dimensions included) first declared."""
    for exported, declared in ((graph.input, original.input), (graph.output, original.output)):
        types = {vi.name: vi for vi in declared}
        for value_info in exported:
            if value_info.name in types:
                value_info.type.CopyFrom(types[value_info.name].type)
                value_info.doc_string = types[value_info.name].doc_string


def restore_attribute_tensor_names(model: onnx.ModelProto) -> None:
    """Undoes the one change graphsurgeon's exporter makes to the model it imported from.

    Exporting writes each constant's name into the TensorProto it was read from; for unnamed tensors in
    node attributes (``Constant`` values) that marks an empty name as present, which changes the
    caller's model bytes though not its meaning.
    """
    for tensor in _iter_model_tensors(model):
        if not tensor.name and tensor.HasField("name"):
            tensor.ClearField("name")


def _copy_shell(template: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Copies every model field but the graph (which may hold gigabytes) from template to model."""
    _copy_fields(template, model, skip=("graph",))


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR version 3 requires every initializer to be a graph input as well."""
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


# ---------------------------------------------------------------------------------------------------
# Graph queries


@dataclass(frozen=True)
class GraphStats:
    """Size of a graph: nodes (subgraphs included), constant tensors and their bytes."""

    nodes: int
    initializers: int
    bytes: int


def tensor_nbytes(tensor: gs.Tensor) -> int:
    """Bytes of a constant's data, computed from its shape and dtype without loading it."""
    if not isinstance(tensor, gs.Constant):
        return 0
    values = tensor._values
    nbytes = getattr(values, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    return int(constant_array(tensor).nbytes)


def graph_stats(graph: gs.Graph) -> GraphStats:
    purge_detached(graph)
    constants: dict[int, gs.Constant] = {}
    nodes = 0
    for sub in all_graphs(graph):
        nodes += len(sub.nodes)
        for node in sub.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    constants[id(tensor)] = tensor
    for tensor in graph.outputs:
        if isinstance(tensor, gs.Constant):
            constants[id(tensor)] = tensor
    return GraphStats(
        nodes=nodes,
        initializers=len(constants),
        bytes=sum(tensor_nbytes(t) for t in constants.values()),
    )


def subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """The graphs held by a node's attributes (If branches, Loop and Scan bodies).

    The same as graphsurgeon's ``Node.subgraphs()``, which costs several times more per node; graph
    walks call this for every node of every graph, many times per pass.
    """
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, list) and value and isinstance(value[0], gs.Graph):
            yield from value


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph nested in its nodes' attributes, outermost first."""
    yield graph
    # ``subgraphs`` inlined: passes walk every graph many times, and most nodes hold none.
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from all_graphs(value)
            elif isinstance(value, list) and value and isinstance(value[0], gs.Graph):
                for sub in value:
                    yield from all_graphs(sub)


def all_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Every node of the graph and of its subgraphs."""
    for sub in all_graphs(graph):
        yield from sub.nodes


def outer_scope_names(graph: gs.Graph) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes: used by its nodes but not defined inside it."""
    defined = {t.name for t in graph.inputs}
    used: set[str] = set()
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant):
                used.add(tensor.name)
        for sub in subgraphs(node):
            used |= outer_scope_names(sub)
        defined |= {t.name for t in node.outputs}
    used |= {t.name for t in graph.outputs if not isinstance(t, gs.Constant)}
    return used - defined


def is_local(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` belongs to ``graph`` itself (not to an enclosing or nested graph).

    Nodes remember their graph after the first call (graphsurgeon keeps no back-reference), so asking
    about many nodes of one graph costs one scan.
    """
    members = vars(graph).get("_onnxopt_members")
    if members is None or members.get(id(node)) is not node:
        members = {id(n): n for n in graph.nodes}
        setattr(graph, "_onnxopt_members", members)
    return members.get(id(node)) is node


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def is_constant(tensor: gs.Tensor) -> bool:
    """True for initializers and for outputs of ``Constant`` nodes with a tensor value."""
    if isinstance(tensor, gs.Constant):
        return True
    return constant_value(tensor) is not None


def constant_array(constant: gs.Constant) -> np.ndarray:
    """The data of a constant, in its exact dtype, without changing how the graph holds it.

    graphsurgeon's ``Constant.values`` replaces a weight's TensorProto by a numpy copy for good (and casts
    types numpy lacks, such as bfloat16, to float32, changing what is later written); this reads
    the TensorProto instead and leaves it in place.
    """
    data = constant._values
    if isinstance(data, gs.ir.tensor.LazyValues):
        return numpy_helper.to_array(data.tensor)
    return np.asarray(data)


def _constant_node(tensor: gs.Tensor) -> gs.Node | None:
    """The standard ``Constant`` node that makes ``tensor``, if one does."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    return producer if producer.op == "Constant" and producer.domain in ("", None) else None


def _constant_holder(tensor: gs.Tensor) -> gs.Constant | None:
    """The ``gs.Constant`` holding an initializer's or a ``Constant`` node's tensor value, if either."""
    if isinstance(tensor, gs.Constant):
        return tensor
    node = _constant_node(tensor)
    value = None if node is None else node.attrs.get("value")
    return value if isinstance(value, gs.Constant) else None


def constant_shape_dtype(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and numpy dtype of an initializer or ``Constant`` node output, else ``None``.

    They are read without the data: reading a weight copies it out of its TensorProto, so a rule that
    only wants some constants (small ones such as axes and scalars, or matrices of a type) asks first.
    """
    holder = _constant_holder(tensor)
    if holder is None:
        value = constant_value(tensor)
        return None if value is None else (value.shape, value.dtype)
    data = holder._values
    if isinstance(data, gs.ir.tensor.LazyValues) and isinstance(data.tensor, TensorProto):
        proto = data.tensor
        return tuple(int(d) for d in proto.dims), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(proto.data_type))
    array = constant_array(holder)
    return array.shape, array.dtype


def constant_size(tensor: gs.Tensor) -> int | None:
    """The element count of an initializer or ``Constant`` node output, read without its data; else ``None``."""
    found = constant_shape_dtype(tensor)
    return None if found is None else int(np.prod(found[0], dtype=np.int64))


_SCALAR_ATTRIBUTE_TYPES = (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64))


def constant_value(tensor: gs.Tensor, max_size: int | None = None) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` node output as a numpy array, else ``None``.

    With ``max_size``, a constant of more elements also gives ``None``, without its data being read.
    """
    if max_size is not None:
        size = constant_size(tensor)
        if size is None or size > max_size:
            return None
    holder = _constant_holder(tensor)
    if holder is not None:
        return constant_array(holder)
    node = _constant_node(tensor)
    if node is None:
        return None
    attrs = node.attrs
    for key, dtype in _SCALAR_ATTRIBUTE_TYPES:
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


_constant_counter = iter(range(1 << 62))


def _contiguous(values) -> np.ndarray | gs.ir.tensor.LazyValues:
    """Constant data in a form graphsurgeon exports.

    A C-contiguous array of the same shape (``np.ascontiguousarray`` would turn scalars into 1-D);
    strings and types numpy lacks go through a TensorProto, which graphsurgeon writes as it is.
    """
    array = np.asarray(values)
    if array.dtype == object or array.dtype.kind in "SUV" or array.dtype.name not in _NUMPY_EXPORTABLE:
        return gs.ir.tensor.LazyValues(numpy_helper.from_array(array))
    return array if array.flags.c_contiguous else array.copy(order="C")


_NUMPY_EXPORTABLE = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                     "float32", "float64", "complex64", "complex128"}


def make_constant(graph: gs.Graph, values: np.ndarray, hint: str = "const") -> gs.Constant:
    """A new constant tensor with a name unique in the graph."""
    taken = _all_names(graph)
    name = hint
    while name in taken:
        name = f"{hint}_{next(_constant_counter)}"
    return gs.Constant(name, _contiguous(values))


def _all_names(graph: gs.Graph) -> set[str]:
    names: set[str] = set()
    for sub in all_graphs(graph):
        names |= set(sub.tensors().keys())
        names |= {t.name for t in sub.inputs}
    return names


def unique_name(graph: gs.Graph, hint: str) -> str:
    """A tensor name not used anywhere in the graph or its subgraphs."""
    taken = _all_names(graph)
    name = hint
    while name in taken:
        name = f"{hint}_{next(_constant_counter)}"
    return name


# ---------------------------------------------------------------------------------------------------
# Graph edits


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Makes every reader of ``old`` read ``new`` instead, in subgraphs too.

    If ``old`` is a graph output, the output keeps its name: when ``new`` is produced by a node of this
    graph and is not itself an input or output, that node now produces ``old`` directly; otherwise an
    ``Identity`` keeps the output's name (which ``dce`` then leaves in place).
    """
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
    output_slots = [i for i, out in enumerate(graph.outputs) if out is old]
    if not output_slots:
        return
    producer_here = len(new.inputs) == 1 and any(n is new.inputs[0] for n in graph.nodes)
    new_is_io = any(t is new for t in graph.inputs) or any(t is new for t in graph.outputs)
    if producer_here and not new_is_io and isinstance(new, gs.Variable):
        producer = new.inputs[0]
        for consumer in list(new.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is new:
                    consumer.inputs[index] = old
        index = next(i for i, t in enumerate(producer.outputs) if t is new)
        old.inputs.clear()
        producer.outputs[index] = old
        if old.dtype is None:
            old.dtype = new.dtype
        return
    old.inputs.clear()
    identity = gs.Node("Identity", name=unique_name(graph, f"{old.name}_keep"), inputs=[new], outputs=[old])
    graph.nodes.append(identity)
    toposort(graph)


def replace_with_constant(graph: gs.Graph, tensor: gs.Tensor, values: np.ndarray) -> gs.Constant:
    """Replaces a value by a constant of the same name; graph outputs stay outputs under their name."""
    constant = gs.Constant(tensor.name, _contiguous(values))
    for consumer in list(tensor.outputs):
        for index, current in enumerate(consumer.inputs):
            if current is tensor:
                consumer.inputs[index] = constant
    for index, output in enumerate(graph.outputs):
        if output is tensor:
            graph.outputs[index] = constant
    return constant


def _is_detached(node: gs.Node) -> bool:
    return not node.outputs and not node.inputs


def remove_nodes(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    """Detaches nodes from the graph (their outputs lose their producer).

    Detached nodes (no inputs, no outputs) leave ``graph.nodes`` in batches, so that removing nodes one
    rewrite at a time stays linear in the graph's size; until then loops over ``graph.nodes`` may meet
    them and skip them. Export, statistics and sorting drop them first (``purge_detached``).
    """
    for node in nodes:
        unlink(node)
    pending = vars(graph).get("_onnxopt_detached", 0) + len(nodes)
    setattr(graph, "_onnxopt_detached", pending)
    if pending * 8 >= len(graph.nodes):
        purge_detached(graph)


def unlink(node: gs.Node) -> None:
    """Unlinks ``node`` from the tensors it reads and writes, matching it by identity.

    graphsurgeon keeps producer and consumer lists in step with ``list.remove``, which compares nodes by
    value: sibling branches may each hold a node of the same operator, inputs and output names (both
    ``a = Relu(x)`` reading the outer ``x``), and unlinking one would take the other's entry out of
    ``x``'s consumers. Plain ``list`` operations keep graphsurgeon out of it.
    """
    for tensors, links in ((node.inputs, "outputs"), (node.outputs, "inputs")):
        for tensor in tensors:
            linked = getattr(tensor, links)
            index = next((i for i, other in enumerate(linked) if other is node), None)
            if index is not None:
                list.pop(linked, index)
        list.clear(tensors)


def purge_detached(graph: gs.Graph) -> None:
    """Drops detached nodes from the graph and its subgraphs."""
    for sub in all_graphs(graph):
        if vars(sub).get("_onnxopt_detached"):
            sub.nodes = [n for n in sub.nodes if not _is_detached(n)]
            setattr(sub, "_onnxopt_detached", 0)


def toposort(graph: gs.Graph) -> None:
    """Sorts the graph's nodes so that every value is produced before it is read (stable).

    Reads from subgraph bodies count as reads by the node that owns the subgraph. Raises ``UserError``
    if the graph has a cycle.
    """
    purge_detached(graph)
    index_of = {id(node): i for i, node in enumerate(graph.nodes)}
    producer_of: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            producer_of[out.name] = i
    deps: list[set[int]] = []
    for node in graph.nodes:
        names = {t.name for t in node.inputs if t.name}
        for sub in subgraphs(node):
            names |= outer_scope_names(sub)
        deps.append({producer_of[n] for n in names if n in producer_of} - {index_of[id(node)]})
    order: list[int] = []
    state = [0] * len(graph.nodes)
    for start in range(len(graph.nodes)):
        if state[start]:
            continue
        stack = [(start, iter(sorted(deps[start])))]
        state[start] = 1
        while stack:
            current, pending = stack[-1]
            advanced = False
            for dep in pending:
                if state[dep] == 1:
                    raise UserError(f"graph '{graph.name}' has a cycle through node '{graph.nodes[dep].name}'")
                if state[dep] == 0:
                    state[dep] = 1
                    stack.append((dep, iter(sorted(deps[dep]))))
                    advanced = True
                    break
            if not advanced:
                state[current] = 2
                order.append(current)
                stack.pop()
    if order != list(range(len(graph.nodes))):
        graph.nodes = [graph.nodes[i] for i in order]


def infer_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None) -> None:
    """Fills in dtypes and shapes of intermediate tensors (see ``onnxopt.shapes.infer_shapes``)."""
    from onnxopt import shapes

    shapes.infer_shapes(graph, template)


_NON_NUMPY = {TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
              TensorProto.FLOAT8E5M2FNUZ, TensorProto.INT4, TensorProto.UINT4, TensorProto.STRING}


def _graph_opsets(graph: gs.Graph) -> dict[str, int]:
    opsets = {"": graph.opset}
    for opset in graph.import_domains or []:
        opsets[opset.domain] = opset.version
    return opsets


def imported_domains(graph: gs.Graph) -> set[str]:
    """The operator domains the model imports."""
    return set(_graph_opsets(graph))


def opset_version(graph: gs.Graph, domain: str = "") -> int | None:
    """The imported version of an operator domain, or ``None`` if the model does not import it."""
    return _graph_opsets(graph).get(domain)
