"""OPCM, orthogonal projection-based continual merging (Tang et al. 2025; the `opcm` method of
tanganke/fusion_bench, `fusion_bench/method/opcm/opcm.py`, read for the order of operations).

The first merge is the first fine-tuned model itself. For each later task vector τ_t:
1. its global norm ‖τ_t‖ (one L2 norm over every merged parameter, before projection) joins the
   running mean n̄_t of the task vectors' norms;
2. every matrix weight (`nn.Linear`; convolutions: see `conv`) is projected in the singular bases
   of that weight's current merged task vector M = θ⁽ᵗ⁻¹⁾ − θ₀ (full SVD, M = U S Vᵀ):
   P = Uᵀ τ V loses its whole diagonal and its top-left r×r block, where r counts the leading
   singular values whose cumulative share of Σσ stays ≤ α, and returns as U P Vᵀ. Every other
   parameter (biases, norms' affine weights) keeps its raw τ;
3. the sum S_t = λ_{t−1}·(θ⁽ᵗ⁻¹⁾ − θ₀) + τ̃_t (λ_{t−1}(θ⁽ᵗ⁻¹⁾ − θ₀) is the running sum of
   cleaned task vectors) is rescaled so its global norm is n̄_t: λ_t = ‖S_t‖/n̄_t and
   θ⁽ᵗ⁾ = θ₀ + S_t/λ_t.
State between merges: λ and the sum and count of norms (constant in T). Protocol, memory and
batch norm: `strategies/merging.py`.

Deliberate differences from the official code:
- `conv="reshape"` (default) projects a convolution's kernel as the out × (in/groups·k·k) matrix
  it applies to every patch: a k×k convolution is a linear map of patches (a 1×1 one is exactly
  a Linear per pixel), so the interference argument for projecting holds unchanged, and a CNN
  backbone (EfficientNet-Lite0 is all convolutions) would otherwise get no projection at all.
  `conv="skip"` is the official rule (Linear weights only).
- Every merged parameter is merged; the official per-leaf-module loop never merges a parameter
  held directly by a non-leaf module (CLIP's `class_embedding`, which keeps the first model's
  value and is only rescaled).
- The norm is over the merged parameters, not the whole state dict (the buffers left out have a
  zero task vector here: batch norm keeps θ₀'s statistics).
"""
from __future__ import annotations

from torch import Tensor

from cl.errors import UserError
from strategies.merging import ContinualMerging, global_norm, project_out


class OPCM(ContinualMerging):
    def __init__(self, model, optimizer, scheduler=None, alpha: float = 0.5, conv: str = "reshape"):
        super().__init__(model, optimizer, scheduler)
        if not 0 < alpha < 1:
            raise UserError(f"strategy.alpha={alpha} must be in (0, 1): the share of the merged task vector's "
                            "spectrum kept orthogonal (0.5 is the paper's default).")
        if conv not in ("reshape", "skip"):
            raise UserError(f"strategy.conv={conv!r} must be reshape (project kernels as out x in*k*k matrices) "
                            "or skip (Linear weights only, the official rule).")
        self.alpha, self.conv = float(alpha), conv
        self.lam, self.norm_sum = 1.0, 0.0

    def merge(self, tau: dict[str, Tensor]) -> dict[str, Tensor]:
        self.norm_sum += global_norm(tau.values())
        if self.merged is None:
            self.lam = 1.0
            return {n: self.base[n] + tau[n] for n in tau}
        mean_norm = self.norm_sum / (self.merges + 1)
        matrices = self.matrices()
        total = {}
        for n, t in tau.items():
            previous = self.merged[n] - self.base[n]
            if n in matrices:
                t = project_out(previous.flatten(1), t.flatten(1), self.alpha).view_as(t)
            total[n] = self.lam * previous + t
        self.lam = global_norm(total.values()) / mean_norm
        return {n: s.div_(self.lam).add_(self.base[n]) for n, s in total.items()}  # in place: one model less at peak

    def merge_state(self) -> dict:
        return {"lam": self.lam, "norm_sum": self.norm_sum}

    def load_merge_state(self, state: dict) -> None:
        self.lam, self.norm_sum = state["lam"], state["norm_sum"]

    def results(self) -> dict:
        return {**super().results(), "alpha": self.alpha, "conv": self.conv, "lambda": self.lam}
