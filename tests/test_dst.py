"""DST: BWT exactly 0, earlier tasks' weights bit-identical after later tasks,
per-layer density on target after every topology update, ERK in closed form."""
from __future__ import annotations

import pytest
import torch

from strategies.dst import DST, cosine_drop_rate, erk_densities
from tests.conftest import run_inprocess


def test_erk_densities_match_the_closed_form():
    d = 0.1
    shapes = [(10, 20), (4, 3, 3, 3)]
    eps = d * 308 / (0.15 * 200 + (13 / 108) * 108)  # Σ d_l n_l = d Σ n_l with d_l = ε Σdims/Πdims
    assert erk_densities(shapes, d) == pytest.approx([eps * 0.15, eps * 13 / 108])
    # a layer that would exceed density 1 is dense; the rest share what is left
    dens = erk_densities([(2, 2), (100, 100)], 0.5)
    assert dens[0] == 1.0 and dens[1] == pytest.approx((0.5 * 10004 - 4) / 10000)
    assert 4 * dens[0] + 10000 * dens[1] == pytest.approx(0.5 * 10004)


def test_drop_rate_follows_a_cosine_from_half_to_five_thousandths():
    assert cosine_drop_rate(0, 100) == pytest.approx(0.5)
    assert cosine_drop_rate(50, 100) == pytest.approx((0.5 + 0.005) / 2)
    assert cosine_drop_rate(100, 100) == pytest.approx(0.005)


class RecordingDST(DST):
    """Records each layer's mask size after every topology update, each task's
    weights (W∪ ⊙ M_j) when it ends, and the same views after the latest task."""

    densities: list = []
    merged: list = []
    views: dict = {}
    coverage: list = []
    updates = 0

    def update_topology(self):
        super().update_topology()
        RecordingDST.updates += 1
        RecordingDST.densities.append([(int(m.sum()), m.numel(), d) for m, d in zip(self.mask, self.layer_density)])

    def after_experience(self, exp):
        super().after_experience(exp)
        view = lambda j: [(w * m).clone() for w, m in zip(self.union_w, self.masks[j])]  # noqa: E731
        RecordingDST.merged.append(view(exp.index))
        RecordingDST.views = {j: view(j) for j in self.masks}
        RecordingDST.coverage = [float(u.float().mean()) for u in self.used]


TIL = ["scenario=split_mnist5k", "scenario.setting=task", "scenario.max_per_class=80", "scenario.max_per_class_eval=40",
       "model=resnet18_reduced", "model.backbone.nf=8", "optimizer=adam", "optimizer.lr=0.005", "trainer.epochs=2",
       "trainer.batch_size=16", "evaluation.every=0", "logger.console=false"]


@pytest.mark.parametrize("init,growth", [("uniform", "random"), ("ERK", "gradient"), ("uniform", "momentum"),
                                         ("ERK", "unfired")])
def test_bwt_is_zero_old_weights_are_bit_identical_and_density_stays_on_target(tmp_path, init, growth):
    RecordingDST.densities, RecordingDST.merged, RecordingDST.updates = [], [], 0
    results = run_inprocess(TIL + ["strategy=dst", "strategy._target_=tests.test_dst.RecordingDST",
                                   f"strategy.init={init}", f"strategy.growth={growth}", "strategy.update_every=3"],
                            tmp_path / "dst")
    R = results["accuracy_matrix"]
    for j in range(len(R)):
        assert all(R[i][j] == R[j][j] for i in range(j, len(R))), f"task {j} changed: {[r[j] for r in R]}"
    assert results["metrics"]["bwt"] == 0
    assert min(R[j][j] for j in range(len(R))) > 0.7  # and it learns every task
    # each task's weights after the last task are bit-identical to those at its own end
    assert len(RecordingDST.merged) == 5
    for j, at_end in enumerate(RecordingDST.merged):
        assert all(torch.equal(a, b) for a, b in zip(at_end, RecordingDST.views[j])), f"task {j}'s weights moved"
    # per-layer density on target after every topology update (drop and grow are the same size)
    assert RecordingDST.updates >= 5 * 3
    for record in RecordingDST.densities:
        assert all(nnz == round(d * n) for nnz, n, d in record)
    if init == "uniform":
        # masks drawn independently of U: the union covers about 1 - (1 - d)^T (0.67), not d
            # (nested masks) nor T·d (disjoint); topology updates move it a little
        cov = RecordingDST.coverage
        assert sum(cov) / len(cov) == pytest.approx(1 - (1 - 0.2) ** 5, abs=0.06)


def test_dense_finetuning_forgets_in_the_same_setting(tmp_path):
    ft = run_inprocess(TIL + ["strategy=finetune"], tmp_path / "ft")
    assert ft["metrics"]["bwt"] < -0.05, ft["accuracy_matrix"]


def test_unrestricted_logits_make_the_task_agnostic_accuracy_primary(tmp_path):
    results = run_inprocess(TIL + ["strategy=dst", "strategy.eval_logits=all", "trainer.epochs=1",
                                   "scenario.max_per_class=20"], tmp_path / "all")
    assert results["protocol"]["accuracy"] == "task-agnostic"
