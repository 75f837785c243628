"""The baselines' defining properties, checked on hand-sized inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.stream import Batch, Experience, Stream, TensorData
from strategies.joint import Joint
from strategies.replay import DERPP, ER, ERACE, asymmetric_cross_entropy


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class Fixed(nn.Module):
    """A 'model' whose logits are a learnable table indexed by the input's first value."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.table[x.flatten(1)[:, 0].long()]


def tiny_stream(T=3, per_exp=4) -> Stream:
    exps = []
    for i in range(T):
        x = torch.arange(i * per_exp, (i + 1) * per_exp).view(-1, 1, 1, 1).to(torch.uint8)
        y = torch.tensor([2 * i, 2 * i + 1] * (per_exp // 2))
        d = TensorData(x, y).with_task(i)
        exps.append(Experience(i, [2 * i, 2 * i + 1], d, d, i))
    return Stream(exps, "class", "tiny", 2 * T, (1, 1, 1), base=0, increment=2)


def batch_of(data: TensorData) -> Batch:
    return Batch(x=data.x, y=data.y, t=data.t, raw=data.x)


def test_asymmetric_ce_ignores_classes_absent_from_the_batch():
    logits = torch.tensor([[2.0, 1.0, 5.0, -1.0], [0.5, 3.0, 4.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    loss = asymmetric_cross_entropy(logits, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:, :2], y).item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[:, 2:] == 0) and torch.all(logits.grad[:, :2] != 0)


def test_er_trains_on_stream_plus_replay_and_fills_the_buffer():
    s = tiny_stream()
    table = torch.randn(12, 6)
    er = ER(Fixed(table), sgd, mem_size=8, replay_batch_size=4, seed=0)
    er.setup(s)
    b0 = batch_of(s[0].train)
    loss = er.training_step(b0)  # empty buffer: plain CE on the stream batch
    assert loss.item() == pytest.approx(F.cross_entropy(table[:4], b0.y).item(), rel=1e-6)
    assert len(er.buffer) == 4 and sorted(er.buffer.x[:4].flatten().tolist()) == [0, 1, 2, 3]
    er.new_weight = 0.3
    b1 = batch_of(s[1].train)
    g = er.buffer.generator.get_state()
    replay_idx = torch.randperm(4, generator=torch.Generator().set_state(g))[:4]
    rx = er.buffer.x[replay_idx].flatten().long()
    ry = er.buffer.y[replay_idx]
    loss = er.training_step(b1)
    expected = 0.3 * F.cross_entropy(table[4:8], b1.y) + 0.7 * F.cross_entropy(table[rx], ry)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_er_ace_masks_absent_classes_from_the_second_experience_on():
    s = tiny_stream()
    model = Fixed(torch.randn(12, 6))
    ace = ERACE(model, sgd, mem_size=8, replay_batch_size=4, seed=0)
    ace.setup(s)
    ace.before_experience(s[0])  # first experience: plain CE, no replay (the official code)
    ace.training_step(batch_of(s[0].train)).backward()
    assert torch.all(model.table.grad[:4, 2:] != 0) and len(ace.buffer) == 4
    model.table.grad = None
    ace.before_experience(s[1])  # second: the stream batch sees only classes 2, 3; replay sees all
    ace.training_step(batch_of(s[1].train)).backward()
    stream_rows = model.table.grad[4:8]
    assert torch.all(stream_rows[:, [0, 1, 4, 5]] == 0) and torch.all(stream_rows[:, 2:4] != 0)
    assert torch.all(model.table.grad[:4].abs().sum(1) > 0)  # replayed samples got gradient
    paper = ERACE(Fixed(torch.randn(12, 6)), sgd, mem_size=8, from_first_experience=True)
    paper.setup(s)
    paper.before_experience(s[0])
    paper.training_step(batch_of(s[0].train)).backward()
    assert torch.all(paper.model.table.grad[:4, 2:] == 0)


def official_er_ace_ada_loss(logits, y, buf_logits, buf_y, seen, num_classes):
    """ErACEAda.observe (lvyilin/AdaB2N, models/er_ace_ada.py; Mammoth's er_ace masks alike)
    from the second task on, re-derived: `seen` gains the batch's classes; the stream
    batch's CE sees the present classes and, while the largest seen id is below the last
    class, every column from that id upward; the replay batch gets the full CE."""
    present = y.unique()
    seen = torch.cat([seen, present]).unique()
    mask = torch.zeros_like(logits)
    mask[:, present] = 1
    if seen.max() < num_classes - 1:
        mask[:, seen.max():] = 1
    masked = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)
    return F.cross_entropy(masked, y) + F.cross_entropy(buf_logits, buf_y), seen


def test_er_ace_mammoth_mask_keeps_the_unseen_classes_as_the_official_er_ace_ada():
    s = tiny_stream()  # 3 tasks x 2 classes; the 'model' is a fixed table over all 6 classes
    table = torch.randn(12, 6)
    ace = ERACE(Fixed(table), sgd, mem_size=8, replay_batch_size=4, seed=0, mask="mammoth")
    ace.setup(s)
    drawn = []
    sample = ace.buffer.sample
    ace.buffer.sample = lambda n: drawn.append(sample(n)) or drawn[-1]

    def part(exp, rows):
        d = s[exp].train
        return Batch(x=d.x[rows], y=d.y[rows], t=d.t[rows], raw=d.x[rows])

    ace.before_experience(s[0])
    b = batch_of(s[0].train)
    loss = ace.training_step(b)  # first task: plain CE over the whole head, future classes included
    assert loss.item() == pytest.approx(F.cross_entropy(table[b.x.flatten().long()], b.y).item(), rel=1e-6)
    seen = b.y.unique()
    # task 1 with only class 2 present: classes 2..5 stay (3 absent but >= the largest seen id);
    # task 2: class 4 (largest seen 4: 4, 5 stay), then 5 (largest seen is the last class: 5 alone), then 4
    for exp, rows in ((1, [0, 2]), (2, [0, 2]), (2, [1, 3]), (2, [0, 2])):
        if exp != ace.experience_index:
            ace.before_experience(s[exp])
        b = part(exp, rows)
        loss = ace.training_step(b)
        r = drawn[-1]
        expected, seen = official_er_ace_ada_loss(table[b.x.flatten().long()], b.y, table[r["x"].flatten().long()],
                                                  r["y"], seen, 6)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    present = ERACE(Fixed(table), sgd, mem_size=8, replay_batch_size=4, seed=0)  # the default: present classes only
    assert present.mask == "present"


def test_er_ace_mammoth_mask_needs_a_fixed_head():
    from cl.errors import UserError
    from cl.models import Classifier, MLP

    model = Classifier(lambda input_shape: MLP(input_shape=input_shape, hidden=(4,)), (1, 1, 1))
    with pytest.raises(UserError, match="model.fixed_head=true"):
        ERACE(model, sgd, mask="mammoth").setup(tiny_stream())
    with pytest.raises(UserError, match="present or mammoth"):
        ERACE(model, sgd, mask="official")


def test_derpp_compares_only_the_logit_columns_that_existed_when_stored():
    s = tiny_stream()
    table = torch.randn(12, 6)
    der = DERPP(Fixed(table), sgd, mem_size=4, replay_batch_size=4, alpha=1.0, beta=0.0, seed=0)
    der.setup(s)
    stored = torch.tensor([[1.0, -1.0], [0.5, 0.0], [2.0, 1.0], [0.0, 3.0]])
    der.buffer.add(s[0].train.x, s[0].train.y, s[0].train.t, logits=stored)
    assert der.buffer.logits.shape == (4, 6) and der.buffer.logit_valid.tolist() == [2] * 4
    b1 = batch_of(s[1].train)
    g = torch.Generator().set_state(der.buffer.generator.get_state())
    idx = torch.randperm(4, generator=g)
    loss = der.training_step(b1)
    ids = s[0].train.x[idx].flatten().long()
    mse = ((table[ids][:, :2] - stored[idx]) ** 2).mean()
    assert loss.item() == pytest.approx(F.cross_entropy(table[4:8], b1.y).item() + mse.item(), rel=1e-5)


def test_joint_trains_once_on_everything_or_cumulatively():
    s = tiny_stream()
    j = Joint(Fixed(torch.zeros(12, 6)), sgd)
    j.setup(s)
    assert len(j.train_dataset(s[0])) == 0 and len(j.train_dataset(s[1])) == 0
    assert len(j.train_dataset(s[2])) == 12 and set(j.train_dataset(s[2]).y.tolist()) == set(range(6))
    c = Joint(Fixed(torch.zeros(12, 6)), sgd, cumulative=True)
    c.setup(s)
    assert [len(c.train_dataset(e)) for e in s] == [4, 8, 12]


def test_joint_reaches_the_upper_bound_on_split_digits(tmp_path):
    """Joint on split digits must beat finetune by a wide margin (it sees every class at once)."""
    from tests.conftest import run_inprocess

    common = ["scenario=split_digits", "model.backbone.hidden=[64]", "trainer.epochs=5", "trainer.batch_size=32"]
    joint = run_inprocess(common + ["strategy=joint"], tmp_path / "joint")
    ft = run_inprocess(common + ["strategy=finetune"], tmp_path / "ft")
    # measured: joint 0.87, finetune 0.20 (it keeps only the last of 5 experiences), chance 0.10
    assert joint["metrics"]["final_average_accuracy"] > ft["metrics"]["final_average_accuracy"] + 0.3
