"""Per-task parameter sets, for task-incremental parameter isolation (CLR, DST).

A `ParameterSet` names some live tensors of the network (parameters or buffers); a
task's set is their values for that task. `predict` routes through the sets with
`swapped()`: each task's values go into the live tensors for its forward, and the live
values are back when the block ends, so evaluating never changes training.
`KeepBest` holds a task's best-epoch snapshot by a score (a tie keeps the earlier epoch).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import Tensor


def to_device(obj, device: torch.device):
    """The tensors in nested dicts, lists and tuples moved to `device` (stored sets from a checkpoint)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class ParameterSet:
    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors  # name -> live tensor

    def snapshot(self) -> dict[str, Tensor]:
        return {k: t.detach().clone() for k, t in self.tensors.items()}

    @torch.no_grad()
    def load(self, values: dict[str, Tensor]) -> None:
        """Copy `values` into the live tensors (keys outside the set are ignored)."""
        for k, t in self.tensors.items():
            t.copy_(values[k])

    @contextmanager
    def swapped(self):
        """Yields `use(values)`, which puts a task's values (None: the live ones) into the live
        tensors; the live values are restored when the block ends."""
        live, loaded = self.snapshot(), [None]

        def use(values: dict[str, Tensor] | None) -> None:
            if values is not loaded[0]:
                self.load(live if values is None else values)
                loaded[0] = values

        try:
            yield use
        finally:
            use(None)


class KeepBest:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.score, self.state = -1.0, None

    def offer(self, score: float, snapshot: Callable[[], Any]) -> None:
        """Take `snapshot()` if `score` beats the best so far."""
        if score > self.score:
            self.score, self.state = score, snapshot()

    def state_dict(self) -> tuple:
        return self.score, self.state

    def load_state_dict(self, saved: tuple, device: torch.device) -> None:
        self.score, self.state = saved[0], to_device(saved[1], device)
