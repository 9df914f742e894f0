"""The Python API: ``optimize``, custom passes, pipeline specs, the manager's fixed point and errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from cli_harness import TINY_CNN
from helpers import assert_same_outputs, make_model, tensor, value
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import Pass, PassContext, PassResult, ir
from onnxopt.passes import ConstantFolding, DeadCodeElimination, Fuse
from onnxopt.registry import PassRegistry


def _chain_model() -> onnx.ModelProto:
    """y = relu(x) + (c * 2): one foldable Mul."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["c", "two"], ["c2"]),
             helper.make_node("Add", ["r", "c2"], ["y"])]
    inits = [tensor("c", np.array([1.0, -2.0, 3.0], np.float32)), tensor("two", np.float32(2.0))]
    return make_model(nodes, [value("x", shape=[3])], [value("y", shape=[3])], inits)


# ---------------------------------------------------------------------------------------------------
# optimize


def test_optimize_accepts_a_path_or_a_modelproto(tmp_path):
    from_path = onnxopt.optimize(TINY_CNN)
    from_str = onnxopt.optimize(str(TINY_CNN), passes="fold,fuse,dce")
    proto = onnx.load(TINY_CNN)
    from_proto = onnxopt.optimize(proto)
    for result in (from_path, from_str, from_proto):
        assert isinstance(result, onnx.ModelProto)
        assert len(result.graph.node) < len(proto.graph.node)
    assert from_path.SerializeToString() == from_proto.SerializeToString()
    assert_same_outputs(proto, from_path)


class _ExportedProgram:
    """What ``torch.onnx.export(..., dynamo=True)`` returns, as far as onnxopt reads it: ``model_proto``."""

    def __init__(self, model: onnx.ModelProto):
        self._model = model

    @property
    def model_proto(self) -> onnx.ModelProto:
        return self._model


def test_optimize_accepts_the_program_an_exporter_returns():
    proto = onnx.load(TINY_CNN)
    result = onnxopt.optimize_model(_ExportedProgram(proto))
    assert result.report.verification.ok
    assert result.model.SerializeToString() == onnxopt.optimize(proto).SerializeToString()
    with pytest.raises(onnxopt.UserError, match="not an ONNX model"):
        onnxopt.optimize(_ExportedProgram(onnx.ModelProto()))


def test_optimize_does_not_mutate_the_given_model():
    model = onnx.load(TINY_CNN)
    before = model.SerializeToString()
    onnxopt.optimize(model, passes="fold,fuse,dce", verify="each")
    assert model.SerializeToString() == before


def test_optimize_does_not_mutate_the_given_model_when_a_pass_fails():
    @onnxopt.function_pass("explode-after-fuse")
    def explode(graph, ctx):
        raise RuntimeError("boom")

    model = onnx.load(TINY_CNN)
    before = model.SerializeToString()
    with pytest.raises(onnxopt.PassFailedError):
        onnxopt.optimize(model, passes=["fold", "fuse", explode()])
    assert model.SerializeToString() == before


def test_renaming_a_constant_does_not_rename_it_in_the_given_model():
    @onnxopt.function_pass("rename-constant")
    def rename(graph, ctx):
        for tensor_ in graph.tensors().values():
            if tensor_.name == "c":
                tensor_.name = "c_renamed"
                return True
        return False

    model = _chain_model()
    before = model.SerializeToString()
    optimized = onnxopt.optimize(model, passes=[rename()], max_iterations=1)
    assert "c_renamed" in {t.name for t in optimized.graph.initializer}
    assert model.SerializeToString() == before


@pytest.mark.parametrize("target", ["generic", "ort", "openvino", "tensorrt", onnxopt.Target.ORT])
def test_optimize_accepts_every_target(target):
    optimized = onnxopt.optimize(_chain_model(), target=target)
    assert_same_outputs(_chain_model(), optimized)


@pytest.mark.parametrize("target", ["generic", "ort", "openvino", "tensorrt"])
def test_default_pipeline_reaches_its_fixed_point_on_every_target(target):
    # --target ort once imported com.microsoft for its rules on every round and dce dropped it unused: the
    # pipeline changed the graph on every round and ran to the iteration cap (3x the time on EfficientNet).
    result = onnxopt.optimize_model(TINY_CNN, target=target)
    assert result.report.converged and result.report.iterations <= 2, result.report.iterations
    assert {o.domain for o in result.model.opset_import} <= {"", "ai.onnx"}
    assert result.report.verification.ok


@pytest.mark.parametrize("verify", [True, False, "end", "each", "off"])
def test_optimize_accepts_verify_modes(verify):
    result = onnxopt.optimize_model(_chain_model(), passes="fold,dce", verify=verify)
    assert (result.report.verification is None) == (verify in (False, "off"))


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "gpu"}, "unknown target 'gpu'"),
    ({"verify": "sometimes"}, "verify must be"),
    ({"passes": "fodl"}, "did you mean 'fold'"),
    ({"passes": [42]}, "not a pass"),
    ({"max_iterations": 0}, "max_iterations"),
])
def test_optimize_user_errors(kwargs, message):
    with pytest.raises(onnxopt.UserError, match=message):
        onnxopt.optimize(_chain_model(), **kwargs)


def test_optimize_with_given_inputs():
    feeds = {"x": np.array([-1.0, 0.0, 1.0], np.float32)}
    result = onnxopt.optimize_model(_chain_model(), passes="fold,dce", inputs=feeds)
    assert result.report.verification.ok
    assert result.report.verification.input_shapes == {"x": [3]}
    with pytest.raises(onnxopt.UserError, match="lack"):
        onnxopt.optimize(_chain_model(), inputs={"other": feeds["x"]})


def test_report_of_a_run():
    result = onnxopt.optimize_model(_chain_model(), passes="fold{max_growth=4KiB},dce")
    report = result.report
    assert report.pipeline == ["fold{max_growth=4096}", "dce"]
    assert report.target == "generic"
    assert report.converged and report.iterations == 2  # a change, then a round without one
    # dce found nothing after fold's change and nothing changed since: it is not run again.
    assert [r.name for r in report.records] == ["fold", "dce", "fold"]
    assert report.records[0].stats["folded"] == 1
    assert report.before["nodes"] == 3 and report.after["nodes"] == 2
    rows = report.per_pass()
    assert [row["pass"] for row in rows] == ["fold{max_growth=4096}", "dce"]
    assert rows[0]["runs"] == 2 and rows[1]["runs"] == 1 and rows[0]["nodes"] == -1
    data = report.to_dict()
    assert data["verification"]["ok"] is True
    import json

    json.dumps(data)  # the --report file


def test_instruments_see_every_pass():
    seen = []

    class Recorder:
        def before_pass(self, pass_, iteration):
            seen.append(("before", pass_.name, iteration))

        def after_pass(self, record):
            seen.append(("after", record.name, record.iteration))

    onnxopt.optimize_model(_chain_model(), passes="fold,dce", instruments=[Recorder()])
    assert seen == [("before", "fold", 1), ("after", "fold", 1), ("before", "dce", 1), ("after", "dce", 1),
                    ("before", "fold", 2), ("after", "fold", 2)]


# ---------------------------------------------------------------------------------------------------
# Custom passes


@onnxopt.function_pass("relu-to-identity-free")
def drop_relu_before_nothing(graph, ctx):
    """Counts Relu nodes without changing anything."""
    return PassResult(modified=False, stats={"relus": sum(n.op == "Relu" for n in graph.nodes)})


@dataclass(frozen=True)
class ScaleOutputs(Pass):
    """Multiplies every float initializer by ``factor`` (changes numerics unless factor is 1)."""

    name: ClassVar[str] = "scale-initializers"
    factor: float = 1.0
    only_vectors: bool = False
    label: str = "scaled"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        count = 0
        for tensor_ in graph.tensors().values():
            if isinstance(tensor_, gs.Constant) and tensor_.values.dtype == np.float32 and self.factor != 1.0:
                if self.only_vectors and tensor_.values.ndim != 1:
                    continue
                tensor_.values = tensor_.values * np.float32(self.factor)
                count += 1
        return PassResult.from_count(count, self.label)


def test_function_pass_runs_through_optimize():
    result = onnxopt.optimize_model(_chain_model(), passes=[drop_relu_before_nothing()])
    assert result.report.records[0].stats == {"relus": 1}
    assert drop_relu_before_nothing.name == "relu-to-identity-free"
    assert drop_relu_before_nothing.description() == "Counts Relu nodes without changing anything."
    assert issubclass(drop_relu_before_nothing, Pass)
    # The class itself is accepted too.
    onnxopt.optimize(_chain_model(), passes=[drop_relu_before_nothing, "dce"])


def test_pass_subclass_with_options_runs_through_optimize():
    model = _chain_model()
    unchanged = onnxopt.optimize(model, passes=[ScaleOutputs(), "dce"])
    assert_same_outputs(model, unchanged)
    with pytest.raises(onnxopt.VerificationError):
        onnxopt.optimize(model, passes=[ScaleOutputs(factor=3.0)])
    scaled = onnxopt.optimize(model, passes=[ScaleOutputs(factor=3.0)], verify=False, max_iterations=1)
    c = next(t for t in scaled.graph.initializer if t.name == "c")
    np.testing.assert_allclose(onnx.numpy_helper.to_array(c), [3.0, -6.0, 9.0])


def test_pass_options_are_frozen_fields_with_a_spec():
    pass_ = ScaleOutputs(factor=2.5)
    assert pass_.options() == {"factor": 2.5, "only_vectors": False, "label": "scaled"}
    assert pass_.spec() == "scale-initializers{factor=2.5}"
    assert ScaleOutputs().spec() == "scale-initializers"
    assert [f.name for f in ScaleOutputs.option_fields()] == ["factor", "only_vectors", "label"]
    assert ScaleOutputs.description().startswith("Multiplies every float initializer")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pass_.factor = 1.0


def test_parse_pipeline_options():
    passes = onnxopt.parse_pipeline("fold{max_growth=4KiB},dce")
    assert passes == [ConstantFolding(max_growth=4096), DeadCodeElimination()]
    assert [p.spec() for p in passes] == ["fold{max_growth=4096}", "dce"]
    assert onnxopt.parse_pipeline(" fuse , fold { max-growth = 1.5MiB } ")[1].max_growth == 1536 * 1024
    assert onnxopt.parse_pipeline("fold{max_growth=1M}")[0].max_growth == 1 << 20
    assert onnxopt.parse_pipeline(["fuse", "fold,dce"]) == [Fuse(), ConstantFolding(), DeadCodeElimination()]


def test_parse_pipeline_typed_options_of_a_user_pass():
    registry = PassRegistry()
    registry.register(ScaleOutputs, "test")
    (pass_,) = onnxopt.parse_pipeline("scale-initializers{factor=0.5,only-vectors=yes,label=x}", registry)
    assert pass_ == ScaleOutputs(factor=0.5, only_vectors=True, label="x")
    # A spec recreates the pass it came from.
    assert onnxopt.parse_pipeline(pass_.spec(), registry) == [pass_]


@pytest.mark.parametrize("spec, error", [
    ("fold{nope=1}", "has no option 'nope'"),
    ("fold{max_growth}", "must read key=value"),
    ("fold{max_growth=big}", "expects an integer"),
    ("fold{max_growth=1", "unbalanced"),
    ("fold}", "unbalanced"),
    ("fold{max_growth=1}x", "must end with"),
    ("", "empty"),
    (" , ", "empty"),
    ("scale-initializers{factor=much}", "expects a number"),
    ("scale-initializers{only_vectors=maybe}", "expects true or false"),
])
def test_parse_pipeline_errors(spec, error):
    registry = onnxopt.default_registry()
    local = PassRegistry()
    for name in registry.names():
        local.register(registry.get(name), registry.origin(name))
    local.register(ScaleOutputs, "test")
    with pytest.raises(onnxopt.UserError, match=error):
        onnxopt.parse_pipeline(spec, local)


# ---------------------------------------------------------------------------------------------------
# The manager: fixed point, contracts, errors


def _counting_pass(changes: int):
    """A pass that reports a change for its first ``changes`` runs (state kept on the instance's graph)."""

    @onnxopt.function_pass(f"change-{changes}-times")
    def change(graph, ctx):
        runs = vars(graph).setdefault("test_runs", [0])
        runs[0] += 1
        return runs[0] <= changes

    return change()


def test_fixed_point_stops_when_nothing_changes():
    model = _chain_model()
    manager = onnxopt.PassManager([_counting_pass(3)], max_iterations=10)
    _, report = manager.run(model)
    assert report.converged and report.iterations == 4
    assert [r.modified for r in report.records] == [True, True, True, False]


def test_fixed_point_is_bounded_by_max_iterations():
    model = _chain_model()
    _, report = onnxopt.PassManager([_counting_pass(100), DeadCodeElimination()], max_iterations=5).run(model)
    assert not report.converged and report.iterations == 5
    assert len(report.records) == 10
    result = onnxopt.optimize_model(model, passes=[_counting_pass(100)], max_iterations=3)
    assert not result.report.converged and result.report.iterations == 3


def test_single_pass_run_without_fixed_point():
    _, report = onnxopt.PassManager([_counting_pass(100)], fixed_point=False).run(_chain_model())
    assert report.iterations == 1 and report.converged


def test_pass_returning_a_count_or_bool():
    @onnxopt.function_pass("count")
    def count(graph, ctx):
        return 0

    result = onnxopt.optimize_model(_chain_model(), passes=[count()])
    assert result.report.records[0].stats == {"rewrites": 0} and not result.report.records[0].modified


def test_pass_returning_nonsense_is_an_internal_error_naming_it():
    @onnxopt.function_pass("returns-none")
    def returns_none(graph, ctx):
        return None

    with pytest.raises(onnxopt.PassFailedError, match="'returns-none'") as info:
        onnxopt.optimize(_chain_model(), passes=["fold", returns_none()])
    assert info.value.pass_name == "returns-none"
    assert info.value.passes_before == ["fold"]
    assert isinstance(info.value.cause, TypeError)


def test_contract_violation_names_the_pass_and_the_problem():
    @onnxopt.function_pass("rename-output")
    def rename_output(graph, ctx):
        graph.outputs[0].name = "renamed"
        return True

    with pytest.raises(onnxopt.ContractViolation) as info:
        onnxopt.optimize(_chain_model(), passes=[rename_output()])
    assert info.value.pass_name == "rename-output"
    assert any("graph outputs changed" in p for p in info.value.problems)


def test_contract_violation_on_changed_input_dtype():
    @onnxopt.function_pass("retype-input")
    def retype_input(graph, ctx):
        graph.inputs[0].dtype = np.float64
        return True

    with pytest.raises(onnxopt.ContractViolation, match="changed dtype"):
        onnxopt.optimize(_chain_model(), passes=[retype_input()])


def test_contract_violation_on_unsorted_nodes():
    @onnxopt.function_pass("reverse-nodes")
    def reverse_nodes(graph, ctx):
        graph.nodes.reverse()
        return True

    with pytest.raises(onnxopt.ContractViolation, match="not topologically sorted"):
        onnxopt.optimize(_chain_model(), passes=[reverse_nodes()])


def test_verification_error_carries_the_report():
    with pytest.raises(onnxopt.VerificationError) as info:
        onnxopt.optimize(_chain_model(), passes=[ScaleOutputs(factor=2.0)])
    assert not info.value.comparison.ok
    assert info.value.report.verification is info.value.comparison


def test_verify_each_names_the_pass():
    with pytest.raises(onnxopt.VerificationError, match="pass 'scale-initializers'") as info:
        onnxopt.optimize(_chain_model(), passes=["fold", ScaleOutputs(factor=2.0), "dce"], verify="each")
    assert info.value.pass_name == "scale-initializers"
    assert [r.name for r in info.value.report.records] == ["fold", "scale-initializers"]


def test_pass_sees_target_and_original_model():
    seen = {}

    @onnxopt.function_pass("look")
    def look(graph, ctx):
        seen["target"] = ctx.target
        seen["original"] = ctx.original
        seen["ort_runs_ms"] = ctx.target_runs("com.microsoft")
        seen["opset"] = ctx.opset(graph)
        return False

    model = _chain_model()
    onnxopt.optimize(model, passes=[look()], target="ort")
    assert seen["target"] is onnxopt.Target.ORT and seen["ort_runs_ms"]
    assert seen["original"].graph.name == model.graph.name
    assert seen["opset"] == 17


def test_optimized_model_failing_the_checker_is_an_internal_error():
    @onnxopt.function_pass("bad-attribute")
    def bad_attribute(graph, ctx):
        graph.nodes[0].attrs["not_an_attribute_of_relu"] = 1
        return True

    with pytest.raises(onnxopt.OnnxoptError, match="fails onnx.checker") as info:
        onnxopt.optimize(_chain_model(), passes=[bad_attribute()])
    assert not isinstance(info.value, onnxopt.UserError)


def test_load_model_validates():
    model = onnxopt.load_model(TINY_CNN)
    assert isinstance(model, onnx.ModelProto)
    broken = make_model([helper.make_node("Relu", ["nowhere"], ["y"])], [value("x", shape=[1])],
                        [value("y", shape=[1])], check=False)
    with pytest.raises(onnxopt.ModelLoadError, match="invalid ONNX model"):
        onnxopt.load_model(broken)
    assert ir.load_model(broken, check=False) is broken


def test_public_names():
    for name in onnxopt.__all__:
        assert hasattr(onnxopt, name), name


# ---------------------------------------------------------------------------------------------------
# Weights held once


def _weighty_model() -> onnx.ModelProto:
    """y = relu(x @ w + 0) with a 256x256 weight, large enough to stay a stub until it is needed."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "zero"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    inits = [tensor("w", rng.standard_normal((256, 256)).astype(np.float32)), tensor("zero", np.float32(0))]
    return make_model(nodes, [value("x", shape=[2, 256])], [value("y", shape=[2, 256])], inits)


@pytest.mark.parametrize("external_data", [True, False])
def test_save_writes_weights_straight_from_the_original(tmp_path, external_data):
    original = _weighty_model()
    result = onnxopt.optimize_model(original, verify=False)
    path = tmp_path / "out.onnx"
    written = result.save(path, external_data=external_data)
    assert (tmp_path / "out.onnx.data" in written) == external_data
    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    assert_same_outputs(original, saved)
    assert_same_outputs(original, result.model)


def test_save_after_model_access_writes_the_same_weights(tmp_path):
    original = _weighty_model()
    result = onnxopt.optimize_model(original, verify=False)
    assert_same_outputs(original, result.model)
    result.save(tmp_path / "out.onnx", external_data=True)
    assert_same_outputs(original, onnx.load(tmp_path / "out.onnx"))


def test_verification_finds_sizes_for_a_mask_spanning_past_and_new_tokens():
    """A decoder's mask is past + sequence long: equal dynamic sizes cannot run it, a searched one can."""
    nodes = [
        helper.make_node("Concat", ["past", "x"], ["all_tokens"], axis=1),
        helper.make_node("Concat", ["all_tokens", "mask"], ["stacked"], axis=0),  # no broadcasting: sizes must agree
        helper.make_node("Identity", ["stacked"], ["out"]),
    ]
    model = make_model(nodes, [value("x", shape=["batch", "sequence"]), value("past", shape=["batch", "past_sequence"]),
                               value("mask", shape=["batch", "total_sequence"])],
                       [value("out", shape=["twice_batch", "total_sequence"])])
    result = onnxopt.optimize_model(model)
    verification = result.report.verification
    assert verification.ok and not verification.skipped
    assert verification.input_shapes["mask"] == [2, 4]


def test_output_is_written_after_verification_of_the_written_file(tmp_path):
    path = tmp_path / "out.onnx"
    result = onnxopt.optimize_model(TINY_CNN, output=path)
    assert result.written == [path]
    assert result.report.verification.ok and not result.report.verification.skipped
    assert_same_outputs(onnx.load(TINY_CNN), onnx.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_output_failing_verification_is_never_written(tmp_path):
    path = tmp_path / "out.onnx"
    with pytest.raises(onnxopt.VerificationError):
        onnxopt.optimize_model(_chain_model(), passes=[ScaleOutputs(factor=3.0)], output=path)
    assert list(tmp_path.iterdir()) == []  # neither the model nor the staging folder it was checked in


def test_output_with_external_data_is_verified_from_its_files(tmp_path):
    path = tmp_path / "out.onnx"
    result = onnxopt.optimize_model(TINY_CNN, output=path, external_data=True)
    assert result.written == [tmp_path / "out.onnx.data", path]
    assert result.report.verification.ok
    assert_same_outputs(onnx.load(TINY_CNN), onnx.load(path))


def test_outputs_of_verification_runs_own_their_memory():
    # An array onnxruntime returns is a view into its session's memory arena, which then lives as long as
    # the array: the reference outputs, kept for the comparison, held a Whisper encoder's every activation.
    from onnxopt.verify import reference_run, run_model

    model = onnx.load(TINY_CNN)
    feeds, expected = reference_run(model)
    assert expected and all(value.flags.owndata for value in expected.values())
    assert all(value.flags.owndata for value in run_model(model, feeds).values())


def _conv_model(rank: int, kernel: int, dims: list) -> onnx.ModelProto:
    """A convolution whose input must be at least ``kernel`` long along each dynamic spatial dimension."""
    weight = np.random.default_rng(0).standard_normal([2, 1] + [kernel] * rank).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel] * rank)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (rank + 2))],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("rank", "kernel", "dims"), [
    (1, 400, ["batch", 1, "samples"]),  # wav2vec2's feature encoder needs 400 samples
    (2, 20, ["batch", 1, "height", "width"]),  # both spatial sizes at once
], ids=["long_audio", "height_and_width"])
def test_verification_finds_sizes_a_convolution_accepts(rank, kernel, dims):
    from onnxopt.verify import reference_run

    model = _conv_model(rank, kernel, dims)
    feeds, expected = reference_run(model)
    assert isinstance(expected, dict) and all(size >= kernel for size in feeds["x"].shape[2:])
    result = onnxopt.optimize_model(model, passes="fold")
    assert result.report.verification.ok and not result.report.verification.skipped
