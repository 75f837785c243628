"""Strategies that misbehave on purpose, for the resume and bad-input tests."""
from __future__ import annotations

import os

import torch

from strategies.clr import CLR
from strategies.dst import DST
from strategies.mos import MOS
from strategies.replay import DERPP, ER, ERACE


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


class NaNLoss(ER):
    """ER whose loss turns NaN at step `at`."""

    def __init__(self, *args, at: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at
        self.steps = 0

    def training_step(self, batch):
        self.steps += 1
        loss = super().training_step(batch)
        return loss * torch.tensor(float("nan")) if self.steps >= self.at else loss
