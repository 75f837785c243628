"""Backbones and the incremental head."""
from __future__ import annotations

import time

import pytest
import torch

from cl.errors import UserError
from cl.models import MLP, Classifier, IncrementalClassifier, ReducedResNet18, TimmBackbone


def test_head_growth_keeps_old_rows_and_adds_new_ones():
    head = IncrementalClassifier(5)
    assert head(torch.randn(3, 5)).shape == (3, 0)
    assert head.grow(2) and head.out_features == 2
    w, b = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    assert not head.grow(2)  # no change when nothing new
    assert head.grow(5) and head.fc.weight.shape == (5, 5)
    assert torch.equal(head.fc.weight[:2], w) and torch.equal(head.fc.bias[:2], b)
    x = torch.randn(4, 5)
    assert torch.allclose(head(x)[:, :2], x @ w.T + b)


def test_head_state_dict_loads_into_a_smaller_head():
    big = IncrementalClassifier(3)
    big.grow(4)
    small = IncrementalClassifier(3)
    small.load_state_dict(big.state_dict())
    assert small.out_features == 4 and torch.equal(small.fc.weight, big.fc.weight)


def test_classifier_grows_with_classes_and_keeps_features():
    model = Classifier(lambda input_shape: MLP(input_shape, hidden=[8]), input_shape=(1, 4, 4))
    model.grow(3)
    assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert model.features(torch.rand(2, 1, 4, 4)).shape == (2, 8)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_reduced_resnet18_shapes_and_width(shape):
    net = ReducedResNet18(shape, nf=20)
    assert net(torch.rand(2, *shape)).shape == (2, 160)
    n_params = sum(p.numel() for p in net.parameters())
    assert 1.0e6 < n_params < 1.3e6  # the reduced ResNet-18 has about 1.1M parameters


def test_timm_backbone_builds_offline_without_weights():
    net = TimmBackbone("vit_tiny_patch16_224", input_shape=(3, 32, 32), pretrained=False, img_size=32, patch_size=8)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, net.num_features)
    assert net.describe()["pretrained"] is None


def test_timm_missing_weights_fail_fast_and_name_the_local_file_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="checkpoint_path"):
        TimmBackbone("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    assert time.perf_counter() - start < 10
    with pytest.raises(UserError, match="does not exist"):
        TimmBackbone("vit_tiny_patch16_224", checkpoint_path="/nonexistent/weights.safetensors")


def test_timm_loads_weights_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    net = TimmBackbone("resnet18", input_shape=(3, 32, 32), checkpoint_path=str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    ref.eval(), net.eval()
    assert torch.allclose(net(x), ref(x))
    assert net.describe()["pretrained"].endswith("w.safetensors")
