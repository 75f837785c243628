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
    assert M.summary(R, SIZES)["fwt"] is None
    assert s["bwt"] == pytest.approx(-0.3) and s["fwt"] == pytest.approx(-0.1)


# ---- continual-evaluation metrics, on a hand-made trace with uneven spacing --------------------
# experiences end at iterations 4, 9, 12 (start at 0, 4, 9); evaluations at 0,2,4,5,6,9,10,12
TRACE = {
    0: [(0, 0.5), (2, 0.8), (4, 0.9), (5, 0.4), (6, 0.6), (9, 0.7), (10, 0.3), (12, 0.5)],
    1: [(4, 0.0), (5, 0.5), (6, 0.7), (9, 0.9), (10, 0.6), (12, 0.8)],
    2: [(9, 0.1), (10, 0.6), (12, 0.9)],
}
STARTS, ENDS = [0, 4, 9], [4, 9, 12]


def test_min_acc_only_looks_after_each_experience_ended():
    # experience 0 after iteration 4: 0.4 0.6 0.7 0.3 0.5 -> 0.3 ; experience 1 after 9: 0.6 0.8 -> 0.6
    assert M.min_acc(TRACE, ENDS) == pytest.approx((0.3 + 0.6) / 2)


def test_wc_acc_mixes_the_last_accuracy_and_min_acc():
    # (1/3) * 0.9 + (2/3) * 0.45
    assert M.wc_acc(TRACE, ENDS) == pytest.approx(0.6)


@pytest.mark.parametrize("h,expected", [(2, (0.5 + 0.3 + 0.0) / 3), (3, (0.5 + 0.3 + 0.0) / 3), (5, (0.6 + 0.3 + 0.0) / 3)])
def test_windowed_forgetting_counts_windows_in_evaluations(h, expected):
    # h=2: 0.9->0.4 (exp 0), 0.9->0.6 (exp 1); h=5 also catches 0.9 ... 0.3 four evaluations apart
    assert M.windowed_forgetting(TRACE, h) == pytest.approx(expected)


@pytest.mark.parametrize("h,expected", [(2, (0.3 + 0.5 + 0.5) / 3), (3, (0.4 + 0.7 + 0.8) / 3)])
def test_windowed_plasticity(h, expected):
    assert M.windowed_plasticity(TRACE, h) == pytest.approx(expected)


def test_learning_curve_area_over_the_first_beta_evaluations_of_each_experience():
    # beta=2: exp0 (0.5+0.8)/2, exp1 (0.0+0.5)/2, exp2 (0.1+0.6)/2
    assert M.learning_curve_area(TRACE, STARTS, ENDS, beta=2) == pytest.approx((0.65 + 0.25 + 0.35) / 3)


def lca_as_the_paper_counts(trace, starts, ends, beta):
    """De Lange et al.'s LCA plugin, re-derived: walk the evaluations in time order; an
    evaluation of the experience being learned fills that experience's window until it
    holds β values, and only a full window gives the experience an LCA; the result is the
    mean over experiences with one, or nothing when none has one."""
    events = sorted((it, k, a) for k, evals in trace.items() for it, a in evals)
    window, lca = {}, {}
    for it, k, a in events:
        if not starts[k] <= it <= ends[k]:
            continue  # not the experience being learned
        if len(window.setdefault(k, [])) < beta:
            window[k].append(a)
            if len(window[k]) == beta:
                lca[k] = sum(window[k]) / beta
    return sum(lca.values()) / len(lca) if lca else None


# during their own training, experience 0 has 3 evaluations (0.5 0.8 0.9), experience 1 has 4
# (0.0 0.5 0.7 0.9), experience 2 has 3 (0.1 0.6 0.9)
@pytest.mark.parametrize("beta,expected", [
    (3, (2.2 / 3 + 1.2 / 3 + 1.6 / 3) / 3),
    (4, 2.1 / 4),  # only experience 1 fills its window
    (5, None),  # no experience does: null
])
def test_learning_curve_area_leaves_out_experiences_with_fewer_than_beta_evaluations(beta, expected):
    got = M.learning_curve_area(TRACE, STARTS, ENDS, beta=beta)
    assert got == (None if expected is None else pytest.approx(expected))
    assert got == (None if expected is None else pytest.approx(lca_as_the_paper_counts(TRACE, STARTS, ENDS, beta)))
    assert lca_as_the_paper_counts(TRACE, STARTS, ENDS, beta) == (None if expected is None else pytest.approx(expected))
    assert M.stability_summary(TRACE, STARTS, ENDS, windows=(), beta=beta)[f"lca_{beta}"] == got


def test_stability_metrics_with_a_single_experience():
    trace, ends = {0: [(0, 0.2), (3, 0.9), (5, 0.7)]}, [5]
    assert M.min_acc(trace, ends) is None
    assert M.wc_acc(trace, ends) == pytest.approx(0.7)
    assert M.windowed_forgetting(trace, 2) == pytest.approx(0.2)
    assert M.windowed_plasticity(trace, 2) == pytest.approx(0.7)
    assert M.learning_curve_area(trace, [0], ends, beta=10) is None  # 3 evaluations < β: left out
    assert M.learning_curve_area(trace, [0], ends, beta=3) == pytest.approx(0.6)
    s = M.stability_summary(trace, [0], ends, windows=(10,))
    assert set(s) == {"min_acc", "wc_acc", "wf_10", "wp_10", "lca_10"}


def test_stability_metrics_without_a_trace_are_none():
    s = M.stability_summary({}, [0, 3], [3, 6])
    assert all(v is None for v in s.values())
