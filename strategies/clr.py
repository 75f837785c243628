"""CLR: channel-wise lightweight reprogramming (Ge et al., ICCV 2023).

The backbone is an immutable pretrained CNN. `setup` puts a depthwise 3×3
reprogramming convolution (one 3×3 kernel per channel, no bias, Dirac-initialised
so the network starts equal to the backbone) after every convolution whose kernel
is not 1×1 (`full=true`, "CLR-Full", also after the 1×1 ones) and freezes every
backbone weight.

Each task owns a set: its reprogramming kernels, *all* batch-norm layers (γ, β and
running statistics; BN trains in train mode), and its head (the rows of the
task's classes). A task starts from the pristine set (a fresh model from the same
immutable weights), trains with cross-entropy over its own classes plus
λ·Σ_p ‖p‖₂ (the L2 norm, not squared, λ = 1e-5) over its set, and the set is
stored when the task ends; the model of the best validation epoch is kept
(`select=best_validation`), or the last epoch (`select=last`). Nothing trainable is
shared, so BWT is 0. The per-task heads are the task's rows of one linear head over
all classes, created at `setup`: the same function and initialisation as a new
512→C_t head per task, as no other task's loss or penalty touches them.

`predict` gives every task's columns from that task's own model (stored set and
head rows; the live ones for the task in training; the pristine set for a task not
trained yet), so the task-aware accuracy (the sample's task's columns) is the
official evaluation, and the task-agnostic one compares the tasks' models.

Differences from the official code (gyhandy/Channel-wise-Lightweight-Reprogramming):
- the validation split for `best_validation` is held out from train
  (`scenario.validation`), where the official code selects on the split it reports;
- no early stopping (the official code stops after 21 epochs without improvement);
- the task-agnostic logits above are ours (the official code evaluates each task alone).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cl.errors import UserError
from cl.evaluation.evaluator import classification_scores
from cl.stream import Batch
from cl.strategy import Strategy
from strategies.passes import eval_batches
from strategies.per_task import KeepBest, ParameterSet, to_device


class Reprogram(nn.Module):
    """y_c = K_c * x_c: a depthwise 3×3 convolution initialised as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, 3, 3))
        nn.init.dirac_(self.weight, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, padding=1, groups=self.weight.shape[0])


def insert_reprogramming(model: nn.Module, full: bool = False) -> list[Reprogram]:
    """Replace each eligible Conv2d by Sequential(conv, Reprogram) in place."""
    added = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and (full or tuple(child.kernel_size) != (1, 1)):
                reprogram = Reprogram(child.out_channels).to(child.weight.device)
                setattr(module, name, nn.Sequential(child, reprogram))
                added.append(reprogram)
    return added


class CLR(Strategy):
    def __init__(self, model, optimizer, scheduler=None, lam: float = 1e-5, full: bool = False,
                 select: str = "best_validation"):
        super().__init__(model, optimizer, scheduler)
        if select not in ("last", "best_validation"):
            raise UserError(f"strategy.select must be last or best_validation, not {select!r}.")
        self.lam, self.full, self.select = lam, full, select
        self.sets: dict[int, dict[str, Tensor]] = {}  # a finished task's set and head rows
        self.best = KeepBest()

    def setup(self, stream, context=None):
        super().setup(stream, context)
        if stream.setting != "task":
            raise UserError("strategy=clr is task-incremental (a task id picks the task's parameters); "
                            "set scenario.setting=task.")
        backbone = getattr(self.model, "backbone", None)
        if backbone is None or getattr(self.model, "head", None) is None:
            raise UserError("strategy=clr needs a model with a backbone and a head (cl.models.Classifier).")
        self.model.grow(stream.num_classes)  # every task's head rows exist from the start
        self.reprograms = insert_reprogramming(backbone, self.full)
        if not self.reprograms:
            raise UserError("strategy=clr found no convolution to reprogram; use a CNN backbone.")
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
        for m in self.reprograms + self.norms:
            for p in m.parameters():
                p.requires_grad_(True)
        self.task_set = ParameterSet({f"backbone.{n}": t for n, t in self._set_items(backbone)})
        self.pristine = self.task_set.snapshot()
        self.pristine_head = {k: t.detach().clone() for k, t in self._head().named_parameters()}  # every task's rows

    @staticmethod
    def _set_items(backbone: nn.Module):
        for name, module in backbone.named_modules():
            if isinstance(module, (Reprogram, _BatchNorm)):
                for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    yield f"{name}.{n}", t

    def _head(self):
        return self.model.head.fc

    def _snapshot(self, task: int) -> dict[str, Tensor]:
        """The task's set with its head rows."""
        state = self.task_set.snapshot()
        rows = torch.tensor(self.stream[task].classes, device=self.device)
        state["head.weight"] = self._head().weight.detach()[rows].clone()
        if self._head().bias is not None:
            state["head.bias"] = self._head().bias.detach()[rows].clone()
        return state

    @torch.no_grad()
    def _load(self, state: dict[str, Tensor], task: int) -> None:
        """A task's set and head rows into the live model."""
        self.task_set.load(state)
        rows = torch.tensor(self.stream[task].classes, device=self.device)
        self._head().weight[rows] = state["head.weight"]
        if "head.bias" in state:
            self._head().bias[rows] = state["head.bias"]

    # ---- hooks ------------------------------------------------------------------
    def before_experience(self, exp, plan=None):
        super().before_experience(exp, plan)
        self.task_set.load(self.pristine)  # a fresh model from the same immutable weights, and a fresh head
        with torch.no_grad():
            for k, p in self._head().named_parameters():
                p[exp.classes] = self.pristine_head[k][exp.classes]
        self.best.reset()

    def parameters_to_optimize(self):
        return [p for m in self.reprograms + self.norms for p in m.parameters()] + list(self._head().parameters())

    def task_parameters(self) -> list[Tensor]:
        """This task's set: kernels, BN γ/β and its head rows."""
        rows = torch.tensor(self.experience.classes, device=self.device)
        head = [self._head().weight[rows]] + ([self._head().bias[rows]] if self._head().bias is not None else [])
        return [p for m in self.reprograms + self.norms for p in m.parameters()] + head

    def training_step(self, batch: Batch) -> Tensor:
        classes = torch.tensor(sorted(self.experience.classes), device=batch.y.device)
        logits = self.forward(batch.x, batch.t)[:, classes]
        target = torch.searchsorted(classes, batch.y)  # position of y among the task's (sorted) classes
        loss = F.cross_entropy(logits, target)
        if self.lam:
            loss = loss + self.lam * sum(p.norm(2) for p in self.task_parameters())
        return loss

    def after_epoch(self, epoch: int) -> None:
        if self.select != "best_validation":
            return
        valid = self.experience.valid
        if valid is None:
            raise UserError("strategy.select=best_validation needs a validation split; set scenario.validation=0.1.")
        with torch.no_grad():  # the task-aware accuracy of the live model, as the evaluator scores it
            classes = torch.tensor(self.experience.classes, device=self.device)
            correct = sum(classification_scores(self.model(b.x), b, classes, True)[1]
                          for b in eval_batches(self, valid, 256))
        self.best.offer(correct / max(len(valid), 1), lambda: self._snapshot(self.experience.index))

    def after_experience(self, exp):
        super().after_experience(exp)
        if self.select == "best_validation" and self.best.state is not None:
            self._load(self.best.state, exp.index)
        self.sets[exp.index] = self._snapshot(exp.index)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """Task u's columns are task u's own model on the input: its stored set and head rows
        once it has finished, the live set and rows while it trains, the pristine set (and its
        untouched rows) before. The task-aware accuracy reads the sample's own task's columns."""
        head = self._head()
        models: dict = {}  # which set -> the tasks whose columns it gives
        for u in range(len(self.stream)):
            models.setdefault(u if u in self.sets else "live" if u == self.experience_index else "pristine", []).append(u)
        out = None
        with self.task_set.swapped() as use:
            for key, tasks in models.items():
                use(None if key == "live" else self.pristine if key == "pristine" else self.sets[key])
                features = self.model.backbone(batch.x)
                for u in tasks:
                    rows = torch.tensor(self.stream[u].classes, device=features.device)
                    heads = dict(head.named_parameters()) if key == "live" else self.pristine_head
                    own = self.sets.get(u) or {f"head.{k}": v[rows] for k, v in heads.items()}
                    logits = F.linear(features, own["head.weight"], own.get("head.bias"))
                    out = features.new_zeros(len(batch), head.out_features, dtype=logits.dtype) if out is None else out
                    out[:, rows] = logits
        return out

    # ---- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "sets": self.sets, "best": self.best.state_dict(),
                "pristine_head": self.pristine_head}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sets = {int(k): to_device(v, self.device) for k, v in state["sets"].items()}
        self.best.load_state_dict(state.get("best", (-1.0, None)), self.device)
        if "pristine_head" in state:  # the rows every task starts from, as the run drew them
            self.pristine_head = to_device(state["pristine_head"], self.device)
