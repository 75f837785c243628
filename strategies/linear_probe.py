"""Linear probes on the frozen pretrained model: the merging papers' "pretrained" baseline when no
zero-shot head exists (a CNN, or CLIP without its text tower). Each task trains only its own head
on θ₀'s features; nothing is merged, so every row of the accuracy matrix is θ₀ with the heads so
far. Same protocol as the merging strategies (strategies/merging.py), with the backbone frozen.
"""
from __future__ import annotations

from torch import Tensor

from strategies.merging import ContinualMerging


class LinearProbe(ContinualMerging):
    def parameters_to_optimize(self):
        return [p for n, p in self.model.named_parameters() if n.startswith("head.")]

    def merge(self, tau: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(self.base)
