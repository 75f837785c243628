"""The evaluator: what is measured, on which data, and when.

- `initial()`: before any training, the full eval sets of all experiences (the
  baseline b for FWT).
- `continual(iteration, i)`: every `every` iterations during experience i, a
  fixed seeded subset (`subset` samples) of each seen experience's eval split.
- `end_of_experience(i)`: the full eval sets of all experiences, seen and
  unseen -> row i of the accuracy matrix.

The model runs in eval mode under `inference_mode`; every module's train/eval
state is restored afterwards (BatchNorm, dropout). Per-sample correctness comes
from the strategy's `predict`: argmax over the logits (task-agnostic) and, where
experiences partition the classes, argmax within the experience's classes
(task-aware).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor

from cl.evaluation import metrics
from cl.stream import Stream, TensorData


@contextmanager
def eval_mode(model: torch.nn.Module):
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in states:
            m.training = training


class Evaluator:
    def __init__(
        self,
        stream: Stream,
        strategy,
        log: Callable[[dict], None] = lambda event: None,
        every: int = 0,
        subset: int = 1000,
        batch_size: int = 512,
        split: str = "test",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if split not in ("test", "validation"):
            raise ValueError(f"evaluation.split must be test or validation, not {split}")
        self.stream = stream
        self.strategy = strategy
        self.log = log
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.data: list[TensorData] = [e.valid if split == "validation" else e.eval for e in stream]
        if split == "validation" and any(d is None for d in self.data):
            raise ValueError("evaluation.split=validation needs scenario.validation > 0")
        self.split = split
        self.subset_size = int(subset)
        self.subsets = [self._draw_subset(d, seed, j) for j, d in enumerate(self.data)]
        self.sizes = [len(d) for d in self.data]
        self.task_aware_available = stream.setting in ("class", "task")
        # results
        self.initial_row: list[float] | None = None
        self.rows: list[list[float]] = []
        self.rows_task_aware: list[list[float]] = []
        self.eval_seconds = 0.0

    def _draw_subset(self, data: TensorData, seed: int, j: int) -> Tensor | None:
        if self.subset_size <= 0 or len(data) <= self.subset_size:
            return None
        g = torch.Generator().manual_seed(int(seed) * 1000 + j)
        return torch.randperm(len(data), generator=g)[: self.subset_size].sort().values

    # ---- measuring ----------------------------------------------------------------
    def accuracy(self, j: int, data: TensorData) -> tuple[float, float | None, int]:
        """(task-agnostic accuracy, task-aware accuracy or None, n) of the current model on `data`."""
        classes = torch.tensor(self.stream[j].classes, device=self.device)
        correct = correct_aware = 0
        for batch in data.batches(self.batch_size):
            batch = batch.to(self.device, non_blocking=True)
            if self.stream.eval_transform is not None:
                batch.x = self.stream.eval_transform(batch.x)
            logits = self.strategy.predict(batch).float()
            c, ca = self.score(logits, batch.y, classes)
            correct += c
            correct_aware += ca
        n = max(len(data), 1)
        aware = correct_aware / n if self.task_aware_available else None
        return correct / n, aware, len(data)

    def score(self, logits: Tensor, y: Tensor, classes: Tensor) -> tuple[int, int]:
        """Correct counts (task-agnostic, task-aware). Classes the head does not have yet
        can never be predicted, so a sample of such a class counts as wrong."""
        if logits.shape[1] == 0:
            return 0, 0
        correct = int((logits.argmax(1) == y).sum())
        if not self.task_aware_available:
            return correct, 0
        known = classes[classes < logits.shape[1]]
        if known.numel() == 0:
            return correct, 0
        pred_aware = known[logits[:, known].argmax(1)]
        return correct, int((pred_aware == y).sum())

    def _evaluate(self, which: list[int], full: bool, iteration: int, training_exp: int) -> list[tuple]:
        start = time.perf_counter()
        out = []
        with eval_mode(self.strategy.model):
            for j in which:
                data = self.data[j]
                if not full and self.subsets[j] is not None:
                    data = data.subset(self.subsets[j])
                acc, acc_aware, n = self.accuracy(j, data)
                out.append((acc, acc_aware))
                event = {
                    "event": "eval",
                    "iteration": iteration,
                    "experience": training_exp,
                    "eval_experience": j,
                    "accuracy": acc,
                    "n": n,
                    "full": full,
                }
                if acc_aware is not None:
                    event["accuracy_task_aware"] = acc_aware
                self.log(event)
        self.eval_seconds += time.perf_counter() - start
        return out

    # ---- when ----------------------------------------------------------------------
    def initial(self) -> None:
        res = self._evaluate(list(range(len(self.stream))), True, 0, -1)
        self.initial_row = [a for a, _ in res]

    def due(self, iteration: int) -> bool:
        return self.every > 0 and iteration % self.every == 0

    def continual(self, iteration: int, i: int) -> None:
        self._evaluate(list(range(i + 1)), False, iteration, i)

    def end_of_experience(self, i: int, iteration: int) -> list[float]:
        res = self._evaluate(list(range(len(self.stream))), True, iteration, i)
        self.rows.append([a for a, _ in res])
        if self.task_aware_available:
            self.rows_task_aware.append([a for _, a in res])
        return self.rows[-1]

    # ---- results -------------------------------------------------------------------
    @property
    def primary_is_task_aware(self) -> bool:
        return self.stream.setting == "task"

    def results(self) -> dict:
        primary = self.rows_task_aware if self.primary_is_task_aware else self.rows
        out = {
            "accuracy": "task-aware" if self.primary_is_task_aware else "task-agnostic",
            "metrics": metrics.summary(primary, self.sizes, self.initial_row) if primary else {},
            "accuracy_matrix": primary,
            "eval_sizes": self.sizes,
            "initial_accuracy": self.initial_row,
        }
        if self.task_aware_available:
            other = self.rows if self.primary_is_task_aware else self.rows_task_aware
            name = "task_agnostic" if self.primary_is_task_aware else "task_aware"
            out[f"accuracy_matrix_{name}"] = other
            out[f"metrics_{name}"] = metrics.summary(other, self.sizes) if other else {}
        return out

    def state_dict(self) -> dict:
        return {
            "initial_row": self.initial_row,
            "rows": self.rows,
            "rows_task_aware": self.rows_task_aware,
            "eval_seconds": self.eval_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.initial_row = state["initial_row"]
        self.rows = [list(r) for r in state["rows"]]
        self.rows_task_aware = [list(r) for r in state["rows_task_aware"]]
        self.eval_seconds = state["eval_seconds"]
