"""DST: BWT exactly 0, earlier tasks' weights bit-identical after later tasks,
per-layer mask sizes kept by every topology update, ERK in closed form; and, each
against a re-derivation from the official code (muratonuryildirim/CL-with-DST):
the MobileNetV2, the drop count, the Bernoulli mask draw, the update at a task's
last step and the best-epoch choice."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.models import Classifier, MobileNetV2
from cl.stream import Batch, Experience, Stream, TensorData
from cl.strategy import Plan
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

    def before_experience(self, exp, plan=None):
        super().before_experience(exp, plan)
        self.drawn = [int(m.sum()) for m in self.mask]

    def update_topology(self):
        super().update_topology()
        RecordingDST.updates += 1
        RecordingDST.densities.append([(int(m.sum()), n) for m, n in zip(self.mask, self.drawn)])

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
    # and it learns: against the untrained model (about 0.5 per task), the mean diagonal gains 0.40-0.47 over
    # thread counts, CPU kernels (AVX-512, AVX2) and settings (one task of the uniform/random draw lands at
    # 0.6-0.73, so no per-task bar); the bar, 0.15, is 6 sd of chance on 400 samples, under half the least gain
    untrained = sum(results["initial_accuracy"]) / len(R)
    assert sum(R[j][j] for j in range(len(R))) / len(R) > untrained + 0.15
    # each task's weights after the last task are bit-identical to those at its own end
    assert len(RecordingDST.merged) == 5
    for j, at_end in enumerate(RecordingDST.merged):
        assert all(torch.equal(a, b) for a, b in zip(at_end, RecordingDST.views[j])), f"task {j}'s weights moved"
    # every layer keeps its drawn mask size through every topology update (drop and grow are the same size)
    assert RecordingDST.updates >= 5 * 3
    for record in RecordingDST.densities:
        assert all(nnz == drawn for nnz, drawn in record)
    if init == "uniform":
        # masks drawn independently of U: the union covers about 1 - (1 - d)^T (0.67), not d
            # (nested masks) nor T·d (disjoint); topology updates move it a little
        cov = RecordingDST.coverage
        assert sum(cov) / len(cov) == pytest.approx(1 - (1 - 0.2) ** 5, abs=0.06)


class ScheduleDST(DST):
    """Records, per task, the steps the drop schedule spans, the optimizer steps taken and the last drop rate."""

    tasks: list = []

    def update_topology(self):
        super().update_topology()
        self.last_rate = cosine_drop_rate(self.step, self.total_steps, self.drop_start, self.drop_end)

    def after_experience(self, exp):
        super().after_experience(exp)
        ScheduleDST.tasks.append((self.total_steps, self.step, self.last_rate))


@pytest.mark.parametrize("setting", [["trainer.accumulate_grad_batches=2"], ["trainer.epochs=[1,3,2,1,2]"]])
def test_the_drop_schedule_spans_the_optimizer_steps_the_engine_takes(tmp_path, setting):
    """48 samples per task in batches of 16: 3 micro-batches per epoch. With accumulation 2 that is 2 optimizer
    steps per epoch (4 in 2 epochs; counting micro-batches gave 6, so the cosine never reached its end), and
    with per-task epochs each task's own count (a list used to be multiplied by the batch count)."""
    ScheduleDST.tasks = []
    results = run_inprocess(TIL + ["strategy=dst", "strategy._target_=tests.test_dst.ScheduleDST",
                                   "strategy.update_every=1", "scenario.max_per_class=24", *setting], tmp_path / "dst")
    epochs = [2] * 5 if "accumulate" in setting[0] else [1, 3, 2, 1, 2]
    per_epoch = 2 if "accumulate" in setting[0] else 3
    assert [(total, taken) for total, taken, _ in ScheduleDST.tasks] == [(e * per_epoch, e * per_epoch) for e in epochs]
    assert all(rate == pytest.approx(0.005) for _, _, rate in ScheduleDST.tasks)  # the cosine ends at drop_end
    assert results["iterations"] == per_epoch * sum(epochs)


def test_dense_finetuning_forgets_in_the_same_setting(tmp_path):
    ft = run_inprocess(TIL + ["strategy=finetune"], tmp_path / "ft")
    assert ft["metrics"]["bwt"] < -0.05, ft["accuracy_matrix"]


def test_unrestricted_logits_make_the_task_agnostic_accuracy_primary(tmp_path):
    results = run_inprocess(TIL + ["strategy=dst", "strategy.eval_logits=all", "trainer.epochs=1",
                                   "scenario.max_per_class=20"], tmp_path / "all")
    assert results["protocol"]["accuracy"] == "task-agnostic"


# ---- the official MobileNetV2 (models.py) ----------------------------------------------------
# Re-derived from the official class: a 3x3 stride-2 stem to int(32·w) channels; per setting
# (t, c, n, s) n blocks of [1x1 to cin·t, 3x3 depthwise with stride s (first block) or 1,
# 1x1 to int(c·w)] — the 1x1 expansion is there for t = 1 too; a residual when the stride is 1
# and cin = cout; a 1x1 conv to 1280 (not scaled by w); average pool; Linear(1280, classes).
OFFICIAL_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1)]


def official_mobilenet_layers(width: float, num_classes: int) -> list[tuple]:
    """(kind, weight shape, stride, groups) of every conv/linear layer, in forward order, and each block's residual."""
    c = int(32 * width)
    layers, residual = [("conv", (c, 3, 3, 3), 2, 1)], []
    for t, out, n, s in OFFICIAL_SETTINGS:
        out = int(out * width)
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), c * t
            layers += [("conv", (hidden, c, 1, 1), 1, 1), ("conv", (hidden, 1, 3, 3), stride, hidden),
                       ("conv", (out, hidden, 1, 1), 1, 1)]
            residual.append(stride == 1 and c == out)
            c = out
    layers += [("conv", (1280, c, 1, 1), 1, 1), ("linear", (num_classes, 1280), None, None)]
    return layers, residual


def official_mobilenet_forward(x, layers, weights, residual, bias):
    """The official forward with the given weights; BN as the official (batch statistics, no affine)."""
    bn = lambda h: F.batch_norm(h, None, None, training=True)  # noqa: E731
    conv = lambda h, i: F.conv2d(h, weights[i], stride=layers[i][2], padding=weights[i].shape[-1] // 2,  # noqa: E731
                                 groups=layers[i][3])
    h = F.relu6(bn(conv(x, 0)))
    for b, res in enumerate(residual):
        i = 1 + 3 * b
        y = bn(conv(F.relu6(bn(conv(F.relu6(bn(conv(h, i))), i + 1))), i + 2))
        h = h + y if res else y
    h = F.relu6(bn(conv(h, len(layers) - 2)))
    return F.linear(h.mean((2, 3)), weights[-1], bias)


def ours_mobilenet(width: float, num_classes: int) -> Classifier:
    model = Classifier(partial(MobileNetV2, width=width), input_shape=(3, 32, 32))
    model.grow(num_classes)
    return model


def layer_list(model) -> list[tuple]:
    return [("conv", tuple(m.weight.shape), m.stride[0], m.groups) if isinstance(m, nn.Conv2d)
            else ("linear", tuple(m.weight.shape), None, None)
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_mobilenetv2_is_the_official_network(width):
    torch.manual_seed(0)
    model = ours_mobilenet(width, 100)
    official, residual = official_mobilenet_layers(width, 100)
    assert len(official) == 54 and layer_list(model) == official
    assert [blk.residual for blk in model.modules() if hasattr(blk, "residual")] == residual
    x = torch.randn(2, 3, 32, 32)
    assert model.backbone.features(x).shape == (2, 1280, 1, 1)  # a 1x1 final map on CIFAR
    if width == 0.25:  # the same function: our module wiring equals the official forward on our weights
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            expected = official_mobilenet_forward(x, official, weights, residual, model.head.fc.bias)
            torch.testing.assert_close(model(x), expected)


# ---- the sparse-training core (core.py) on a tiny network, hooks called directly ------------
class Tiny(nn.Module):
    def __init__(self, input_shape=(1, 6, 6)):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8 * 36, 40, bias=False)
        self.num_features = 40

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def tiny_dst(epochs: int = 1, **kw) -> DST:
    torch.manual_seed(0)
    exps = []
    for i in range(2):
        y = torch.arange(2 * i, 2 * i + 2).repeat(8)
        data = TensorData(torch.randn(16, 1, 6, 6), y, torch.full_like(y, i))
        exps.append(Experience(i, [2 * i, 2 * i + 1], data, data, i))
    stream = Stream(exps, "task", "tiny", 4, (1, 6, 6))
    dst = DST(Classifier(Tiny(), (1, 6, 6)), partial(torch.optim.SGD, lr=0.1), **kw)
    dst.setup(stream)
    dst.before_experience(exps[0], Plan(epochs, 4, exps[0].train.num_batches(4)))
    dst.configure_optimizer(exps[0])
    return dst


def test_one_update_drops_the_official_count_and_grows_as_many():
    dst = tiny_dst(update_every=10, epochs=25)  # 100 steps; the update at step 30
    dst.step = 30
    rate = cosine_drop_rate(30, 100)
    before = [m.clone() for m in dst.mask]
    weights = [w.detach().clone() for w in dst.weights]
    dst.update_topology()
    fractional = 0
    for w, old, new in zip(weights, before, dst.mask):
        # official magnitude_death: num_remove = ceil(r·nnz); the threshold is the
        # (num_zeros + num_remove)-th smallest |w| of the masked weight; keep |w| > threshold
        nnz = int(old.sum())
        num_remove = math.ceil(rate * nnz)
        fractional += num_remove != int(rate * nnz)
        masked = (w * old).abs().flatten()
        threshold = masked.sort().values[old.numel() - nnz + num_remove - 1]
        kept = (masked > threshold).view_as(old)
        assert torch.equal(old & new, kept)  # the same weights dropped
        assert int((new & ~old).sum()) == num_remove  # as many grown (the official: that many in expectation)
    assert fractional == len(before)  # r·nnz is not an integer in any layer: int() would drop one fewer


def test_masks_are_bernoulli_draws_by_default_and_exact_counts_on_request():
    dst = tiny_dst()
    n = [w.numel() for w in dst.weights]
    counts = torch.tensor([[int(m.sum()) for m in dst._draw_mask(t)] for t in range(400)], dtype=torch.float64)
    # official uniform init: (torch.rand(shape) < d) per layer, i.e. Binomial(n_l, d) entries
    official = torch.tensor([[int((torch.rand(k) < 0.2).sum()) for k in n] for _ in range(400)], dtype=torch.float64)
    for ours, ref, k in zip(counts.T, official.T, n):
        mean, std = k * 0.2, math.sqrt(k * 0.2 * 0.8)
        for c in (ours, ref):
            assert abs(float(c.mean()) - mean) < 4 * std / math.sqrt(400)
            assert float(c.std()) == pytest.approx(std, rel=0.2)
    exact = tiny_dst(mask_draw="exact")
    assert all(int(m.sum()) == round(0.2 * k) for m, k in zip(exact._draw_mask(3), n))


def test_the_topology_is_updated_at_a_tasks_last_step_too():
    dst = tiny_dst(update_every=4, epochs=2)  # 2 epochs x 4 batches = 8 steps: updates at steps 4 and 8
    assert dst.total_steps == 8
    calls = []
    dst.update_topology = lambda: calls.append(dst.step)
    for _ in range(dst.total_steps):
        dst.after_optimizer_step()
    # official Masking.step: steps += 1; truncate_weights() whenever steps % update_frequency == 0
    assert calls == [s for s in range(1, 9) if s % 4 == 0] == [4, 8]


def test_the_best_epoch_is_chosen_by_accuracy_over_all_logits():
    dst = tiny_dst()
    task = dst.stream[1]
    dst.before_experience(task, Plan(1, 4, 4))
    dst.configure_optimizer(task)
    y = torch.tensor([2, 3, 2, 3])
    batch = Batch(torch.zeros(4, 1, 6, 6), y, torch.ones_like(y))
    # epoch 0: right within the task's classes, but class 0 wins over all logits (task 1.0, all 0.0)
    # epoch 1: half right either way (task 0.5, all 0.5)
    epochs = [torch.tensor([[9.0, 0, 2, 1], [9, 0, 1, 2], [9, 0, 2, 1], [9, 0, 1, 2]]),
              torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 2], [0, 0, 1, 2], [0, 0, 2, 1]])]
    official = [float((logits.argmax(1) == y).float().mean()) for logits in epochs]  # core.train's train_acc
    bias = dst.model.head.fc.bias
    for e, logits in enumerate(epochs):
        dst.forward = lambda x, t, logits=logits: logits.clone().requires_grad_()
        dst.training_step(batch)
        with torch.no_grad():
            bias.fill_(e)  # marks the epoch's parameters
        dst.after_epoch(e)
    chosen = max(range(2), key=lambda e: (official[e], -e))  # the first epoch with the highest accuracy
    assert official == [0.0, 0.5] and chosen == 1
    dst.after_experience(task)
    assert torch.all(bias == chosen)
