"""The accuracy matrix, task-agnostic and task-aware, on a hand-made model whose
every prediction is fixed in advance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl import engine
from cl.evaluation import Evaluator
from cl.evaluation.evaluator import eval_mode
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
    ev = Evaluator(s, strategy, events.append, every=0)
    engine.train(s, strategy, ev, RunLogger([]), engine.Trainer(epochs=1, batch_size=2),
                 engine.Checkpointer(tmp_path), seed=0)
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
    a = Evaluator(s, TableStrategy(), subset=7, seed=3)
    b = Evaluator(s, TableStrategy(), subset=7, seed=3)
    c = Evaluator(s, TableStrategy(), subset=7, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.subsets, b.subsets))
    assert not torch.equal(a.subsets[0], c.subsets[0])
    assert all(len(x) == 7 for x in a.subsets)
    assert Evaluator(s, TableStrategy(), subset=100).subsets[0] is None  # smaller than the subset: all of it
