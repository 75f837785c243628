"""Joint training, the upper bound: all experiences' train data at once.

Default: nothing is trained until the last experience, which trains on the union
of every experience (so only the last row of the accuracy matrix describes a
trained model). `cumulative=true` instead trains at each experience on everything
seen so far, continuing from the previous model, which gives a meaningful
accuracy matrix and Ā."""
from __future__ import annotations

from cl.stream import Experience, TensorData
from cl.strategy import Strategy


class Joint(Strategy):
    def __init__(self, model, optimizer, scheduler=None, cumulative: bool = False):
        super().__init__(model, optimizer, scheduler)
        self.cumulative = cumulative

    def train_dataset(self, exp: Experience) -> TensorData:
        seen = self.stream.experiences[: exp.index + 1]
        if self.cumulative or exp.index == len(self.stream) - 1:
            return type(exp.train).concat([e.train for e in seen])
        return exp.train.subset([])
