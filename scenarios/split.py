"""Class-split streams: class-incremental and task-incremental, offline or online,
with a held-out validation split and two disjoint class pools for the
two-phase (tuning -> evaluation) protocol."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from cl.errors import UserError
from cl.stream import Experience, Stream, TensorData
from scenarios.datasets import ImageDataset

SETTINGS = ("class", "task")


def seeded_class_order(classes: Sequence[int], seed: int | None) -> list[int]:
    """The classes permuted by `np.random.seed(seed); np.random.permutation`, the way
    PyCIL/LAMDA-PILOT draw it (seed 1993 gives their CIFAR-100 order). None keeps the
    given order."""
    classes = list(classes)
    if seed is None:
        return classes
    perm = np.random.RandomState(seed).permutation(len(classes))
    return [classes[i] for i in perm]


def pool_classes(num_classes: int, pool: str | None, pools: dict | None) -> list[int]:
    """Which of the dataset's classes this run may use. `pool=tuning|evaluation`
    picks one of two disjoint halves (by default the first and second half of the
    dataset's class ids, as Cha & Cho split CIFAR-100 into 0-49 and 50-99)."""
    everything = list(range(num_classes))
    if pool is None:
        return everything
    if pools is None:
        half = num_classes // 2
        pools = {"tuning": everything[:half], "evaluation": everything[half : 2 * half]}
    pools = {k: [int(c) for c in v] for k, v in dict(pools).items()}
    if pool not in pools:
        raise UserError(f"scenario.pool={pool} is not a pool; choose one of {sorted(pools)} or null.")
    if len(pools) == 2:
        a, b = pools.values()
        if set(a) & set(b):
            raise UserError(f"scenario.pools overlap in classes {sorted(set(a) & set(b))[:10]}; make them disjoint.")
        if len(a) != len(b):
            raise UserError("scenario.pools must have the same number of classes so both phases have the same shape.")
    return pools[pool]


def _limit_per_class(data: TensorData, k: int | None, seed: int) -> TensorData:
    if not k:
        return data
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(data.y):
        idx = torch.nonzero(data.y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return data.subset(torch.cat(keep).sort().values)


def _hold_out(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData | None]:
    if fraction <= 0:
        return data, None
    g = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in torch.unique(data.y):
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * fraction)))
        va.append(idx[:k])
        tr.append(idx[k:])
    return data.subset(torch.cat(tr).sort().values), data.subset(torch.cat(va).sort().values)


def input_shape(data: TensorData, transform: Callable | None) -> tuple[int, ...]:
    x = data.x[:1]
    if transform is not None:
        x = transform(x)
    return tuple(x.shape[1:])


def class_split(
    dataset: ImageDataset,
    increment: int,
    base: int = 0,
    setting: str = "class",
    class_order: Sequence[int] | None = None,
    class_order_seed: int | None = 0,
    pool: str | None = None,
    pools: dict | None = None,
    validation: float = 0.0,
    split_seed: int = 0,
    max_per_class: int | None = None,
    max_per_class_eval: int | None = None,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    online: bool = False,
    batch_size: int | None = None,
    name: str | None = None,
    info: dict | None = None,
) -> Stream:
    """Split `dataset` by class into B{base}Inc{increment} experiences.

    base=0 means the first experience has `increment` classes too. The class order
    is `class_order` if given, else the pool's classes permuted by `class_order_seed`
    (None: natural order). Labels are remapped to positions in that order.
    `setting="task"` gives task-incremental evaluation (predictions restricted to
    the experience's classes); the task label is the experience index either way.
    `validation` holds out that fraction of each class's train samples.
    `max_per_class(_eval)` subsample (used by `debug=smoke`).
    """
    if setting not in SETTINGS:
        raise UserError(f"scenario.setting={setting} is not a class-split setting; choose one of {SETTINGS}.")
    if increment <= 0 or base < 0:
        raise UserError(f"scenario.increment must be > 0 and scenario.base >= 0 (got {increment}, {base}).")
    if not 0 <= validation < 1:
        raise UserError(f"scenario.validation must be a fraction in [0, 1) of each class's train samples, "
                        f"got {validation}; e.g. scenario.validation=0.1 (0: no validation split).")
    available = pool_classes(dataset.num_classes, pool, pools)
    of = f"of pool {pool}" if pool else f"of {dataset.name}"
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != sorted(available):
            unknown = sorted(set(order) - set(available))
            repeated = sorted({c for c in order if order.count(c) > 1})
            missing = sorted(set(available) - set(order))
            problems = []
            if unknown:
                problems.append(f"{_ids(unknown)} {'is not a class' if len(unknown) == 1 else 'are not classes'} {of}")
            if repeated:
                problems.append(f"{_ids(repeated)} repeated")
            if missing:
                problems.append(f"{_ids(missing)} missing")
            raise UserError(f"scenario.class_order must be a permutation of the {len(available)} classes {of} "
                            f"({_ids(available)}): {', '.join(problems)}.")
        class_order_seed = None
    else:
        order = seeded_class_order(available, class_order_seed)
    n = len(order)
    first = base or increment
    if first > n and base:
        raise UserError(f"scenario.base={base} is more than the {n} classes {of}; choose scenario.base from 0 to {n} "
                        "(0: the first experience has scenario.increment classes too).")
    if first > n:
        raise UserError(f"scenario.increment={increment} is more than the {n} classes {of}; "
                        f"e.g. scenario.increment={_divisors_hint(n)}.")
    if (n - first) % increment:
        raise UserError(
            f"B{base}Inc{increment} does not divide the {n} classes: (classes - base) must be a multiple of "
            f"the increment; e.g. scenario.increment={_divisors_hint(n - base if 0 < base < n else n)}."
        )
    sizes = [first] + [increment] * ((n - first) // increment)

    remap = torch.full((dataset.num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(n)

    def relabel(data: TensorData) -> TensorData:
        y = remap[data.y]
        keep = torch.nonzero(y >= 0).flatten()
        return TensorData(data.x[keep], y[keep])

    train_all = _limit_per_class(relabel(dataset.train), max_per_class, split_seed)
    test_all = _limit_per_class(relabel(dataset.test), max_per_class_eval, split_seed + 1)
    train_all, valid_all = _hold_out(train_all, validation, split_seed + 2)

    experiences, start = [], 0
    for i, k in enumerate(sizes):
        classes = list(range(start, start + k))
        start += k

        def part(d: TensorData | None) -> TensorData | None:
            if d is None:
                return None
            idx = torch.nonzero((d.y >= classes[0]) & (d.y <= classes[-1])).flatten()
            return d.subset(idx).with_task(i)

        experiences.append(
            Experience(index=i, classes=classes, train=part(train_all), eval=part(test_all),
                       task_label=i, name=f"classes {classes[0]}-{classes[-1]}", valid=part(valid_all))
        )

    return Stream(
        experiences=experiences,
        setting=setting,
        name=name or f"split_{dataset.name}",
        num_classes=n,
        input_shape=input_shape(train_all, eval_transform),
        class_order=order,
        class_order_seed=class_order_seed,
        base=base,
        increment=increment,
        train_transform=train_transform,
        eval_transform=eval_transform,
        online=online,
        batch_size=batch_size,
        info={"dataset": dataset.name, "pool": pool, "validation": validation, **(info or {})},
    )


def _ids(ids: list[int]) -> str:
    """Class ids in a sentence: `0-9`, or the list (the first 10)."""
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")


def _divisors_hint(m: int) -> str:
    divs = [d for d in range(1, m) if m % d == 0] or [1]
    return " or ".join(str(d) for d in divs[-3:])
