"""The training loop, top to bottom in one function (`train`), with its two steps
(`micro_batch`, `optimizer_step`) and the experience plan (`plan_experience`) beside it.
Checkpoints, random states, preemption and resume are `cl.checkpoint.RunState`.

The engine owns devices, optimizer stepping, AMP, clipping, schedules, counters,
evaluation calls, logging and checkpoints; the strategy's hooks own the method
(see `cl.strategy`). Determinism: each epoch's shuffle comes from a seed derived
from (run seed, experience, epoch), augmentation from a dedicated generator, and
every random state is in the checkpoint, so a resumed run continues with the
same batches, the same augmentations and the same numbers.

An iteration is one optimizer step; with `accumulate_grad_batches=k` it takes k
micro-batches (fewer at an epoch's end). Under torchrun each batch is the global
batch and each rank trains on its contiguous share (`cl.distributed`); gradients,
the loss and a stop request are reduced once per step, so every rank takes the same
step and runs the same hooks. SIGINT/SIGTERM stop the run after the current step
with a checkpoint (`Preemption`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cl import distributed
from cl.checkpoint import Checkpointer, Position, Preemption, RunState
from cl.errors import Diverged, UserError
from cl.evaluation import Evaluator
from cl.loggers import RunLogger
from cl.runtime import autocast, epoch_seed
from cl.schedules import Schedule
from cl.stream import Stream, TensorData
from cl.strategy import Context, Plan, Strategy


@dataclass
class Trainer:
    """`trainer.*` in the config."""

    epochs: int | list = 1  # or one count per experience (TRACE trains each task for its own number of epochs)
    batch_size: int = 32
    device: str = "auto"
    precision: str = "32"  # "32" | "bf16" | "16"
    clip_grad_norm: float | None = None
    scheduler_interval: str = "epoch"  # "epoch" | "iteration"
    drop_last: bool = False
    log_every: int = 10
    checkpoint_every: int = 0  # iterations between mid-experience checkpoints (0: only at experience ends)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step (an iteration is one step)
    compile: bool = False  # torch.compile the model (nn.Module.compile: state_dict keys unchanged)

    deterministic: bool = True  # deterministic kernels (cuDNN/cuBLAS); CPU runs are deterministic anyway

    def __post_init__(self):
        if isinstance(self.epochs, (list, tuple)):
            if not self.epochs or any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in self.epochs):
                raise UserError(f"trainer.epochs must be a positive integer or a list of them, got {self.epochs!r}.")
            self.epochs = list(self.epochs)
        for name in ("batch_size", "log_every", "checkpoint_every", "accumulate_grad_batches") + (() if isinstance(self.epochs, list) else ("epochs",)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "checkpoint_every" else 1):
                kind = "a non-negative" if name == "checkpoint_every" else "a positive"
                raise UserError(f"trainer.{name} must be {kind} integer, got {value!r}.")
        self.precision = str(self.precision)
        if self.precision not in ("32", "bf16", "16"):
            raise UserError(f"trainer.precision must be one of 32, bf16, 16, not {self.precision!r}.")
        if self.scheduler_interval not in ("epoch", "iteration"):
            raise UserError(f"trainer.scheduler_interval must be epoch or iteration, not {self.scheduler_interval!r}.")
        if self.clip_grad_norm is not None and not (isinstance(self.clip_grad_norm, (int, float)) and self.clip_grad_norm > 0):
            raise UserError(f"trainer.clip_grad_norm must be a positive number or null, got {self.clip_grad_norm!r}.")

    def epochs_at(self, i: int) -> int:
        """Epochs of experience i (a list gives one per experience)."""
        if not isinstance(self.epochs, list):
            return self.epochs
        if i >= len(self.epochs):
            raise UserError(f"trainer.epochs lists {len(self.epochs)} counts but the stream has more experiences; "
                            "give one per experience.")
        return self.epochs[i]



def plan_experience(trainer: Trainer, stream: Stream, data: TensorData, i: int) -> Plan:
    """The experience's epochs, batch size, batches and accumulation: what `train` runs and
    what `before_experience` receives."""
    world = distributed.world()
    epochs = 1 if stream.online else trainer.epochs_at(i)
    batch_size = stream.batch_size if (stream.online and stream.batch_size) else trainer.batch_size
    if batch_size < world:
        raise UserError(f"The global batch ({batch_size}) is smaller than the number of processes ({world}); "
                        f"raise trainer.batch_size to at least {world}.")
    n_batches = data.num_batches(batch_size, trainer.drop_last) if len(data) else 0
    if world > 1 and n_batches and len(data) - (n_batches - 1) * batch_size < world:
        n_batches -= 1  # DDP: a last batch too small to give every rank a sample is not trained on
    return Plan(epochs, batch_size, n_batches, trainer.accumulate_grad_batches, i, len(stream))


def per_iteration(scheduler, trainer: Trainer) -> bool:
    """Whether the scheduler steps after every optimizer step (cl.schedules' always do) or per epoch."""
    return isinstance(scheduler, Schedule) or trainer.scheduler_interval == "iteration"


def micro_batch(strategy: Strategy, batch, weight: float, scaler, precision: str) -> float:
    """Forward and backward of one micro-batch; its mean loss weighs `weight` in the step's gradient."""
    batch = batch.to(strategy.device, non_blocking=True)
    if batch.raw is not None:
        batch.x = strategy.augment(batch.raw)
    with autocast(strategy.device, precision):
        loss = strategy.training_step(batch)
    scaler.scale(loss * weight if weight != 1.0 else loss).backward()
    return float(loss.detach()) * weight


def optimizer_step(strategy: Strategy, optimizer, scheduler, scaler, trainer: Trainer, params: list) -> None:
    """Unscale, `after_backward`, clip, step, `after_optimizer_step`, zero the gradients and step
    a per-iteration schedule. An fp16 step with inf/nan gradients is skipped, and so are its hooks."""
    scaler.unscale_(optimizer)
    strategy.after_backward()
    if trainer.clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    stepped = scaler.get_scale() >= scale
    if stepped:
        strategy.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)
    if stepped and scheduler is not None and per_iteration(scheduler, trainer):
        scheduler.step()


def train(
    stream: Stream,
    strategy: Strategy,
    evaluator: Evaluator,
    log: RunLogger,
    trainer: Trainer,
    checkpointer: Checkpointer,
    seed: int,
    resume: dict | None = None,
    preemption: Preemption | None = None,
) -> Position:
    device, world = evaluator.device, distributed.world()
    strategy.model.to(device)
    if trainer.compile:
        strategy.model.compile()
    # each rank augments its own share of the batch: its own generator (rank 0's is the single-process one)
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1 + 1_000_003 * distributed.rank())
    transform = stream.train_transform
    augment = (lambda raw: transform(raw, augment_gen)) if transform is not None else (lambda raw: raw)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "16")
    strategy.setup(stream, Context(device, log, augment))
    distributed.check_in_sync(strategy.model, "after setup")
    run = RunState(strategy, evaluator, log, checkpointer, augment_gen, scaler, resume, preemption)
    run.restore()
    pos = run.pos

    for i in range(pos.experience, len(stream)):
        exp = stream[i]
        data = strategy.train_dataset(exp)
        plan = plan_experience(trainer, stream, data, i)
        optimizer, scheduler, resuming = run.start_experience(exp, plan)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        pos.trainable_parameters = max(pos.trainable_parameters, sum(p.numel() for p in params if p.requires_grad))
        buffers = list(strategy.model.buffers()) if world > 1 else []
        n_batches, accumulate, per_epoch = plan.batches_per_epoch, plan.accumulate, plan.steps_per_epoch
        log({"event": "resume" if resuming else "experience_start", "experience": i, "of": len(stream),
             "iteration": pos.iteration, "iterations": plan.steps,
             "done": pos.epoch * per_epoch + pos.batch // accumulate})
        if not resuming:
            evaluator.experience_start(i, pos.iteration)
        strategy.model.train()
        pending = stop = False

        for epoch in range(pos.epoch, plan.epochs):
            pos.epoch = epoch
            batches = data.batches(plan.batch_size, shuffle=True, seed=epoch_seed(seed, i, epoch),
                                   drop_last=trainer.drop_last, start=pos.batch) if n_batches else []
            step_loss = 0.0
            for batch in batches:
                if pos.batch >= n_batches:
                    break
                if world > 1:
                    batch = batch.shard(*distributed.bounds(len(batch)))
                # one optimizer step = the micro-batches [first, last) (`accumulate`, fewer at an epoch's end);
                # each mean loss weighs by its share of the step's global samples, so the summed (and
                # rank-averaged) gradient is the mean over all of them
                first = pos.batch - pos.batch % accumulate
                last = min(first + accumulate, n_batches)
                samples = min(last * plan.batch_size, len(data)) - first * plan.batch_size
                step_loss += micro_batch(strategy, batch, len(batch) * world / samples, scaler, trainer.precision)
                pos.batch += 1
                if pos.batch < last:
                    continue

                value, stop = distributed.sync_step(params, buffers, step_loss, run.stop_requested)
                step_loss = 0.0
                if value != value or value in (float("inf"), float("-inf")):
                    good = checkpointer.path if checkpointer.path.exists() else "none written yet"
                    raise Diverged(f"The loss became {value} at iteration {pos.iteration + 1} (experience {i}, "
                                   f"epoch {epoch}; last good checkpoint: {good})")
                optimizer_step(strategy, optimizer, scheduler, scaler, trainer, params)
                pos.iteration += 1
                pos.loss_sum += value
                pos.loss_n += 1
                log.step()
                if pos.iteration % trainer.log_every == 0:
                    log({"event": "train", "iteration": pos.iteration, "experience": i, "epoch": epoch,
                         "loss": pos.loss_sum / pos.loss_n, "lr": optimizer.param_groups[0]["lr"]})
                    pos.loss_sum, pos.loss_n = 0.0, 0
                # the epoch's last update is evaluated after the epoch's hooks (`evaluator.epoch_end` below)
                evaluator.after_step(pos.iteration, i, epoch_step=-(-pos.batch // accumulate),
                                     epoch_end=pos.batch == n_batches)
                if stop or (trainer.checkpoint_every and pos.iteration % trainer.checkpoint_every == 0):
                    if pos.batch < n_batches:
                        run.save("mid", optimizer, scheduler)
                        if stop:
                            raise run.interrupted()
                    else:  # the epoch's last step: checkpoint after the epoch-end schedule step
                        pending = True
            pos.batch = 0
            if scheduler is not None and not per_iteration(scheduler, trainer):
                scheduler.step()
            strategy.after_epoch(epoch)
            if per_epoch and epoch < plan.epochs - 1:  # the last epoch's end is evaluated after after_experience
                evaluator.epoch_end(pos.iteration, i, per_epoch)
            if pending:
                pos.epoch, pending = epoch + 1, False
                run.save("mid", optimizer, scheduler)
                if stop:
                    raise run.interrupted()

        strategy.after_experience(exp)
        distributed.check_in_sync(strategy.model, f"after experience {i}")
        if per_epoch:  # the experience's last trace point: the model its accuracy-matrix row scores
            evaluator.epoch_end(pos.iteration, i, per_epoch)
        row = evaluator.end_of_experience(i, pos.iteration)
        log({"event": "experience_end", "experience": i, "iteration": pos.iteration, evaluator.score.primary: row})
        pos.experience, pos.epoch, pos.batch = i + 1, 0, 0
        run.save("end")
    return pos
