"""Models whose weights live in a separate file, and atomic saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_harness import run_cli, snapshot
from helpers import assert_same_outputs, make_model, random_feeds, tensor, value
from onnx import TensorProto, helper

from onnxopt import ir


def _mlp() -> onnx.ModelProto:
    """y = relu(x @ W1 + b1) @ W2 + (c * 1): 16 KiB and 2 KiB weights, a tiny bias, a foldable Mul."""
    rng = np.random.default_rng(0)
    inits = [
        tensor("W1", rng.standard_normal((32, 128)).astype(np.float32)),
        tensor("b1", rng.standard_normal(128).astype(np.float32)),
        tensor("W2", rng.standard_normal((128, 4)).astype(np.float32)),
        tensor("c", np.array([0.5, -1.0, 2.0, 0.25], np.float32)),
        tensor("one", np.float32(1.0)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["z"]),
        helper.make_node("Mul", ["c", "one"], ["c1"]),
        helper.make_node("Add", ["z", "c1"], ["y"]),
    ]
    return make_model(nodes, [value("x", shape=[2, 32])], [value("y", shape=[2, 4])], inits)


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> None:
    # onnx.save converts the message it is given: save a copy so that callers keep an inline model.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def _external_locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {entry.value for init in proto.graph.initializer if init.data_location == TensorProto.EXTERNAL
            for entry in init.external_data if entry.key == "location"}


def _ort_outputs(path: Path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_cli_keeps_external_data_and_output_runs(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    original = _mlp()
    _save_external(original, models / "mlp.onnx")
    assert _external_locations(models / "mlp.onnx") == {"weights.bin"}
    elsewhere = tmp_path / "elsewhere"  # run from another folder: data paths are relative to the model
    elsewhere.mkdir()
    before = snapshot(models)

    result = run_cli("run", models / "mlp.onnx", "-o", models / "out.onnx", cwd=elsewhere)
    assert result.code == 0, result.stderr

    assert snapshot(models)["mlp.onnx"] == before["mlp.onnx"]
    assert snapshot(models)["weights.bin"] == before["weights.bin"]
    assert sorted(p.name for p in models.iterdir()) == ["mlp.onnx", "out.onnx", "out.onnx.data", "weights.bin"]
    assert _external_locations(models / "out.onnx") == {"out.onnx.data"}
    assert (models / "out.onnx.data").stat().st_size > 16 * 1024
    assert f"wrote {models / 'out.onnx.data'}, {models / 'out.onnx'}" in result.stdout

    feeds = random_feeds(original)
    want = _ort_outputs(models / "mlp.onnx", feeds)
    got = _ort_outputs(models / "out.onnx", feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert_same_outputs(original, onnx.load(models / "out.onnx"))
    assert list(elsewhere.iterdir()) == []


def test_cli_default_output_of_external_model(tmp_path):
    _save_external(_mlp(), tmp_path / "mlp.onnx", "mlp.weights")
    result = run_cli("run", tmp_path / "mlp.onnx", "-q", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert (tmp_path / "mlp.opt.onnx").is_file() and (tmp_path / "mlp.opt.onnx.data").is_file()


def test_cli_external_data_flags(tmp_path):
    _save_external(_mlp(), tmp_path / "mlp.onnx")
    result = run_cli("run", tmp_path / "mlp.onnx", "-o", tmp_path / "inline.onnx", "--no-external-data", "-q")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "inline.onnx.data").exists()
    assert _external_locations(tmp_path / "inline.onnx") == set()

    onnx.save(_mlp(), tmp_path / "plain.onnx")
    result = run_cli("run", tmp_path / "plain.onnx", "-o", tmp_path / "split.onnx", "--external-data", "-q")
    assert result.code == 0, result.stderr
    assert _external_locations(tmp_path / "split.onnx") == {"split.onnx.data"}
    assert_same_outputs(_mlp(), onnx.load(tmp_path / "split.onnx"))


def test_cli_overwrites_external_model_in_place(tmp_path):
    original = _mlp()
    _save_external(original, tmp_path / "mlp.onnx", "mlp.onnx.data")
    result = run_cli("run", tmp_path / "mlp.onnx", "-o", tmp_path / "mlp.onnx", "-q")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    assert_same_outputs(original, onnx.load(tmp_path / "mlp.onnx"))


def test_load_model_with_external_data_from_another_cwd(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "cwd").mkdir()
    _save_external(_mlp(), tmp_path / "m" / "mlp.onnx")
    monkeypatch.chdir(tmp_path / "cwd")
    loaded = ir.read_model(tmp_path / "m" / "mlp.onnx")
    assert loaded.external_data
    assert all(init.data_location == TensorProto.DEFAULT for init in loaded.model.graph.initializer)
    assert_same_outputs(_mlp(), loaded.model)


def test_external_model_given_as_modelproto_is_refused(tmp_path):
    _save_external(_mlp(), tmp_path / "mlp.onnx")
    proto = onnx.load(tmp_path / "mlp.onnx", load_external_data=False)
    with pytest.raises(ir.ModelLoadError, match="load the model from its path"):
        ir.load_model(proto)


# ---------------------------------------------------------------------------------------------------
# save_model


def test_save_model_external_writes_data_beside_and_leaves_no_temp_files(tmp_path):
    model = _mlp()
    written = ir.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert written == [tmp_path / "out.onnx.data", tmp_path / "out.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    # Only weights of 1 KiB or more move out; the small bias and the scalar stay inline.
    proto = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = {init.name for init in proto.graph.initializer if init.data_location == TensorProto.EXTERNAL}
    assert external == {"W1", "W2"}
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"))


def test_save_model_does_not_change_the_given_model(tmp_path):
    model = _mlp()
    # A weight stored as float_data (not raw bytes) must be converted to be written externally.
    model.graph.initializer.append(helper.make_tensor("extra", TensorProto.FLOAT, [512], [1.0] * 512))
    before = model.SerializeToString()
    ir.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString() == before
    saved = onnx.load(tmp_path / "out.onnx")
    extra = next(init for init in saved.graph.initializer if init.name == "extra")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(extra), np.ones(512, np.float32))


def test_save_model_writes_no_empty_data_file(tmp_path):
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [value("x", shape=[4])],
                       [value("y", shape=[4])], [tensor("w", np.ones(4, np.float32))])
    written = ir.save_model(model, tmp_path / "small.onnx", external_data=True)
    assert written == [tmp_path / "small.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]


def test_save_model_inline_by_default_and_overwrites(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")
    written = ir.save_model(_mlp(), target)
    assert written == [target]
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert_same_outputs(_mlp(), onnx.load(target))


def test_failed_save_leaves_old_file_no_temp_files_and_the_model_intact(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")
    model = _mlp()
    before = model.SerializeToString()
    real_stub = ir._DataWriter.stub

    def fail_after_first_tensor(writer, tensor):
        # Let the real writer move the first tensor, then fail as a full disk would.
        if writer.count:
            raise OSError("disk full")
        return real_stub(writer, tensor)

    monkeypatch.setattr(ir._DataWriter, "stub", fail_after_first_tensor)
    with pytest.raises(OSError, match="disk full"):
        ir.save_model(model, target, external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert target.read_bytes() == b"old contents"
    assert model.SerializeToString() == before  # the model given is never touched


def test_interrupted_save_leaves_no_temp_files(tmp_path, monkeypatch):
    def interrupt(writer, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(ir._DataWriter, "stub", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ir.save_model(_mlp(), tmp_path / "out.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["missing_folder", "is_a_folder"])
def test_save_model_refuses_bad_paths_before_writing(tmp_path, bad):
    target = tmp_path / "nowhere" / "out.onnx" if bad == "missing_folder" else tmp_path
    if bad == "is_a_folder":
        (tmp_path / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(ir.UserError):
        ir.save_model(_mlp(), target, external_data=True)
    assert snapshot(tmp_path) == before


def test_large_constant_attribute_goes_external_and_runs(tmp_path, monkeypatch):
    constant = helper.make_node("Constant", [], ["c"], value=tensor("cv", np.arange(512, dtype=np.float32)))
    model = make_model([constant, helper.make_node("Add", ["x", "c"], ["y"])], [value("x", shape=[512])],
                       [value("y", shape=[512])])
    ir.save_model(model, tmp_path / "const.onnx", external_data=True)
    assert (tmp_path / "const.onnx.data").stat().st_size >= 512 * 4
    feeds = {"x": np.zeros(512, np.float32)}
    np.testing.assert_array_equal(_ort_outputs(tmp_path / "const.onnx", feeds)[0], np.arange(512, dtype=np.float32))
    monkeypatch.chdir(tmp_path.parent)  # loading does not depend on the working directory
    assert_same_outputs(model, ir.load_model(tmp_path / "const.onnx"))
