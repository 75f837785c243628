"""Golden values for every metric, computed by hand."""
from __future__ import annotations

import pytest

from cl.evaluation import metrics as M

R = [
    [0.90, 0.10, 0.00],
    [0.95, 0.80, 0.20],
    [0.40, 0.70, 1.00],
]
SIZES = [10, 20, 40]
B = [0.10, 0.20, 0.30]


def test_final_average_accuracy_is_the_mean_of_the_last_row():
    assert M.final_average_accuracy(R) == pytest.approx((0.4 + 0.7 + 1.0) / 3)


def test_final_accuracy_pools_the_samples():
    assert M.final_accuracy(R, SIZES) == pytest.approx((4 + 14 + 40) / 70)


def test_average_incremental_accuracy():
    # stage 0: 0.9; stage 1: (9.5 + 16) / 30; stage 2: 58 / 70
    assert M.average_incremental_accuracy(R, SIZES) == pytest.approx((0.9 + 25.5 / 30 + 58 / 70) / 3)
    # without sizes, each stage is the mean over its seen experiences
    assert M.average_incremental_accuracy(R) == pytest.approx((0.9 + 0.875 + 0.7) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # j=0: max(0.90, 0.95) - 0.40 = 0.55 ; j=1: 0.80 - 0.70 = 0.10
    assert M.forgetting(R) == pytest.approx((0.55 + 0.10) / 2)


def test_backward_transfer_uses_the_accuracy_just_after_learning():
    # j=0: 0.40 - 0.90 ; j=1: 0.70 - 0.80
    assert M.backward_transfer(R) == pytest.approx((-0.5 - 0.1) / 2)


def test_forward_transfer_against_the_untrained_model():
    # j=1: R[0][1] - b1 = 0.10 - 0.20 ; j=2: R[1][2] - b2 = 0.20 - 0.30
    assert M.forward_transfer(R, B) == pytest.approx(-0.1)


def test_single_experience_edge_case():
    one = [[0.8]]
    assert M.final_average_accuracy(one) == 0.8
    assert M.average_incremental_accuracy(one, [5]) == 0.8
    assert M.forgetting(one) is None and M.backward_transfer(one) is None
    assert M.forward_transfer(one, [0.1]) is None
    s = M.summary(one, [5], [0.1])
    assert s["forgetting"] is None and s["final_accuracy"] == 0.8


def test_summary_collects_everything():
    s = M.summary(R, SIZES, B)
    assert set(s) == {"final_average_accuracy", "final_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt"}
    assert s["bwt"] == pytest.approx(-0.3) and s["fwt"] == pytest.approx(-0.1)
