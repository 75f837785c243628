"""Strategies that misbehave on purpose, for the resume and bad-input tests."""
from __future__ import annotations

import os

import torch

from strategies.clr import CLR
from strategies.dst import DST
from strategies.finetune import Finetune
from strategies.hft import HFT
from strategies.lcia import LCIA
from strategies.lm_replay import LMReplay
from strategies.lora import SeqLoRA
from strategies.mos import MOS
from strategies.opcm import OPCM
from strategies.replay import DERPP, ER, ERACE
from strategies.token_replay import TokenReplay


class Crash:
    """Mixin: die after optimizer step `Crash.crash_at` (set by the test), or, in a
    subprocess, at the step named by $CL_TEST_KILL_AT with os._exit: no cleanup, no
    flush, like SIGKILL."""

    crash_at: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def after_optimizer_step(self):
        self.steps += 1
        if os.environ.get("CL_TEST_KILL_AT") == str(self.steps):
            os._exit(9)
        if Crash.crash_at is not None and self.steps == Crash.crash_at:
            raise KeyboardInterrupt("simulated kill")
        super().after_optimizer_step()


class CrashingER(Crash, ER):
    pass


class CrashingDERPP(Crash, DERPP):
    pass


class CrashingERACE(Crash, ERACE):
    pass


class CrashingDST(Crash, DST):
    pass


class CrashingCLR(Crash, CLR):
    pass


class CrashingMOS(Crash, MOS):
    pass


class CrashingHFT(Crash, HFT):
    pass


class CrashingLCIA(Crash, LCIA):
    pass


class CrashingLMReplay(Crash, LMReplay):
    pass


class CrashingSeqLoRA(Crash, SeqLoRA):
    pass


class CrashingTokenReplay(Crash, TokenReplay):
    pass


class CrashingFinetune(Crash, Finetune):
    pass


class CrashingOPCM(Crash, OPCM):
    pass


class NaNLoss(ER):
    """ER whose loss turns NaN at step `at` (only while the learning rate is above `max_lr`, if given)."""

    def __init__(self, *args, at: int = 3, max_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.max_lr = at, max_lr
        self.steps = 0

    def training_step(self, batch):
        self.steps += 1
        loss = super().training_step(batch)
        too_high = self.max_lr is None or self.optimizer.param_groups[0]["lr"] > self.max_lr
        return loss * torch.tensor(float("nan")) if self.steps >= self.at and too_high else loss


def train_experience(strategy, exp, steps: int, batch_size: int = 4) -> None:
    """One experience through the hooks in the engine's order (no evaluator, no logger)."""
    strategy.before_experience(exp)
    strategy.configure_optimizer(exp)
    strategy.model.train()
    batches = list(exp.train.batches(batch_size, shuffle=True, seed=exp.index))
    for step in range(steps):
        loss = strategy.training_step(batches[step % len(batches)].to(strategy.device))
        loss.backward()
        strategy.after_backward()
        strategy.optimizer.step()
        strategy.after_optimizer_step()
        strategy.optimizer.zero_grad(set_to_none=True)
    strategy.after_experience(exp)


class SlowER(ER):
    """ER that, with $CL_TEST_SLOW set, takes 30 ms more per step (the numbers are ER's):
    a run long enough to signal at a random moment."""

    def after_optimizer_step(self):
        if os.environ.get("CL_TEST_SLOW"):
            import time

            time.sleep(0.03)
        super().after_optimizer_step()
