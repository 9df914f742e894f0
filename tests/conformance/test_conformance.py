"""Every ONNX operator conformance case through onnxopt: inputs as constants (folding) and as inputs.

The counts are printed (``pytest -s``) and written to the pytest cache; none may be wrong.
"""

import pytest
from conformance import Tally, cases, run_as_constants, run_as_inputs

from onnxopt.passes import DEFAULT_PIPELINE

PIPELINE = ",".join(DEFAULT_PIPELINE)


def _run(runner, passes: str, request) -> Tally:
    tally = Tally()
    for case in cases():
        try:
            runner(case, passes, tally)
        except Exception as error:  # noqa: BLE001 - a crash is a wrong result, reported with its case
            tally.wrong.append(f"{case.name}: {type(error).__name__}: {str(error)[:300]}")
    print(f"\n{runner.__name__} ({passes}): {tally.counts()}")
    request.config.cache.set(f"onnxopt/conformance/{runner.__name__}", tally.counts())
    return tally


@pytest.mark.slow
def test_fold_agrees_with_every_conformance_case_it_folds(request):
    tally = _run(run_as_constants, "fold", request)
    assert tally.wrong == []
    assert len(tally.folded) > 1400


@pytest.mark.slow
def test_default_pipeline_on_conformance_cases_with_constant_inputs(request):
    tally = _run(run_as_constants, PIPELINE, request)
    assert tally.wrong == []


@pytest.mark.slow
def test_default_pipeline_on_conformance_cases_with_graph_inputs(request):
    tally = _run(run_as_inputs, PIPELINE, request)
    assert tally.wrong == []
