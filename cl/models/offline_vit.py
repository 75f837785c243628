"""A small ViT pretrained offline on Fashion-MNIST, for pretrained-model methods (MOS, SimpleCIL,
adapters) where no hub weights can be had.

`pretrained_fmnist_vit(path, steps)` trains timm's ViT (28×28 input, 7×7 patches, 6 blocks,
width 128, one channel) for a fixed number of AdamW steps on the full Fashion-MNIST train split
(Debian `dataset-fashion-mnist`), and saves it without its head where
`model.backbone.checkpoint_path` reads it:

    model.backbone.name=vit_tiny_patch16_224 model.backbone.pretrained=true
    model.backbone.checkpoint_path=<path> +model.backbone.img_size=28 +model.backbone.patch_size=7
    +model.backbone.depth=6 +model.backbone.embed_dim=128 +model.backbone.num_heads=4

The same arguments give the same weights; a file already at `path` made with the same settings is
reused (a different one is refused), and the file appears only complete (temporary file, rename).
A preparation step calls it through Hydra (`_target_: cl.models.offline_vit.pretrained_fmnist_vit`).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.errors import UserError

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
ARCH = dict(img_size=28, patch_size=7, depth=6, embed_dim=128, num_heads=4)  # pretrained_fmnist_vit's defaults
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> Tensor:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_fmnist(root: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{split: (uint8 N×1×28×28 images, int64 labels)} from the four IDX files (`.gz` or not) in `root`."""
    folder = Path(root).expanduser()
    found = {}
    for stem in (s for pair in FILES.values() for s in pair):
        found[stem] = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
    if not all(found.values()):
        raise UserError(f"Fashion-MNIST is not in {folder}; install it with `apt-get install dataset-fashion-mnist` "
                        f"(it lands in {FMNIST_ROOT}) or pass fmnist_root=<the folder with its four IDX files> (suites read "
                        "it from $CL_FMNIST_DIR).")
    return {split: (_read_idx(found[img]).unsqueeze(1), _read_idx(found[lab]).long())
            for split, (img, lab) in FILES.items()}


def pretrained_fmnist_vit(path: str, steps: int, seed: int = 0, fmnist_root: str = FMNIST_ROOT,
                          batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                          name: str = "vit_tiny_patch16_224", img_size: int = 28, patch_size: int = 7,
                          depth: int = 6, embed_dim: int = 128, num_heads: int = 4, test_samples: int = 10000) -> str:
    """Train the ViT for `steps` AdamW steps (batch `batch_size`, cosine lr after a 5% warm-up; no
    augmentation, which costs accuracy when training lasts an epoch or two), measure it on the first
    `test_samples` test images, save its weights without the head at `path` (a .pth that timm loads)
    and return `path`."""
    import timm

    path = Path(path).expanduser()
    arch = dict(img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads)
    settings = dict(name=name, steps=steps, seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay, **arch)
    if path.is_file():
        try:
            made = torch.load(path, map_location="cpu", weights_only=True)["pretraining"]
        except Exception:  # noqa: BLE001 - not a torch file, or not one of ours
            raise UserError(f"{path} exists but pretrained_fmnist_vit did not write it; delete it or pass another "
                            "path.") from None
        if {k: made.get(k) for k in settings} != settings:
            differ = [k for k in settings if made.get(k) != settings[k]]
            raise UserError(f"{path} was pretrained with {', '.join(f'{k}={made.get(k)}' for k in differ)}, not "
                            f"{', '.join(f'{k}={settings[k]}' for k in differ)}; delete it or pass another path.")
        print(f"pretrained ViT (Fashion-MNIST): cached {path} ({made['steps']} steps in {made['minutes']:.1f} min, "
              f"test accuracy {made['test_accuracy']:.2%})")
        return str(path)
    data = load_fmnist(fmnist_root)
    x, y = data["train"]
    start = time.time()
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    net.train()
    for _ in range(steps):
        if len(order) < batch_size:  # a new epoch: a fresh permutation from the same generator
            order = torch.randperm(len(y), generator=g)
        idx, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(net(x[idx].float() / 255), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    tx, ty = (t[:test_samples] for t in data["test"])
    with torch.inference_mode():
        correct = sum(int((net(tx[i:i + 1000].float() / 255).argmax(1) == ty[i:i + 1000]).sum())
                      for i in range(0, len(ty), 1000))
    made = dict(settings, minutes=(time.time() - start) / 60, test_accuracy=correct / len(ty))
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": weights, "pretraining": made}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Cannot write {path} ({e.strerror or e}); pass a path in a writable folder.") from None
    print(f"pretrained ViT (Fashion-MNIST): {steps} steps in {made['minutes']:.1f} min, "
          f"test accuracy {made['test_accuracy']:.2%} -> {path}")
    return str(path)


def backbone_overrides(path: str, name: str = "vit_tiny_patch16_224", **arch) -> list[str]:
    """The overrides that load the file at `path` as the backbone of `model=timm` or `model=vit_adapter`
    (`arch`: the architecture it was pretrained with, if not the default)."""
    return [f"model.backbone.name={name}", "model.backbone.pretrained=true", f"model.backbone.checkpoint_path={path}",
            *(f"+model.backbone.{k}={v}" for k, v in {**ARCH, **arch}.items())]
