"""Tests of the rewrite-rule API: matching, checks, the driver's splicing, bisection hooks and explain."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import apply_rules, assert_same_outputs, op_counts, parse, random_feeds

from onnxopt import ir
from onnxopt.pass_infra import PassContext
from onnxopt.pattern import Explanation, RewritePass, RewriteRule, RuleSet, explain, rule_pass

# ---------------------------------------------------------------------------------------------------
# Rules used by the tests


class MulByOneToInput(RewriteRule):
    """Replaces x * 1 with x (a constant literal in the pattern; Mul commutes)."""

    def pattern(self, op, x):
        return op.Mul(x, 1.0)

    def rewrite(self, op, m):
        return m["x"]


class SubNegToAdd(RewriteRule):
    """Replaces a - (-b) with a + b."""

    name = "sub_neg_to_add"

    def pattern(self, op, a, b):
        return op.Sub(a, op.Neg(b))

    def rewrite(self, op, m):
        return op.Add(m["a"], m["b"])


class SharedSubNegToAdd(SubNegToAdd):
    name = "shared_sub_neg_to_add"
    allow_shared_intermediates = True


class SquareToPow(RewriteRule):
    """Replaces x * x (the same value twice) with Pow(x, 2)."""

    def pattern(self, op, x):
        return op.Mul(x, x)

    def check(self, m):
        if m.dtype("x") != np.float32:
            return m.fail("only float32 here")
        return m.ok()

    def rewrite(self, op, m):
        return op.Pow(m["x"], op.const(np.array(2.0, np.float32), "two"))


class ClipToRelu(RewriteRule):
    """Replaces Clip(x, 0) (no max, an optional input) with Relu(x)."""

    def pattern(self, op, x, lo, hi):
        return op.Clip(x, lo, op.optional(hi))

    def check(self, m):
        if m["hi"] is not None:
            return m.fail("Clip has an upper bound")
        lo = m.value("lo")
        if lo is None or lo.size != 1 or float(lo) != 0.0:
            return m.fail("the lower bound is not the constant 0")
        return m.ok()

    def rewrite(self, op, m):
        return op.Relu(m["x"])


class DropoutToInput(RewriteRule):
    """Removes an inference Dropout; its mask (a second output) must be unused."""

    def pattern(self, op, x):
        return op.Dropout(x, _outputs=2, _allow_other_inputs=True)[0]

    def rewrite(self, op, m):
        return m["x"]


class SplitConcatToInput(RewriteRule):
    """Concat(Split(x)) along the same axis is x: a pattern returning one output of a two-output node twice."""

    def pattern(self, op, x):
        first, second = op.Split(x, _outputs=2, _allow_other_inputs=True)
        return op.Concat(first, second)

    def check(self, m):
        if m.attr("Split", "axis", 0) != m.attr("Concat", "axis"):
            return m.fail("Split and Concat axes differ")
        return m.ok()

    def rewrite(self, op, m):
        return m["x"]


class ReluToGelu(RewriteRule):
    """Not exact: only used to test that an operator missing from the model's opset is refused."""

    def pattern(self, op, x):
        return op.Relu(x)

    def rewrite(self, op, m):
        return op.Gelu(m["x"])


class NewOpsetOnly(ReluToGelu):
    name = "new_opset_only"
    min_opset = 20


class TransposePairTagged(RewriteRule):
    """Two nodes of one type told apart by tags."""

    def pattern(self, op, x):
        return op.Transpose(op.Transpose(x, _tag="first"), _tag="second")

    def check(self, m):
        first, second = m.attr("first", "perm"), m.attr("second", "perm")
        if first is None or second is None or [first[a] for a in second] != sorted(first):
            return m.fail("the permutations do not cancel")
        return m.ok()

    def rewrite(self, op, m):
        return m["x"]


# ---------------------------------------------------------------------------------------------------
# Matching


SUB_NEG = """
g (float[2,3] a, float[2,3] b) => (float[2,3] y) {
  n = Neg(b)
  y = Sub(a, n)
}"""


def test_rule_fires_keeps_the_output_name_and_numerics():
    model = parse(SUB_NEG)
    optimized, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 1}
    assert op_counts(optimized) == {"Add": 1}
    assert list(optimized.graph.node[0].output) == ["y"]
    assert_same_outputs(model, optimized)


def test_rule_that_does_not_match_leaves_the_graph_alone():
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y) {
      n = Abs(b)
      y = Sub(a, n)
    }""")
    optimized, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 0}
    assert op_counts(optimized) == {"Abs": 1, "Sub": 1}


def test_non_commutative_operator_is_not_swapped():
    # Sub(Neg(b), a) is not a - (-b).
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y) {
      n = Neg(b)
      y = Sub(n, a)
    }""")
    _, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 0}


@pytest.mark.parametrize("body", ["y = Mul(x, one)", "y = Mul(one, x)"])
def test_commutative_operands_match_in_both_orders_and_literals_match_constants(body):
    model = parse("""
    g (float[2,3] x) => (float[2,3] z) <float[3] one = {1., 1., 1.}> {
      %s
      z = Neg(y)
    }""" % body)
    optimized, counts = apply_rules(model, MulByOneToInput())
    assert counts == {"mul_by_one_to_input": 1}
    assert op_counts(optimized) == {"Neg": 1}
    assert_same_outputs(model, optimized)


def test_literal_does_not_match_other_constants_or_variables():
    model = parse("""
    g (float[2,3] x, float[3] v) => (float[2,3] z) <float[3] c = {1., 2., 1.}> {
      y = Mul(x, c)
      z = Mul(y, v)
    }""")
    explanation = Explanation()
    _, counts = apply_rules(model, MulByOneToInput(), explanation=explanation)
    assert counts == {"mul_by_one_to_input": 0}
    reasons = " ".join(a.reason for a in explanation.misses())
    assert "not 1.0 everywhere" in reasons and "not a constant" in reasons


def test_a_variable_used_twice_binds_one_value():
    model = parse("""
    g (float[2,3] x, float[2,3] w) => (float[2,3] y, float[2,3] z) {
      y = Mul(x, x)
      z = Mul(x, w)
    }""")
    optimized, counts = apply_rules(model, SquareToPow())
    assert counts == {"square_to_pow": 1}
    assert op_counts(optimized) == {"Pow": 1, "Mul": 1}
    assert_same_outputs(model, optimized)


def test_optional_input_absent_or_present():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) <float zero = {0.}, float six = {6.}> {
      y = Clip(x, zero)
      z = Clip(x, zero, six)
    }""")
    explanation = Explanation()
    optimized, counts = apply_rules(model, ClipToRelu(), explanation=explanation)
    assert counts == {"clip_to_relu": 1}
    assert op_counts(optimized) == {"Relu": 1, "Clip": 1}
    assert [a.reason for a in explanation.misses()] == ["Clip has an upper bound"]
    assert_same_outputs(model, optimized)


def test_node_with_several_outputs_matches_when_unmatched_outputs_are_unused():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) {
      d, mask = Dropout(x)
      y = Relu(d)
    }""")
    optimized, counts = apply_rules(model, DropoutToInput())
    assert counts == {"dropout_to_input": 1}
    assert op_counts(optimized) == {"Relu": 1}
    assert_same_outputs(model, optimized)


def test_node_with_a_used_output_the_rule_does_not_replace_is_not_matched():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y, bool[2,3] mask) {
      d, mask = Dropout(x)
      y = Relu(d)
    }""")
    explanation = Explanation()
    _, counts = apply_rules(model, DropoutToInput(), explanation=explanation)
    assert counts == {"dropout_to_input": 0}
    assert explanation.misses()[0].outcome == "shared"
    assert "mask" in explanation.misses()[0].reason


def test_two_outputs_of_one_matched_node():
    model = parse("""
    g (float[4,3] x) => (float[4,3] y) {
      a, b = Split<axis = 0, num_outputs = 2>(x)
      c = Concat<axis = 0>(a, b)
      y = Relu(c)
    }""", opset=18)
    optimized, counts = apply_rules(model, SplitConcatToInput())
    assert counts == {"split_concat_to_input": 1}
    assert op_counts(optimized) == {"Relu": 1}
    assert_same_outputs(model, optimized)


def test_tags_tell_apart_two_nodes_of_one_type():
    model = parse("""
    g (float[2,3,4] x) => (float[2,3,4] y) {
      t1 = Transpose<perm = [1, 2, 0]>(x)
      t2 = Transpose<perm = [2, 0, 1]>(t1)
      y = Relu(t2)
    }""")
    optimized, counts = apply_rules(model, TransposePairTagged())
    assert counts == {"transpose_pair_tagged": 1}
    assert op_counts(optimized) == {"Relu": 1}
    assert_same_outputs(model, optimized)


# ---------------------------------------------------------------------------------------------------
# Shared intermediates and graph outputs


def test_intermediate_with_other_readers_is_not_matched_unless_the_rule_opts_in():
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] z) {
      n = Neg(b)
      y = Sub(a, n)
      z = Relu(n)
    }""")
    _, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 0}
    optimized, counts = apply_rules(model, SharedSubNegToAdd())
    assert counts == {"shared_sub_neg_to_add": 1}
    assert op_counts(optimized) == {"Neg": 1, "Add": 1, "Relu": 1}
    assert_same_outputs(model, optimized)


def test_intermediate_graph_output_is_never_lost():
    model = parse("""
    g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] n) {
      n = Neg(b)
      y = Sub(a, n)
    }""")
    _, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 0}
    optimized, counts = apply_rules(model, SharedSubNegToAdd())
    assert counts == {"shared_sub_neg_to_add": 1}
    assert [o.name for o in optimized.graph.output] == ["y", "n"]
    assert_same_outputs(model, optimized)


def test_replacement_by_a_graph_input_keeps_the_output_name():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <float one = {1.}> {
      y = Mul(x, one)
    }""")
    optimized, counts = apply_rules(model, MulByOneToInput())
    assert counts == {"mul_by_one_to_input": 1}
    assert op_counts(optimized) == {"Identity": 1}
    assert [o.name for o in optimized.graph.output] == ["y"]
    assert_same_outputs(model, optimized)


def test_value_read_by_a_subgraph_counts_as_a_reader():
    model = parse("""
    g (float[2,3] a, float[2,3] b, bool c) => (float[2,3] y, float[2,3] z) {
      n = Neg(b)
      y = Sub(a, n)
      z = If(c) <
        then_branch = t () => (float[2,3] p) { p = Relu(n) },
        else_branch = e () => (float[2,3] q) { q = Abs(n) }
      >
    }""")
    _, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 0}


# ---------------------------------------------------------------------------------------------------
# The driver: subgraphs, fixed point, bisection, opsets, errors


def test_rules_fire_inside_subgraph_bodies():
    model = parse("""
    g (float[2,3] a, float[2,3] b, bool c) => (float[2,3] y) {
      y = If(c) <
        then_branch = t () => (float[2,3] p) { n = Neg(b)
                                               p = Sub(a, n) },
        else_branch = e () => (float[2,3] q) { q = Sub(b, a) }
      >
    }""")
    optimized, counts = apply_rules(model, SubNegToAdd())
    assert counts == {"sub_neg_to_add": 1}
    assert op_counts(optimized) == {"If": 1, "Add": 1, "Sub": 1}
    for flag in (True, False):
        feeds = random_feeds(model)
        feeds["c"] = np.array(flag)
        assert_same_outputs(model, optimized, feeds)


def test_rules_run_to_a_fixed_point():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <float one = {1.}> {
      a = Mul(x, one)
      b = Mul(one, a)
      c = Mul(b, one)
      y = Relu(c)
    }""")
    optimized, counts = apply_rules(model, MulByOneToInput())
    assert counts == {"mul_by_one_to_input": 3}
    assert op_counts(optimized) == {"Relu": 1}


def test_each_rewrite_asks_ctx_allow_and_bisection_can_refuse():
    model = parse(SUB_NEG)
    ctx = PassContext(site_filter=lambda site: False)
    optimized, counts = apply_rules(model, SubNegToAdd(), ctx=ctx)
    assert counts == {"sub_neg_to_add": 0}
    assert op_counts(optimized) == {"Neg": 1, "Sub": 1}
    ctx = PassContext()
    apply_rules(model, SubNegToAdd(), ctx=ctx)
    assert [(s.rule, s.site) for s in ctx.sites] == [("sub_neg_to_add", "y")]


def test_rule_whose_opset_the_model_lacks_is_skipped():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }""")
    explanation = Explanation()
    _, counts = apply_rules(model, NewOpsetOnly(), explanation=explanation)
    assert counts == {"new_opset_only": 0}
    assert explanation.attempts[0].outcome == "not applicable"
    assert "opset 20" in explanation.attempts[0].reason


def test_replacement_operator_missing_from_the_opset_is_refused():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }""")
    explanation = Explanation()
    optimized, counts = apply_rules(model, ReluToGelu(), explanation=explanation)
    assert counts == {"relu_to_gelu": 0}
    assert op_counts(optimized) == {"Relu": 1}
    assert explanation.attempts[0].outcome == "refused" and "Gelu" in explanation.attempts[0].reason


def test_explain_tells_why_a_check_failed():
    model = parse("""
    g (double[2,3] x) => (double[2,3] y) { y = Mul(x, x) }""")
    explanation = explain(model, [SquareToPow()])
    (attempt,) = explanation.attempts
    assert (attempt.rule, attempt.node, attempt.outcome, attempt.reason) == (
        "square_to_pow", "y", "check failed", "only float32 here")
    assert "square_to_pow at 'y': check failed: only float32 here" in explanation.format()


def test_rule_names_must_be_unique():
    with pytest.raises(ValueError, match="sub_neg_to_add"):
        RuleSet([SubNegToAdd(), SubNegToAdd()])


def test_a_pattern_must_return_an_op_call():
    class Broken(RewriteRule):
        def pattern(self, op, x):
            return x

    with pytest.raises(TypeError, match="broken"):
        RuleSet([Broken()])


def test_a_rewrite_returning_the_wrong_thing_names_the_rule():
    class WrongCount(SubNegToAdd):
        name = "wrong_count"

        def rewrite(self, op, m):
            return m["a"], m["b"]

    with pytest.raises(TypeError, match="wrong_count"):
        apply_rules(parse(SUB_NEG), WrongCount())


def test_a_failing_check_names_the_rule_and_node():
    class Crashes(SubNegToAdd):
        name = "crashes"

        def check(self, m):
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="rule 'crashes' failed checking node 'y'.*boom"):
        apply_rules(parse(SUB_NEG), Crashes())


def test_rewrite_pass_reports_counts_per_rule():
    class MyPass(RewritePass):
        """Test rules."""

        name = "my-pass"
        rules = (SubNegToAdd(), MulByOneToInput)

    model = parse(SUB_NEG)
    graph = ir.import_model(model)
    result = MyPass()(graph, PassContext())
    assert result.modified and result.stats == {"sub_neg_to_add": 1, "mul_by_one_to_input": 0}
    made = rule_pass("made", [SubNegToAdd()])
    assert made.name == "made" and made.__module__ == __name__
    result = made()(ir.import_model(model), PassContext())
    assert result.stats == {"sub_neg_to_add": 1}
    assert not made()(graph, PassContext()).modified


def test_rules_can_be_disabled_by_name_from_the_pipeline_spec():
    from onnxopt.errors import PipelineSpecError
    from onnxopt.registry import parse_pipeline

    (fuse,) = parse_pipeline("fuse{disable=noop_pad+conv_mul}")
    assert fuse.disabled() == ["noop_pad", "conv_mul"] and fuse.spec() == "fuse{disable=noop_pad+conv_mul}"
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) <int64[4] p = {0, 0, 0, 0}> {
      q = Pad(x, p)
      y = Relu(q)
    }""")
    result = fuse(ir.import_model(model), PassContext())
    assert not result.modified and result.stats["noop_pad"] == 0
    with pytest.raises(PipelineSpecError, match="no rule named 'nope'"):
        parse_pipeline("fuse{disable=nope}")


def test_explain_names_what_a_rewrite_made():
    explanation = explain(parse(SUB_NEG), [SubNegToAdd()])
    (attempt,) = explanation.attempts
    assert attempt.outcome == "rewritten" and attempt.reason == "made Add 'y'"


class SplitInTwoToSlices(RewriteRule):
    """Split(x) into two halves along axis 0 becomes two Slices: a pattern with two outputs."""

    def pattern(self, op, x):
        return op.Split(x, _outputs=2, _allow_other_inputs=True, num_outputs=2)

    def check(self, m):
        shape = m.shape("x")
        if shape is None or not isinstance(shape[0], int) or shape[0] % 2 or m.attr("Split", "axis", 0) != 0:
            return m.fail("not an even split along a known axis 0")
        return m.ok()

    def rewrite(self, op, m):
        half = m.shape("x")[0] // 2
        const = lambda *v: op.const(np.array(v, np.int64), "bounds")  # noqa: E731
        return (op.Slice(m["x"], const(0), const(half), const(0)),
                op.Slice(m["x"], const(half), const(2 * half), const(0)))


def test_a_pattern_with_two_outputs_replaces_both():
    model = parse("""
    g (float[4,3] x) => (float[2,3] a, float[2,3] b) {
      a, b = Split<axis = 0, num_outputs = 2>(x)
    }""", opset=18)
    optimized, counts = apply_rules(model, SplitInTwoToSlices())
    assert counts == {"split_in_two_to_slices": 1}
    assert [(n.op_type, list(n.output)) for n in optimized.graph.node] == [("Slice", ["a"]), ("Slice", ["b"])]
    assert_same_outputs(model, optimized)


class ConcatSplitToCopies(RewriteRule):
    """Split(Concat(x, x)) in halves is (x, x): one new value stands for both outputs."""

    def pattern(self, op, x):
        return op.Split(op.Concat(x, x, axis=0), _outputs=2, _allow_other_inputs=True, axis=0)

    def rewrite(self, op, m):
        copy = op.Identity(m["x"])
        return copy, copy


def test_one_new_value_may_replace_two_outputs():
    model = parse("""
    g (float[2,3] x) => (float[2,3] a, float[2,3] b) {
      c = Concat<axis = 0>(x, x)
      a, b = Split<axis = 0, num_outputs = 2>(c)
    }""", opset=18)
    optimized, counts = apply_rules(model, ConcatSplitToCopies())
    assert counts == {"concat_split_to_copies": 1}
    assert [o.name for o in optimized.graph.output] == ["a", "b"]
    assert op_counts(optimized) == {"Identity": 2}
    assert_same_outputs(model, optimized)


class SwapLastAxesTwiceToInput(RewriteRule):
    """Attribute constraints in the pattern: a value to equal, or a predicate."""

    def pattern(self, op, x):
        return op.Transpose(op.Transpose(x, perm=[0, 2, 1]), perm=lambda perm: list(perm or []) == [0, 2, 1])

    def rewrite(self, op, m):
        return m["x"]


def test_attribute_constraints_in_the_pattern():
    model = parse("""
    g (float[2,3,4] x) => (float[2,3,4] y, float[2,3,4] z) {
      a = Transpose<perm = [0, 2, 1]>(x)
      y = Transpose<perm = [0, 2, 1]>(a)
      b = Transpose<perm = [1, 0, 2]>(x)
      z = Transpose<perm = [1, 0, 2]>(b)
    }""")
    explanation = Explanation()
    optimized, counts = apply_rules(model, SwapLastAxesTwiceToInput(), explanation=explanation)
    assert counts == {"swap_last_axes_twice_to_input": 1}
    assert op_counts(optimized) == {"Identity": 1, "Transpose": 2}
    assert any("attribute perm" in a.reason for a in explanation.misses())
    assert_same_outputs(model, optimized)


class CustomScaleToMul(RewriteRule):
    """A rule on an operator of another domain; it only runs on models importing that domain."""

    domain = "my.domain"

    def pattern(self, op, x):
        return op.Double(x, _domain="my.domain")

    def rewrite(self, op, m):
        return op.Add(m["x"], m["x"])


def test_rules_of_another_domain_run_only_where_it_is_imported():
    model = parse("""
    g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }""")
    explanation = Explanation()
    _, counts = apply_rules(model, CustomScaleToMul(), explanation=explanation)
    assert counts == {"custom_scale_to_mul": 0}
    assert explanation.attempts[0].outcome == "not applicable"

    custom = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "my.domain" : 1]>
    g (float[2,3] x) => (float[2,3] y) { y = my.domain.Double(x) }""")
    graph = ir.import_model(custom)
    assert RuleSet([CustomScaleToMul()]).apply(graph, PassContext()) == {"custom_scale_to_mul": 1}
    assert [(n.op, n.domain or "") for n in graph.nodes] == [("Add", "")]


def test_explain_from_the_command_line(tmp_path, capsys):
    from onnxopt.pattern.__main__ import main

    path = tmp_path / "model.onnx"
    onnx.save(parse("""
    g (float[2,3] x) => (float[2,3] y) <float[3] s = {1., 2., 3.}> {
      t = Transpose<perm = [0, 1]>(x)
      y = Mul(t, s)
    }"""), path)
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "transpose_identity at 't': rewritten: replaced by an existing value" in lines
    assert main([str(path), "--misses", "--rule", "conv_mul"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "conv_mul at 'y': no match: 'x' is not produced by a node (the pattern wants Conv); "
        "'s' is not produced by a node (the pattern wants Conv)"]
    assert main([str(path), "--pass", "dce"]) == 2
    assert "not made of rewrite rules" in capsys.readouterr().err
