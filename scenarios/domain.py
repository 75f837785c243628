"""Domain-incremental streams: every experience has all classes, seen through a
different input transformation (a pixel permutation or a rotation)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from cl.errors import UserError
from cl.stream import Experience, Stream, TensorData
from scenarios.datasets import ImageDataset
from scenarios.split import _limit_per_class, input_shape


def _domain_stream(dataset, transforms, names, name, train_transform, eval_transform,
                   max_per_class, max_per_class_eval, split_seed, online, batch_size, info) -> Stream:
    train = _limit_per_class(dataset.train, max_per_class, split_seed)
    test = _limit_per_class(dataset.test, max_per_class_eval, split_seed + 1)
    classes = list(range(dataset.num_classes))
    experiences = []
    for i, (f, label) in enumerate(zip(transforms, names)):
        tr = TensorData(f(train.x), train.y).with_task(i)
        te = TensorData(f(test.x), test.y).with_task(i)
        experiences.append(Experience(index=i, classes=classes, train=tr, eval=te, task_label=i, name=label))
    return Stream(
        experiences=experiences, setting="domain", name=name, num_classes=dataset.num_classes,
        input_shape=input_shape(experiences[0].train, eval_transform),
        train_transform=train_transform, eval_transform=eval_transform, online=online,
        batch_size=batch_size, info={"dataset": dataset.name, **(info or {})},
    )


def permuted(
    dataset: ImageDataset,
    num_experiences: int = 10,
    seed: int = 0,
    first_identity: bool = False,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    max_per_class: int | None = None,
    max_per_class_eval: int | None = None,
    split_seed: int = 0,
    online: bool = False,
    batch_size: int | None = None,
    info: dict | None = None,
) -> Stream:
    """Permuted MNIST: experience i applies a fixed random pixel permutation drawn from `seed`."""
    if num_experiences <= 0:
        raise UserError("scenario.num_experiences must be positive.")
    shape = dataset.train.x.shape[1:]
    npix = int(torch.tensor(shape).prod())
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(npix, generator=g) for _ in range(num_experiences)]
    if first_identity:
        perms[0] = torch.arange(npix)

    def make(p):
        return lambda x: x.reshape(len(x), -1)[:, p].reshape(len(x), *shape)

    return _domain_stream(dataset, [make(p) for p in perms], [f"permutation {i}" for i in range(num_experiences)],
                          f"permuted_{dataset.name}", train_transform, eval_transform, max_per_class,
                          max_per_class_eval, split_seed, online, batch_size, {"permutation_seed": seed, **(info or {})})


def rotated(
    dataset: ImageDataset,
    angles: Sequence[float] | None = None,
    num_experiences: int = 5,
    max_angle: float = 180.0,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    max_per_class: int | None = None,
    max_per_class_eval: int | None = None,
    split_seed: int = 0,
    online: bool = False,
    batch_size: int | None = None,
    info: dict | None = None,
) -> Stream:
    """Rotated MNIST: experience i rotates every image by `angles[i]` degrees
    (default: evenly spaced from 0 to `max_angle`, exclusive)."""
    from torchvision.transforms.v2 import functional as TF

    if angles is None:
        angles = [max_angle * i / num_experiences for i in range(num_experiences)]
    angles = [float(a) for a in angles]

    def make(a):
        return lambda x: TF.rotate(x, a, interpolation=TF.InterpolationMode.BILINEAR)

    return _domain_stream(dataset, [make(a) for a in angles], [f"rotation {a:g}°" for a in angles],
                          f"rotated_{dataset.name}", train_transform, eval_transform, max_per_class,
                          max_per_class_eval, split_seed, online, batch_size, {"angles": angles, **(info or {})})
