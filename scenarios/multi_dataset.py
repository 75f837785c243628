"""Dataset-incremental streams: each experience is a different dataset with its own label space
and head (the setting of the model-merging papers: CLIP-ViT over SUN397, Cars, ..., MNIST, DTD).

Every dataset is brought to one input shape when the stream is built (`size`×`size`, `channels`
1 or 3: bilinear with antialiasing, gray repeated to 3 channels, colour averaged to 1), and stays
uint8 in memory. Dataset j's classes are the labels `offset_j .. offset_j + k_j - 1`, so its
head is its rows of the growing head; the setting is "dataset": predictions and the primary
accuracy are within the experience's own classes (task-aware), as each dataset has its own head.

A dataset entry may transform its images once at build time (`rotate: degrees`, or
`permute: seed`, a fixed pixel permutation), which makes MNIST variants more tasks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cl.errors import UserError
from cl.stream import Experience, Stream, TensorData
from scenarios.datasets import ImageDataset
from scenarios.split import _hold_out, _limit_per_class, input_shape


def to_shape(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 N×C×H×W images as uint8 N×`channels`×`size`×`size`."""
    if x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1:
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise UserError(f"scenario.channels must be 1 or 3, not {channels}.")
    if tuple(x.shape[2:]) == (size, size):
        return x.contiguous()
    out = []
    for chunk in x.split(4096):  # bounded float memory for large datasets
        y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _variant(x: torch.Tensor, rotate: float | None, permute: int | None) -> torch.Tensor:
    if rotate is not None:
        from torchvision.transforms.v2 import functional as TF

        x = TF.rotate(x, float(rotate), interpolation=TF.InterpolationMode.BILINEAR)
    if permute is not None:
        p = torch.randperm(x[0].numel(), generator=torch.Generator().manual_seed(int(permute)))
        x = x.reshape(len(x), -1)[:, p].reshape(x.shape)
    return x


def dataset_stream(
    datasets: dict,
    size: int = 32,
    channels: int = 1,
    order: Sequence[str] | None = None,
    order_seed: int | None = None,
    validation: float = 0.0,
    split_seed: int = 0,
    max_per_class: int | None = None,
    max_per_class_eval: int | None = None,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    name: str = "multi_dataset",
    info: dict | None = None,
) -> Stream:
    """One experience per entry of `datasets` (name -> {dataset: ImageDataset, rotate, permute}),
    in the order `order` (names) or permuted by `order_seed` (None: as listed)."""
    if not datasets:
        raise UserError("scenario.datasets is empty; name at least one dataset (e.g. mnist, fashion_mnist, digits).")
    names = list(datasets)
    if order is not None:
        order = [str(n) for n in order]
        if sorted(order) != sorted(names):
            raise UserError(f"scenario.order must list each of scenario.datasets once ({', '.join(names)}), "
                            f"got {', '.join(order)}.")
        order_seed = None
    elif order_seed is not None:
        order = [names[i] for i in np.random.RandomState(order_seed).permutation(len(names))]
    else:
        order = names
    experiences, offset, sources = [], 0, {}
    for i, key in enumerate(order):
        entry = dict(datasets[key])
        data: ImageDataset = entry.pop("dataset", None)
        if not isinstance(data, ImageDataset):
            raise UserError(f"scenario.datasets.{key} needs a `dataset:` with a _target_ that loads it "
                            "(e.g. scenarios.datasets.mnist_subset).")
        rotate, permute = entry.pop("rotate", None), entry.pop("permute", None)
        if entry:
            raise UserError(f"scenario.datasets.{key} has unknown keys {sorted(entry)}; use dataset, rotate, permute.")

        def prepared(d: TensorData) -> TensorData:
            return TensorData(_variant(to_shape(d.x, size, channels), rotate, permute), d.y + offset)

        k = data.num_classes
        train = _limit_per_class(prepared(data.train), max_per_class, split_seed)
        test = _limit_per_class(prepared(data.test), max_per_class_eval, split_seed + 1)
        train, valid = _hold_out(train, validation, split_seed + 2)
        classes = list(range(offset, offset + k))
        experiences.append(Experience(index=i, classes=classes, train=train.with_task(i), eval=test.with_task(i),
                                      task_label=i, name=key, valid=None if valid is None else valid.with_task(i)))
        sources[key] = {"dataset": data.name, "classes": k, "train": len(train), "test": len(test),
                        **({"rotate": rotate} if rotate is not None else {}),
                        **({"permute_seed": permute} if permute is not None else {})}
        offset += k
    return Stream(
        experiences=experiences, setting="dataset", name=name, num_classes=offset,
        input_shape=input_shape(experiences[0].train, eval_transform),
        train_transform=train_transform, eval_transform=eval_transform,
        info={"datasets": sources, "order": order, "order_seed": order_seed, "image_size": size,
              "channels": channels, "validation": validation, **(info or {})},
    )
