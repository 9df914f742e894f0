"""The built-in pass library, installed as ``onnxopt.passes``: one module per pass, named after it.

Presets (``onnxopt run -O1`` ... ``-O3``), each repeated until nothing changes. Without ``--passes`` or
``-O``, ``onnxopt run`` runs ``default_pipeline(target)``: ``O2`` for the generic target, ``O3`` for an
engine (``--target ort``, ``openvino``, ``tensorrt``).

* ``O0``: nothing but loading, checking and saving (useful to validate and re-save a model);
* ``O1``: ``fold,dce`` — constants and shapes folded, dead code removed, no operator changed;
* ``O2``: ``fold,cse,fuse,attention,dce`` — also merges duplicate computations and applies the exact
  fusions; for the generic target every operator emitted is a standard ONNX one (``attention`` needs
  opset 23 there);
* ``O3``: ``O2`` and ``ort_fuse``, the target's own fused operators (onnxruntime's contrib operators for
  ``--target ort``; nothing more for the other targets yet).
"""

from onnxopt.passes.attention import Attention
from onnxopt.passes.cse import CommonSubexpressionElimination
from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fold import ConstantFolding
from onnxopt.passes.fuse import Fuse
from onnxopt.passes.ort_fusions import OrtFuse

BUILTIN_PASSES = [ConstantFolding, CommonSubexpressionElimination, Fuse, Attention, OrtFuse, DeadCodeElimination]

PRESETS: dict[str, list[str]] = {
    "O0": [],
    "O1": ["fold", "dce"],
    "O2": ["fold", "cse", "fuse", "attention", "dce"],
    "O3": ["fold", "cse", "fuse", "attention", "ort_fuse", "dce"],
}

DEFAULT_PIPELINE = PRESETS["O2"]


def default_pipeline(target: str = "generic") -> list[str]:
    """The pipeline run without ``--passes``: ``O2`` for the generic target, ``O3`` for an engine."""
    return list(PRESETS["O2" if str(getattr(target, "value", target)) == "generic" else "O3"])

__all__ = [
    "BUILTIN_PASSES",
    "DEFAULT_PIPELINE",
    "PRESETS",
    "default_pipeline",
    "Attention",
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "Fuse",
    "OrtFuse",
]
