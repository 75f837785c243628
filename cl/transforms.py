"""Batched, device-side augmentation.

Each transform maps a batch N×C×H×W to a batch and draws its randomness from a
`torch.Generator` passed in by the engine, so a run (and a resumed run) sees the
same augmentations. Geometric transforms that resample work in float; crops and
flips work on uint8 too. Nothing here loops over samples in Python.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class Transform:
    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x, generator=None):
        for t in self.transforms:
            x = t(x, generator)
        return x


class ToFloat(Transform):
    """uint8 [0, 255] -> float [0, 1]."""

    def __call__(self, x, generator=None):
        return _float(x)


class Normalize(Transform):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, x, generator=None):
        x = _float(x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, generator=None):
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < self.p
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class RandomCrop(Transform):
    """Zero-pad by `padding`, then cut a random `size` window per sample."""

    def __init__(self, size, padding: int = 0):
        self.size = _pair(size)
        self.padding = int(padding)

    def __call__(self, x, generator=None):
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        n, _, h, w = x.shape
        th, tw = self.size
        oy = torch.randint(0, h - th + 1, (n,), generator=generator, device=x.device)
        ox = torch.randint(0, w - tw + 1, (n,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(th, device=x.device))[:, :, None]  # n, th, 1
        cols = (ox[:, None] + torch.arange(tw, device=x.device))[:, None, :]  # n, 1, tw
        batch = torch.arange(n, device=x.device)[:, None, None]
        return x[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # n, th, tw, c -> n, c, th, tw


class Resize(Transform):
    """Resize so the shorter side is `size` (an int), or to exactly (h, w)."""

    def __init__(self, size, antialias: bool = True):
        self.size = size
        self.antialias = antialias

    def __call__(self, x, generator=None):
        h, w = x.shape[-2:]
        if isinstance(self.size, int):
            if h <= w:
                out = (self.size, max(1, int(self.size * w / h)))
            else:
                out = (max(1, int(self.size * h / w)), self.size)
        else:
            out = _pair(self.size)
        if tuple(out) == (h, w):
            return x
        return F.interpolate(_float(x), size=out, mode="bilinear", align_corners=False, antialias=self.antialias)


class CenterCrop(Transform):
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, x, generator=None):
        h, w = x.shape[-2:]
        th, tw = self.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return x[..., top : top + th, left : left + tw]


class RandomResizedCrop(Transform):
    """Per-sample random area/aspect crop resized to `size`, for the whole batch at once.

    Boxes are drawn as torchvision draws them (10 tries, then a centre crop of the
    clamped aspect ratio); the resampling is bilinear through one `grid_sample`.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10):
        self.size = _pair(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.tries = tries

    def boxes(self, n: int, h: int, w: int, generator=None, device=None) -> Tensor:
        """n×4 boxes (top, left, height, width) in pixels."""
        area = h * w
        k = self.tries
        target = area * torch.empty(n, k, device=device).uniform_(*self.scale, generator=generator)
        log_r = torch.empty(n, k, device=device).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator
        )
        r = torch.exp(log_r)
        cw = torch.sqrt(target * r).round()
        ch = torch.sqrt(target / r).round()
        ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
        # fallback: whole image at the clamped ratio
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            fw, fh = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fh, fw = h, int(round(h * max(self.ratio)))
        else:
            fw, fh = w, h
        pick = first.clamp(min=0)[:, None]
        bw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((n,), float(fw), device=device))
        bh = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((n,), float(fh), device=device))
        u = torch.rand(n, 2, device=device, generator=generator)
        top = torch.floor(u[:, 0] * (h - bh + 1))
        left = torch.floor(u[:, 1] * (w - bw + 1))
        top = torch.where(first >= 0, top, torch.full_like(top, float((h - fh) // 2)))
        left = torch.where(first >= 0, left, torch.full_like(left, float((w - fw) // 2)))
        return torch.stack([top, left, bh, bw], 1)

    def __call__(self, x, generator=None):
        x = _float(x)
        n, _, h, w = x.shape
        top, left, bh, bw = self.boxes(n, h, w, generator, x.device).unbind(1)
        # affine map from output [-1, 1] to the box, in align_corners=False coordinates
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = bw / w
        theta[:, 0, 2] = (2 * left + bw) / w - 1
        theta[:, 1, 1] = bh / h
        theta[:, 1, 2] = (2 * top + bh) / h - 1
        grid = F.affine_grid(theta, (n, x.shape[1], *self.size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---- the usual pipelines, for configs ----------------------------------------------------

def _finish(steps: list, mean, std) -> Compose:
    steps.append(Normalize(mean, std) if mean is not None else ToFloat())
    return Compose(steps)


def to_float(mean=None, std=None) -> Compose:
    """uint8 -> float in [0, 1], then normalised if `mean`/`std` are given."""
    return _finish([], mean, std)


def crop_flip(size, padding: int = 4, flip: bool = True, mean=None, std=None) -> Compose:
    """The CIFAR recipe: random crop with zero padding, horizontal flip."""
    steps: list = [RandomCrop(size, padding)]
    if flip:
        steps.append(RandomHorizontalFlip())
    return _finish(steps, mean, std)


def random_resized_crop_flip(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, mean=None, std=None) -> Compose:
    """The ImageNet/ViT train recipe: RandomResizedCrop then horizontal flip."""
    steps: list = [RandomResizedCrop(size, scale, ratio)]
    if flip:
        steps.append(RandomHorizontalFlip())
    return _finish(steps, mean, std)


def resize_center_crop(resize, size, mean=None, std=None) -> Compose:
    """The ImageNet/ViT test recipe: Resize (shorter side) then CenterCrop."""
    return _finish([Resize(resize), CenterCrop(size)], mean, std)
