"""Any timm model as a feature extractor, with weights from the hub or a local file."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from torch import Tensor, nn

from cl.errors import UserError


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of
    sitting through the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(hf_hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hf_hub_id.partition("@")
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def weights_problem(name: str) -> str | None:
    """Why pretrained weights for `name` cannot be had here, or None if they can."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name.split(".")[0]) else None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_reachable() or (hub_id and _cached_hub_file(hub_id)):
        return None
    return (f"Pretrained weights for '{name}' are not in the local cache and the hub is unreachable (or "
            "HF_HUB_OFFLINE=1); download them where there is network (they land in ~/.cache/huggingface) or pass "
            "model.backbone.checkpoint_path=/path/to/weights.safetensors.")


class TimmBackbone(nn.Module):
    """`timm.create_model(name, num_classes=0)`: forward returns the pooled features
    (for ViTs, the [CLS] token after the final norm).

    Weights: `pretrained=true` takes them from the Hugging Face hub (or its local
    cache); `checkpoint_path` takes them from a local file instead. Extra keyword
    arguments go to timm (e.g. `img_size`, `patch_size` for a small ViT).
    """

    def __init__(
        self,
        name: str,
        input_shape=(3, 224, 224),
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        **kwargs,
    ):
        super().__init__()
        import timm

        self.name = name
        kwargs.setdefault("in_chans", input_shape[0])
        overlay = None
        source = None
        if checkpoint_path:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise UserError(
                    f"model.backbone.checkpoint_path={checkpoint_path} does not exist; "
                    "point it at a .safetensors/.pth/.bin file with the weights of "
                    f"'{name}'."
                )
            overlay, pretrained, source = {"file": str(path)}, True, str(path)
        elif pretrained:
            cfg = timm.models.get_pretrained_cfg(name)
            hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            source = f"hf-hub:{hub_id}" if hub_id else f"timm:{name}"
            if not hub_reachable():
                cached = _cached_hub_file(hub_id) if hub_id else None
                if cached is None:
                    raise UserError(weights_problem(name))
                overlay = {"file": cached}
        try:
            self.model = timm.create_model(
                name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
            )
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise UserError(f"timm has no model '{name}'; list them with timm.list_models('*vit*').") from e
            raise
        except OSError as e:
            raise UserError(
                f"Could not load weights for '{name}' ({e.__class__.__name__}); pass "
                "model.backbone.checkpoint_path=/path/to/weights, or set pretrained=false."
            ) from e
        self.pretrained = source if pretrained else None
        self.num_features = self.model.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def describe(self) -> dict:
        return {"backbone": f"timm:{self.name}", "pretrained": self.pretrained}
