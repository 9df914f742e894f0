"""Errors raised by onnxopt.

``UserError`` and its subclasses describe a problem with what the user gave us (a file, a pass name, a
graph); the CLI prints their message as one line and exits with code 2. Every other exception is an
internal error and is reported with the name of the pass that raised it.
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose."""


class UserError(OnnxoptError):
    """A problem with the input: reported as one line, exit code 2."""


class ModelLoadError(UserError):
    """The model file is missing, unreadable, corrupt or not a valid ONNX model."""


class UnknownPassError(UserError):
    """A pipeline names a pass that no registry knows."""


class PipelineSpecError(UserError):
    """A pipeline specification string cannot be parsed or has bad options."""


class PluginError(UserError):
    """A plugin file or entry point failed to load."""


class InputSpecError(UserError):
    """An ``--input-shape`` or ``--inputs`` value does not fit the model."""


class PassFailedError(OnnxoptError):
    """A pass raised an unexpected exception; the input model is left untouched."""

    def __init__(self, pass_name: str, cause: BaseException, passes_before: list[str]):
        self.pass_name = pass_name
        self.cause = cause
        self.passes_before = passes_before
        before = ", ".join(passes_before) if passes_before else "none"
        super().__init__(
            f"internal error in pass '{pass_name}': {type(cause).__name__}: {cause} "
            f"(passes run before it: {before})"
        )


class ContractViolation(OnnxoptError):
    """A pass left the graph in a state every pass must keep true (sorted, single producer, ...)."""

    def __init__(self, pass_name: str, problems: list[str]):
        self.pass_name = pass_name
        self.problems = problems
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(f"pass '{pass_name}' broke the graph: {shown}")


class VerificationError(OnnxoptError):
    """The optimized model does not compute the same outputs as the original."""

    def __init__(self, message: str, comparison=None, pass_name: str | None = None):
        self.comparison = comparison
        self.pass_name = pass_name
        super().__init__(message)
