"""Tests of the fuzzer's graph generator itself: breadth, and models valid by construction."""

from __future__ import annotations

from collections import Counter

import onnx
from graphs import onnx_cases
from hypothesis import HealthCheck, given, settings

GENERATOR_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_generator_covers_at_least_50_operators():
    seen: Counter = Counter()

    @GENERATOR_SETTINGS
    @given(onnx_cases())
    def collect(case):
        seen.update(case.ops)

    collect()
    assert len(seen) >= 50, sorted(seen)


@settings(GENERATOR_SETTINGS, max_examples=30)
@given(onnx_cases())
def test_generated_models_pass_the_full_check(case):
    onnx.checker.check_model(case.model, full_check=True)
    declared = {i.name for i in case.model.graph.input}
    assert len(case.feeds) == 2 and set(case.feeds[1]) <= declared
