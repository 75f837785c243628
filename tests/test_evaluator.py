"""The accuracy matrix, task-agnostic and task-aware, on a hand-made model whose
every prediction is fixed in advance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl import checkpoint, engine
from cl.errors import UserError
from cl.evaluation import Evaluation, Evaluator
from cl.runtime import eval_mode
from cl.loggers import RunLogger
from cl.stream import Experience, Stream, TensorData
from cl.strategy import Strategy

# eval samples: ids 0-3 in experience 0 (labels 0,0,1,1), 4-7 in experience 1 (2,2,3,3),
# 8-11 in experience 2 (4,4,5,5). After training experience `stage`, the model ranks
# FIRST[stage][id] highest and SECOND[stage][id] next.
FIRST = {
    0: [0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1],
    1: [2, 0, 3, 1, 2, 2, 3, 0, 0, 0, 1, 1],
    2: [0, 0, 4, 4, 2, 3, 3, 3, 4, 4, 5, 4],
}
SECOND = {
    0: [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0],
    1: [0, 1, 1, 0, 0, 0, 0, 3, 0, 0, 0, 0],
    2: [1, 1, 1, 0, 3, 2, 2, 2, 5, 5, 4, 5],
}
# By hand. Stage 0 (head: classes 0,1): e0 ids 0-3 -> 0,1,1,1 vs 0,0,1,1 = 3/4; e1, e2 = 0.
# Stage 1: e0 agnostic 2,0,3,1 -> ids 1,3 right = 2/4; task-aware: id0 -> 0, id2 -> 1: 4/4.
#          e1 agnostic 2,2,3,0 = 3/4; aware id7 -> 3: 4/4. e2: no head rows for 4,5 = 0.
# Stage 2: e0 agnostic 0,0,4,4 = 2/4; aware id2 -> 1 right, id3 -> 0 wrong = 3/4.
#          e1 2,3,3,3 = 3/4 both. e2 4,4,5,4 = 3/4 both.
EXPECTED = [[0.75, 0.0, 0.0], [0.5, 0.75, 0.0], [0.5, 0.75, 0.75]]
EXPECTED_AWARE = [[0.75, 0.0, 0.0], [1.0, 1.0, 0.0], [0.75, 0.75, 0.75]]


class TableStrategy(Strategy):
    def __init__(self):
        super().__init__(nn.Linear(1, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        self.stage = -1

    def training_step(self, batch):
        return F.mse_loss(self.model(batch.x.float()), torch.zeros(len(batch), 1))

    def after_experience(self, exp):
        self.stage = exp.index

    def predict(self, batch):
        width = 2 * (self.stage + 1)
        ids = batch.x[:, 0].long()
        logits = torch.zeros(len(ids), width)
        if width:
            first = torch.tensor([FIRST[self.stage][i] for i in ids])
            second = torch.tensor([SECOND[self.stage][i] for i in ids])
            logits[torch.arange(len(ids)), second] = 1.0
            logits[torch.arange(len(ids)), first] = 2.0
        return logits


def stream(setting="class") -> Stream:
    exps = []
    for i in range(3):
        classes = [2 * i, 2 * i + 1]
        ev = TensorData(torch.arange(4 * i, 4 * i + 4).view(-1, 1).float(), torch.tensor(classes).repeat_interleave(2))
        tr = TensorData(torch.zeros(3, 1), torch.tensor([2 * i] * 3))
        exps.append(Experience(i, classes, tr.with_task(i), ev.with_task(i), i))
    return Stream(exps, setting, "table", 6, (1,), base=0, increment=2)


@pytest.mark.parametrize("setting", ["class", "task"])
def test_accuracy_matrix_golden(tmp_path, setting):
    s = stream(setting)
    strategy = TableStrategy()
    events = []
    ev = Evaluator(s, strategy, Evaluation(every=0), events.append)
    engine.train(s, strategy, ev, RunLogger([]), engine.Trainer(epochs=1, batch_size=2),
                 checkpoint.Checkpointer(tmp_path), seed=0)
    res = ev.results()
    if setting == "class":
        assert res["accuracy"] == "task-agnostic"
        assert res["accuracy_matrix"] == EXPECTED
        assert res["accuracy_matrix_task_aware"] == EXPECTED_AWARE
    else:
        assert res["accuracy"] == "task-aware"
        assert res["accuracy_matrix"] == EXPECTED_AWARE
        assert res["accuracy_matrix_task_agnostic"] == EXPECTED
    assert res["initial_accuracy"] == [0.0, 0.0, 0.0]
    primary = res["accuracy_matrix"]
    assert res["metrics"]["final_average_accuracy"] == pytest.approx(sum(primary[-1]) / 3)
    full = [e for e in events if e["event"] == "eval" and e["full"]]
    assert len(full) == 3 * 4  # initial + 3 experience ends, all experiences each time


def test_evaluation_restores_every_module_state():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a module a strategy keeps in eval mode on purpose
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.is_inference_mode_enabled()
    assert [m.training for m in model.modules()] == before


def test_continual_evaluation_uses_a_fixed_seeded_subset():
    s = stream()
    for e in s:
        e.eval = TensorData(torch.arange(50).view(-1, 1).float(), torch.zeros(50, dtype=torch.long)).with_task(e.index)
    a = Evaluator(s, TableStrategy(), Evaluation(subset=7), seed=3)
    b = Evaluator(s, TableStrategy(), Evaluation(subset=7), seed=3)
    c = Evaluator(s, TableStrategy(), Evaluation(subset=7), seed=4)
    assert all(torch.equal(x.x, y.x) for x, y in zip(a.subsets, b.subsets))
    assert not torch.equal(a.subsets[0].x, c.subsets[0].x)
    assert all(len(x) == 7 for x in a.subsets)
    assert Evaluator(s, TableStrategy(), Evaluation(subset=100)).subsets[0] is None  # smaller than the subset: all of it


# ---- continual evaluation in real runs ------------------------------------------------------------
from tests.conftest import read_events, read_results, run_inprocess  # noqa: E402

SMALL = ["scenario.max_per_class=20", "scenario.max_per_class_eval=30", "model.backbone.hidden=[16]",
         "trainer.batch_size=10", "trainer.epochs=2"]


def test_every_iteration_and_every_seen_experience_is_evaluated(tmp_path):
    res = run_inprocess(SMALL + ["evaluation.every=1", "evaluation.subset=25", "evaluation.lca_beta=8"], tmp_path)
    events = read_events(tmp_path)
    tracked = {(e["iteration"], e["eval_experience"]) for e in events if e["event"] == "eval" and not e["full"]}
    per_exp = 2 * 40 // 10  # 2 epochs x 4 batches
    for i in range(5):
        for it in range(i * per_exp, (i + 1) * per_exp + 1):
            for j in range(i + 1):
                if it == i * per_exp and i > 0:
                    # at a boundary the old experiences were measured as the previous one ended; the new
                    # one is not measured before its first update (only the run's first update is)
                    assert (it, i) not in tracked
                    continue
                assert (it, j) in tracked, (it, j)
    assert all(e["n"] == 25 for e in events if e["event"] == "eval" and not e["full"])
    m = res["metrics"]
    assert all(m[k] is not None for k in ("min_acc", "wc_acc", "wf_10", "wp_10", "wf_100", "wp_100", "lca_8"))
    assert m["min_acc"] <= m["final_average_accuracy"] + 1e-9
    assert res["continual_evaluation"]["evaluations"] == len([e for e in events if e["event"] == "eval" and not e["full"]])
    assert (tmp_path / "stability_gap.png").is_file()


def evaluated(run_dir) -> list[tuple[int, int]]:
    """(iteration, evaluated experience) of every continual evaluation of a run."""
    return sorted({(e["iteration"], e["eval_experience"]) for e in read_events(run_dir) if e["event"] == "eval" and not e["full"]})


def iterations(run_dir) -> list[int]:
    return sorted({it for it, _ in evaluated(run_dir)})


# SMALL: 5 experiences x 2 epochs x 4 batches; experience i trains iterations 8i+1 .. 8i+8
def test_epoch_ends_are_evaluated_even_with_a_long_period(tmp_path):
    run_inprocess(SMALL + ["evaluation.every=1000", "evaluation.period=global"], tmp_path)
    assert iterations(tmp_path) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]  # before the first update, epoch ends
    run_inprocess(SMALL + ["evaluation.every=1000", "evaluation.period=global", "evaluation.at_epoch_end=false"],
                  tmp_path / "off")
    assert iterations(tmp_path / "off") == [0]


@pytest.mark.parametrize("pre_update", [None, "every"], ids=["default", "every"])
def test_pre_update_evaluation_before_the_first_update_only_by_default(tmp_path, pre_update):
    """De Lange et al.'s code evaluates before the very first update of the run only;
    `pre_update=every` also evaluates each later experience (alone) before its first update."""
    over = SMALL + ["evaluation.every=1000", "evaluation.period=global", "evaluation.at_epoch_end=false"]
    res = run_inprocess(over + ([f"evaluation.pre_update={pre_update}"] if pre_update else []), tmp_path)
    if pre_update == "every":
        assert evaluated(tmp_path) == [(0, 0), (8, 1), (16, 2), (24, 3), (32, 4)]
    else:
        assert evaluated(tmp_path) == [(0, 0)]
    assert res["continual_evaluation"]["pre_update"] == (pre_update or "first")
    assert res["metrics"]["lca_10"] is None  # no experience has 10 evaluations while it is learned


@pytest.mark.parametrize("period,extra,expected,ends", [
    # the paper's: after update 1, 1+every, 1+2·every, ... of each epoch (epoch e starts at 4e);
    # update 4 is the epoch's last, so at_epoch_end adds nothing
    (None, [], [0] + [4 * e + k for e in range(10) for k in (1, 4)], None),
    # every 3rd iteration of the run; at_epoch_end adds the epoch ends
    ("global", [], [0] + list(range(3, 41, 3)), range(4, 41, 4)),
    # an iteration is an optimizer step (3 micro-batches; 2 steps per epoch): after step 1 of each epoch
    ("epoch", ["trainer.accumulate_grad_batches=3"], [0] + [2 * e + 1 for e in range(10)], range(2, 21, 2)),
], ids=["default-epoch", "global", "epoch-accumulate"])
def test_period_counts_updates_within_the_epoch_or_over_the_run(tmp_path, period, extra, expected, ends):
    over = SMALL + extra + ["evaluation.every=3"] + ([f"evaluation.period={period}"] if period else [])
    res = run_inprocess(over + ["evaluation.at_epoch_end=false"], tmp_path)
    assert iterations(tmp_path) == expected
    assert res["continual_evaluation"]["period"] == (period or "epoch")
    if ends is not None:
        run_inprocess(over, tmp_path / "ends")
        assert iterations(tmp_path / "ends") == sorted(set(expected) | set(ends))


def test_bad_evaluation_options_are_one_sentence():
    with pytest.raises(UserError, match="evaluation.pre_update must be first or every"):
        Evaluation(pre_update="all")
    with pytest.raises(UserError, match="evaluation.period must be epoch or global"):
        Evaluation(period="run")


def test_resample_draws_a_new_subset_each_time(tmp_path):
    fixed = run_inprocess(SMALL + ["evaluation.every=1", "evaluation.subset=5", "evaluation.resample=false"], tmp_path / "f")
    redraw = run_inprocess(SMALL + ["evaluation.every=1", "evaluation.subset=5", "evaluation.resample=true"], tmp_path / "r")
    assert fixed["accuracy_matrix"] == redraw["accuracy_matrix"]  # evaluation never changes training
    acc_fixed = [e["accuracy"] for e in read_events(tmp_path / "f") if e["event"] == "eval" and not e["full"]]
    acc_redraw = [e["accuracy"] for e in read_events(tmp_path / "r") if e["event"] == "eval" and not e["full"]]
    assert acc_fixed != acc_redraw
    assert redraw["continual_evaluation"]["resample"] is True


def test_budget_lengthens_the_period_and_records_it(tmp_path):
    res = run_inprocess(SMALL + ["evaluation.every=1", "evaluation.budget=0.05"], tmp_path)
    periods = res["continual_evaluation"]["periods"]
    assert periods[0] == {"from_iteration": 0, "every": 1} and len(periods) > 1
    assert [p["every"] for p in periods] == [2 ** k for k in range(len(periods))]


def test_fwt_baseline_uses_a_head_for_every_class(tmp_path):
    res = run_inprocess(["scenario=permuted_mnist", "scenario.num_experiences=3"] + SMALL, tmp_path)
    assert any(b > 0 for b in res["initial_accuracy"])  # an untrained 10-way head is right by chance
    assert res["metrics"]["fwt"] is not None
    cil = run_inprocess(SMALL, tmp_path / "cil")
    assert cil["metrics"]["fwt"] is None  # unseen classes cannot be predicted by a growing head


def test_predict_sees_no_task_label_outside_the_task_setting():
    seen = []

    class Spy(TableStrategy):
        def predict(self, batch):
            seen.append(batch.t.unique().tolist())
            return super().predict(batch)

    for setting, expect in (("class", [[-1]] * 3), ("task", [[0], [1], [2]])):
        seen.clear()
        ev = Evaluator(stream(setting), Spy())
        ev.initial()
        assert sorted(seen) == expect
