"""``python -m onnxopt.pattern MODEL --pass fuse``: why each rule of a rewrite pass fired or not, per node.

A stop-gap for the CLI's ``--explain``: prints one line per rule and candidate node (a node whose
operator is the rule's pattern root), with the reason a rule did not fire. The model is not changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxopt import ir
from onnxopt.errors import OnnxoptError
from onnxopt.pattern._driver import RewritePass, explain
from onnxopt.registry import default_registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxopt.pattern", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--pass", dest="pass_name", default="fuse", help="a rewrite pass (default: fuse)")
    parser.add_argument("--plugin", action="append", default=[], type=Path, help="a plugin file (repeatable)")
    parser.add_argument("--rule", default=None, help="show only this rule")
    parser.add_argument("--misses", action="store_true", help="show only candidates where no rule fired")
    args = parser.parse_args(argv)
    try:
        pass_class = default_registry(args.plugin).get(args.pass_name)
        if not issubclass(pass_class, RewritePass):
            raise OnnxoptError(f"pass '{args.pass_name}' is not made of rewrite rules")
        explanation = explain(ir.load_model(args.model), pass_class)
    except OnnxoptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    attempts = explanation.misses(args.rule) if args.misses else [
        a for a in explanation.attempts if args.rule is None or a.rule == args.rule]
    for attempt in attempts:
        print(attempt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
