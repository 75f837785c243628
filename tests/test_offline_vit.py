"""The offline-pretrained ViT: written once (cached), loaded by the suite's overrides, missing data named."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from cl.checks import build
from cl.errors import UserError
from cl.models.offline_vit import backbone_overrides, pretrained_fmnist_vit
from tests import datafiles
from tests.conftest import compose

ARCH = dict(img_size=28, patch_size=7, depth=1, embed_dim=16, num_heads=2)


def test_pretraining_is_cached_and_loads_through_the_suite_overrides(tmp_path, capsys):
    root = datafiles.write_mnist_idx(tmp_path / "fmnist", gz=True, per_class_train=4, per_class_test=2)
    kwargs = {"path": str(tmp_path / "vit" / "w.pth"), "steps": 3, "batch_size": 8, "fmnist_root": str(root), **ARCH}
    step = {"_target_": "cl.models.offline_vit.pretrained_fmnist_vit", **kwargs}
    path = instantiate(step)  # as a suite's preparation step calls it
    assert path == step["path"] and "3 steps" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "vit").iterdir()] == ["w.pth"]  # no temporary file left
    mtime = (tmp_path / "vit" / "w.pth").stat().st_mtime_ns
    assert instantiate(step) == path and "cached" in capsys.readouterr().out
    assert (tmp_path / "vit" / "w.pth").stat().st_mtime_ns == mtime  # not trained again
    with pytest.raises(UserError, match="with steps=3, not steps=4"):  # a file made otherwise is not reused
        pretrained_fmnist_vit(**{**kwargs, "steps": 4})

    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("head.") for k in saved)
    for model in ("timm", "vit_adapter"):  # MOS and SimpleCIL; sequential adapter fine-tuning
        cfg = compose([f"model={model}", *backbone_overrides(path, **ARCH)])
        backbone = build(cfg, "model", input_shape=(1, 28, 28)).backbone
        vit = backbone.model if model == "timm" else backbone.vit
        for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc2.weight", "norm.bias", "pos_embed"):
            assert torch.equal(vit.state_dict()[key], saved[key]), (model, key)


def test_the_same_arguments_give_the_same_weights(tmp_path):
    root = datafiles.write_mnist_idx(tmp_path / "fmnist", gz=False, per_class_train=4, per_class_test=2)
    a, b = (torch.load(pretrained_fmnist_vit(str(tmp_path / n), 2, batch_size=8, fmnist_root=str(root), **ARCH),
                       weights_only=True)["state_dict"] for n in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["patch_embed.proj.weight"], torch.load(  # and other seeds other weights
        pretrained_fmnist_vit(str(tmp_path / "c.pth"), 2, seed=1, batch_size=8, fmnist_root=str(root), **ARCH),
        weights_only=True)["state_dict"]["patch_embed.proj.weight"])


def test_missing_fashion_mnist_names_the_package_and_the_option(tmp_path):
    with pytest.raises(UserError) as e:
        pretrained_fmnist_vit(str(tmp_path / "w.pth"), 2, fmnist_root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "fmnist_root=" in msg and msg.count(". ") == 0
    assert not (tmp_path / "w.pth").exists()
    (tmp_path / "other.pth").write_bytes(b"not a checkpoint")  # a file it did not write is not taken for one
    with pytest.raises(UserError, match="did not write it"):
        pretrained_fmnist_vit(str(tmp_path / "other.pth"), 2, fmnist_root=str(tmp_path / "nowhere"))
