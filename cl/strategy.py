"""The hook contract between methods and the engine.

The engine owns the loop, devices, optimizer stepping, AMP, clipping,
schedules, counters, evaluation, logging and checkpoints. A strategy owns what
makes a method the method, through the hooks below; the base class is plain
fine-tuning with cross-entropy, so a method overrides only what differs.

Order of calls (see `cl.engine.train`):

    setup(stream, context)                          once, model already on context.device
    for each experience:
        before_experience(exp, plan)                plan: the engine's counts for this experience
        configure_optimizer(exp)                    -> (optimizer, scheduler)
        for each epoch:
            for each batch of train_dataset(exp):   batch.x augmented, batch.raw stored form
                loss = training_step(batch)
                loss.backward(); after_backward()
                optimizer.step(); after_optimizer_step(); optimizer.zero_grad()
            after_epoch(epoch)
        after_experience(exp)
    predict(batch)                                  at every evaluation, under inference_mode
    generate(batch, max_new_tokens)                 instruction streams: greedy completions (full evaluations)
    baseline()                                      a context in which predict is the untrained model's
                                                    over every class (the evaluator's FWT baseline b)

`context` (a `Context`) is what the engine gives a strategy: `device`,
`augment(raw) -> x`, which applies the stream's train augmentation with the run's
generator (replay strategies use it on buffer samples), and `log(event)`, the
run's event log (metrics.jsonl, console, wandb) for a method's own diagnostics;
`self.device`, `self.augment` and `self.log` read it. `plan` (a `Plan`) holds the
epochs, batch size, batches and optimizer steps the engine will run for the
experience: a schedule over the experience (DST's drop rate) reads it rather
than re-deriving it from the trainer's config. `train_dataset(exp)` is called
before `before_experience`, to make the plan.

Under torchrun (`cl.distributed`), `training_step` sees this rank's share of the
global batch (`batch.global_size` is the whole batch's size) and every other hook
runs identically on every rank; a method that draws from its own seeded
generators and reads only parameters, gradients (already averaged) and whole
datasets needs nothing more. Counts accumulated from training shares must be
summed with `distributed.all_sum`; replay buffers handle DDP themselves.

Resume: the engine calls `setup(stream)`, then, for a checkpoint taken inside
experience k, `before_experience(k)` (with the random state it had then) followed
by `load_state_dict`; for a checkpoint at the end of experience k, only
`load_state_dict` before `before_experience(k+1)`. So `load_state_dict` must
rebuild whatever earlier experiences created (per-task heads, masks, adapter
snapshots) from the saved state, as `IncrementalClassifier` does for its rows.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.schedules import Schedule
from cl.stream import Batch, Experience, Stream, TensorData


@dataclass
class Context:
    """What the engine gives a strategy at `setup` (defaults: a strategy driven by hand in a test)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[dict], None] = lambda event: None
    augment: Callable[[Tensor], Tensor] = lambda raw: raw


@dataclass(frozen=True)
class Plan:
    """What the engine will run for one experience: `epochs` over `batches_per_epoch`
    micro-batches of `batch_size` samples (the global batch), `accumulate` micro-batches
    per optimizer step, so `steps_per_epoch` optimizer steps per epoch and `steps` in all."""

    epochs: int
    batch_size: int
    batches_per_epoch: int
    accumulate: int = 1
    experience: int = 0  # which experience of how many (a schedule spanning the stream reads them)
    experiences: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.batches_per_epoch // self.accumulate)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


class Strategy:
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., object] | None = None,
    ):
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.stream: Stream | None = None
        self.experience: Experience | None = None
        self.plan: Plan | None = None
        self.context = Context()

    @property
    def device(self) -> torch.device:
        return self.context.device

    def augment(self, raw: Tensor) -> Tensor:
        return self.context.augment(raw)

    def log(self, event: dict) -> None:
        self.context.log(event)

    # Declared for the run to read, so neither the engine nor evaluation probes a method for them:
    # in the task setting, is the primary accuracy the argmax within the task's classes (False:
    # over all logits, DST's official evaluation)?
    task_aware_accuracy: bool = True

    def results(self) -> dict | None:
        """The method's own diagnostics for results.json (under `strategy`), or None."""
        return None

    # ---- hooks -------------------------------------------------------------
    def setup(self, stream: Stream, context: Context | None = None) -> None:
        """Once, before training: the model is on `context.device`."""
        self.stream = stream
        self.context = context or Context()

    def before_experience(self, exp: Experience, plan: Plan | None = None) -> None:
        """A new experience starts. The base grows the head to every class seen so far
        (to all classes at once if the model has `fixed_head=True`)."""
        self.experience, self.plan = exp, plan
        grow = getattr(self.model, "grow", None)
        if grow is not None and self.stream.modality == "classification":
            fixed = getattr(self.model, "fixed_head", False)
            grow(self.stream.num_classes if fixed else len(self.stream.classes_upto(exp.index)))

    def train_dataset(self, exp: Experience) -> TensorData:
        """The data the engine iterates for this experience (joint training widens it)."""
        return exp.train

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """The model's training forward. Strategies call this rather than `self.model`,
        so a wrapper (e.g. continual batch norm, which needs each sample's task) can
        see every forward with its task labels."""
        return self.model(x)

    def training_step(self, batch: Batch) -> Tensor:
        """The stream's modality picks the loss: cross-entropy over the labels, over the response
        tokens (instruction), or over every next token of the packed blocks (token streams)."""
        if self.stream.modality in ("instruction", "tokens"):
            return self.token_loss(batch.x, batch.y)
        logits = self.forward(batch.x, batch.t)
        if self.stream.setting == "dataset":  # each dataset has its own head: cross-entropy within its classes
            logits = self.own_head(logits, batch.t)
        return F.cross_entropy(logits, batch.y)

    def own_head(self, logits: Tensor, t: Tensor) -> Tensor:
        """`logits` with every column outside the sample's own experience's classes at -inf (the
        dataset setting: a dataset's head is its rows of the growing head)."""
        owned = getattr(self, "_owned", None)
        if owned is None or owned.device != logits.device:
            owned = torch.zeros(len(self.stream), self.stream.num_classes, dtype=torch.bool, device=logits.device)
            for e in self.stream:
                owned[e.index, e.classes] = True
            self._owned = owned
        return logits.masked_fill(~owned[t, : logits.shape[1]], float("-inf"))

    def token_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the response tokens (targets that are not -100);
        a `CausalLM` runs its LM head at those positions only. Packed token blocks have no -100:
        every position is scored, through the plain full-sequence head."""
        if self.stream is not None and self.stream.modality == "tokens":
            return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        keep = y != -100
        return F.cross_entropy(self.model(x, keep), y[keep])

    def after_backward(self) -> None:
        """Gradients exist and are unscaled (mask or read them here)."""

    def after_optimizer_step(self) -> None:
        """After `optimizer.step()`, before `zero_grad()`: gradients are still populated."""

    def after_epoch(self, epoch: int) -> None:
        """An epoch of the current experience ended (after its scheduler step)."""

    def after_experience(self, exp: Experience) -> None:
        """The experience's last step is done."""

    @torch.no_grad()
    def predict(self, batch: Batch, keep: Tensor | None = None) -> Tensor:
        """Logits over the labels seen so far (columns = remapped class labels). Language
        models: next-token logits, B×L×V, or with a boolean `keep` (B×L) N×V at those
        positions only (teacher-forced scoring needs the response tokens alone)."""
        return self.model(batch.x) if keep is None else self.model(batch.x, keep)

    @contextmanager
    def baseline(self):
        """Inside this block `predict` is the untrained model's over every class: the
        evaluator's baseline b (FWT), scored once before training. The base predicts with
        a copy of the model whose head is grown to every class; the model is untouched."""
        grow = getattr(self.model, "grow", None)
        if grow is None or self.stream.modality != "classification":
            yield
            return
        model = self.model
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.model = copy.deepcopy(model)
            self.model.grow(self.stream.num_classes)
        try:
            yield
        finally:
            self.model = model

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int) -> list[str]:
        """Greedy completions of the batch's prompts (instruction streams; the model is a `CausalLM`)."""
        return self.model.generate(batch.extra["prompt_ids"], batch.extra["prompt_mask"], max_new_tokens)

    def parameters_to_optimize(self) -> Iterable:
        """Parameters, or param-group dicts, for this experience's optimizer."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizer(self, exp: Experience):
        self.optimizer = self.optimizer_factory(self.parameters_to_optimize())
        self.scheduler = self.scheduler_factory(self.optimizer) if self.scheduler_factory else None
        if isinstance(self.scheduler, Schedule):  # knows where the experience sits in the stream
            self.scheduler.start(self.plan)
        return self.optimizer, self.scheduler

    # ---- checkpoint ------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the optimizer and scheduler
        (the engine saves those). Subclasses extend the dict."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    # ---- helpers for subclasses -------------------------------------------------
    @property
    def experience_index(self) -> int:
        return -1 if self.experience is None else self.experience.index
