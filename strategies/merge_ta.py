"""Continual task arithmetic (FusionBench's `ContinualTaskArithmeticForCLIP`): the merged model
starts at θ₀ and every task vector is added with one fixed scaling λ, θ⁽ᵗ⁾ = θ₀ + λ·Σᵢ τ_i
(the first model is scaled too). λ = 0.3 is the official default for 8 tasks (0.1 for 14 and 20).
Protocol, memory and batch norm: `strategies/merging.py`.
"""
from __future__ import annotations

from torch import Tensor

from strategies.merging import ContinualMerging


class MergeTaskArithmetic(ContinualMerging):
    def __init__(self, model, optimizer, scheduler=None, scaling: float = 0.3):
        super().__init__(model, optimizer, scheduler)
        self.scaling = float(scaling)

    def merge(self, tau: dict[str, Tensor]) -> dict[str, Tensor]:
        merged = self.merged if self.merged is not None else self.base
        return {n: merged[n] + self.scaling * tau[n] for n in tau}
