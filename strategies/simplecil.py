"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained
models", 2023): a frozen pretrained backbone and a prototype classifier.

Nothing is trained. After each experience the prototype of each new class is the
mean feature of its training images (under the eval transform, model in eval
mode); prediction is the cosine similarity to every seen prototype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.runtime import eval_mode
from cl.stream import Batch, TensorData
from cl.strategy import Strategy


@torch.no_grad()
def class_features(strategy: Strategy, data: TensorData, features, batch_size: int = 256,
                   train_mode: bool = False) -> tuple[Tensor, Tensor]:
    """(features, labels) of `data` under the stream's eval transform, model in eval mode
    (`train_mode=True`: left in train mode, dropout active)."""
    out, labels = [], []
    with eval_mode(strategy.model):
        if train_mode:
            strategy.model.train()
        for batch in data.batches(batch_size):
            batch = batch.to(strategy.device)
            x = strategy.stream.eval_transform(batch.x) if strategy.stream.eval_transform is not None else batch.x
            out.append(features(x).float())
            labels.append(batch.y)
    return torch.cat(out), torch.cat(labels)


def class_means(feats: Tensor, labels: Tensor, classes) -> Tensor:
    return torch.stack([feats[labels == c].mean(0) for c in classes])


def grow_rows(old: Tensor, n: int) -> Tensor:
    """`old` with zero rows appended up to `n` rows (per-class tables as classes arrive)."""
    new = old.new_zeros((max(n, len(old)), *old.shape[1:]))
    new[: len(old)] = old
    return new


class SimpleCIL(Strategy):
    def __init__(self, model, optimizer, scheduler=None, batch_size: int = 256):
        super().__init__(model, optimizer, scheduler)
        self.batch_size = batch_size
        self.unused = nn.Parameter(torch.zeros(0))  # the engine's optimizer needs a parameter; nothing trains
        self.prototypes: Tensor | None = None

    def setup(self, stream, context=None):
        super().setup(stream, context)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prototypes = torch.zeros(0, self.model.backbone.num_features, device=self.device)

    def train_dataset(self, exp):
        return exp.train.subset(torch.zeros(0, dtype=torch.long))  # no gradient steps

    def parameters_to_optimize(self):
        return [self.unused]

    def after_experience(self, exp):
        super().after_experience(exp)
        feats, labels = class_features(self, exp.train, self.model.features, self.batch_size)
        classes = sorted(exp.classes)
        self.prototypes = grow_rows(self.prototypes, max(classes) + 1)
        self.prototypes[classes] = class_means(feats, labels, classes)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        f = self.model.features(batch.x).float()
        if len(self.prototypes) == 0:
            return f.new_zeros(len(f), 0)
        return F.normalize(f, dim=1) @ F.normalize(self.prototypes, dim=1).T

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prototypes = state["prototypes"].to(self.device)
