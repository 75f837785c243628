"""The training loop, top to bottom in one function (`train`).

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

import os
import random
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cl import distributed
from cl.errors import Diverged, Interrupted, UserError, cannot_write
from cl.evaluation import Evaluator
from cl.loggers import RunLogger
from cl.runtime import autocast, epoch_seed
from cl.stream import Stream
from cl.strategy import Strategy

CHECKPOINT = "last.pt"


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


@dataclass
class Position:
    """Where a run is. `phase`: "mid" inside an experience, "end" after one."""

    experience: int = 0
    epoch: int = 0
    batch: int = 0
    iteration: int = 0
    phase: str = "start"
    loss_sum: float = 0.0  # the running loss since the last train event
    loss_n: int = 0


@dataclass
class Checkpointer:
    folder: Path
    log: RunLogger | None = None
    jsonl: object = None  # the JsonlLogger, for the offset to truncate to on resume
    written: list = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT

    def save(self, state: dict) -> Path:
        """Atomic: write a temporary file, then rename over the old checkpoint."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.jsonl is not None:
            state["metrics_offset"] = self.jsonl.offset()
        tmp = self.path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            tmp.unlink(missing_ok=True)
            raise cannot_write(self.path, e, self.folder.parent) from e
        return self.path

    @staticmethod
    def load(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
            raise UserError(
                f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it to restart "
                "that run from scratch, or resume from another run folder."
            ) from e


def _rng_state(augment_gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": augment_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Preemption:
    """SIGINT and SIGTERM (SLURM's preemption signal), and submitit's own preemption
    signal when submitit runs the job, ask the run to stop: the engine finishes the
    current optimizer step, writes a checkpoint and raises `Interrupted`. A handler
    that was installed before ours (submitit's requeue) is called after the checkpoint.
    A second signal of the same kind exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only
        wanted = [signal.SIGINT, signal.SIGTERM]
        submitit = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if submitit is not None and callable(signal.getsignal(submitit)):
            wanted.append(submitit)
        for s in wanted:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:
            raise SystemExit(128 + signum)
        self.signum = signum

    def forward(self) -> None:
        """After the checkpoint: let a handler installed before ours (submitit requeues the job) act."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(self.signum, None)


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
    device = evaluator.device
    rank, world = distributed.rank(), distributed.world()
    strategy.device = device
    strategy.log = log
    strategy.model.to(device)
    if trainer.compile:
        strategy.model.compile()
    # each rank augments its own share of the batch: its own generator (rank 0's is the single-process one)
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1 + 1_000_003 * rank)
    transform = stream.train_transform
    strategy.augment = (lambda raw: transform(raw, augment_gen)) if transform is not None else (lambda raw: raw)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "16")

    strategy.setup(stream)
    distributed.check_in_sync(strategy.model, "after setup")
    pos = Position()
    if resume is None:
        evaluator.initial()
    else:
        for key in ("rng", "experience_rng"):  # one random state per rank (a single one before DDP existed)
            if isinstance(resume.get(key), dict):
                resume[key] = [resume[key]]
        saved_world = len(resume["rng"])
        if saved_world != world:
            raise UserError(f"The run being resumed trained on {saved_world} process(es); resume it with the same "
                            f"number (torchrun --nproc_per_node={saved_world}), not {world}.")
        pos = Position(**resume["position"])
        evaluator.load_state_dict(resume["evaluator"])
        if pos.phase == "end":
            strategy.load_state_dict(resume["strategy"])
            _set_rng_state(resume["rng"][rank], augment_gen)
            log({"event": "resume", "experience": pos.experience, "iteration": pos.iteration})
    experience_rng = None  # random state when the current experience started (for mid-experience resumes)

    def interrupted() -> Interrupted:
        """The stop after a checkpoint (the signal may have reached another rank only)."""
        signum = preemption.signum if preemption is not None and preemption.signum else signal.SIGTERM
        return Interrupted(signum, pos.iteration, checkpointer.path,
                           preemption.forward if preemption is not None else None)

    def checkpoint(phase: str, optimizer=None, scheduler=None) -> None:
        pos.phase = phase
        rngs = distributed.gather_objects(_rng_state(augment_gen))  # one per rank
        starts = distributed.gather_objects(experience_rng) if phase == "mid" else None
        if not distributed.is_main():
            return
        state = {
            "position": asdict(pos),
            "strategy": strategy.state_dict(),
            "evaluator": evaluator.state_dict(),
            "rng": rngs,
            "wall_time": log.elapsed,
            "world_size": world,
        }
        if phase == "mid":
            state["experience_rng"] = starts
            state["optimizer"] = optimizer.state_dict()
            state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            state["scaler"] = scaler.state_dict()
        checkpointer.save(state)

    for i in range(pos.experience, len(stream)):
        exp = stream[i]
        resuming = resume is not None and pos.phase == "mid" and i == pos.experience
        if resuming:
            # replay the experience's start exactly as it happened, then overwrite with the saved state
            _set_rng_state(resume["experience_rng"][rank], augment_gen)
        experience_rng = _rng_state(augment_gen)
        # replaying a resumed experience's start: what the strategy logged then is already in metrics.jsonl
        strategy.log = (lambda event: None) if resuming else log
        strategy.before_experience(exp)
        strategy.log = log
        if resuming:
            strategy.load_state_dict(resume["strategy"])
        optimizer, scheduler = strategy.configure_optimizer(exp)
        if resuming:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            _set_rng_state(resume["rng"][rank], augment_gen)
        else:
            pos.epoch = pos.batch = pos.loss_n = 0
            pos.loss_sum = 0.0
        pos.experience = i
        params = [p for group in optimizer.param_groups for p in group["params"]]
        buffers = list(strategy.model.buffers()) if world > 1 else []

        data = strategy.train_dataset(exp)
        epochs = 1 if stream.online else trainer.epochs_at(i)
        batch_size = stream.batch_size if (stream.online and stream.batch_size) else trainer.batch_size
        if batch_size < world:
            raise UserError(f"The global batch ({batch_size}) is smaller than the number of processes ({world}); "
                            f"raise trainer.batch_size to at least {world}.")
        n_batches = data.num_batches(batch_size, trainer.drop_last) if len(data) else 0
        if world > 1 and n_batches and len(data) - (n_batches - 1) * batch_size < world:
            n_batches -= 1  # DDP: a last batch too small to give every rank a sample is not trained on
        accumulate = trainer.accumulate_grad_batches
        per_epoch = -(-n_batches // accumulate)  # optimizer steps per epoch
        log({"event": "resume" if resuming else "experience_start", "experience": i, "of": len(stream),
             "iteration": pos.iteration, "iterations": per_epoch * epochs,
             "done": pos.epoch * per_epoch + pos.batch // accumulate})
        if not resuming:
            evaluator.experience_start(i, pos.iteration)
        strategy.model.train()
        pending = stop = False

        for epoch in range(pos.epoch, epochs):
            pos.epoch = epoch
            batches = data.batches(batch_size, shuffle=True, seed=epoch_seed(seed, i, epoch),
                                   drop_last=trainer.drop_last, start=pos.batch) if len(data) else []
            group_loss = 0.0
            for batch in batches:
                if pos.batch >= n_batches:
                    break
                if world > 1:
                    batch = batch.shard(*distributed.bounds(len(batch)))
                batch = batch.to(device, non_blocking=True)
                if batch.raw is not None:
                    batch.x = strategy.augment(batch.raw)
                # one optimizer step = the micro-batches [first, last) (`accumulate`, fewer at an epoch's end)
                first = pos.batch - pos.batch % accumulate
                last = min(first + accumulate, n_batches)
                samples = min(last * batch_size, len(data)) - first * batch_size  # global samples in the step
                with autocast(device, trainer.precision):
                    loss = strategy.training_step(batch)
                # each (mean) loss weighs by its share of the step's samples; summed over micro-batches and
                # averaged over ranks, the gradient is the mean over all of them (1 with neither)
                weight = len(batch) * world / samples
                scaler.scale(loss * weight if weight != 1.0 else loss).backward()
                group_loss += float(loss.detach()) * weight
                pos.batch += 1
                if pos.batch < last:
                    continue

                stop = preemption is not None and preemption.signum is not None
                value, stop = distributed.sync_step(params, buffers, group_loss, stop)  # all ranks agree
                group_loss = 0.0
                if value != value or value in (float("inf"), float("-inf")):
                    good = checkpointer.path if checkpointer.path.exists() else "none written yet"
                    raise Diverged(f"The loss became {value} at iteration {pos.iteration + 1} (experience {i}, "
                                   f"epoch {epoch}; last good checkpoint: {good})")
                scaler.unscale_(optimizer)
                strategy.after_backward()
                if trainer.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                stepped = scaler.get_scale() >= scale  # fp16: a step with inf/nan gradients is skipped
                if stepped:
                    strategy.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                if stepped and scheduler is not None and trainer.scheduler_interval == "iteration":
                    scheduler.step()

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
                        checkpoint("mid", optimizer, scheduler)
                        if stop:
                            raise interrupted()
                    else:  # the epoch's last step: checkpoint after the epoch-end schedule step
                        pending = True
            pos.batch = 0
            if scheduler is not None and trainer.scheduler_interval == "epoch":
                scheduler.step()
            strategy.after_epoch(epoch)
            if per_epoch and epoch < epochs - 1:  # the last epoch's end is evaluated after after_experience
                evaluator.epoch_end(pos.iteration, i, per_epoch)
            if pending:
                pos.epoch, pending = epoch + 1, False
                checkpoint("mid", optimizer, scheduler)
                if stop:
                    raise interrupted()

        strategy.after_experience(exp)
        distributed.check_in_sync(strategy.model, f"after experience {i}")
        if per_epoch:  # the experience's last trace point: the model its accuracy-matrix row scores
            evaluator.epoch_end(pos.iteration, i, per_epoch)
        row = evaluator.end_of_experience(i, pos.iteration)
        log({"event": "experience_end", "experience": i, "iteration": pos.iteration, "accuracy": row})
        pos.experience, pos.epoch, pos.batch = i + 1, 0, 0
        checkpoint("end")
    return pos
