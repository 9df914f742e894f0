"""onnxopt: a graph-level ONNX optimizer with verification on by default.

>>> import onnxopt
>>> optimized = onnxopt.optimize("model.onnx")            # doctest: +SKIP
"""

from onnxopt import ir
from onnxopt.api import OptimizationResult, optimize, optimize_model
from onnxopt.errors import (
    ContractViolation,
    ModelLoadError,
    OnnxoptError,
    PassFailedError,
    UnknownPassError,
    UserError,
    VerificationError,
)
from onnxopt.ir import load_model, save_model
from onnxopt.manager import PassManager, PassRecord, Report
from onnxopt.pass_infra import Pass, PassContext, PassResult, Target, function_pass
from onnxopt.registry import PassRegistry, default_registry, parse_pipeline

__version__ = "0.1.0"

__all__ = [
    "ContractViolation",
    "ModelLoadError",
    "OnnxoptError",
    "OptimizationResult",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassRecord",
    "PassRegistry",
    "PassResult",
    "Report",
    "Target",
    "UnknownPassError",
    "UserError",
    "VerificationError",
    "default_registry",
    "function_pass",
    "ir",
    "load_model",
    "optimize",
    "optimize_model",
    "parse_pipeline",
    "save_model",
]
