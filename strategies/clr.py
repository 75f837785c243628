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
stored when the task ends. Inference is task-incremental: the task id of each
sample swaps in that task's set. Nothing trainable is shared, so BWT is 0.

From the official code: the model of the best validation epoch is kept
(`select=best_validation`, the default; it needs `scenario.validation>0`, held out
from train rather than the official test-as-validation), or the last epoch
(`select=last`). The per-task heads are the task's rows of one linear head over
all classes, created at `setup` (the same function as a new 512→C_t head per
task: no other task's loss or penalty touches them). Not reproduced: early
stopping after 21 epochs without improvement.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cl.errors import UserError
from cl.stream import Batch
from cl.strategy import Strategy


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
        self.sets: dict[int, dict[str, Tensor]] = {}

    def setup(self, stream):
        super().setup(stream)
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
        self.set_tensors = {f"backbone.{n}": t for n, t in self._set_items(backbone)}
        self.pristine = self._snapshot()

    @staticmethod
    def _set_items(backbone: nn.Module):
        for name, module in backbone.named_modules():
            if isinstance(module, (Reprogram, _BatchNorm)):
                for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    yield f"{name}.{n}", t

    def _head(self):
        return self.model.head.fc

    def _snapshot(self, task: int | None = None) -> dict[str, Tensor]:
        state = {k: t.detach().clone() for k, t in self.set_tensors.items()}
        if task is not None:
            rows = torch.tensor(self.stream[task].classes, device=self.device)
            state["head.weight"] = self._head().weight.detach()[rows].clone()
            if self._head().bias is not None:
                state["head.bias"] = self._head().bias.detach()[rows].clone()
        return state

    @torch.no_grad()
    def _load(self, state: dict[str, Tensor], task: int | None = None) -> None:
        for k, t in self.set_tensors.items():
            t.copy_(state[k])
        if task is not None and "head.weight" in state:
            rows = torch.tensor(self.stream[task].classes, device=self.device)
            self._head().weight[rows] = state["head.weight"]
            if "head.bias" in state:
                self._head().bias[rows] = state["head.bias"]

    # ---- hooks ------------------------------------------------------------------
    def before_experience(self, exp):
        super().before_experience(exp)
        self._load(self.pristine)  # a fresh model from the same immutable weights
        self.best = (-1.0, None)

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
        acc = self._accuracy(valid)
        if acc > self.best[0]:
            self.best = (acc, self._snapshot(self.experience.index))

    def _accuracy(self, data) -> float:
        from cl.evaluation.evaluator import eval_mode

        correct = 0
        with eval_mode(self.model):
            for batch in data.batches(256):
                batch = batch.to(self.device)
                if self.stream.eval_transform is not None:
                    batch.x = self.stream.eval_transform(batch.x)
                classes = torch.tensor(self.experience.classes, device=self.device)
                pred = classes[self.model(batch.x)[:, classes].argmax(1)]
                correct += int((pred == batch.y).sum())
        return correct / max(len(data), 1)

    def after_experience(self, exp):
        super().after_experience(exp)
        if self.select == "best_validation" and self.best[1] is not None:
            self._load(self.best[1], exp.index)
        self.sets[exp.index] = self._snapshot(exp.index)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """Each sample through its task's set (the current task's live set while it trains,
        the pristine set for a task not trained yet)."""
        tasks = batch.t.unique().tolist()
        if any(t < 0 for t in tasks):
            raise UserError("strategy=clr needs task ids at evaluation; set scenario.setting=task.")
        current = self.experience_index
        live = self._snapshot(current if current >= 0 else None)  # with the current task's head rows
        out = None
        for t in tasks:
            if t in self.sets and t != current:
                self._load(self.sets[t], t)
            elif t != current:
                self._load(self.pristine)
            else:
                self._load(live, current if current >= 0 else None)
            rows = batch.t == t
            logits = self.model(batch.x[rows])
            out = logits.new_zeros(len(batch), logits.shape[1]) if out is None else out
            out[rows] = logits
        self._load(live, current if current >= 0 else None)
        return out

    # ---- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "sets": self.sets, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sets = {int(k): {n: t.to(self.device) for n, t in v.items()} for k, v in state["sets"].items()}
        acc, best = state.get("best", (-1.0, None))
        self.best = (acc, None if best is None else {n: t.to(self.device) for n, t in best.items()})
