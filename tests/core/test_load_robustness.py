"""Damaged model files: loading raises ``ModelLoadError`` (one line) or yields a model onnxopt can handle.

Nothing in between: no UnicodeDecodeError from a name that is not UTF-8, no IndexError from a truncated
field, and a model that loads is either optimized or refused with an onnxopt error.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_harness import TINY_CNN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxopt
from onnxopt import ir

DATA = TINY_CNN.read_bytes()


def _load_or_refuse(path) -> onnx.ModelProto | None:
    try:
        model = ir.load_model(path)
    except onnxopt.ModelLoadError as error:
        assert "\n" not in str(error)
        return None
    return model


def _optimize_or_refuse(model: onnx.ModelProto) -> None:
    try:
        onnxopt.optimize(model, passes="fold,dce", verify=False)
    except onnxopt.OnnxoptError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2048))
def test_random_bytes_are_refused(tmp_path, data):
    path = tmp_path / "random.onnx"
    path.write_bytes(data)
    model = _load_or_refuse(path)
    if model is not None:
        _optimize_or_refuse(model)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_tiny_cnn_is_loaded_or_refused(tmp_path, data):
    damaged = bytearray(DATA)
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        damaged = damaged[: data.draw(st.integers(1, len(DATA) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            damaged[data.draw(st.integers(0, len(DATA) - 1))] = data.draw(st.integers(0, 255))
    else:
        start = data.draw(st.integers(0, len(DATA) - 1))
        damaged[start:start + data.draw(st.integers(1, 40))] = data.draw(st.binary(max_size=40))
    path = tmp_path / "damaged.onnx"
    path.write_bytes(bytes(damaged))
    model = _load_or_refuse(path)
    if model is not None:
        _optimize_or_refuse(model)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_tiny_cnn_is_refused(tmp_path, fraction):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(DATA[: int(len(DATA) * fraction)])
    with pytest.raises(onnxopt.ModelLoadError):
        ir.load_model(path)


def test_every_string_field_is_checked_for_utf8(tmp_path):
    model = onnx.load(TINY_CNN)
    model.graph.node[3].attribute[0].name = "ATTRNAME"
    model.metadata_props.add(key="KEYKEY", value="v")
    for marker in (b"ATTRNAME", b"KEYKEY"):
        path = tmp_path / "bad.onnx"
        path.write_bytes(model.SerializeToString().replace(marker, marker[:2] + b"\xff" + marker[3:]))
        with pytest.raises(onnxopt.ModelLoadError, match="not valid UTF-8"):
            ir.load_model(path)


def test_damaged_proto_given_directly_is_refused():
    model = onnx.ModelProto.FromString(DATA.replace(b"relu0", b"rel\xe9u"[:5]))
    with pytest.raises(onnxopt.ModelLoadError, match="the given ModelProto.*UTF-8"):
        onnxopt.optimize(model)


def test_valid_model_with_unicode_names_is_fine(tmp_path):
    model = onnx.load(TINY_CNN)
    model.graph.node[0].name = "свёртка-0 ✓"
    model.doc_string = "模型"
    path = tmp_path / "unicode.onnx"
    onnx.save(model, path)
    optimized = onnxopt.optimize(path)
    assert optimized.doc_string == "模型"
    np.testing.assert_equal(len(optimized.graph.output), 1)
