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


# ---- lower-is-better: a loss matrix (token streams) -------------------------------------------

L = [
    [2.0, 4.0, 5.0],
    [2.5, 1.5, 4.5],
    [3.0, 2.0, 1.0],
]
LB = [3.0, 4.5, 5.5]  # the untrained model's losses


def test_loss_metrics_by_hand():
    m = M.loss_summary(L, [10, 10, 20], LB)
    assert m["final_average_loss"] == pytest.approx(2.0)
    assert m["final_loss"] == pytest.approx((30 + 20 + 20) / 40)
    assert m["final_perplexity"] == pytest.approx(2.718281828 ** 1.75, rel=1e-8)
    # stage 0: 2.0; stage 1: (25 + 15) / 20; stage 2: 70 / 40
    assert m["average_incremental_loss"] == pytest.approx((2.0 + 2.0 + 1.75) / 3)
    # forgetting: the final loss over the lowest one reached before the end: e0 3.0 - 2.0, e1 2.0 - 1.5
    assert m["loss_forgetting"] == pytest.approx((1.0 + 0.5) / 2)
    # BWT: the loss just after learning minus the final loss (negative: old losses rose)
    assert m["loss_bwt"] == pytest.approx(((2.0 - 3.0) + (1.5 - 2.0)) / 2)
    # FWT: how far earlier training lowered an unseen domain's loss below the untrained model's
    assert m["loss_fwt"] == pytest.approx(((4.5 - 4.0) + (5.5 - 4.5)) / 2)
    for name in ("final_average_loss", "loss_forgetting", "max_loss", "wc_loss", "loss_wf_10", "held_out_loss_increase"):
        assert M.direction(name) == "min", name
    for name in ("loss_bwt", "loss_fwt", "loss_wp_10"):
        assert M.direction(name) == "max", name


def test_loss_stability_metrics_by_hand():
    # e0 learned by iteration 10, e1 by 20, e2 by 30
    trace = {0: [(0, 5.0), (5, 3.0), (10, 2.0), (12, 3.5), (15, 2.8), (20, 2.5), (25, 3.1), (30, 3.0)],
             1: [(10, 4.0), (15, 2.0), (20, 1.5), (22, 2.6), (30, 2.0)],
             2: [(20, 4.5), (30, 1.0)]}
    s = M.loss_stability_summary(trace, [0, 10, 20], [10, 20, 30], windows=(2,), beta=2)
    # the worst loss of each finished domain after it was learned: e0 3.5 (the gap), e1 2.6
    assert s["max_loss"] == pytest.approx((3.5 + 2.6) / 2)
    assert s["wc_loss"] == pytest.approx(1.0 / 3 + (2 / 3) * 3.05)
    # the largest rise within 2 consecutive evaluations: e0 2.0 -> 3.5, e1 1.5 -> 2.6, e2 none
    assert s["loss_wf_2"] == pytest.approx((1.5 + 1.1 + 0.0) / 3)
    # the largest fall: e0 5.0 -> 3.0, e1 4.0 -> 2.0, e2 4.5 -> 1.0
    assert s["loss_wp_2"] == pytest.approx((2.0 + 2.0 + 3.5) / 3)
    # the mean loss over each domain's first 2 evaluations while learned
    assert s["loss_lca_2"] == pytest.approx(((5.0 + 3.0) / 2 + (4.0 + 2.0) / 2 + (4.5 + 1.0) / 2) / 3)
