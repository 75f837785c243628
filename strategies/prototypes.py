"""Class prototypes from a frozen feature extractor: per-class features, their means,
and per-class tables that grow as classes arrive (SimpleCIL, MOS)."""
from __future__ import annotations

import torch
from torch import Tensor

from cl.stream import TensorData
from cl.strategy import Strategy
from strategies.passes import eval_batches


@torch.no_grad()
def class_features(strategy: Strategy, data: TensorData, features, batch_size: int = 256,
                   train_mode: bool = False) -> tuple[Tensor, Tensor]:
    """(features, labels) of `data` under the stream's eval transform, model in eval mode
    (`train_mode=True`: left in train mode, dropout active)."""
    out, labels = [], []
    for batch in eval_batches(strategy, data, batch_size, train_mode):
        out.append(features(batch.x).float())
        labels.append(batch.y)
    return torch.cat(out), torch.cat(labels)


def class_means(feats: Tensor, labels: Tensor, classes) -> Tensor:
    return torch.stack([feats[labels == c].mean(0) for c in classes])


def grow_rows(old: Tensor, n: int) -> Tensor:
    """`old` with zero rows appended up to `n` rows (per-class tables as classes arrive)."""
    new = old.new_zeros((max(n, len(old)), *old.shape[1:]))
    new[: len(old)] = old
    return new
