"""The planner's per-rank peak is within 10% of a measured step, and never more than 5% below it (an
under-prediction is an OOM on the user's cluster), for every bench cell that runs in seconds
(bench/plan_accuracy.py runs the whole matrix, up to 70B at world size 64)."""

from __future__ import annotations

import pytest

from bench.plan_accuracy import QUICK
from launcher.accuracy import compare


@pytest.mark.parametrize("cell", QUICK, ids=[c.label for c in QUICK])
def test_prediction_within_ten_percent_and_never_five_under(cell):
    result = compare(cell)
    assert abs(result.ratio - 1) < 0.10, (cell.label, result.predicted_peak, result.measured.peak)
    assert result.ratio > 0.95, (cell.label, result.predicted_peak, result.measured.peak)
