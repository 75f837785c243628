from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then Linear+ReLU layers; the features are the last hidden layer."""

    def __init__(self, input_shape, hidden=(400, 400), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.num_features = width
        self.hidden = list(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def describe(self) -> dict:
        return {"backbone": f"mlp{'x'.join(map(str, self.hidden))}", "pretrained": None}
