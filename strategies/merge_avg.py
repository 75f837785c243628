"""Continual weight averaging (FusionBench's `ContinualWeightAverageForCLIP`): after t merges the
merged model is the running mean of the t fine-tuned models, θ⁽ᵗ⁾ = ((t−1)·θ⁽ᵗ⁻¹⁾ + θ_t)/t,
i.e. θ₀ plus the mean task vector. The first merge is the first fine-tuned model itself.
Protocol, memory and batch norm: `strategies/merging.py`.

Deliberate difference from the official code: it averages every parameter with
`requires_grad` of the vision encoder; here every merged parameter (all but the per-task heads).
"""
from __future__ import annotations

from torch import Tensor

from strategies.merging import ContinualMerging


class MergeAverage(ContinualMerging):
    def merge(self, tau: dict[str, Tensor]) -> dict[str, Tensor]:
        t = self.merges + 1
        if self.merged is None:
            return {n: self.base[n] + tau[n] for n in tau}
        return {n: self.base[n] + ((t - 1) * (self.merged[n] - self.base[n]) + tau[n]) / t for n in tau}
