"""Checkpoints, random states, preemption and resume: what makes a stopped run
continue with the same batches, the same augmentations and the same numbers.

`RunState` is the engine's one handle on all of it. `train()` calls it twice for
a resume: `restore()` at the start of the run, and `start_experience()` at the
start of each experience, which replays a half-done experience's start with the
random state it had then and loads the saved optimizer, scheduler, scaler and
random state over it; the position it restores says at which epoch and batch the
loop continues.

A checkpoint at an experience's end ("end") holds the strategy, the evaluator and
every rank's random state; one inside an experience ("mid") also holds the
optimizer, scheduler and grad scaler, and the random state at the experience's start.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cl import distributed
from cl.errors import Interrupted, UserError, cannot_write

CHECKPOINT = "last.pt"


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
    trainable_parameters: int = 0  # the most parameters an experience's optimizer updated


@dataclass
class Checkpointer:
    folder: Path
    jsonl: object = None  # the JsonlLogger, for the offset to truncate to on resume

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


def rng_state(augment_gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": augment_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, augment_gen: torch.Generator) -> None:
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


class RunState:
    """The run's position, its checkpoints and its resume (see the module docstring)."""

    def __init__(self, strategy, evaluator, log, checkpointer: Checkpointer, augment_gen: torch.Generator,
                 scaler, resume: dict | None = None, preemption: Preemption | None = None):
        self.strategy, self.evaluator, self.log = strategy, evaluator, log
        self.checkpointer, self.augment_gen, self.scaler = checkpointer, augment_gen, scaler
        self.resume, self.preemption = resume, preemption
        self.pos = Position()
        self.experience_rng = None  # random state when the current experience started (for mid-experience resumes)

    def restore(self) -> None:
        """At the run's start: the untrained model's evaluation, or the saved position and evaluator
        (and, for a run stopped between experiences, the strategy and random state)."""
        resume, rank = self.resume, distributed.rank()
        if resume is None:
            self.evaluator.initial()
            return
        for key in ("rng", "experience_rng"):  # one random state per rank (a single one before DDP existed)
            if isinstance(resume.get(key), dict):
                resume[key] = [resume[key]]
        saved_world = len(resume["rng"])
        if saved_world != distributed.world():
            raise UserError(f"The run being resumed trained on {saved_world} process(es); resume it with the same "
                            f"number (torchrun --nproc_per_node={saved_world}), not {distributed.world()}.")
        self.pos = Position(**resume["position"])
        self.evaluator.load_state_dict(resume["evaluator"])
        if self.pos.phase == "end":
            self.strategy.load_state_dict(resume["strategy"])
            set_rng_state(resume["rng"][rank], self.augment_gen)
            self.log({"event": "resume", "experience": self.pos.experience, "iteration": self.pos.iteration})

    def start_experience(self, exp, plan):
        """`before_experience` and the experience's optimizer; a half-done experience is replayed
        from its start and the saved state loaded over it. -> (optimizer, scheduler, resuming)"""
        pos, resume, rank = self.pos, self.resume, distributed.rank()
        resuming = resume is not None and pos.phase == "mid" and exp.index == pos.experience
        if resuming:
            set_rng_state(resume["experience_rng"][rank], self.augment_gen)
        self.experience_rng = rng_state(self.augment_gen)
        with self.log.muted(resuming):  # what the strategy logged then is already in metrics.jsonl
            self.strategy.before_experience(exp, plan)
        if resuming:
            self.strategy.load_state_dict(resume["strategy"])
        optimizer, scheduler = self.strategy.configure_optimizer(exp)
        if resuming:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            self.scaler.load_state_dict(resume["scaler"])
            set_rng_state(resume["rng"][rank], self.augment_gen)
        else:
            pos.epoch = pos.batch = pos.loss_n = 0
            pos.loss_sum = 0.0
        pos.experience = exp.index
        return optimizer, scheduler, resuming

    @property
    def stop_requested(self) -> bool:
        return self.preemption is not None and self.preemption.signum is not None

    def save(self, phase: str, optimizer=None, scheduler=None) -> None:
        self.pos.phase = phase
        rngs = distributed.gather_objects(rng_state(self.augment_gen))  # one per rank
        starts = distributed.gather_objects(self.experience_rng) if phase == "mid" else None
        if not distributed.is_main():
            return
        state = {
            "position": asdict(self.pos),
            "strategy": self.strategy.state_dict(),
            "evaluator": self.evaluator.state_dict(),
            "rng": rngs,
            "wall_time": self.log.elapsed,
            "world_size": distributed.world(),
        }
        if phase == "mid":
            state["experience_rng"] = starts
            state["optimizer"] = optimizer.state_dict()
            state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            state["scaler"] = self.scaler.state_dict()
        self.checkpointer.save(state)

    def interrupted(self) -> Interrupted:
        """The stop after a checkpoint (the signal may have reached another rank only)."""
        p = self.preemption
        signum = p.signum if p is not None and p.signum else signal.SIGTERM
        return Interrupted(signum, self.pos.iteration, self.checkpointer.path, p.forward if p is not None else None)
