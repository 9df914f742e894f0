"""A wrong rewrite rule is found by bisection: the driver asks ctx.allow for every rewrite it makes."""

import textwrap
from pathlib import Path

from onnxopt.bisect import bisect

TINY_CNN = Path(__file__).parents[2] / "examples" / "models" / "tiny_cnn.onnx"

BROKEN_RULES = textwrap.dedent('''
    from onnxopt.pattern import RewritePass, RewriteRule

    class ReluToAbs(RewriteRule):
        """Wrong on purpose: Relu is not Abs."""
        name = "relu_to_abs"

        def pattern(self, op, x):
            return op.Relu(x)

        def rewrite(self, op, m):
            return op.Abs(m["x"])

    class Broken(RewritePass):
        """A pass with a wrong rule."""
        name = "broken-rules"
        rules = (ReluToAbs(),)
''')


def test_bisect_names_the_wrong_rule_and_its_sites(tmp_path):
    plugin = tmp_path / "broken_rules.py"
    plugin.write_text(BROKEN_RULES)
    found = bisect(TINY_CNN, "fuse,broken-rules,dce", plugins=[plugin], output_dir=tmp_path / "out")
    assert found.pass_name == "broken-rules"
    assert found.rules == ["relu_to_abs"]
    assert found.minimal_sites and all(site.rule == "relu_to_abs" for site in found.minimal_sites)
