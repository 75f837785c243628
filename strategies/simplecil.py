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

from cl.stream import Batch
from cl.strategy import Strategy
from strategies.prototypes import class_features, class_means, grow_rows


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
