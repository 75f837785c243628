"""MobileNetV2 (Sandler et al. 2018) with the CIFAR stem: a stride-1 3×3 stem and
stride 1 in the second stage, so a 32×32 input ends at 4×4. Bias-free
convolutions, batch norm, ReLU6, inverted residual blocks; `width` scales the
channels (0.25 for smoke tests)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# (expansion, out channels, blocks, stride) as in the paper, second stage stride 1 for 32 px
CIFAR_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + ([nn.ReLU6(inplace=True)] if act else [])


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = _conv_bn(cin, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), width: float = 1.0, last_channels: int = 1280):
        super().__init__()
        self.width = width
        c = max(8, int(32 * width))
        layers = _conv_bn(input_shape[0], c, 3)
        for expansion, out, blocks, stride in CIFAR_STAGES:
            out = max(8, int(out * width))
            for b in range(blocks):
                layers.append(InvertedResidual(c, out, stride if b == 0 else 1, expansion))
                c = out
        self.num_features = max(c, int(last_channels * width))
        layers += _conv_bn(c, self.num_features, 1)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def describe(self) -> dict:
        return {"backbone": f"mobilenet_v2_cifar(width={self.width})", "pretrained": None}
