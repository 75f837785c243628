"""Scoring token streams (continual pre-training): the mean cross-entropy per target token of
each domain's held-out blocks, and the share of targets the argmax predicts, in one forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.stream import Batch


class TokenLossScorer:
    """Per block (a `TokenBlocks` sample): its mean next-token loss and token accuracy. All
    blocks of a stream have the same length, so the mean over blocks is the mean per token."""

    task_aware = False
    primary = "loss"
    lower_is_better = True
    description = ("mean cross-entropy (nats) per target token of each domain's held-out blocks, "
                   "lower is better; perplexity = exp(loss)")

    def names(self, full: bool) -> tuple[str, ...]:
        return ("loss", "token_accuracy")

    def __call__(self, strategy, batch: Batch, exp, full: bool) -> tuple[float, float]:
        logits = strategy.predict(batch)  # B×L×V
        n, length = batch.y.shape
        loss = F.cross_entropy(logits.reshape(n * length, -1).float(), batch.y.reshape(-1), reduction="none")
        hits = (logits.argmax(-1) == batch.y).to(torch.float64)
        return float(loss.view(n, length).mean(1).double().sum()), float(hits.mean(1).sum())
