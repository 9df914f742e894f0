"""A complete user rule file: three rewrite rules and the pass that applies them.

Run it with::

    onnxopt run model.onnx --plugin examples/rules/my_rules.py --passes my-rules,dce
    onnxopt passes --plugin examples/rules/my_rules.py       # lists my-rules

Each rule is a pattern written like the formula, a ``check`` that says why it does not apply (shown by
``onnxopt.pattern.explain``), and a ``rewrite`` that only builds the replacement. The driver splices it
in, keeps the names of graph outputs, removes what became dead and counts rewrites per rule (shown in
the run's report).
"""

from __future__ import annotations

from onnxopt.pattern import RewritePass, RewriteRule


class NegNegToInput(RewriteRule):
    """-(-x) is x."""

    name = "neg_neg_to_input"

    def pattern(self, op, x):
        return op.Neg(op.Neg(x))

    def rewrite(self, op, m):
        return m["x"]  # an existing value: uses of the result now read x


class AddZeroToInput(RewriteRule):
    """x + 0 is x, when the zero cannot broadcast x to a bigger shape."""

    name = "add_zero_to_input"

    def pattern(self, op, x):
        return op.Add(x, 0)  # a number matches a constant equal to it everywhere; Add also matches 0 + x

    def check(self, m):
        shape = m.shape("x")
        if shape is None:
            return m.fail("the shape of x is unknown")
        constant = next(t for t in m.node("Add").inputs if t is not m["x"])  # the zero, on either side
        zero_shape = list(constant.shape or [])
        if len(zero_shape) > len(shape) or any(z != 1 and z != s for z, s in zip(reversed(zero_shape), reversed(shape))):
            return m.fail(f"adding a zero of shape {zero_shape} may broadcast x of shape {shape}")
        return m.ok()

    def rewrite(self, op, m):
        return m["x"]


class SoftmaxLogToLogSoftmax(RewriteRule):
    """Log(Softmax(x)) is LogSoftmax(x) over the same axis, and more accurate."""

    name = "softmax_log_to_logsoftmax"
    min_opset = 13  # both changed their axis semantics together at 13; keep to one meaning

    def pattern(self, op, x):
        return op.Log(op.Softmax(x))

    def check(self, m):
        if m.dtype("x") is not None and m.dtype("x").kind != "f":
            return m.fail("x is not floating point")
        return m.ok()

    def rewrite(self, op, m):
        return op.LogSoftmax(m["x"], **m.attrs("Softmax"))  # carries the axis attribute over


class MyRules(RewritePass):
    """Removes double negations and zero additions, and fuses Log(Softmax) into LogSoftmax."""

    name = "my-rules"
    needs_shapes = True  # AddZeroToInput reads shapes: run shape inference before the rules
    rules = (NegNegToInput(), AddZeroToInput(), SoftmaxLogToLogSoftmax())
