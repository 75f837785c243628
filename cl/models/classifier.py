"""A backbone plus an incremental linear head."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class IncrementalClassifier(nn.Module):
    """A linear head whose outputs grow with the classes seen. Growing keeps the
    rows of the old classes; new rows get the usual `nn.Linear` init."""

    def __init__(self, in_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.bias = bias
        self.fc: nn.Linear | None = None
        # follows the module's device and dtype, so rows grown later land there too
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def out_features(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def grow(self, num_classes: int) -> bool:
        """Make room for `num_classes` outputs; returns whether the head changed."""
        old = self.fc
        if num_classes <= self.out_features:
            return False
        fc = nn.Linear(self.in_features, num_classes, bias=self.bias)
        fc = fc.to(device=self._anchor.device, dtype=self._anchor.dtype)
        if old is not None:
            with torch.no_grad():
                fc.weight[: old.out_features].copy_(old.weight)
                if self.bias:
                    fc.bias[: old.out_features].copy_(old.bias)
        self.fc = fc
        return True

    def forward(self, features: Tensor) -> Tensor:
        if self.fc is None:
            return features.new_zeros(features.shape[0], 0)
        return self.fc(features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "fc.weight"
        if key in state_dict:
            self.grow(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Classifier(nn.Module):
    """`backbone` (a module, or a factory taking `input_shape`) followed by an incremental head.
    With `fixed_head=True` the head has every class of the stream from the first
    experience on, and cross-entropy also pushes down the logits of future classes."""

    def __init__(self, backbone: nn.Module | Callable[..., nn.Module], input_shape, head_bias: bool = True,
                 fixed_head: bool = False):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, nn.Module) else backbone(input_shape=tuple(input_shape))
        self.head = IncrementalClassifier(self.backbone.num_features, bias=head_bias)
        self.fixed_head = fixed_head  # all classes' outputs from the start (Mammoth's convention)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def grow(self, num_classes: int) -> bool:
        return self.head.grow(num_classes)

    def describe(self) -> dict:
        describe = getattr(self.backbone, "describe", None)
        return describe() if describe else {"backbone": type(self.backbone).__name__, "pretrained": None}
