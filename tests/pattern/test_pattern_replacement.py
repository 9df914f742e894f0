"""Tests of rewrites that replace more than the root's outputs: ``also_replaces`` and ``Replacement``."""

from __future__ import annotations

import pytest
from helpers import apply_rules, assert_same_outputs, op_counts, parse

from onnxopt.pattern import Explanation, Replacement, RewriteRule, RuleSet

# ---------------------------------------------------------------------------------------------------
# Rules used by the tests


class SubNegToAddRemakingNeg(RewriteRule):
    """a - Neg(b) -> a + b; the negation, read elsewhere too, is made anew (an inner value replaced)."""

    also_replaces = ("Neg",)

    def pattern(self, op, a, b):
        return op.Sub(a, op.Neg(b))

    def rewrite(self, op, m):
        return Replacement(op.Add(m["a"], m["b"]), inner={"Neg": op.Neg(m["b"])})


class SubDoubleNegToSub(RewriteRule):
    """a - Neg(Neg(b)) -> a - b; the double negation, read elsewhere too, becomes b (an existing value)."""

    also_replaces = ("outer",)

    def pattern(self, op, a, b):
        return op.Sub(a, op.Neg(op.Neg(b, _tag="inner"), _tag="outer"))

    def rewrite(self, op, m):
        return Replacement(op.Sub(m["a"], m["b"]), inner={"outer": m["b"]})


class ReluTwiceToOnce(RewriteRule):
    """Relu(x) read by two Relu nodes: the other one is replaced by this one (a found value replaced)."""

    replaces_found_values = True

    def pattern(self, op, x):
        return op.Relu(x)

    def others(self, m):
        return [n for n in m["x"].outputs if n is not m.root and n.op == "Relu"]

    def check(self, m):
        return m.ok() if self.others(m) else m.fail("no other Relu of x")

    def rewrite(self, op, m):
        mine = m.root.outputs[0]
        return Replacement(mine, found=[(other.outputs[0], mine) for other in self.others(m)])


SUB_NEG_READ_ELSEWHERE = """
g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] z) {
  n = Neg(b)
  y = Sub(a, n)
  z = Relu(n)
}"""


# ---------------------------------------------------------------------------------------------------
# Inner values


def test_inner_value_with_outside_readers_is_replaced_in_the_same_rewrite():
    model = parse(SUB_NEG_READ_ELSEWHERE)
    explanation = Explanation()
    optimized, counts = apply_rules(model, SubNegToAddRemakingNeg(), explanation=explanation)
    assert counts == {"sub_neg_to_add_remaking_neg": 1}
    assert op_counts(optimized) == {"Add": 1, "Neg": 1, "Relu": 1}  # the old Neg is gone, not kept beside
    neg = next(n for n in optimized.graph.node if n.op_type == "Neg")
    assert list(neg.output) == ["n"]  # the new node took over the replaced value's name
    assert_same_outputs(model, optimized)
    (attempt,) = explanation.attempts
    assert attempt.outcome == "rewritten" and attempt.reason.endswith("also replaced 'n'")


def test_inner_graph_output_keeps_its_name_and_position():
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] n, float[2,3] y) {
      n = Neg(b)
      y = Sub(a, n)
    }""")
    optimized, counts = apply_rules(model, SubNegToAddRemakingNeg())
    assert counts == {"sub_neg_to_add_remaking_neg": 1}
    assert [o.name for o in optimized.graph.output] == ["n", "y"]
    assert op_counts(optimized) == {"Add": 1, "Neg": 1}
    assert_same_outputs(model, optimized)


def test_inner_value_replaced_by_an_existing_value():
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] z, float[2,3] d) {
      m = Neg(b)
      d = Neg(m)
      y = Sub(a, d)
      z = Relu(d)
    }""")
    optimized, counts = apply_rules(model, SubDoubleNegToSub())
    assert counts == {"sub_double_neg_to_sub": 1}
    assert op_counts(optimized) == {"Sub": 1, "Relu": 1, "Identity": 1}  # the Identity keeps output 'd'
    assert [o.name for o in optimized.graph.output] == ["y", "z", "d"]
    assert_same_outputs(model, optimized)


def test_undeclared_inner_value_with_outside_readers_is_still_refused():
    class SubNegToAdd(SubNegToAddRemakingNeg):
        also_replaces = ()

        def rewrite(self, op, m):
            return op.Add(m["a"], m["b"])

    explanation = Explanation()
    model = parse(SUB_NEG_READ_ELSEWHERE)
    optimized, counts = apply_rules(model, SubNegToAdd(), explanation=explanation)
    assert counts == {"sub_neg_to_add": 0}
    assert [a.reason for a in explanation.misses()] == ["'n' inside the pattern has other readers"]
    # Declaring one inner node allows outside readers of that node only.
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] z) {
      m = Neg(b)
      d = Neg(m)
      y = Sub(a, d)
      z = Relu(m)
    }""")
    optimized, counts = apply_rules(model, SubDoubleNegToSub())
    assert counts == {"sub_double_neg_to_sub": 0}
    assert_same_outputs(model, optimized)


def test_a_declared_inner_value_left_out_is_a_type_error_naming_the_rule():
    class ForgetsTheNeg(SubNegToAddRemakingNeg):
        name = "forgets_the_neg"

        def rewrite(self, op, m):
            return op.Add(m["a"], m["b"])

    with pytest.raises(TypeError, match="rule 'forgets_the_neg'.*no value for 'Neg'"):
        apply_rules(parse(SUB_NEG_READ_ELSEWHERE), ForgetsTheNeg())


def test_replacing_an_unlisted_label_is_a_type_error():
    class Unlisted(SubNegToAddRemakingNeg):
        name = "unlisted"
        also_replaces = ()

        def rewrite(self, op, m):
            return Replacement(op.Add(m["a"], m["b"]), inner={"Neg": op.Neg(m["b"])})

    with pytest.raises(TypeError, match="rule 'unlisted'.*also_replaces does not list"):
        apply_rules(parse("""
        g (float[2,3] a, float[2,3] b) => (float[2,3] y) {
          n = Neg(b)
          y = Sub(a, n)
        }"""), Unlisted())


def test_also_replaces_must_name_an_inner_node_of_the_pattern():
    class NoSuchNode(SubNegToAddRemakingNeg):
        name = "no_such_node"
        also_replaces = ("Abs",)

    class TheRoot(SubNegToAddRemakingNeg):
        name = "the_root"
        also_replaces = ("Sub",)

    with pytest.raises(TypeError, match="rule 'no_such_node'.*'Abs', which is no node"):
        RuleSet([NoSuchNode()])
    with pytest.raises(TypeError, match="rule 'the_root'.*names the root"):
        RuleSet([TheRoot()])


def test_a_replacement_reading_the_value_it_replaces_is_refused():
    class Cycle(SubNegToAddRemakingNeg):
        name = "cycle"

        def rewrite(self, op, m):
            made = op.Add(m["a"], m.node("Neg").outputs[0])  # reads the inner value it replaces
            return Replacement(made, inner={"Neg": op.Neg(made)})

    with pytest.raises(TypeError, match="rule 'cycle'.*reads 'n', which it replaces"):
        apply_rules(parse(SUB_NEG_READ_ELSEWHERE), Cycle())


# ---------------------------------------------------------------------------------------------------
# Found values


RELU_TWICE = """
g (float[2,3] x) => (float[2,3] p, float[2,3] q) {
  r1 = Relu(x)
  r2 = Relu(x)
  p = Abs(r1)
  q = Abs(r2)
}"""


def test_found_values_are_replaced_and_their_nodes_removed():
    model = parse(RELU_TWICE)
    optimized, counts = apply_rules(model, ReluTwiceToOnce())
    assert counts == {"relu_twice_to_once": 1}  # one rewrite, both Relu values handled
    assert op_counts(optimized) == {"Relu": 1, "Abs": 2}
    assert_same_outputs(model, optimized)


def test_a_found_graph_output_keeps_its_name_and_position():
    model = parse("""
    g (float[2,3] x) => (float[2,3] r2, float[2,3] p) {
      r1 = Relu(x)
      r2 = Relu(x)
      p = Abs(r1)
    }""")
    optimized, counts = apply_rules(model, ReluTwiceToOnce())
    assert counts == {"relu_twice_to_once": 1}
    assert [o.name for o in optimized.graph.output] == ["r2", "p"]
    assert op_counts(optimized) == {"Relu": 1, "Abs": 1}
    assert_same_outputs(model, optimized)


def test_found_values_need_the_rule_to_say_so():
    class Undeclared(ReluTwiceToOnce):
        name = "undeclared"
        replaces_found_values = False

    with pytest.raises(TypeError, match="rule 'undeclared'.*replaces_found_values"):
        apply_rules(parse(RELU_TWICE), Undeclared())


def test_a_found_value_made_by_a_matched_node_is_refused():
    class FoundInside(SubNegToAddRemakingNeg):
        name = "found_inside"
        also_replaces = ()
        replaces_found_values = True

        def rewrite(self, op, m):
            return Replacement(op.Add(m["a"], m["b"]), found=[(m.node("Neg").outputs[0], op.Neg(m["b"]))])

    with pytest.raises(TypeError, match="rule 'found_inside'.*also_replaces instead"):
        apply_rules(parse("""
        g (float[2,3] a, float[2,3] b) => (float[2,3] y) {
          n = Neg(b)
          y = Sub(a, n)
        }"""), FoundInside())
