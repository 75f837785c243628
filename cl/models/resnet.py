"""The reduced ResNet-18 of the CL literature (Lopez-Paz & Ranzato 2017, GEM):
a CIFAR stem (one 3×3 conv, stride 1, no max-pool), four stages of two basic
blocks with widths nf, 2nf, 4nf, 8nf, global average pooling. nf=20 is the
"reduced" network; nf=64 is the full-width CIFAR ResNet-18 Mammoth uses."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), nf: int = 20, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.nf = nf
        self.conv1 = conv3x3(input_shape[0], nf)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, n in enumerate(blocks):
            cout = nf * 2**i
            layers = []
            for b in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def describe(self) -> dict:
        return {"backbone": f"reduced_resnet18(nf={self.nf})", "pretrained": None}
