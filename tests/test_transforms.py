"""Batched device-side augmentation."""
from __future__ import annotations

import torch

from cl import transforms as T


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = T.RandomCrop(6, padding=2)(x, gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[n, :, i:i + 6, j:j + 6], out[n])]
        assert hits, "each output must be a 6x6 window of the padded input"
    assert out.shape == x.shape


def test_random_crop_works_on_uint8_and_is_reproducible():
    x = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    a, b = T.RandomCrop(8, 2)(x, gen(3)), T.RandomCrop(8, 2)(x, gen(3))
    assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_flip_flips_about_half_and_only_horizontally():
    x = torch.rand(400, 1, 3, 5)
    out = T.RandomHorizontalFlip()(x, gen())
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert torch.all(flipped ^ same)
    assert 150 < int(flipped.sum()) < 250


def test_random_resized_crop_with_full_box_is_identity():
    x = torch.rand(4, 3, 16, 16)
    rrc = T.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(rrc(x, gen()), x, atol=1e-5)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    rrc = T.RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    top, left, h, w = rrc.boxes(2000, 64, 64, gen()).unbind(1)
    area = h * w / (64 * 64)
    assert torch.all(area > 0.22) and torch.all(area < 0.53)
    assert torch.all(top >= 0) and torch.all(left >= 0) and torch.all(top + h <= 64) and torch.all(left + w <= 64)
    out = rrc(torch.rand(5, 3, 64, 64), gen())
    assert out.shape == (5, 3, 8, 8)


def test_random_resized_crop_samples_the_chosen_box():
    # a horizontal ramp: the crop's mean column value tells where the box was
    x = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64).contiguous()
    rrc = T.RandomResizedCrop(16, scale=(0.1, 0.2), ratio=(1.0, 1.0))
    g = gen(7)
    box = rrc.boxes(1, 64, 64, gen(7))[0]
    out = rrc(x, g)
    left, w = float(box[1]), float(box[3])
    centre = (left + w / 2) / 64
    assert abs(float(out.mean()) - centre) < 0.02


def test_resize_and_center_crop_match_the_vit_test_recipe_shapes():
    t = T.resize_center_crop(256, 224)
    out = t(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32 and out.max() <= 1.0


def test_normalize_and_to_float():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(T.to_float()(x), torch.ones(1, 3, 2, 2))
    out = T.to_float(mean=[0.5] * 3, std=[0.25] * 3)(x)
    assert torch.allclose(out, torch.full_like(out, 2.0))
