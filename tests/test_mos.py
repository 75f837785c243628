"""MOS and SimpleCIL: adapters at init, merging in closed form, immutable stored
adapters, bounded retrieval, lazy == eager, the official per-block merge (values at
evaluation by hand; a training step's gradients against the official sequence written
out; class statistics; mid-task evaluation), the alignment sampler and its weight
decay, and resuming mid-stream."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cl.strategy import Context
from cl.models import Classifier, TimmBackbone
from cl.models.vit_adapter import ADAPTER_KEYS, AdapterViT
from cl.stream import Batch, TensorData
from cl.transforms import to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.mos import MOS, sample_class_features

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT)


def stream(tasks: int = 5, per_class: int = 12):
    g = torch.Generator().manual_seed(0)

    def part(k):
        y = torch.arange(2 * tasks).repeat_interleave(k)
        # class-dependent images, so features separate a little
        x = (torch.rand(len(y), 3, 32, 32, generator=g) * 120 + (y[:, None, None, None] * 13 % 120)).to(torch.uint8)
        return TensorData(x, y)

    data = ImageDataset("toy", part(per_class), part(4), 2 * tasks)
    return class_split(data, increment=2, class_order_seed=0, train_transform=to_float(), eval_transform=to_float())


def tiny_mos(s, **kw):
    torch.manual_seed(0)
    model = Classifier(lambda input_shape: TimmBackbone("vit_tiny_patch16_224", input_shape=input_shape, **VIT),
                       input_shape=(3, 32, 32))
    strategy = MOS(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), batch_size=4, ca_epochs=2, **kw)
    strategy.setup(s, Context(augment=lambda raw: raw.float() / 255))
    return strategy


def train_tasks(strategy, s, tasks: int, steps: int = 2, perturb: float = 0.0):
    """A few real steps per task; `perturb` adds noise to the adapter so tasks differ clearly."""
    for i in range(tasks):
        exp = s[i]
        strategy.before_experience(exp)
        opt, _ = strategy.configure_optimizer(exp)
        strategy.model.train()
        for batch in list(exp.train.batches(8, shuffle=True, seed=i))[:steps]:
            batch.x = strategy.augment(batch.raw)
            loss = strategy.training_step(batch)
            loss.backward()
            opt.step()
            strategy.after_optimizer_step()
            opt.zero_grad()
        if perturb:
            with torch.no_grad():
                for p in strategy.net.adapter.parameters():
                    p.add_(torch.randn_like(p) * perturb)
        strategy.after_experience(exp)


def test_adapters_at_init_leave_the_backbone_features_unchanged():
    vit = tiny_vit().eval()
    x = torch.rand(3, 3, 32, 32)
    before = vit(x)
    net = AdapterViT(vit, bottleneck=8).eval()
    assert net.adapter.down_w.abs().sum() > 0  # the down-projection is initialised...
    assert net.adapter.up_w.eq(0).all() and net.adapter.up_b.eq(0).all()  # ...the up-projection is zero
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in net.vit.parameters())


def test_merging_once_per_step_matches_the_closed_form():
    s = stream(tasks=3)
    mos = tiny_mos(s)
    train_tasks(mos, s, 2, perturb=0.5)  # two stored adapters
    mos.before_experience(s[2])
    start = {n: v.detach().clone() for n, v in mos.current().items()}
    mean = {n: (mos.adapters[0][n] + mos.adapters[1][n]) / 2 for n in ADAPTER_KEYS}
    for _ in range(5):
        mos.after_optimizer_step()
    keep = (1 - mos.alpha) ** 5
    for n in ADAPTER_KEYS:
        torch.testing.assert_close(mos.current()[n].detach(), keep * start[n] + (1 - keep) * mean[n])


def test_paper_merge_never_changes_stored_adapters_and_retrieval_is_bounded():
    s = stream(tasks=4)
    mos = tiny_mos(s)
    snapshots = []
    for i in range(4):
        exp = s[i]
        mos.before_experience(exp)
        opt, _ = mos.configure_optimizer(exp)
        for batch in list(exp.train.batches(8, shuffle=True, seed=i))[:2]:
            batch.x = mos.augment(batch.raw)
            mos.training_step(batch).backward()
            opt.step()
            mos.after_optimizer_step()
            opt.zero_grad()
        mos.after_experience(exp)
        snapshots.append({n: v.clone() for n, v in mos.adapters[-1].items()})
        batch = next(iter(s[0].eval.batches(16))) if i else next(iter(exp.eval.batches(16)))
        batch.x = batch.x.float() / 255
        mos.model.eval()
        mos.predict(batch)
        assert 1 <= mos.retrieve(batch.x)[3] <= 4  # refinement rounds
    for k, snap in enumerate(snapshots):
        assert all(torch.equal(mos.adapters[k][n], snap[n]) for n in ADAPTER_KEYS), f"A_{k} changed"


def test_lazy_and_eager_retrieval_give_identical_predictions_with_five_tasks():
    s = stream(tasks=6)
    mos = tiny_mos(s)
    train_tasks(mos, s, 6, perturb=0.3)  # T = 6 adapters that really differ
    mos.model.eval()
    x = torch.cat([d.x[:6] for d in (s[j].eval for j in range(6))]).float() / 255
    y = torch.cat([d.y[:6] for d in (s[j].eval for j in range(6))])
    batch = Batch(x=x, y=y, t=torch.full_like(y, -1))
    mos.retrieval = "lazy"
    calls = []
    original = mos.net.features
    mos.net.features = lambda inp, *a, **k: (calls.append(len(inp)), original(inp, *a, **k))[1]
    lazy = mos.predict(batch)
    lazy_images = sum(calls)
    calls.clear()
    mos.retrieval = "eager"
    eager = mos.predict(batch)
    eager_images = sum(calls)
    mos.net.features = original
    assert torch.equal(lazy.argmax(1), eager.argmax(1))
    torch.testing.assert_close(lazy, eager, rtol=1e-5, atol=1e-6)
    assert eager_images == 6 * len(x)  # every adapter for every sample
    assert lazy_images < eager_images  # only the visited ones


@pytest.mark.parametrize("merge", ["paper", "official"])
def test_retrieval_diagnostics_do_not_depend_on_what_was_evaluated_before(merge):
    """`predict` counts nothing: `results()` measures retrieval on every finished experience's
    eval split in a pass of its own, the same whatever the evaluator asked before, and (with
    merge=official) without rewriting the stored adapters."""
    s = stream(tasks=3)
    mos = tiny_mos(s, merge=merge, retrieval="eager" if merge == "official" else "lazy")
    train_tasks(mos, s, 3, perturb=0.3)
    stored = [{n: v.clone() for n, v in a.items()} for a in mos.adapters]
    first = mos.results()
    assert all(torch.equal(a[n], b[n]) for a, b in zip(mos.adapters, stored) for n in ADAPTER_KEYS)
    assert first["retrieval_samples"] == sum(len(s[j].eval) for j in range(3))
    assert 0 <= first["task_retrieval_initial"] <= 1 and 0 <= first["task_retrieval_refined"] <= 1
    if merge == "paper":  # official predictions rewrite adapters, which changes what is measured later
        batch = next(iter(s[2].eval.batches(5)))
        batch.x = batch.x.float() / 255
        for _ in range(3):
            mos.predict(batch)
        assert mos.results() == first


def test_official_merge_reproduces_the_in_place_sequence_by_hand():
    """Depth-2 ViT, stored A_0 and A_1: evaluating with A_1 merges the whole set before each
    block's adapter (block 0 sees one merge, block 1 two), and A_1 stays rewritten (the official
    `.data` rebinding keeps the merged values)."""
    s = stream(tasks=3)
    mos = tiny_mos(s, merge="official", retrieval="eager")
    train_tasks(mos, s, 2, perturb=0.5)
    a0 = {n: v.clone() for n, v in mos.adapters[0].items()}
    a1 = {n: v.clone() for n, v in mos.adapters[1].items()}
    alpha = mos.alpha
    once = {n: (1 - alpha) * a1[n] + alpha * a0[n] for n in ADAPTER_KEYS}  # mean of A_0 alone is A_0
    twice = {n: (1 - alpha) * once[n] + alpha * a0[n] for n in ADAPTER_KEYS}
    by_hand = {n: torch.stack([once[n][0], twice[n][1]]) for n in ADAPTER_KEYS}  # block 0 once, block 1 twice
    mos.model.eval()
    x = torch.rand(4, 3, 32, 32)
    expected = mos.net.features(x, by_hand)
    got = mos.features(x, 1)
    torch.testing.assert_close(got, expected)
    for n in ADAPTER_KEYS:
        torch.testing.assert_close(mos.adapters[1][n], twice[n])  # the stored A_1 was rewritten
        assert torch.equal(mos.adapters[0][n], a0[n])  # A_0 is never merged
    mos.features(x, 1)
    thrice = (1 - alpha) ** 4
    torch.testing.assert_close(mos.adapters[1]["up_w"], thrice * a1["up_w"] + (1 - thrice) * a0["up_w"])


def test_official_merge_needs_eager_retrieval():
    from cl.errors import UserError

    with pytest.raises(UserError, match="retrieval=eager"):
        MOS(torch.nn.Linear(1, 1), optimizer=None, merge="official", retrieval="lazy")


def test_official_merge_is_refused_under_torchrun(monkeypatch):
    """Each process evaluates other batches, and official-mode evaluation rewrites stored adapters."""
    from cl.errors import UserError
    from strategies import mos

    monkeypatch.setattr(mos.distributed, "world", lambda: 2)
    with pytest.raises(UserError, match="one process"):
        MOS(torch.nn.Linear(1, 1), optimizer=None, merge="official", retrieval="eager")
    MOS(torch.nn.Linear(1, 1), optimizer=None, merge="paper")  # the default mode runs data-parallel


def test_alignment_sampler_draws_the_right_number_per_class():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [5.0, -5.0], [1.0, 2.0]])
    covs = torch.stack([torch.eye(2) * v for v in (1.0, 0.25, 4.0)])
    x, y = sample_class_features(means, covs, 2000, g)
    assert x.shape == (6000, 2) and torch.bincount(y).tolist() == [2000, 2000, 2000]
    for c in range(3):
        torch.testing.assert_close(x[y == c].mean(0), means[c], atol=0.15, rtol=0)
        torch.testing.assert_close(torch.cov(x[y == c].T), covs[c], atol=0.3, rtol=0.1)
    xd, yd = sample_class_features(means, covs.diagonal(dim1=1, dim2=2), 10, g, diagonal=True)
    assert torch.bincount(yd).tolist() == [10, 10, 10]


def test_state_dict_round_trips_mid_stream():
    s = stream(tasks=3)
    mos = tiny_mos(s)
    train_tasks(mos, s, 2, perturb=0.2)
    mos.before_experience(s[2])
    state = copy.deepcopy(mos.state_dict())
    fresh = tiny_mos(s)
    fresh.before_experience(s[2])
    fresh.load_state_dict(state)
    for k in range(2):
        assert all(torch.equal(fresh.adapters[k][n], mos.adapters[k][n]) for n in ADAPTER_KEYS)
    for key in ("prototypes", "means", "covs", "task_of"):
        assert torch.equal(getattr(fresh, key), getattr(mos, key))
    batch = Batch(x=torch.rand(5, 3, 32, 32), y=torch.zeros(5, dtype=torch.long), t=torch.full((5,), -1))
    mos.model.eval(), fresh.model.eval()
    # mid-task predictions use the live adapter and head; after the task ends, the retrieval
    mos.experience = fresh.experience = s[1]
    torch.testing.assert_close(fresh.predict(batch), mos.predict(batch))


# ---- the official per-block merge, re-implemented from backbone/vit_mos.py -------------------------------------
def _official_layers(live: dict, depth: int) -> list[tuple[torch.nn.Linear, torch.nn.Linear]]:
    """One (down_proj, up_proj) pair of nn.Linear per block, as the official `cur_adapter`."""
    layers = []
    for i in range(depth):
        r, d = live["down_w"].shape[1:]
        down, up = torch.nn.Linear(d, r, dtype=torch.float64), torch.nn.Linear(r, d, dtype=torch.float64)
        with torch.no_grad():
            down.weight.copy_(live["down_w"][i]), down.bias.copy_(live["down_b"][i])
            up.weight.copy_(live["up_w"][i]), up.bias.copy_(live["up_b"][i])
        layers.append((down, up))
    return layers


def _official_reweight(layers, prefix: dict, idx: int, momentum: float) -> None:
    """`reweight_adapter(adapter, idx)`: every block's adapter gets new `.data` (never an in-place write)."""
    for i, (down, up) in enumerate(layers):
        down.weight.data = (1 - momentum) * down.weight.data + momentum * prefix["down_w"][i] / idx
        down.bias.data = (1 - momentum) * down.bias.data + momentum * prefix["down_b"][i] / idx
        up.weight.data = (1 - momentum) * up.weight.data + momentum * prefix["up_w"][i] / idx
        up.bias.data = (1 - momentum) * up.bias.data + momentum * prefix["up_b"][i] / idx


def _official_features(vit, layers, prefix, idx, momentum, scale, dropout, x):
    """`forward_features(x, adapter_id=idx, train=True)`: before every block, reweight the whole
    current adapter, then run the block (adapter parallel to the MLP, on the post-attention state)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, blk in enumerate(vit.blocks):
        _official_reweight(layers, prefix, idx, momentum)
        down, up = layers[i]
        x = x + blk.attn(blk.norm1(x))
        adapt_x = up(F.dropout(F.relu(down(x)), p=dropout, training=True)) * scale
        residual = x
        x = blk.mlp(blk.norm2(x))
        x = x + adapt_x
        x = residual + x
    return vit.norm(x)[:, 0]


def _to_double(mos):
    mos.model.double()
    mos.adapters = [{n: v.double() for n, v in a.items()} for a in mos.adapters]
    mos.prefix = [{n: v.double() for n, v in a.items()} for a in mos.prefix]
    mos.means, mos.covs, mos.prototypes = mos.means.double(), mos.covs.double(), mos.prototypes.double()


def test_official_merge_training_step_matches_the_official_per_block_rebinding():
    """One training step of task 2 with merge=official against the official sequence written out
    (float64, same dropout draws): features, loss, every adapter and head gradient, the adapter
    values after the forward (12 merges here: 2 blocks) and after SGD + the post-step merge."""
    s = stream(tasks=3)
    mos = tiny_mos(s, merge="official", retrieval="eager")
    train_tasks(mos, s, 2, perturb=0.5)  # stored A_0, A_1 that differ clearly
    _to_double(mos)
    exp = s[2]
    mos.before_experience(exp)
    opt, _ = mos.configure_optimizer(exp)
    mos.model.train()
    k, alpha, depth = exp.index, mos.alpha, mos.net.depth
    prefix = mos.prefix[k - 1]
    layers = _official_layers({n: v.detach() for n, v in mos.current().items()}, depth)
    head = copy.deepcopy(mos.model.head)
    batch = next(iter(exp.train.batches(8, shuffle=True, seed=0)))
    batch.x = batch.raw.double() / 255

    seen = []
    hook = mos.model.head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    torch.manual_seed(7)
    loss = mos.training_step(batch)
    hook.remove()
    loss.backward()

    torch.manual_seed(7)
    f = _official_features(mos.net.vit, layers, prefix, k, alpha, mos.adapter_scale, mos.adapter_dropout, batch.x)
    known, total = min(exp.classes), max(exp.classes) + 1
    logits = head(f)[:, :total]
    logits[:, :known] = float("-inf")
    m = torch.cat([mos.means[:known], f])
    ref_loss = F.cross_entropy(logits, batch.y) + mos.reg * F.cross_entropy(m @ m.t() / 0.8, torch.arange(len(m)))
    ref_loss.backward()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(seen[0], f.detach()) < 1e-6
    assert rel(loss.detach(), ref_loss.detach()) < 1e-6
    live = mos.current()
    for i, (down, up) in enumerate(layers):
        for ours, ref in ((live["down_w"], down.weight), (live["down_b"], down.bias),
                          (live["up_w"], up.weight), (live["up_b"], up.bias)):
            assert ref.grad.norm() > 0
            err = rel(ours.grad[i], ref.grad)
            assert err < 1e-6, f"block {i}: the gradient differs from the official one by {err:.2%}"
            err = rel(ours.detach()[i], ref.detach())  # both merged `depth` times by the forward
            assert err < 1e-6, f"block {i}: the adapter after the forward differs by {err:.2%}"
    for ours, ref in ((mos.model.head.fc.weight, head.fc.weight), (mos.model.head.fc.bias, head.fc.bias)):
        assert rel(ours.grad, ref.grad) < 1e-6

    # the step applies to the merged values, then the post-step merge (`adapter_merge`)
    opt.step()
    mos.after_optimizer_step()
    lr = opt.param_groups[0]["lr"]
    ref_opt = torch.optim.SGD([p for pair in layers for lin in pair for p in lin.parameters()], lr=lr)
    ref_opt.step()
    _official_reweight(layers, prefix, k, alpha)
    for i, (down, up) in enumerate(layers):
        for ours, ref in ((live["down_w"], down.weight), (live["up_w"], up.weight), (live["up_b"], up.bias)):
            assert rel(ours.detach()[i], ref.detach()) < 1e-6


@pytest.mark.parametrize("preset, wd", [("mos_imagenet_r", 5e-3), ("mos_cifar100", 5e-4)])
def test_classifier_alignment_uses_the_runs_weight_decay(preset, wd, monkeypatch):
    """The official alignment passes the run's weight decay in its param group (which overrides
    the SGD constructor's 5e-4): the preset's optimizer.weight_decay reaches the alignment's SGD."""
    from tests.conftest import compose

    cfg = compose([f"experiment={preset}", "debug=smoke"])
    assert cfg.optimizer.weight_decay == wd  # the official json's weight_decay
    s = stream(tasks=2)
    mos = tiny_mos(s, ca_weight_decay=cfg.strategy.ca_weight_decay)
    train_tasks(mos, s, 1)
    mos.before_experience(s[1])
    made, sgd = [], torch.optim.SGD

    def recording_sgd(*args, **kwargs):
        made.append(sgd(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.optim, "SGD", recording_sgd)
    mos.align_classifier()
    assert [g["weight_decay"] for g in made[0].param_groups] == [wd]


def test_official_merge_class_statistics_follow_the_official_loop():
    """`_compute_mean` runs class by class in batches of 3 × batch size, each forward merging the live
    adapter before every block: so the live adapter leaves task 1 merged depth × (forwards) times."""
    s = stream(tasks=2)
    mos = tiny_mos(s, merge="official", retrieval="eager")
    mos.batch_size_option = 3  # batches of 9: each class's 12 training images take two forwards (9, 3)
    train_tasks(mos, s, 1, perturb=0.5)
    exp = s[1]
    mos.before_experience(exp)
    start = {n: v.detach().clone() for n, v in mos.current().items()}
    sizes = []
    original = mos.net.features

    def spy(inp, adapter=None, hook=None):
        if adapter is not None and adapter["down_w"] is mos.net.adapter.down_w:  # the live adapter
            sizes.append(len(inp))
        return original(inp, adapter, hook)

    mos.net.features = spy
    mos.after_experience(exp)
    mos.net.features = original
    assert sizes == [9, 3] * len(exp.classes)
    m = mos.net.depth * len(sizes)
    keep = (1 - mos.alpha) ** m
    for n in ADAPTER_KEYS:  # the mean of A_0 alone is A_0
        torch.testing.assert_close(mos.current()[n].detach(), keep * start[n] + (1 - keep) * mos.adapters[0][n])


def test_official_merge_mid_task_evaluation_leaves_the_live_adapter_alone():
    """The official code evaluates only at task ends: a continual evaluation during task 1 runs the
    official per-block merge on a copy, so it neither changes training nor depends on earlier evaluations."""
    s = stream(tasks=2)
    mos = tiny_mos(s, merge="official", retrieval="eager")
    train_tasks(mos, s, 1, perturb=0.5)
    mos.before_experience(s[1])
    live = {n: v.detach().clone() for n, v in mos.current().items()}
    a0, alpha = mos.adapters[0], mos.alpha
    once = {n: (1 - alpha) * live[n] + alpha * a0[n] for n in ADAPTER_KEYS}
    twice = {n: (1 - alpha) * once[n] + alpha * a0[n] for n in ADAPTER_KEYS}
    by_hand = {n: torch.stack([once[n][0], twice[n][1]]) for n in ADAPTER_KEYS}  # block 0 once, block 1 twice
    mos.model.eval()
    batch = Batch(x=torch.rand(4, 3, 32, 32), y=torch.full((4,), 2), t=torch.full((4,), -1))
    first = mos.predict(batch)
    for n in ADAPTER_KEYS:
        assert torch.equal(mos.current()[n].detach(), live[n]), f"evaluation changed the live {n}"
    torch.testing.assert_close(first, mos.model.head(mos.net.features(batch.x, by_hand)))
    torch.testing.assert_close(mos.predict(batch), first)
