from helpers import assert_same_outputs

import onnxopt
from onnxopt.passes import DEFAULT_PIPELINE


def test_default_pipeline_on_tiny_cnn_is_exact(tmp_path):
    from pathlib import Path

    model_path = Path(__file__).parents[2] / "examples" / "models" / "tiny_cnn.onnx"
    original = onnxopt.load_model(model_path)
    optimized = onnxopt.optimize(original, passes=",".join(DEFAULT_PIPELINE))
    assert len(optimized.graph.node) < len(original.graph.node)
    assert_same_outputs(original, optimized)
