"""A strategy's own passes over data (class statistics, a validation score for keep-best,
diagnostics), seeing the data as the evaluator does: the stream's eval transform, the
model in eval mode (restored afterwards)."""
from __future__ import annotations

from typing import Iterator

from cl import distributed
from cl.runtime import eval_mode
from cl.stream import Batch, TensorData
from cl.strategy import Strategy


def eval_batches(strategy: Strategy, data: TensorData, batch_size: int, train_mode: bool = False,
                 shard: bool = False) -> Iterator[Batch]:
    """`data`'s batches on the strategy's device, `x` under the stream's eval transform, model in
    eval mode (`train_mode=True`: left in train mode, dropout active). `shard=True`: this rank's
    share under torchrun (every world-th batch), for counts the caller sums over ranks."""
    start, step = (distributed.rank(), distributed.world()) if shard else (0, 1)
    with eval_mode(strategy.model):
        if train_mode:
            strategy.model.train()
        for batch in data.batches(batch_size, start=start, step=step):
            batch = batch.to(strategy.device)
            if strategy.stream.eval_transform is not None:
                batch.x = strategy.stream.eval_transform(batch.x)
            yield batch
