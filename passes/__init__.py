"""The built-in pass library, installed as ``onnxopt.passes``: one module per pass, named after it.

``DEFAULT_PIPELINE`` is what ``onnxopt run`` runs without ``--passes``: constant folding, then the
fusions, then dead-code elimination, repeated until nothing changes.
"""

from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fold import ConstantFolding
from onnxopt.passes.fuse import Fuse

BUILTIN_PASSES = [ConstantFolding, Fuse, DeadCodeElimination]

DEFAULT_PIPELINE = ["fold", "fuse", "dce"]

__all__ = ["BUILTIN_PASSES", "DEFAULT_PIPELINE", "ConstantFolding", "DeadCodeElimination", "Fuse"]
