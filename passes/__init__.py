"""The built-in pass library, installed as ``onnxopt.passes``: one module per pass, named after it.

Presets (``onnxopt run -O1`` ... ``-O3``); ``DEFAULT_PIPELINE`` is ``O2``, what ``onnxopt run`` runs
without ``--passes``, repeated until nothing changes:

* ``O0``: nothing but loading, checking and saving (useful to validate and re-save a model);
* ``O1``: ``fold,dce`` — constants and shapes folded, dead code removed, no operator changed;
* ``O2``: ``fold,cse,fuse,dce`` — also merges duplicate computations and applies the exact fusions;
  every pass keeps the model numerically equivalent and emits only standard ONNX operators;
* ``O3``: for now the same as ``O2``; target-specific fusions will join it.
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
    "O2": ["fold", "cse", "fuse", "dce"],
    "O3": ["fold", "cse", "fuse", "dce"],
}

DEFAULT_PIPELINE = PRESETS["O2"]

__all__ = [
    "BUILTIN_PASSES",
    "DEFAULT_PIPELINE",
    "PRESETS",
    "Attention",
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "Fuse",
    "OrtFuse",
]
