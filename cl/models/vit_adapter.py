"""AdaptFormer-style adapters on a frozen timm ViT, with many adapter sets.

An adapter runs parallel to the MLP of every block. With h the block's state
after the attention residual:

    out = h + MLP(LN2(h)) + s · (W_up · Dropout(ReLU(W_down · h + b_d)) + b_u)

(s = 0.1, bottleneck `ffn_num` = 16, dropout 0.1, no LN inside the adapter).
W_down has Kaiming-uniform(a=√5) init; W_up and both biases are 0, so at init
the model equals the pretrained one.

An adapter *set* is four tensors stacked over the blocks: down_w (L, r, D),
down_b (L, r), up_w (L, D, r), up_b (L, D). `AdapterViT.features(x, adapter)`
runs the ViT with any set (the trainable current one, or a stored snapshot), so
methods that keep one adapter per task (MOS) evaluate any of them without
copying weights into the network. `block_hook(i)` is called before block i's
adapter is applied, and the set's tensors are indexed after it (MOS's
`merge=official` rewrites the set there; a hook that changes values during a
training forward must rebind `.data` rather than write in place, so that
backward sees the values each block used).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_KEYS = ("down_w", "down_b", "up_w", "up_b")


class AdapterSet(nn.Module):
    """The trainable adapter set: one adapter per block, stacked."""

    def __init__(self, depth: int, dim: int, bottleneck: int = 16):
        super().__init__()
        self.down_w = nn.Parameter(torch.empty(depth, bottleneck, dim))
        self.down_b = nn.Parameter(torch.zeros(depth, bottleneck))
        self.up_w = nn.Parameter(torch.zeros(depth, dim, bottleneck))
        self.up_b = nn.Parameter(torch.zeros(depth, dim))
        for i in range(depth):
            nn.init.kaiming_uniform_(self.down_w.data[i], a=math.sqrt(5))

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ADAPTER_KEYS}

    def snapshot(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach().clone() for k in ADAPTER_KEYS}


class AdapterViT(nn.Module):
    """A frozen timm VisionTransformer plus a current `AdapterSet`.

    `vit` is the timm model (num_classes=0); `features` returns its pooled
    pre-logits ([CLS] after the final norm for the usual ViTs)."""

    def __init__(self, vit: nn.Module, bottleneck: int = 16, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise TypeError(f"{type(vit).__name__} is not a timm VisionTransformer")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.scale = scale
        self.dropout = dropout
        self.depth = len(vit.blocks)
        self.dim = vit.num_features
        self.num_features = vit.num_features
        self.adapter = AdapterSet(self.depth, self.dim, bottleneck)

    def features(self, x: Tensor, adapter: dict[str, Tensor] | None = None,
                 block_hook: Callable[[int], None] | None = None) -> Tensor:
        """Pooled features with adapter set `adapter` (None: the plain backbone)."""
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for i, blk in enumerate(vit.blocks):
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            h = x
            x = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
            if adapter is not None:
                if block_hook is not None:
                    block_hook(i)
                a = F.relu(F.linear(h, adapter["down_w"][i], adapter["down_b"][i]))
                a = F.dropout(a, self.dropout, self.training)
                x = x + self.scale * F.linear(a, adapter["up_w"][i], adapter["up_b"][i])
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x, self.adapter.tensors())


def adapter_vit(name: str, input_shape=(3, 224, 224), pretrained: bool = False, checkpoint_path: str | None = None,
                bottleneck: int = 16, scale: float = 0.1, dropout: float = 0.1, **kwargs) -> AdapterViT:
    """A timm ViT (weights as `TimmBackbone` loads them) with one trainable adapter set:
    with `strategy=finetune` this is sequential adapter fine-tuning."""
    from cl.models.timm_backbone import TimmBackbone

    backbone = TimmBackbone(name, input_shape, pretrained, checkpoint_path, **kwargs)
    net = AdapterViT(backbone.model, bottleneck, scale, dropout)
    net.describe = lambda: {**backbone.describe(), "adapters": f"AdaptFormer(ffn_num={bottleneck})"}
    return net
