"""Learning-rate schedules that know where an experience sits in the stream.

A strategy builds a new optimizer, and so a new scheduler, for every experience. torch's
schedulers therefore restart with each experience. The schedules here are told the experience's
`Plan` (`start(plan)`: which experience of how many, and its optimizer steps), so one can restart
inside each experience (re-warm and re-decay) or span experiences (the infinite schedule never
re-warms). They step once per optimizer step whatever `trainer.scheduler_interval` says, and their
factor is a pure function of (step within the experience, plan), `factor`, which the tests check
against the closed forms. The learning rate is the optimizer's lr times the factor.

Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language
Models") compare re-warming + re-decaying a cosine schedule at every new dataset with "infinite"
schedules: one warm-up and cooldown to a constant rate, kept across datasets, and an annealing
phase at the end.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler

from cl.errors import UserError


def _steps(value: float | int, total: int, what: str) -> int:
    """A phase length: a fraction of `total` steps (a float below 1) or a number of steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"scheduler.{what} must be a fraction of the steps (0 <= x < 1) or a number of steps, "
                        f"got {value!r}.")
    return int(round(value * total)) if isinstance(value, float) and value < 1 else int(value)


class Schedule(LRScheduler):
    """Base: lr = base lr × `factor(step, plan)`, `step` counting this experience's optimizer steps."""

    def __init__(self, optimizer):
        self.plan = None
        super().__init__(optimizer)

    def start(self, plan) -> None:
        """The experience's plan (engine counts): set the rate for its first step."""
        self.plan = plan
        self._last_lr = [base * self.factor(self.last_epoch, plan) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_lr(self) -> list[float]:
        scale = 1.0 if self.plan is None else self.factor(self.last_epoch, self.plan)
        return [base * scale for base in self.base_lrs]

    def factor(self, step: int, plan) -> float:
        raise NotImplementedError


class WarmupCosine(Schedule):
    """Re-warm and re-decay, restarted in every experience (Ibrahim et al.: warm-up over 1% of a
    dataset's iterations from 0, cosine to η_min = 0.1·η_max, optimizer state reset): a linear
    warm-up over `warmup` of the experience's steps from `warmup_from` × lr to lr, then a cosine
    decay to `min_ratio` × lr at the experience's last step. factor(s) = warmup_from + (1 -
    warmup_from)·(s + 1)/W for s < W; min_ratio + (1 - min_ratio)·½(1 + cos(π·(s - W)/(S - W)))
    after, S the experience's steps. The warm-up's first step already moves ((s + 1)/W: the
    authors' code gives step 0 a rate of 0)."""

    def __init__(self, optimizer, warmup: float | int = 0.01, min_ratio: float = 0.1, warmup_from: float = 0.0):
        self.warmup, self.min_ratio, self.warmup_from = warmup, float(min_ratio), float(warmup_from)
        super().__init__(optimizer)

    def factor(self, step: int, plan) -> float:
        total = max(plan.steps, 1)
        warm = min(_steps(self.warmup, total, "warmup"), total)
        if step < warm:
            return self.warmup_from + (1 - self.warmup_from) * (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Constant(Schedule):
    """A constant rate, after a linear warm-up over the first experience's first `warmup` steps
    (none by default); never re-warmed."""

    def __init__(self, optimizer, warmup: float | int = 0):
        self.warmup = warmup
        super().__init__(optimizer)

    def factor(self, step: int, plan) -> float:
        warm = _steps(self.warmup, max(plan.steps, 1), "warmup") if plan.experience == 0 else 0
        return (step + 1) / warm if step < warm else 1.0


class Infinite(Schedule):
    """Ibrahim et al.'s infinite schedule, spanning the stream (the authors' code: EleutherAI
    gpt-neox fork, megatron/learning_rates.py): in the first experience a linear warm-up over
    `warmup` of its steps, then a cooldown over `cooldown` of its steps from lr to
    `constant_ratio` × lr; then constant through every later experience (no re-warming); and an
    exponential annealing to `min_ratio` × lr over the final `anneal` of the last experience's
    steps: c·(min/c)^k, k rising to 1 at its last step (`anneal_shape=linear`: a straight line).
    Cooldown shapes (x the cooldown's progress in (0, 1], c the constant ratio):
    cosine c + (1 - c)·½(1 + cos πx); inverse_sqrt 1 + (c - 1)·h(x)/h(1), h(x) = (1 + αx)^-½ - 1,
    α = `timescale`; linear 1 + (c - 1)·x. Defaults are the authors' (η_const = 1.65e-4 of
    η_max 3e-4 and η_min 3e-5 is 0.55; cooldown 60%, annealing after 85%; α = 1).

    Difference from the authors' code: there each dataset is a run of its own that anneals at its
    end, and the next dataset continues from the checkpoint saved before annealing. Here one run
    covers the stream and only its last experience anneals (`anneal=0`: none), so every
    experience-end evaluation before the last scores the constant-rate model."""

    def __init__(self, optimizer, warmup: float | int = 0.01, cooldown: float | int = 0.6,
                 constant_ratio: float = 0.55, anneal: float | int = 0.15, min_ratio: float = 0.1,
                 cooldown_shape: str = "cosine", anneal_shape: str = "exponential", timescale: float = 1.0):
        if cooldown_shape not in ("cosine", "inverse_sqrt", "linear"):
            raise UserError(f"scheduler.cooldown_shape must be cosine, inverse_sqrt or linear, not {cooldown_shape!r}.")
        if anneal_shape not in ("exponential", "linear"):
            raise UserError(f"scheduler.anneal_shape must be exponential or linear, not {anneal_shape!r}.")
        if not 0 < min_ratio <= constant_ratio <= 1:
            raise UserError(f"scheduler needs 0 < min_ratio <= constant_ratio <= 1, got min_ratio={min_ratio}, "
                            f"constant_ratio={constant_ratio}.")
        self.warmup, self.cooldown, self.anneal = warmup, cooldown, anneal
        self.constant_ratio, self.min_ratio = float(constant_ratio), float(min_ratio)
        self.cooldown_shape, self.anneal_shape, self.timescale = cooldown_shape, anneal_shape, float(timescale)
        super().__init__(optimizer)

    def factor(self, step: int, plan) -> float:
        total = max(plan.steps, 1)
        c = self.constant_ratio
        if plan.experience == plan.experiences - 1:
            ann = _steps(self.anneal, total, "anneal")
            if ann and step >= total - ann:
                k = (step - (total - ann) + 1) / ann  # in (0, 1]
                return c * (self.min_ratio / c) ** k if self.anneal_shape == "exponential" else c + (self.min_ratio - c) * k
        if plan.experience == 0:
            warm = _steps(self.warmup, total, "warmup")
            cool = _steps(self.cooldown, total, "cooldown")
            if step < warm:
                return (step + 1) / warm
            if step < warm + cool:
                x = (step - warm + 1) / cool  # in (0, 1]
                if self.cooldown_shape == "cosine":
                    return c + (1 - c) * 0.5 * (1 + math.cos(math.pi * x))
                if self.cooldown_shape == "linear":
                    return 1 + (c - 1) * x

                def h(v):
                    return (1 + self.timescale * v) ** -0.5 - 1

                return 1 + (c - 1) * h(x) / h(1)
        return c
