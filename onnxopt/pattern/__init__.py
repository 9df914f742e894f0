"""The rewrite-rule API: patterns written like the formula, checks that explain, a driver that rewrites.

A rule says what to find, when it is safe, and what to put instead::

    from onnxopt.pattern import RewritePass, RewriteRule

    class MatMulAddToGemm(RewriteRule):
        \"\"\"Replaces Add(MatMul(a, b), c) with Gemm(a, b, c).\"\"\"
        name = "matmul_add_to_gemm"
        min_opset = 7                      # the rule is skipped on models of older opsets

        def pattern(self, op, a, b, c):    # parameters after ``op`` are the pattern's variables
            return op.Add(op.MatMul(a, b), c)      # Add is commutative: c + a @ b matches too

        def check(self, m):
            if not m.is_constant("b"):
                return m.fail("B is not constant")  # a reason, never an exception
            return m.ok()

        def rewrite(self, op, m):          # only builds nodes; the driver splices them in
            return op.Gemm(m["a"], m["b"], m["c"])

    class MyRules(RewritePass):
        \"\"\"My fusions.\"\"\"
        name = "my-rules"
        rules = [MatMulAddToGemm()]

The matcher tries both operand orders of commutative binary operators, treats ``op.optional(v)`` as an
input that may be absent (``m["v"] is None``), matches numbers as constants (``op.Add(x, 0)``), and
accepts nodes with several outputs (``op.Dropout(x, _outputs=2)``: outputs the pattern does not return
must be unused). ``op.either(a, b)`` matches any of several sub-patterns (a ``pattern`` may return one,
making a rule with several roots); ``op.product(x, 0.5, y)`` matches a product of factors in any
association and order. A value inside the pattern that is read elsewhere or is a graph output stops the
match, unless the rule sets ``allow_shared_intermediates``. In ``check`` and ``rewrite``,
``m["x"]`` is a bound value, ``m.node("Conv")`` / ``m.attrs("Conv")`` a matched node and its
attributes (``_tag="name"`` tells apart two nodes of one type), ``m.is_constant("w")`` and
``m.value("w")`` read constants, ``m.has_node("Div")`` tells which alternative matched. A rule's
``targets`` (``None``: all) names the engines it runs for; ``min_opset``/``max_opset`` its opsets.

A rewrite may replace more than the root's outputs by returning ``Replacement(outputs, inner={label:
value}, found=[(old, new)])``: outputs of the inner nodes the rule lists in ``also_replaces`` (which may
then be read outside the pattern or be graph outputs; a listed node that matched must get a value), and,
in a rule with ``replaces_found_values``, values outside the match the rule found itself. It still
counts as one rewrite.

The driver (``RuleSet.apply``) asks ``ctx.allow(rule_name, site)`` before every rewrite, keeps the
names of replaced values (graph outputs stay outputs), removes matched nodes left unused, works in
subgraph bodies and repeats until no rule fires; it refuses replacements whose operator the model's
opset lacks. ``explain(model, rules_or_pass)`` records why each rule did not fire at each candidate
node; ``python -m onnxopt.pattern MODEL --pass fuse [--plugin FILE] [--rule NAME] [--misses]`` prints it.
"""

from onnxopt.pattern._driver import Attempt, Explanation, RewritePass, RuleSet, explain, rule_pass
from onnxopt.pattern._pattern import COMMUTATIVE_OPS, PatternBuilder
from onnxopt.pattern._rule import (
    Match,
    MatchResult,
    Replacement,
    ReplacementBuilder,
    RewriteRefused,
    RewriteRule,
)

__all__ = [
    "COMMUTATIVE_OPS",
    "Attempt",
    "Explanation",
    "Match",
    "MatchResult",
    "PatternBuilder",
    "Replacement",
    "ReplacementBuilder",
    "RewritePass",
    "RewriteRefused",
    "RewriteRule",
    "RuleSet",
    "explain",
    "rule_pass",
]
