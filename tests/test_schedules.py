"""Learning-rate schedules over a stream (cl/schedules.py): each curve against its closed form,
written here from the definitions, and through a whole run."""
from __future__ import annotations

import math

import pytest
import torch

from cl.errors import UserError
from cl.schedules import Constant, Infinite, WarmupCosine
from cl.strategy import Plan
from tests.conftest import read_events, run_inprocess

LR = 0.2


def curve(make, steps: list[int]) -> list[list[float]]:
    """The learning rate of every optimizer step of each experience (a new optimizer and schedule
    per experience, as a strategy builds them)."""
    out = []
    for i, n in enumerate(steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        sched = make(opt)
        sched.start(Plan(1, 1, n, 1, i, len(steps)))
        lrs = []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out.append(lrs)
    return out


def test_warmup_cosine_re_warms_and_re_decays_in_every_experience():
    got = curve(lambda o: WarmupCosine(o, warmup=0.2, min_ratio=0.1), [10, 20])
    for lrs, n in zip(got, [10, 20]):
        W = round(0.2 * n)
        want = [LR * (s + 1) / W if s < W else LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - W) / (n - W))))
                for s in range(n)]
        assert lrs == pytest.approx(want, rel=1e-12)
    assert got[1][0] == pytest.approx(LR / 4) and got[1][3] == pytest.approx(LR)  # re-warmed to the peak
    assert got[0][-1] == pytest.approx(LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))


def test_the_infinite_schedule_spans_experiences_without_re_warming():
    c, lo = 0.55, 0.1
    got = curve(lambda o: Infinite(o, warmup=2, cooldown=0.5, constant_ratio=c, anneal=0.25, min_ratio=lo), [20, 8, 12])
    first = [LR * (s + 1) / 2 for s in range(2)]
    first += [LR * (c + (1 - c) * 0.5 * (1 + math.cos(math.pi * (k + 1) / 10))) for k in range(10)]
    first += [LR * c] * 8
    assert got[0] == pytest.approx(first, rel=1e-12)
    assert got[1] == pytest.approx([LR * c] * 8)  # no re-warming: the constant rate carries on
    last = [LR * c] * 9 + [LR * c * (lo / c) ** ((k + 1) / 3) for k in range(3)]
    assert got[2] == pytest.approx(last, rel=1e-12)
    assert got[2][-1] == pytest.approx(LR * lo)


@pytest.mark.parametrize("shape", ["inverse_sqrt", "linear"])
def test_infinite_cooldown_shapes_start_at_the_peak_and_end_at_the_constant(shape):
    c, alpha = 0.5, 10.0
    got = curve(lambda o: Infinite(o, warmup=0, cooldown=10, constant_ratio=c, anneal=0, cooldown_shape=shape,
                                   timescale=alpha), [12])[0]
    x = [(k + 1) / 10 for k in range(10)]
    h = lambda v: (1 + alpha * v) ** -0.5 - 1  # noqa: E731
    want = [LR * (1 + (c - 1) * (h(v) / h(1) if shape == "inverse_sqrt" else v)) for v in x] + [LR * c] * 2
    assert got == pytest.approx(want, rel=1e-12)


def test_constant_warms_up_once():
    got = curve(lambda o: Constant(o, warmup=4), [6, 6])
    assert got[0] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR]) and got[1] == pytest.approx([LR] * 6)


def test_bad_schedule_settings_are_one_sentence():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(UserError, match="cooldown_shape must be cosine, inverse_sqrt or linear"):
        Infinite(opt, cooldown_shape="step")
    with pytest.raises(UserError, match="min_ratio <= constant_ratio"):
        Infinite(opt, constant_ratio=0.05, min_ratio=0.1)
    with pytest.raises(UserError, match="scheduler.warmup must be a fraction"):
        curve(lambda o: WarmupCosine(o, warmup=-1), [4])


def test_a_run_steps_the_schedule_every_iteration_across_experiences(tmp_path, data_root):
    """Through the engine: the logged lr of every iteration is the closed form's, the infinite
    schedule steps per iteration although trainer.scheduler_interval is epoch, and a run killed
    and resumed keeps the curve (the resume tests cover the numbers)."""
    run_inprocess(["experiment=cpt_smollm2_infinite", "debug=smoke", f"data_dir={data_root}", "trainer.log_every=1",
                   "optimizer.lr=0.01", "scheduler.warmup=2", "scheduler.cooldown=4", "scheduler.anneal=0.5",
                   "evaluation.every=0"], tmp_path)
    events = read_events(tmp_path)
    lrs = {}
    for e in events:
        if e["event"] == "train":
            lrs.setdefault(e["experience"], []).append(e["lr"])
    steps = [len(lrs[i]) for i in range(3)]
    # the logged lr is the one after the step's schedule step: the next step's rate
    want = curve(lambda o: Infinite(o, warmup=2, cooldown=4, constant_ratio=0.55, anneal=0.5, min_ratio=0.1), steps)
    for i in range(3):
        nxt = want[i][1:] + [None]
        assert lrs[i][:-1] == pytest.approx([v / LR * 0.01 for v in nxt[:-1]], rel=1e-9), i
