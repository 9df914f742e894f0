"""Bad input to ``onnxopt``: exit code 2, one line on stderr, no traceback, nothing written or changed.

Each case builds its files in a fresh folder and returns the command line and words the error must
contain. The whole folder is compared before and after the run, so "no output file" and "input untouched"
are checked at once (plugin files included: the harness turns off bytecode caching).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_harness import TINY_CNN, assert_user_error, copy_tiny_cnn, run_cli, snapshot
from helpers import make_model, tensor, value
from onnx import TensorProto, helper


def _relu_model(**kwargs) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", shape=[4])], [value("y", shape=[4])],
                      **kwargs)


def _add_weight_model() -> onnx.ModelProto:
    """y = x + w with a 256-element weight."""
    weight = tensor("w", np.arange(256, dtype=np.float32))
    return make_model([helper.make_node("Add", ["x", "w"], ["y"])], [value("x", shape=[256])],
                      [value("y", shape=[256])], [weight])


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def missing_file(d: Path):
    return ["run", d / "missing.onnx"], ["no such file"]


def a_directory(d: Path):
    (d / "folder.onnx").mkdir()
    return ["run", d / "folder.onnx"], ["is a directory"]


def empty_file(d: Path):
    (d / "empty.onnx").write_bytes(b"")
    return ["run", d / "empty.onnx"], ["is empty"]


def random_bytes(d: Path):
    (d / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["run", d / "random.onnx"], ["not an ONNX model"]


def text_file(d: Path):
    (d / "notes.onnx").write_text("this is not a model\n")
    return ["run", d / "notes.onnx"], ["not an ONNX model"]


def truncated_model(d: Path):
    data = TINY_CNN.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return ["run", d / "truncated.onnx"], ["not an ONNX model"]


def undefined_value(d: Path):
    model = make_model([helper.make_node("Relu", ["nowhere"], ["y"])], [value("x", shape=[4])],
                       [value("y", shape=[4])], check=False)
    onnx.save(model, d / "undefined.onnx")
    return ["run", d / "undefined.onnx"], ["invalid ONNX model", "'nowhere'", "Relu"]


def cycle(d: Path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    model = make_model(nodes, [value("x", shape=[4])], [value("b", shape=[4])], check=False)
    onnx.save(model, d / "cycle.onnx")
    return ["run", d / "cycle.onnx"], ["invalid ONNX model"]


def duplicate_output_names(d: Path):
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    model = make_model(nodes, [value("x", shape=[4])], [value("y", shape=[4])], check=False)
    onnx.save(model, d / "duplicate.onnx")
    return ["run", d / "duplicate.onnx"], ["invalid ONNX model", "'y'"]


def ir_version_too_new(d: Path):
    model = _relu_model(check=False)
    model.ir_version = 99
    onnx.save(model, d / "ir99.onnx")
    return ["run", d / "ir99.onnx"], ["invalid ONNX model"]


def opset_too_new(d: Path):
    model = _relu_model(opset=onnx.defs.onnx_opset_version() + 3, check=False)
    onnx.save(model, d / "future.onnx")
    return ["run", d / "future.onnx"], ["newer than the installed onnx"]


def unknown_pass(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", "fodl"], ["unknown pass 'fodl'", "did you mean 'fold'"]


def unknown_pass_among_others(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", "fuse,dcee"], ["unknown pass 'dcee'", "'dce'"]


def bad_pipeline_option(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", "fold{nope=1}"], ["no option 'nope'", "max_growth"]


def bad_option_value(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", "fold{max_growth=lots}"], ["expects an integer"]


def unbalanced_pipeline(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", "fold{max_growth=1"], ["unbalanced"]


def empty_pipeline(d: Path):
    return ["run", copy_tiny_cnn(d), "--passes", ","], ["empty"]


def plugin_fails_to_import(d: Path):
    (d / "broken_plugin.py").write_text("import module_that_does_not_exist_anywhere\n")
    return (["run", copy_tiny_cnn(d), "--plugin", d / "broken_plugin.py"],
            ["failed to import", "ModuleNotFoundError"])


def plugin_with_syntax_error(d: Path):
    (d / "syntax_plugin.py").write_text("def broken(:\n")
    return ["run", copy_tiny_cnn(d), "--plugin", d / "syntax_plugin.py"], ["failed to import", "SyntaxError"]


def plugin_without_passes(d: Path):
    (d / "empty_plugin.py").write_text("X = 1\n")
    return ["run", copy_tiny_cnn(d), "--plugin", d / "empty_plugin.py"], ["defines no pass"]


def plugin_name_clash(d: Path):
    (d / "clash.py").write_text(
        "import onnxopt\n@onnxopt.function_pass('fold')\ndef fold(graph, ctx):\n    return False\n")
    return ["run", copy_tiny_cnn(d), "--plugin", d / "clash.py"], ["'fold' is already taken by built-in"]


def plugin_missing(d: Path):
    return ["run", copy_tiny_cnn(d), "--plugin", d / "nowhere.py"], ["plugin file not found"]


def input_shape_without_name(d: Path):
    return ["run", copy_tiny_cnn(d), "--input-shape", "1x3x16x16"], ["must read NAME:DIMS"]


def input_shape_not_integers(d: Path):
    return ["run", copy_tiny_cnn(d), "--input-shape", "input:1xthreex16"], ["integers"]


def input_shape_unknown_input(d: Path):
    return ["run", copy_tiny_cnn(d), "--input-shape", "image:1x3x16x16"], ["unknown input", "image"]


def input_shape_wrong_rank(d: Path):
    return ["run", copy_tiny_cnn(d), "--input-shape", "input:1x3"], ["rank 2", "rank 4"]


def inputs_file_missing(d: Path):
    return ["run", copy_tiny_cnn(d), "--inputs", d / "nowhere.npz"], ["cannot read inputs"]


def inputs_file_lacks_an_input(d: Path):
    np.savez(d / "inputs.npz", other=np.zeros(3, np.float32))
    return ["run", copy_tiny_cnn(d), "--inputs", d / "inputs.npz"], ["lack", "input"]


def external_data_missing(d: Path):
    _save_external(_add_weight_model(), d / "model.onnx", "model.bin")
    os.remove(d / "model.bin")
    return ["run", d / "model.onnx"], ["external data file 'model.bin' is missing"]


def external_data_outside_folder(d: Path):
    (d / "models").mkdir()
    _save_external(_add_weight_model(), d / "models" / "model.onnx", "model.bin")
    os.replace(d / "models" / "model.bin", d / "secret.bin")
    proto = onnx.load(d / "models" / "model.onnx", load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(proto, d / "models" / "model.onnx")
    return ["run", d / "models" / "model.onnx"], ["'../secret.bin'", "outside the model's folder"]


def external_data_absolute_path(d: Path):
    _save_external(_add_weight_model(), d / "model.onnx", "model.bin")
    proto = onnx.load(d / "model.onnx", load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = str(d / "model.bin")
    onnx.save(proto, d / "model.onnx")
    return ["run", d / "model.onnx"], ["absolute path"]


def external_data_too_short(d: Path):
    _save_external(_add_weight_model(), d / "model.onnx", "model.bin")
    data = (d / "model.bin").read_bytes()
    (d / "model.bin").write_bytes(data[:100])
    return ["run", d / "model.onnx"], ["external data needs"]


def dims_disagree_with_raw_data(d: Path):
    weight = tensor("w", np.ones(4, np.float32))
    weight.dims[:] = [8]
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [value("x", shape=[8])],
                       [value("y", shape=[8])], [weight], check=False)
    onnx.save(model, d / "dims.onnx")
    return ["run", d / "dims.onnx"], ["'w' declares shape [8]", "holds 16 bytes"]


def dims_disagree_with_float_data(d: Path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    weight.dims[:] = [8]
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [value("x", shape=[8])],
                       [value("y", shape=[8])], [weight], check=False)
    onnx.save(model, d / "dims.onnx")
    return ["run", d / "dims.onnx"], ["tensor name: w", "too small"]


def name_not_utf8(d: Path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="NODENAME")], [value("x", shape=[4])],
                       [value("y", shape=[4])])
    (d / "latin1.onnx").write_bytes(model.SerializeToString().replace(b"NODENAME", b"NOD\xc9NAME"))
    return ["run", d / "latin1.onnx"], ["not valid UTF-8", "graph.node[0].name"]


def inputs_the_model_cannot_run(d: Path):
    # A kernel failure in onnxruntime: its own error log must not add lines to stderr.
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [value("x", shape=["n", 4])],
                       [value("y", shape=[2, 2])], [tensor("shape", np.array([2, 2], np.int64))])
    onnx.save(model, d / "reshape.onnx")
    np.savez(d / "inputs.npz", x=np.ones((3, 4), np.float32))
    return ["run", d / "reshape.onnx", "--inputs", d / "inputs.npz"], ["does not run on the given inputs"]


def output_folder_missing(d: Path):
    return ["run", copy_tiny_cnn(d), "-o", d / "nowhere" / "out.onnx"], ["does not exist"]


def output_is_a_directory(d: Path):
    (d / "out").mkdir()
    return ["run", copy_tiny_cnn(d), "-o", d / "out"], ["is a directory"]


def report_folder_missing(d: Path):
    return ["run", copy_tiny_cnn(d), "--report", d / "nowhere" / "r.json"], ["report folder"]


def unknown_target(d: Path):
    return ["run", copy_tiny_cnn(d), "--target", "gpu9000"], ["--target", "gpu9000"]


def unknown_option(d: Path):
    return ["run", copy_tiny_cnn(d), "--fast"], ["--fast"]


def preset_and_passes(d: Path):
    return ["run", copy_tiny_cnn(d), "-O2", "--passes", "fold"], ["--passes", "-O"]


def unknown_preset(d: Path):
    return ["run", copy_tiny_cnn(d), "-O7"], ["-O", "'7'"]


def missing_model_argument(d: Path):
    return ["run"], ["MODEL"]


def unknown_command(d: Path):
    return ["optimise", copy_tiny_cnn(d)], ["optimise"]


def markup_in_file_name(d: Path):
    # Rich would read "[/]" as a closing tag and crash; a file name is printed as it is.
    return ["run", d / "a[/]b[red].onnx"], ["no such file", "a[/]b[red].onnx"]


def inspect_random_bytes(d: Path):
    (d / "random.onnx").write_bytes(np.random.default_rng(1).bytes(512))
    return ["inspect", d / "random.onnx"], ["not an ONNX model"]


def inspect_missing(d: Path):
    return ["inspect", d / "missing.onnx"], ["no such file"]


def passes_with_broken_plugin(d: Path):
    (d / "broken_plugin.py").write_text("raise ValueError('nope')\n")
    return ["passes", "--plugin", d / "broken_plugin.py"], ["failed to import", "ValueError: nope"]


CASES: list[Callable[[Path], tuple[list, list[str]]]] = [
    missing_file, a_directory, empty_file, random_bytes, text_file, truncated_model, undefined_value, cycle,
    duplicate_output_names, ir_version_too_new, opset_too_new, unknown_pass, unknown_pass_among_others,
    bad_pipeline_option, bad_option_value, unbalanced_pipeline, empty_pipeline, plugin_fails_to_import,
    plugin_with_syntax_error, plugin_without_passes, plugin_name_clash, plugin_missing, input_shape_without_name,
    input_shape_not_integers, input_shape_unknown_input, input_shape_wrong_rank, inputs_file_missing,
    inputs_file_lacks_an_input, external_data_missing, external_data_outside_folder, external_data_absolute_path,
    external_data_too_short, dims_disagree_with_raw_data, dims_disagree_with_float_data, name_not_utf8,
    inputs_the_model_cannot_run, output_folder_missing, output_is_a_directory, report_folder_missing,
    unknown_target, unknown_option, preset_and_passes, unknown_preset, missing_model_argument, unknown_command,
    markup_in_file_name, inspect_random_bytes, inspect_missing, passes_with_broken_plugin,
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    args, fragments = case(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert snapshot(tmp_path) == before

