"""The pass API: what a pass is, what it is given and what it returns.

A pass is a frozen dataclass deriving from ``Pass``: its fields are its options, ``name`` is how
pipelines refer to it, the first line of its docstring is its description, and ``run(graph, ctx)``
changes the graph in place and returns a ``PassResult``. Small passes can be plain functions decorated
with ``function_pass``. Built-in passes are written against exactly this API.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxopt import ir

__all__ = ["Pass", "PassContext", "PassResult", "RewriteSite", "Target", "function_pass"]


class Target(str, enum.Enum):
    """The engine the optimized model is meant for; passes only emit operators the target runs."""

    GENERIC = "generic"
    ORT = "ort"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"

    @property
    def domains(self) -> frozenset[str]:
        """Operator domains the target runs besides the standard ones."""
        if self is Target.ORT:
            return frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
        return frozenset({"", "ai.onnx", "ai.onnx.ml"})


@dataclass(frozen=True)
class RewriteSite:
    """One rewrite a pass made: the rule behind it and where (a node or value name)."""

    rule: str
    site: str

    def __str__(self) -> str:
        return f"{self.rule} at '{self.site}'"


@dataclass
class PassContext:
    """What every pass can see besides the graph: the target, the original model and user options."""

    target: Target = Target.GENERIC
    original: onnx.ModelProto | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxopt"))
    site_filter: Callable[[RewriteSite], bool] | None = None
    sites: list[RewriteSite] = field(default_factory=list)

    def allow(self, rule: str, site: str) -> bool:
        """Asked by a pass before each rewrite; ``False`` means leave this one alone.

        Passes name the rule and the place (a node or value name). Every rewrite is recorded in
        ``sites``; ``onnxopt debug bisect`` switches rewrites off one set at a time through
        ``site_filter`` to find the smallest set that changes a model's outputs.
        """
        rewrite = RewriteSite(rule, site)
        if self.site_filter is not None and not self.site_filter(rewrite):
            return False
        self.sites.append(rewrite)
        return True

    def opset(self, graph: gs.Graph, domain: str = "") -> int | None:
        """The version of ``domain`` the model imports, or ``None``."""
        return ir.opset_version(graph, domain)

    def target_runs(self, domain: str) -> bool:
        """Whether the target engine runs operators of ``domain``."""
        return domain in self.target.domains


@dataclass
class PassResult:
    """What a pass did. ``modified`` must be honest: the fixed-point loop stops on it."""

    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)

    @classmethod
    def from_count(cls, count: int, what: str = "rewrites") -> PassResult:
        return cls(modified=count > 0, stats={what: count})


class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str] = ""
    origin: ClassVar[str] = "user"

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.option_fields()}

    def spec(self) -> str:
        """The pipeline text that recreates this pass with its options, e.g. ``fold{max_growth=1024}``."""
        changed = {
            f.name: getattr(self, f.name)
            for f in self.option_fields()
            if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
        }
        if not changed:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in changed.items()) + "}"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __call__(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        return coerce_result(self.name, self.run(graph, ctx or PassContext()))


def coerce_result(pass_name: str, result: Any) -> PassResult:
    if isinstance(result, PassResult):
        return result
    if isinstance(result, bool):
        return PassResult(modified=result)
    if isinstance(result, int):
        return PassResult.from_count(result)
    raise TypeError(
        f"pass '{pass_name}' returned {type(result).__name__}; a pass returns a PassResult, a bool or a count"
    )


def _class_name(pass_name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^0-9a-zA-Z]+", pass_name) if part) or "FunctionPass"


def function_pass(
    name: str | None = None, description: str | None = None
) -> Callable[[Callable[[gs.Graph, PassContext], Any]], type[Pass]]:
    """Turns ``fn(graph, ctx) -> PassResult | bool | int`` into a pass class.

    >>> @function_pass("drop-doc-strings")
    ... def drop_doc_strings(graph, ctx):
    ...     \"\"\"Clears every node's doc string.\"\"\"
    ...     ...
    """

    def wrap(fn: Callable[[gs.Graph, PassContext], Any]) -> type[Pass]:
        pass_name = name or fn.__name__.replace("_", "-")
        doc = description or (fn.__doc__ or "").strip() or pass_name

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            return coerce_result(pass_name, fn(graph, ctx))

        cls = type(
            _class_name(pass_name),
            (Pass,),
            {"name": pass_name, "__doc__": doc, "run": run, "__module__": fn.__module__, "__wrapped__": fn},
        )
        return dataclass(frozen=True)(cls)

    return wrap
