"""AdaB²N: the layer against BatchNorm2d, the η recursion, the weighted statistics
by hand, gradients to `a`, state round-trips, and the strategy composed by config."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl.strategy import Context
from strategies.adab2n import AdaB2NNorm, swap_batchnorm
from tests.conftest import compose, read_results, run_inprocess


def layer_from_bn(kappa: float, num_tasks: int = 3, channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn, AdaB2NNorm.from_bn(bn, num_tasks, kappa)


def test_kappa_one_without_replay_is_batchnorm_up_to_the_biased_running_variance():
    bn, ada = layer_from_bn(kappa=1.0)
    bn.train(), ada.train()
    for step in range(5):
        x = torch.randn(8, 4, 5, 5) * (step + 1) + step
        n = x.numel() / x.shape[1]
        rv_before = ada.running_var.clone()
        torch.testing.assert_close(ada(x), bn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ada.running_mean, bn.running_mean)
        biased = x.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(ada.running_var, 0.9 * rv_before + 0.1 * biased)
        # BatchNorm2d keeps the unbiased variance: the only difference
        assert not torch.allclose(ada.running_var, bn.running_var)
        ada.running_var.copy_(bn.running_var)  # realign, so the next step compares like for like
        assert n > 1
    bn.eval(), ada.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(ada(x), bn(x))


@pytest.mark.parametrize("kappa", [0.1, 0.4, 0.7])
def test_eta_recursion_is_an_ema_with_decay_one_minus_m_to_the_kappa(kappa):
    _, ada = layer_from_bn(kappa=kappa)
    ada.train()
    m, d = 0.1, (1 - 0.1) ** kappa
    r0 = ada.running_mean.clone()
    xs = []
    for t in range(1, 40):
        x = torch.randn(6, 4, 3, 3) + t * 0.1
        xs.append(x.mean((0, 2, 3)))
        ada(x)
        # closed form of the recursion: 1/η_t = d^{t-1}/η_1 + Σ_{i<t-1} d^i with η_1 = m^κ
        inv = d ** (t - 1) / m**kappa + sum(d**i for i in range(t - 1))
        assert float(ada.eta) == pytest.approx(1 / inv, rel=1e-12)
        # the running mean is the EMA (weights d^{t-s}) with the initial value as a prior of weight c·d^t
        c = (m ** -kappa - 1) / d
        weights = torch.tensor([d ** (t - s) for s in range(1, t + 1)], dtype=torch.float64)
        ema = (c * d**t * r0.double() + (weights[:, None] * torch.stack(xs).double()).sum(0)) / (c * d**t + weights.sum())
        torch.testing.assert_close(ada.running_mean.double(), ema, rtol=1e-5, atol=1e-6)
    for _ in range(3000):
        ada(torch.zeros(1, 4, 1, 1))
    assert float(ada.eta) == pytest.approx(1 - d, rel=1e-6)  # η → 1-(1-m)^κ (0.0105 at κ=0.1)


def test_kappa_zero_is_the_cumulative_average():
    _, ada = layer_from_bn(kappa=0.0)
    ada.train()
    means = []
    for t in range(1, 6):
        x = torch.randn(5, 4, 2, 2) + t
        means.append(x.mean((0, 2, 3)))
        ada(x)
        assert float(ada.eta) == pytest.approx(1 / t)
    torch.testing.assert_close(ada.running_mean, torch.stack(means).mean(0))


def official_kappa_zero_steps(bn: nn.BatchNorm2d, xs: list) -> tuple:
    """models/utils/adab2n.py of lvyilin/AdaB2N at κ = 0 without task weighting, re-derived:
    each training forward first adds 1 to the BatchNorm's own num_batches_tracked, then
    η = 1 / num_batches_tracked; mean += η (μ_B - mean), var = (1 - η) var + η σ²_B (biased)."""
    mean, var, n = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    for x in xs:
        n += 1
        eta = 1.0 / n
        batch_var, batch_mean = torch.var_mean(x, [0, 2, 3], correction=0)
        mean = mean + eta * (batch_mean - mean)
        var = (1 - eta) * var + eta * batch_var
    return mean, var, n


def test_kappa_zero_counts_on_from_the_batchnorms_own_num_batches_tracked():
    """A BN that was already trained (ImageNet weights, or earlier epochs) keeps its count:
    the first step's η is 1/(N+1), not 1 (which would overwrite its running statistics)."""
    bn, _ = layer_from_bn(kappa=0.0)
    bn.num_batches_tracked.fill_(7)
    ada = AdaB2NNorm.from_bn(bn, 3, 0.0).train()
    xs = [torch.randn(5, 4, 3, 3) * (i + 1) + i for i in range(4)]
    for x in xs[:2]:
        ada(x)
    resumed = AdaB2NNorm.from_bn(nn.BatchNorm2d(4), 3, 0.0).train()
    resumed.load_state_dict(copy.deepcopy(ada.state_dict()))  # a checkpoint mid-way continues the count
    for x in xs[2:]:
        ada(x), resumed(x)
    mean, var, n = official_kappa_zero_steps(bn, xs)
    for layer in (ada, resumed):
        assert int(layer.num_batches_tracked) == n == 11 and float(layer.eta) == pytest.approx(1 / 11)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def test_weighted_statistics_match_a_hand_computation():
    _, ada = layer_from_bn(kappa=0.5, num_tasks=4, channels=2)
    with torch.no_grad():
        ada.a.copy_(torch.tensor([0.3, -0.2, 0.7, 0.0]))
    ada.finish_task(), ada.finish_task()  # tasks 0, 1 done; task 2 current
    x = torch.arange(5 * 2 * 2 * 2, dtype=torch.float32).reshape(5, 2, 2, 2).sin() * 3
    tasks = torch.tensor([0, 0, 2, 2, 2])  # task 1 absent from the batch
    ada.task_ids = tasks
    mean, var = ada.statistics(x)

    a = [0.3, -0.2, 0.7]
    n = [2, 0, 3]
    c = [torch.tensor(a[j]).exp().item() + n[j] for j in range(3)]
    omega = [cj / sum(c) for cj in c]
    w = [omega[int(t)] / n[int(t)] for t in tasks]
    assert sum(w) == pytest.approx(1 - omega[1])  # the official code does not renormalise
    for ch in range(2):
        per_sample = [float(x[i, ch].mean()) for i in range(5)]
        mu = sum(wi * mi for wi, mi in zip(w, per_sample))
        sq = sum(wi * float(((x[i, ch] - mu) ** 2).mean()) for i, wi in enumerate(w))
        assert float(mean[ch].detach()) == pytest.approx(mu, rel=1e-5)
        assert float(var[ch].detach()) == pytest.approx(sq, rel=1e-5)


def test_gradients_reach_a_through_the_output_and_the_regulariser():
    _, ada = layer_from_bn(kappa=0.1, num_tasks=3)
    ada.train()
    ada.finish_task()
    ada.task_ids = torch.tensor([0, 1, 1, 1])
    ada.reg_sum = None
    out = ada(torch.randn(4, 4, 3, 3))
    (out.pow(2).sum() + ada.reg_sum).backward()
    assert ada.a.grad is not None
    assert ada.a.grad[:2].abs().min() > 0  # both active tasks
    assert ada.a.grad[2] == 0  # not seen yet


def test_state_dict_round_trips_mid_task():
    _, ada = layer_from_bn(kappa=0.4)
    ada.train()
    ada.finish_task()
    for _ in range(3):
        ada.task_ids = torch.tensor([0, 1, 1])
        ada(torch.randn(3, 4, 2, 2))
    state = copy.deepcopy(ada.state_dict())
    assert {"a", "eta", "steps", "finished"} <= set(state)
    _, fresh = layer_from_bn(kappa=0.4, seed=1)
    fresh.load_state_dict(state)
    fresh.train()
    x = torch.randn(3, 4, 2, 2)
    for layer in (ada, fresh):
        layer.task_ids = torch.tensor([0, 0, 1])
    torch.testing.assert_close(fresh(x), ada(x))
    assert float(fresh.eta) == float(ada.eta) and int(fresh.steps) == int(ada.steps) == 4
    torch.testing.assert_close(fresh.running_var, ada.running_var)


def test_swap_replaces_exactly_batchnorm2d_and_keeps_its_state():
    class Sub(nn.BatchNorm2d):
        pass

    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3), Sub(3)), nn.BatchNorm1d(3))
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    layers = swap_batchnorm(net, 5, 0.1)
    assert len(layers) == 2 and type(net[1]) is AdaB2NNorm and type(net[2][1]) is Sub
    assert float(net[1].running_mean[0]) == 0.25 and net[1].a.shape == (5,)


SMALL = ["experiment=adab2n_online_splitfmnist", "debug=smoke", "model.backbone.nf=4", "scenario.max_per_class=20",
         "scenario.max_per_class_eval=10", "strategy.base.mem_size=30", "evaluation.every=0"]


def test_composes_with_each_replay_method_by_configuration(tmp_path, data_root):
    root = f"scenario.dataset.root={data_root / 'fashion-mnist'}"
    for base, name in (("er_ace_ada", "AdaB2N+ERACE"), ("derpp", "AdaB2N+DERPP"), ("er", "AdaB2N+ER")):
        results = run_inprocess(SMALL + [root, f"strategy@strategy.base={base}", "strategy.base.mem_size=30"],
                                tmp_path / base)
        assert results["protocol"]["strategy"] == name
    cfg = compose(SMALL + [root, "strategy.norm=bn"])
    assert cfg.strategy.base._target_ == "strategies.replay.ERACE"
    bn = run_inprocess(SMALL + [root, "strategy.norm=bn"], tmp_path / "bn")
    assert bn["protocol"]["strategy"] == "ERACE"
    assert bn["accuracy_matrix"] != read_results(tmp_path / "er_ace_ada")["accuracy_matrix"]


def test_with_replay_stream_and_buffer_share_one_forward_and_the_regulariser_waits_for_replay(tmp_path, data_root):
    """As the official AdaB²N versions of ER-ACE/DER++: one concatenated forward per step
    (one η step, one set of task-weighted statistics), λ·ΣR only in steps that replay."""
    from cl.run import build
    from tests.conftest import compose as compose_cfg

    cfg = compose_cfg(SMALL + [f"scenario.dataset.root={data_root / 'fashion-mnist'}"])
    stream = build(cfg, "scenario", _convert_="all")
    model = build(cfg, "model", input_shape=stream.input_shape)
    strategy = build(cfg, "strategy", model=model, optimizer=build(cfg, "optimizer"), scheduler=None)
    gen = torch.Generator().manual_seed(0)
    strategy.setup(stream, Context(augment=lambda raw: stream.train_transform(raw, gen)))
    assert strategy.joint_forward and len(strategy.norms) > 0
    seen = []
    first = strategy.norms[0]
    first.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    for i in (0, 1):
        exp = stream[i]
        strategy.before_experience(exp)
        opt, _ = strategy.configure_optimizer(exp)
        for batch in list(exp.train.batches(10, shuffle=True, seed=0))[:3]:
            batch.x = strategy.augment(batch.raw)
            seen.clear()
            steps, drawn = first._t, strategy.replay_batches
            loss = strategy.training_step(batch)
            assert first._t == steps + 1 and len(seen) == 1  # one forward per step
            if i == 0:  # ER-ACE replays from the second experience: no regulariser, plain statistics
                assert strategy.replay_batches == drawn and seen == [len(batch)]
            else:
                assert strategy.replay_batches == drawn + 1 and seen == [len(batch) + 10]
                assert first.reg_sum is not None
            loss.backward()
            opt.step()
            opt.zero_grad()
        strategy.after_experience(exp)
    assert int(first.finished) == 2 and first._k == 2


@pytest.mark.parametrize("preset", ["adab2n_online_cifar100", "adab2n_online_splitfmnist", "adab2n_derpp_cifar100"])
def test_presets_have_the_official_fixed_head_and_er_ace_ada_mask(preset):
    """Mammoth's head has every class from the first task on; er_ace_ada's stream CE keeps the unseen classes."""
    cfg = compose([f"experiment={preset}"])
    assert cfg.model.fixed_head is True
    if cfg.strategy.base._target_ == "strategies.replay.ERACE":
        assert cfg.strategy.base.mask == "mammoth"
