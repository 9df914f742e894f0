"""Finding passes by name: built-ins, installed plugins (entry points), plugin files, and pipeline specs.

A pipeline spec is a comma-separated list of pass names, each optionally followed by options in
braces: ``fuse,fold{max_growth=4096},dce``. Option names may use ``-`` or ``_``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onnxopt.errors import PipelineSpecError, PluginError, UnknownPassError
from onnxopt.pass_infra import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"

__all__ = ["ENTRY_POINT_GROUP", "PassRegistry", "default_registry", "parse_pipeline"]


class PassRegistry:
    """Pass classes by name, each with the place it came from (built-in, a package, a file)."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._origins: dict[str, str] = {}
        self._plugin_files: dict[Path, list[type[Pass]]] = {}

    def register(self, pass_class: type[Pass], origin: str) -> None:
        if not (inspect.isclass(pass_class) and issubclass(pass_class, Pass) and pass_class.name):
            raise PluginError(f"{origin}: {pass_class!r} is not a named onnxopt Pass")
        existing = self._passes.get(pass_class.name)
        if existing is not None and existing is not pass_class:
            raise PluginError(
                f"{origin}: pass name '{pass_class.name}' is already taken by {self._origins[pass_class.name]}"
            )
        self._passes[pass_class.name] = pass_class
        self._origins[pass_class.name] = origin

    def get(self, name: str) -> type[Pass]:
        if name not in self._passes:
            close = difflib.get_close_matches(name, list(self._passes), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownPassError(f"unknown pass '{name}'{hint} (run 'onnxopt passes' to list them)")
        return self._passes[name]

    def origin(self, name: str) -> str:
        return self._origins[name]

    def names(self) -> list[str]:
        return sorted(self._passes)

    def load_plugin_file(self, path: str | Path) -> list[type[Pass]]:
        """Imports a Python file and registers every pass class it defines."""
        path = Path(path)
        if not path.is_file():
            raise PluginError(f"plugin file not found: {path}")
        if path.resolve() in self._plugin_files:
            # The same file given twice: importing it again would define new classes under taken names.
            return self._plugin_files[path.resolve()]
        module_name = f"onnxopt_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"cannot import plugin {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - any failure in user code is a plugin error
            sys.modules.pop(module_name, None)
            raise PluginError(f"plugin {path} failed to import: {type(error).__name__}: {error}") from None
        found = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Pass) and obj.name and obj.__module__ == module_name
        ]
        if not found:
            raise PluginError(f"plugin {path} defines no pass (a Pass subclass or a @function_pass function)")
        for pass_class in found:
            self.register(pass_class, f"plugin {path}")
        self._plugin_files[path.resolve()] = found
        return found

    def load_entry_points(self) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            origin = f"package {entry_point.dist.name if entry_point.dist else entry_point.value}"
            try:
                loaded = entry_point.load()
            except Exception as error:  # noqa: BLE001 - a broken third-party package is a plugin error
                raise PluginError(
                    f"entry point '{entry_point.name}' ({entry_point.value}) failed to load: "
                    f"{type(error).__name__}: {error}"
                ) from None
            for pass_class in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
                self.register(pass_class, origin)

    def instantiate(self, name: str, options: dict[str, str]) -> Pass:
        pass_class = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(pass_class)} if dataclasses.is_dataclass(pass_class) else {}
        kwargs: dict[str, Any] = {}
        for key, text in options.items():
            field_name = key.replace("-", "_")
            if field_name not in fields:
                known = ", ".join(fields) or "none"
                raise PipelineSpecError(f"pass '{name}' has no option '{key}' (options: {known})")
            kwargs[field_name] = _parse_value(text, fields[field_name])
        try:
            return pass_class(**kwargs)
        except (TypeError, ValueError) as error:
            raise PipelineSpecError(f"pass '{name}': {error}") from None


def _parse_value(text: str, field: dataclasses.Field) -> Any:
    default = field.default
    lowered = text.strip().lower()
    if isinstance(default, bool) or field.type in ("bool", bool):
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise PipelineSpecError(f"option '{field.name}' expects true or false, got '{text}'")
    if isinstance(default, int) or field.type in ("int", int):
        return _parse_size(text, field.name)
    if isinstance(default, float) or field.type in ("float", float):
        try:
            return float(text)
        except ValueError:
            raise PipelineSpecError(f"option '{field.name}' expects a number, got '{text}'") from None
    return text


_SIZE_SUFFIXES = {"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
                  "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _parse_size(text: str, option: str) -> int:
    """Integers, with optional byte suffixes (``64KiB``, ``1M``)."""
    stripped = text.strip().lower()
    for suffix in sorted(_SIZE_SUFFIXES, key=len, reverse=True):
        if stripped.endswith(suffix) and stripped[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(stripped[: -len(suffix)]) * _SIZE_SUFFIXES[suffix])
    try:
        return int(stripped)
    except ValueError:
        raise PipelineSpecError(f"option '{option}' expects an integer, got '{text}'") from None


def split_pipeline(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Parses ``a,b{k=v,k2=v2},c`` into names with their option strings."""
    items: list[tuple[str, dict[str, str]]] = []
    depth = 0
    current = ""
    parts: list[str] = []
    for char in spec:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise PipelineSpecError(f"unbalanced '}}' in pipeline '{spec}'")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise PipelineSpecError(f"unbalanced '{{' in pipeline '{spec}'")
    parts.append(current)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        name, _, rest = part.partition("{")
        name = name.strip()
        options: dict[str, str] = {}
        if rest:
            if not rest.endswith("}"):
                raise PipelineSpecError(f"options of '{name}' must end with '}}'")
            for option in filter(None, (o.strip() for o in rest[:-1].split(","))):
                key, equals, value = option.partition("=")
                if not equals:
                    raise PipelineSpecError(f"option '{option}' of '{name}' must read key=value")
                options[key.strip()] = value.strip()
        items.append((name, options))
    if not items:
        raise PipelineSpecError("the pipeline is empty")
    return items


def parse_pipeline(spec: str | Iterable[str | Pass | type[Pass]], registry: PassRegistry | None = None) -> list[Pass]:
    """Turns a spec string or a list of names, pass classes and pass objects into pass objects."""
    registry = registry or default_registry()
    if isinstance(spec, str):
        return [registry.instantiate(name, options) for name, options in split_pipeline(spec)]
    passes: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            passes.append(item)
        elif inspect.isclass(item) and issubclass(item, Pass):
            passes.append(item())
        elif isinstance(item, str):
            passes.extend(parse_pipeline(item, registry))
        else:
            raise PipelineSpecError(f"not a pass: {item!r}")
    return passes


_default: PassRegistry | None = None


def default_registry(plugins: Iterable[str | Path] = ()) -> PassRegistry:
    """Built-in passes plus installed entry-point passes; with ``plugins``, a fresh registry adding them."""
    global _default
    plugins = list(plugins)
    if _default is not None and not plugins:
        return _default
    from onnxopt.passes import BUILTIN_PASSES

    registry = PassRegistry()
    for pass_class in BUILTIN_PASSES:
        registry.register(pass_class, "built-in")
    registry.load_entry_points()
    for plugin in plugins:
        registry.load_plugin_file(plugin)
    if not plugins:
        _default = registry
    return registry
