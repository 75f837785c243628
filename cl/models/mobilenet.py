"""MobileNetV2 (Sandler et al. 2018) as the DST authors' `models.MobileNetV2`
(CL-with-DST), the network of their CIFAR-100 and miniImageNet runs: the ImageNet
layout unchanged on small images, so the stem and the second stage have stride 2 and
a 32×32 input ends at 1×1; every inverted residual block has its 1×1 expansion conv,
also when the expansion factor is 1; the last 1×1 conv has `last_channels` (1280)
outputs whatever the width. 52 convolutions (bias-free) + the classifier's linear
layer = 54 conv/linear layers. Batch norm, ReLU6; `width` scales the other channels
(`int(c·width)`, as the official `width_mult`; 0.25 for smoke tests)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# (expansion, out channels, blocks, stride of the first block)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + ([nn.ReLU6(inplace=True)] if act else [])


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.block = nn.Sequential(*_conv_bn(cin, hidden, 1), *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   *_conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), width: float = 1.0, last_channels: int = 1280):
        super().__init__()
        self.width = width
        c = int(32 * width)
        layers = _conv_bn(input_shape[0], c, 3, stride=2)
        for expansion, out, blocks, stride in STAGES:
            out = int(out * width)
            for b in range(blocks):
                layers.append(InvertedResidual(c, out, stride if b == 0 else 1, expansion))
                c = out
        self.num_features = last_channels
        layers += _conv_bn(c, last_channels, 1)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def describe(self) -> dict:
        return {"backbone": f"mobilenet_v2(width={self.width})", "pretrained": None}
